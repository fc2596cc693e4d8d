"""``freecustom-pipeline``: run, validate, inspect, manifest from-config, demo, customize.

Heavy imports (torch, diffusers, ray) happen inside the commands, so ``--help`` is fast.
Exit codes of ``run``: 0 every row produced every sample; 1 some rows failed (the others
completed); 2 the run could not start (unreadable manifest, bad option, foreign output folder).

For scripts: ``--version``; ``-v`` / ``-q`` on every command (before or after its name);
``validate --json`` and ``inspect --json`` answer with one JSON object on stdout; closed choices
are checked while the command line is parsed (exit 2, before Ray starts); options set in every
run can come from ``FREECUSTOM_*`` environment variables (the command line wins).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli_common import (
    ENV_VARS,
    REFUSALS,
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
from pipeline.cli_tools import (
    BlipCategory,
    BlipTargetCategory,
    CannyHigh,
    CannyLow,
    ClipImageModel,
    ClipTextModel,
    DinoModel,
    ScoreBatch,
    register_tools,
)
from pipeline.examples import write_example_manifest
from pipeline.progress import ProgressLog
from pipeline.run import RunFailed
from pipeline.run import run as run_pipeline
from pipeline.settings import DEFAULT_MODEL, RunSettings
from stages.control import CANNY_HIGH, CANNY_LOW
from stages.family import model_family
from stages.http import HTTP_TIMEOUT_S, MAX_DOWNLOAD_BYTES
from stages.output import ERRORS_FILE, REFERENCES, SHARDS
from stages.params import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_HEIGHT,
    DEFAULT_STEPS,
    DEFAULT_WIDTH,
    GenParams,
)
from stages.score import parse_min_score
from stages.score_models import (
    DEFAULT_CLIP_IMAGE_MODEL,
    DEFAULT_CLIP_TEXT_MODEL,
    DEFAULT_DINO_MODEL,
    ScoreModels,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="FreeCustom multi-concept customization at scale: a Parquet manifest in, WebDataset shards out.",
)
manifest_app = typer.Typer(no_args_is_help=True, help="Build manifests.")
app.add_typer(manifest_app, name="manifest")


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
    "Environment (the command line wins): "
    + ", ".join(f"{var} (--{option.replace('_', '-')})" for option, var in ENV_VARS.items())
    + "; FREECUSTOM_ALLOW_ROOT holds folders separated by spaces."
)
def run(
    ctx: typer.Context,
    manifest: Annotated[str, typer.Argument(help="Parquet manifest (path or pyarrow-filesystem URI).")],
    out: Annotated[str, typer.Option("-o", "--out", help="Output folder (shards, errors, stats).")],
    model: Annotated[
        str,
        typer.Option(
            envvar=ENV_VARS["model"],
            help="SD1.5/SD2-family model: hub id, diffusers folder, or a single .safetensors checkpoint.",
        ),
    ] = DEFAULT_MODEL,
    model_config: Annotated[
        str | None,
        typer.Option(
            help="A single-file --model's local diffusers config folder (default: the SD1.5 config the "
            "package ships); loading never goes online."
        ),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            help="LoRA adapter PATH_OR_ID[:SCALE] (safetensors; repeatable) for every row; a row's loras "
            "column replaces the set."
        ),
    ] = None,
    controlnet: Annotated[
        list[str] | None,
        typer.Option(
            help="ControlNet id or folder (repeatable: several ControlNets, in this order); every row then needs "
            "a control (or controls, one per ControlNet) in the manifest."
        ),
    ] = None,
    canny_low: CannyLow = CANNY_LOW,
    canny_high: CannyHigh = CANNY_HIGH,
    control_references: Annotated[
        bool,
        typer.Option(help="The release's references through ControlNet (K/V per concept set and control image); "
                     "a row's control_references column wins."),
    ] = False,
    num_inference_steps: Annotated[
        int | None,
        typer.Option(help=f"Denoising steps (rows may override) [default: the model family's: {DEFAULT_STEPS}; "
                          "FLUX.1 28]."),
    ] = None,
    height: Annotated[
        int | None,
        typer.Option(help=f"Image height, multiple of 8 (rows may override) [default: the model family's: "
                          f"{DEFAULT_HEIGHT}; SDXL, FLUX.1 1024]."),
    ] = None,
    width: Annotated[
        int | None,
        typer.Option(help=f"Image width, multiple of 8 (rows may override) [default: as --height's, {DEFAULT_WIDTH} "
                          "for SD1.5]."),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(help=f"Classifier-free guidance scale [default: {DEFAULT_GUIDANCE_SCALE}; FLUX.1: its embedded "
                          "guidance, 3.5, set per run]."),
    ] = None,
    root: Annotated[
        str | None,
        typer.Option(help="Folder relative input paths resolve against (default: the manifest's)."),
    ] = None,
    kv_cache: Annotated[
        str | None,
        typer.Option(envvar=ENV_VARS["kv_cache"], help="Persistent reference K/V cache: reruns reuse it."),
    ] = None,
    samples_per_shard: Annotated[int, typer.Option(min=1, help="Samples per tar shard.")] = 256,
    image_format: Annotated[ImageFormat, typer.Option(help="Image encoding in the shards.")] = "png",
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address ('auto', 'ray://host:10001'); default: a local Ray."),
    ] = None,
    gpus_per_worker: Annotated[
        float, typer.Option(min=0, envvar=ENV_VARS["gpus_per_worker"], help="GPUs per generation actor.")
    ] = 1.0,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Targets per UNet batch (default 8; part of the output identity: a resumed run batches as the first).",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an output folder made with other settings.")
    ] = False,
    allow_root: Annotated[
        list[str] | None,
        typer.Option(
            envvar=ENV_VARS["allow_root"],
            help="Only read inputs under this folder (repeatable; the variable: folders separated by spaces).",
        ),
    ] = None,
    max_workers: Annotated[
        int | None,
        typer.Option(min=1, envvar=ENV_VARS["max_workers"], help="At most this many generation actors."),
    ] = None,
    cpus_per_worker: Annotated[
        float, typer.Option(min=0.1, help="CPUs per model actor (torch threads on CPU-only runs).")
    ] = 1.0,
    dtype: Annotated[
        Dtype,
        typer.Option(envvar=ENV_VARS["dtype"], help="Model precision; auto: float16 on GPU, float32 on CPU."),
    ] = "auto",
    scheduler: Annotated[
        str | None,
        typer.Option(
            envvar=ENV_VARS["scheduler"], help="Diffusers scheduler class, e.g. DPMSolverMultistepScheduler."
        ),
    ] = None,
    channels_last: Annotated[
        bool,
        typer.Option(
            help="Channels-last UNet/VAE weights: faster convolutions on recent GPUs; "
            "equal to the default layout within float rounding, not bit for bit."
        ),
    ] = False,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the generation UNet: faster denoising after a "
            "one-off compile per actor; equal within float rounding, not bit for bit.",
        ),
    ] = False,
    mask_policy: Annotated[
        MaskPolicy,
        typer.Option(help="When a concept has no mask source: fail its row, or use the whole image."),
    ] = "fail",
    sam_checkpoint: Annotated[
        str | None,
        typer.Option(
            envvar=ENV_VARS["sam_checkpoint"],
            help="SAM checkpoint (path or URL; safetensors or weights-only torch).",
        ),
    ] = None,
    sam_model_type: Annotated[
        SamModelType,
        typer.Option(envvar=ENV_VARS["sam_model_type"], help="SAM architecture of the checkpoint."),
    ] = "vit_b",
    detector: Annotated[
        str | None,
        typer.Option(
            envvar=ENV_VARS["detector"],
            help="Zero-shot detector (hub id or folder) for text-grounded masks.",
        ),
    ] = None,
    max_pixels: Annotated[int, typer.Option(help="Refuse input images above this many pixels.")] = 64_000_000,
    reference_actors: Annotated[
        ReferenceActors,
        typer.Option(
            help="Who computes reference K/V: auto (the generation actor itself when "
            "the run has one: one model load; else a reference actor pool first) | "
            "always (the pool) | never (the generation actors). Same output either way."
        ),
    ] = "auto",
    reuse: Annotated[
        list[str] | None,
        typer.Option(
            help="A previous output folder (repeatable): samples whose reproducibility record (model and "
            "weights, every parameter, concept digests, prompt, seed, format) equals one there are copied "
            "from it byte for byte instead of rendered."
        ),
    ] = None,
    device: Annotated[
        Device,
        typer.Option(
            envvar=ENV_VARS["device"],
            help="cuda: model actors request --gpus-per-worker GPUs whatever the cluster has now (an autoscaler "
            "adds GPU nodes; the run waits up to --gpu-wait) | cpu: no GPU anywhere | auto: cuda when the "
            "cluster has a GPU at start, else cpu.",
        ),
    ] = "auto",
    gpu_wait: Annotated[
        float,
        typer.Option(min=0, help="Seconds --device cuda waits for a GPU node before it stops (exit 2)."),
    ] = 3600.0,
    http_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds per http(s) concept image read, connect to last byte.")
    ] = HTTP_TIMEOUT_S,
    max_download_bytes: Annotated[
        int, typer.Option(min=1, help="Refuse an http(s) concept image larger than this many bytes.")
    ] = MAX_DOWNLOAD_BYTES,
    score: Annotated[
        bool,
        typer.Option(
            "--score",
            help="Score every sample (dino, dino_paper, dino_masked, clip_i per concept; clip_t) after "
            "generation: in each sample's JSON (scores) and as columns of the shard Parquet.",
        ),
    ] = False,
    min_score: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=VALUE (repeatable; implies --score): a sample below it (a per-concept score's minimum "
            "over concepts) goes to rejected/ and rejected.parquet instead of shards/.",
        ),
    ] = None,
    dino_model: DinoModel = DEFAULT_DINO_MODEL,
    clip_image_model: ClipImageModel = DEFAULT_CLIP_IMAGE_MODEL,
    clip_text_model: ClipTextModel = DEFAULT_CLIP_TEXT_MODEL,
    score_batch_size: ScoreBatch = 16,
    blip_subject: Annotated[
        str | None,
        typer.Option(help="BLIP-Diffusion --model: the subject image every target prompt gets (path or URI)."),
    ] = None,
    blip_category: BlipCategory = None,
    blip_target_category: BlipTargetCategory = None,
    save_attention: Annotated[
        bool,
        typer.Option(
            "--save-attention",
            help="Also write KEY.attn.png per sample (a WebDataset field): one heat-map panel per "
            "concept, left to right in concept order, each the image's size (the attention mass the image gives that concept's "
            "reference tokens, averaged over the MRSA layers and steps; 0 black .. 1 white).",
        ),
    ] = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Render every (row, seed) of MANIFEST into OUT; rerun the same command to resume."""

    quiet = set_voice(ctx, verbose, quiet)
    try:
        # the model family's defaults (stages.family: SD1.5's are GenParams'), then the options given
        defaults = model_family(model, model_config).defaults(
            num_inference_steps=num_inference_steps, height=height, width=width, guidance_scale=guidance_scale,
            loras=tuple(parse_lora_option(spec) for spec in lora or ()) or None,
        )
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
            if score or min_score
            else None,
            min_score=tuple(parse_min_score(spec) for spec in min_score or ()),
            blip_subject=path_or_uri(blip_subject) if blip_subject else None,
            blip_category=blip_category,
            blip_target_category=blip_target_category,
            save_attention=save_attention,
            controlnet=tuple(controlnet or ()),
            canny_low=canny_low,
            canny_high=canny_high,
            control_references=control_references,
        )
    except (ValueError, OSError) as e:  # OSError: storage named by -o / --kv-cache unreachable
        fail(str(e))
    try:
        summary = _run_with_progress(run_pipeline, settings, *REFUSALS, quiet=quiet)
    except RunFailed as e:
        fail(str(e), code=1)
    _print_summary(summary, quiet)
    raise typer.Exit(summary.exit_code)


def _run_with_progress(run_pipeline, settings, *refusals, quiet: bool = False):
    """On a terminal a rich bar; in a job log (stderr not a terminal) plain ``ProgressLog`` lines.
    Ray's one known noise line is filtered out of stderr (``pipeline.quiet``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline.quiet import filter_native_stderr

    filter_native_stderr()

    if not quiet and not sys.stderr.isatty():
        with ProgressLog() as log:
            try:
                return run_pipeline(settings, progress=log)
            except refusals as e:
                fail(str(e))
            except (ValueError, FileNotFoundError) as e:
                fail(str(e))
    with Progress(
        TextColumn("[bold]shards"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
        disable=quiet or not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task("shards", total=None)

        def on_shard(marker, done, total):
            progress.update(task, completed=done, total=total)

        try:
            return run_pipeline(settings, on_shard=on_shard)
        except refusals as e:
            progress.stop()
            fail(str(e))
        except (ValueError, FileNotFoundError) as e:
            progress.stop()
            fail(str(e))


def _print_summary(summary, quiet: bool) -> None:
    """The stats table on stdout; failed rows after it (on stderr, without the table, under -q)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=quiet)
    if not quiet:
        s = summary.stats
        table = Table(title=f"freecustom-pipeline: {summary.out}", show_header=False)
        for key in (
            "rows",
            "rows_valid",
            "rows_failed",
            "samples_expected",
            "samples_written",
            *(["samples_rejected"] if "samples_rejected" in summary.stats else []),
            "samples_generated_this_run",
            "shards",
            "concept_sets",
            "reference_passes",
            "images_per_second",
            "seconds_total",
        ):
            table.add_row(key, str(s.get(key)))
        console.print(table)
    for e in summary.errors[:20]:
        console.print(
            f"[red]failed[/red] row {e['row']} (id={e['id']}): {e['stage']}: {e['field']}: {e['reason']}"
        )
    if summary.failed > 20:
        console.print(f"... and {summary.failed - 20} more in {summary.out}/{ERRORS_FILE}")


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
    summary = _run_with_progress(run_pipeline, settings, *REFUSALS, quiet=quiet)
    _print_summary(summary, quiet)
    say(
        f"\nshards:     {summary.out}/{SHARDS}/\nreferences: {summary.out}/{REFERENCES}/ (contact sheets)\n"
        f"inspect:    freecustom-pipeline inspect {summary.out}",
        quiet,
    )
    raise typer.Exit(summary.exit_code)


register_tools(app, manifest_app)


if __name__ == "__main__":
    app()
