"""``freecustom-pipeline``: run, validate, inspect, manifest from-config / build, demo, customize.

Heavy imports (torch, diffusers, ray) happen inside the commands, so ``--help`` is fast.
Exit codes of ``run``: 0 every row produced every sample; 1 some rows failed (the others
completed); 2 the run could not start (unreadable manifest, bad option, foreign output folder).

For scripts: ``--version``; ``-v`` / ``-q`` on every command (before or after its name);
``validate --json`` and ``inspect --json`` answer with one JSON object on stdout; closed choices
are checked while the command line is parsed (exit 2, before Ray starts); options set in every
run can come from ``FREECUSTOM_*`` environment variables (the command line wins).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli_build import EPILOG as BUILD_EPILOG
from pipeline.cli_build import build as build_manifest_command
from pipeline.cli_common import (
    ENV_VARS,
    PANEL_CLUSTER,
    PANEL_CONTROLNET,
    PANEL_GENERATION,
    PANEL_INPUT,
    PANEL_MODEL,
    PANEL_OUTPUT,
    PANEL_QUALITY,
    REFUSALS,
    App,
    Device,
    Dtype,
    ImageFormat,
    MaskPolicy,
    Quiet,
    ReferenceActors,
    SamModelType,
    Verbose,
    fail,
    parse_lora_option,
    path_or_uri,
    print_version,
    say,
    set_voice,
)
from pipeline.cli_config import ConfigFile, PrintConfig, effective_config
from pipeline.cli_export import register_export
from pipeline.cli_progress import print_summary, run_with_progress
from pipeline.cli_quality import ClipImageModel, ClipTextModel, DinoModel, ScoreBatch
from pipeline.cli_tools import BlipCategory, BlipTargetCategory, CannyHigh, CannyLow, register_tools
from pipeline.examples import write_example_manifest
from pipeline.run import RunFailed
from pipeline.run import run as run_pipeline
from pipeline.settings import DEFAULT_MODEL, RunSettings
from stages.inputs.control import CANNY_HIGH, CANNY_LOW
from stages.inputs.http import HTTP_TIMEOUT_S, MAX_DOWNLOAD_BYTES
from stages.output.layout import REFERENCES, SHARDS
from stages.params import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_HEIGHT,
    DEFAULT_STEPS,
    DEFAULT_WIDTH,
    GenParams,
)
from stages.reference.family import model_family
from stages.scoring.score import SCORE_NAMES, parse_min_score, threshold_name
from stages.scoring.score_models import (
    DEFAULT_CLIP_IMAGE_MODEL,
    DEFAULT_CLIP_TEXT_MODEL,
    DEFAULT_DINO_MODEL,
    ScoreModels,
)

app = App(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="FreeCustom multi-concept customization at scale: a Parquet manifest in, WebDataset shards out.",
)
manifest_app = App(no_args_is_help=True, help="Build manifests.")
app.add_typer(manifest_app, name="manifest")
manifest_app.command("build", epilog=BUILD_EPILOG)(build_manifest_command)


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    set_voice(ctx, verbose, quiet)


# --------------------------------------------------------------------------- run


@app.command(
    epilog="Examples:\n\n    freecustom-pipeline run manifest.parquet -o out/\n\n"
    "    freecustom-pipeline run s3://bucket/m.parquet -o /mnt/shared/out --address auto --kv-cache /mnt/shared/kv\n\n"
    "    FREECUSTOM_MODEL=/models/sd15 FREECUSTOM_KV_CACHE=/mnt/shared/kv freecustom-pipeline run m.parquet -o out/ -q\n\n"
    "    freecustom-pipeline run m.parquet -o out/ --config nightly.yaml --print-config > effective.yaml\n\n"
    "Where a setting comes from, the first that has it wins: the command line, the environment, "
    "--config FILE, the defaults. Environment: "
    + ", ".join(f"{var} (--{option.replace('_', '-')})" for option, var in ENV_VARS.items())
    + "; FREECUSTOM_ALLOW_ROOT holds folders separated by spaces."
)
def run(
    ctx: typer.Context,
    manifest: Annotated[str, typer.Argument(help="Parquet manifest (path or pyarrow-filesystem URI).")],
    # ---- input
    root: Annotated[
        str | None,
        typer.Option(help="Folder relative input paths resolve against [default: the manifest's].",
                     rich_help_panel=PANEL_INPUT),
    ] = None,
    allow_root: Annotated[
        list[str] | None,
        typer.Option(envvar=ENV_VARS["allow_root"], help="Only read inputs under this folder (repeatable).",
                     rich_help_panel=PANEL_INPUT),
    ] = None,
    mask_policy: Annotated[
        MaskPolicy,
        typer.Option(help="A concept without any mask source: fail its row, or use the whole image.",
                     rich_help_panel=PANEL_INPUT),
    ] = "fail",
    sam_checkpoint: Annotated[
        str | None,
        typer.Option(envvar=ENV_VARS["sam_checkpoint"], help="SAM checkpoint for box/points masks (path or URL).",
                     rich_help_panel=PANEL_INPUT),
    ] = None,
    sam_model_type: Annotated[
        SamModelType,
        typer.Option(envvar=ENV_VARS["sam_model_type"], help="SAM architecture of the checkpoint.",
                     rich_help_panel=PANEL_INPUT),
    ] = "vit_b",
    detector: Annotated[
        str | None,
        typer.Option(envvar=ENV_VARS["detector"], help="Zero-shot detector (hub id or folder) for label masks.",
                     rich_help_panel=PANEL_INPUT),
    ] = None,
    max_pixels: Annotated[
        int, typer.Option(help="Refuse input images above this many pixels.", rich_help_panel=PANEL_INPUT)
    ] = 64_000_000,
    http_timeout: Annotated[
        float,
        typer.Option(min=0.1, help="Seconds per http(s) concept image read.", rich_help_panel=PANEL_INPUT),
    ] = HTTP_TIMEOUT_S,
    max_download_bytes: Annotated[
        int,
        typer.Option(min=1, help="Refuse an http(s) concept image larger than this.", rich_help_panel=PANEL_INPUT),
    ] = MAX_DOWNLOAD_BYTES,
    passthrough: Annotated[
        list[str] | None,
        typer.Option(help="A column kept as pass-through though near a known name (repeatable; x_* always).",
                     rich_help_panel=PANEL_INPUT),
    ] = None,
    # ---- model
    model: Annotated[
        str,
        typer.Option(
            envvar=ENV_VARS["model"],
            help="SD1.x/2.x, SDXL, BLIP-Diffusion or FLUX.1: hub id, diffusers folder or .safetensors file.",
            rich_help_panel=PANEL_MODEL,
        ),
    ] = DEFAULT_MODEL,
    model_config: Annotated[
        str | None,
        typer.Option(help="A single-file --model's diffusers config folder [default: SD1.5's, shipped].",
                     rich_help_panel=PANEL_MODEL),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(help="LoRA adapter PATH_OR_ID[:SCALE] for every row (repeatable).", rich_help_panel=PANEL_MODEL),
    ] = None,
    dtype: Annotated[
        Dtype,
        typer.Option(envvar=ENV_VARS["dtype"], help="Precision; auto: float16 on GPU, float32 on CPU.",
                     rich_help_panel=PANEL_MODEL),
    ] = "auto",
    scheduler: Annotated[
        str | None,
        typer.Option(envvar=ENV_VARS["scheduler"], help="Scheduler NAME[:key=value,...] [default: the release's DDIM].",
                     rich_help_panel=PANEL_MODEL),
    ] = None,
    channels_last: Annotated[
        bool,
        typer.Option(help="Channels-last weights: faster on recent GPUs, equal within rounding.",
                     rich_help_panel=PANEL_MODEL),
    ] = False,
    compile: Annotated[
        bool,
        typer.Option("--compile/--no-compile", help="torch.compile the generation UNet (equal within rounding).",
                     rich_help_panel=PANEL_MODEL),
    ] = False,
    blip_subject: Annotated[
        str | None,
        typer.Option(help="BLIP-Diffusion: the subject image of rows without a blip_subject column.",
                     rich_help_panel=PANEL_MODEL),
    ] = None,
    blip_category: BlipCategory = None,
    blip_target_category: BlipTargetCategory = None,
    blip_subject_references: Annotated[
        bool,
        typer.Option(help="BLIP-Diffusion: the references' prompts get the subject too (the release's).",
                     rich_help_panel=PANEL_MODEL),
    ] = True,
    # ---- generation
    num_inference_steps: Annotated[
        int | None,
        typer.Option(help=f"Denoising steps [default: the family's, {DEFAULT_STEPS}; FLUX.1 28].",
                     rich_help_panel=PANEL_GENERATION),
    ] = None,
    height: Annotated[
        int | None,
        typer.Option(help=f"Image height, a multiple of 8 [default: {DEFAULT_HEIGHT}; SDXL, FLUX.1 1024].",
                     rich_help_panel=PANEL_GENERATION),
    ] = None,
    width: Annotated[
        int | None,
        typer.Option(help=f"Image width, a multiple of 8 [default: {DEFAULT_WIDTH}; SDXL, FLUX.1 1024].",
                     rich_help_panel=PANEL_GENERATION),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(help=f"Guidance scale [default: {DEFAULT_GUIDANCE_SCALE}; FLUX.1 3.5, embedded].",
                     rich_help_panel=PANEL_GENERATION),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Targets per UNet batch [default: 8].", rich_help_panel=PANEL_GENERATION),
    ] = None,
    reference_actors: Annotated[
        ReferenceActors,
        typer.Option(help="Who computes reference K/V: auto, always (a pool), never (generation actors).",
                     rich_help_panel=PANEL_GENERATION),
    ] = "auto",
    # ---- ControlNet
    controlnet: Annotated[
        list[str] | None,
        typer.Option(help="ControlNet id or folder (repeatable); rows then need a control.",
                     rich_help_panel=PANEL_CONTROLNET),
    ] = None,
    canny_low: CannyLow = CANNY_LOW,
    canny_high: CannyHigh = CANNY_HIGH,
    control_references: Annotated[
        bool,
        typer.Option(help="References through ControlNet too, as the release (K/V per condition).",
                     rich_help_panel=PANEL_CONTROLNET),
    ] = False,
    # ---- quality
    score: Annotated[
        bool,
        typer.Option("--score/--no-score", help="Score every sample (dino..., clip_i, clip_t) after generation.",
                     rich_help_panel=PANEL_QUALITY),
    ] = False,
    min_score: Annotated[
        list[str] | None,
        typer.Option(help="NAME=VALUE or NAME<VALUE (repeatable; implies --score): outside goes to rejected/.",
                     rich_help_panel=PANEL_QUALITY),
    ] = None,
    dino_model: DinoModel = DEFAULT_DINO_MODEL,
    clip_image_model: ClipImageModel = DEFAULT_CLIP_IMAGE_MODEL,
    clip_text_model: ClipTextModel = DEFAULT_CLIP_TEXT_MODEL,
    score_batch_size: ScoreBatch = 16,
    save_attention: Annotated[
        bool,
        typer.Option("--save-attention/--no-save-attention", help="Also write KEY.attn.png: where each concept landed.",
                     rich_help_panel=PANEL_QUALITY),
    ] = False,
    embed_references: Annotated[
        bool,
        typer.Option("--embed-references/--no-embed-references", help="Also write KEY.ref{i}.png, KEY.ref{i}.mask.png: the references as fed.",
                     rich_help_panel=PANEL_QUALITY),
    ] = False,
    annotate: Annotated[
        bool,
        typer.Option("--annotate/--no-annotate", help="Also write per concept a box, mask, confidence; presence and overlap.",
                     rich_help_panel=PANEL_QUALITY),
    ] = False,
    # ---- cluster and storage
    address: Annotated[
        str | None,
        typer.Option(help="Ray address ('auto', 'ray://host:10001') [default: RAY_ADDRESS, else a local Ray].",
                     rich_help_panel=PANEL_CLUSTER),
    ] = None,
    device: Annotated[
        Device,
        typer.Option(envvar=ENV_VARS["device"], help="cuda: request GPUs (and wait) | cpu | auto: cuda if the "
                     "cluster has a GPU.", rich_help_panel=PANEL_CLUSTER),
    ] = "auto",
    gpus_per_worker: Annotated[
        float,
        typer.Option(min=0, envvar=ENV_VARS["gpus_per_worker"], help="GPUs per generation actor.",
                     rich_help_panel=PANEL_CLUSTER),
    ] = 1.0,
    cpus_per_worker: Annotated[
        float,
        typer.Option(min=0.1, help="CPUs per model actor (torch threads on CPU).", rich_help_panel=PANEL_CLUSTER),
    ] = 1.0,
    max_workers: Annotated[
        int | None,
        typer.Option(min=1, envvar=ENV_VARS["max_workers"], help="At most this many generation actors.",
                     rich_help_panel=PANEL_CLUSTER),
    ] = None,
    gpu_wait: Annotated[
        float,
        typer.Option(min=0, help="Seconds --device cuda waits for a GPU node (then exit 2).",
                     rich_help_panel=PANEL_CLUSTER),
    ] = 3600.0,
    kv_cache: Annotated[
        str | None,
        typer.Option(envvar=ENV_VARS["kv_cache"], help="Persistent reference K/V cache (path or URI).",
                     rich_help_panel=PANEL_CLUSTER),
    ] = None,
    # ---- output (-o is required: `...`, declared here for the panels' order)
    out: Annotated[
        str, typer.Option("-o", "--out", help="Output folder (path or URI).", rich_help_panel=PANEL_OUTPUT)
    ] = ...,
    samples_per_shard: Annotated[
        int, typer.Option(min=1, help="Samples per tar shard.", rich_help_panel=PANEL_OUTPUT)
    ] = 256,
    image_format: Annotated[
        ImageFormat, typer.Option(help="Image encoding in the shards.", rich_help_panel=PANEL_OUTPUT)
    ] = "png",
    overwrite: Annotated[
        bool, typer.Option(help="Replace an output folder made with other settings.", rich_help_panel=PANEL_OUTPUT)
    ] = False,
    reuse: Annotated[
        list[str] | None,
        typer.Option(help="A previous output (repeatable): equal samples are copied, not rendered.",
                     rich_help_panel=PANEL_OUTPUT),
    ] = None,
    # ---- the settings themselves
    config: ConfigFile = None,
    print_config: PrintConfig = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Render every (row, seed) of MANIFEST into OUT; rerun the same command to resume."""

    quiet = set_voice(ctx, verbose, quiet)
    if print_config:
        typer.echo(effective_config(ctx), nl=False)
        raise typer.Exit(0)
    try:
        # the model family's defaults (stages.reference.family: SD1.5's are GenParams'), then the options given
        defaults = model_family(model, model_config).defaults(
            num_inference_steps=num_inference_steps, height=height, width=width, guidance_scale=guidance_scale,
            loras=tuple(parse_lora_option(spec) for spec in lora or ()) or None,
        )
        thresholds = tuple(parse_min_score(spec) for spec in min_score or ())
        settings = RunSettings(
            manifest=manifest,
            out=path_or_uri(out),
            model=model,
            model_config=model_config,
            defaults=defaults,
            root=root,
            allow_roots=tuple(allow_root or ()),
            max_pixels=max_pixels,
            kv_cache=path_or_uri(kv_cache) if kv_cache else None,
            samples_per_shard=samples_per_shard,
            image_format=image_format.value,
            address=address,
            gpus_per_worker=gpus_per_worker,
            max_workers=max_workers,
            cpus_per_worker=cpus_per_worker,
            batch_size=batch_size,
            overwrite=overwrite,
            dtype=dtype.value,
            scheduler=scheduler,
            channels_last=channels_last,
            compile=compile,
            mask_policy=mask_policy.value,
            sam_checkpoint=sam_checkpoint,
            sam_model_type=sam_model_type.value,
            detector=detector,
            reference_actors=reference_actors.value,
            reuse=tuple(path_or_uri(p) for p in reuse or ()),
            device=device.value,
            gpu_wait=gpu_wait,
            http_timeout=http_timeout,
            max_download_bytes=max_download_bytes,
            score_models=ScoreModels(dino_model, clip_image_model, clip_text_model, batch_size=score_batch_size)
            if score or any(threshold_name(name) in SCORE_NAMES for name, _ in thresholds)
            else None,
            min_score=thresholds,
            blip_subject=path_or_uri(blip_subject) if blip_subject else None,
            blip_category=blip_category,
            blip_target_category=blip_target_category,
            blip_subject_references=blip_subject_references,
            save_attention=save_attention,
            embed_references=embed_references,
            annotate=annotate,
            controlnet=tuple(controlnet or ()),
            canny_low=canny_low,
            canny_high=canny_high,
            control_references=control_references,
            passthrough=tuple(passthrough or ()),
        )
    except (ValueError, OSError) as e:  # OSError: storage named by -o / --kv-cache unreachable
        fail(str(e))
    try:
        summary = run_with_progress(run_pipeline, settings, *REFUSALS, quiet=quiet)
    except RunFailed as e:
        fail(str(e), code=1)
    print_summary(summary, quiet)
    raise typer.Exit(summary.exit_code)


# --------------------------------------------------------------------------- validate, inspect


@app.command(epilog="Example:\n\n    freecustom-pipeline demo -o out/demo")
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the demo's inputs and outputs.")],
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 10,
    size: Annotated[int, typer.Option(help="Image side in pixels (multiple of 8).")] = 128,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """End to end on a built-in example: a tiny random-weight SD1.5-topology model, drawn concept images,
    copy-paste context composites, the real Ray pipeline. Images are noise-like (random weights): the
    demo shows the machinery, not quality."""
    from pipeline.tiny_model import build_tiny_sd15

    quiet = set_voice(ctx, verbose, quiet)
    inputs = out / "inputs"
    model_dir = inputs / "tiny-sd15"
    if not (model_dir / "model_index.json").exists():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Writing model shards" for a model of kilobytes
        build_tiny_sd15(model_dir)
    manifest = write_example_manifest(inputs)
    settings = RunSettings(
        manifest=str(manifest),
        out=str(out / "run"),
        model=str(model_dir),
        defaults=GenParams(num_inference_steps=steps, height=size, width=size),
        samples_per_shard=4,
    )
    summary = run_with_progress(run_pipeline, settings, *REFUSALS, quiet=quiet)
    print_summary(summary, quiet)
    say(
        f"\nshards:     {summary.out}/{SHARDS}/\nreferences: {summary.out}/{REFERENCES}/ (contact sheets)\n"
        f"model:      {model_dir} (the tiny random-weight model: --model for the commands below)\n"
        f"manifest:   {manifest}\n"
        f"inspect:    freecustom-pipeline inspect {summary.out}\n"
        f"run again:  freecustom-pipeline run {manifest} -o {out / 'run-again'} --model {model_dir} "
        f"--num-inference-steps {steps} --height {size} --width {size}",
        quiet,
    )
    raise typer.Exit(summary.exit_code)


register_tools(app, manifest_app)
register_export(app)


if __name__ == "__main__":
    app()
