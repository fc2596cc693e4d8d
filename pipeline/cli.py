"""``freecustom-pipeline``: run, validate, inspect, manifest from-config, demo.

Heavy imports (torch, diffusers, ray) happen inside the commands, so ``--help`` is fast.
Exit codes of ``run``: 0 every row produced every sample; 1 some rows failed (the others
completed); 2 the run could not start (unreadable manifest, bad option, foreign output folder).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.examples import write_example_manifest
from pipeline.from_config import ConfigImportError, manifest_from_configs, write_manifest
from pipeline.manifest import ManifestError, manifest_base_dir, read_manifest
from pipeline.run import RunFailed
from pipeline.run import run as run_pipeline
from pipeline.settings import DEFAULT_MODEL, RunSettings
from pipeline.validate import ManifestValidation, format_problem
from stages.inputs import InputSettings
from stages.output import ERRORS_FILE, REFERENCES, RUN_FILE, SHARDS, STATS_FILE, OutputFolder, OutputRefused
from stages.params import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_HEIGHT,
    DEFAULT_STEPS,
    DEFAULT_WEIGHT,
    DEFAULT_WIDTH,
    GenParams,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="FreeCustom multi-concept customization at scale: a Parquet manifest in, WebDataset shards out.")
manifest_app = typer.Typer(no_args_is_help=True, help="Build manifests.")
app.add_typer(manifest_app, name="manifest")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command(epilog="Examples:\n\n    freecustom-pipeline run manifest.parquet -o out/\n\n"
             "    freecustom-pipeline run s3://bucket/m.parquet -o /mnt/shared/out --address auto --kv-cache /mnt/shared/kv")
def run(
    manifest: Annotated[str, typer.Argument(help="Parquet manifest (path or pyarrow-filesystem URI).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (shards, errors, stats).")],
    model: Annotated[str, typer.Option(help="Diffusers SD1.5-family model: hub id or local folder.")] = DEFAULT_MODEL,
    num_inference_steps: Annotated[int, typer.Option(help="Denoising steps (rows may override).")] = DEFAULT_STEPS,
    height: Annotated[int, typer.Option(help="Image height, multiple of 8 (rows may override).")] = DEFAULT_HEIGHT,
    width: Annotated[int, typer.Option(help="Image width, multiple of 8 (rows may override).")] = DEFAULT_WIDTH,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = DEFAULT_GUIDANCE_SCALE,
    root: Annotated[str | None, typer.Option(help="Folder relative input paths resolve against (default: the manifest's).")] = None,
    kv_cache: Annotated[Path | None, typer.Option(help="Persistent reference K/V cache: reruns reuse it.")] = None,
    samples_per_shard: Annotated[int, typer.Option(min=1, help="Samples per tar shard.")] = 256,
    image_format: Annotated[str, typer.Option(help="png | jpg | webp.")] = "png",
    address: Annotated[str | None, typer.Option(help="Ray cluster address ('auto', 'ray://host:10001'); default: a local Ray.")] = None,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per generation actor.")] = 1.0,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Targets per UNet batch (default 8; part of the output identity: a resumed run batches as the first).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an output folder made with other settings.")] = False,
    allow_root: Annotated[list[str] | None, typer.Option(help="Only read inputs under this folder (repeatable).")] = None,
    max_workers: Annotated[int | None, typer.Option(min=1, help="At most this many generation actors.")] = None,
    cpus_per_worker: Annotated[float, typer.Option(min=0.1, help="CPUs per model actor (torch threads on CPU-only runs).")] = 1.0,
    dtype: Annotated[str, typer.Option(help="auto (fp16 on GPU, fp32 on CPU) | float16 | bfloat16 | float32.")] = "auto",
    scheduler: Annotated[str | None, typer.Option(help="Diffusers scheduler class, e.g. DPMSolverMultistepScheduler.")] = None,
    channels_last: Annotated[bool, typer.Option(help="Channels-last UNet/VAE weights: faster convolutions on recent GPUs; "
                                                     "equal to the default layout within float rounding, not bit for bit.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the generation UNet: faster denoising after a "
                                          "one-off compile per actor; equal within float rounding, not bit for bit.")] = False,
    mask_policy: Annotated[str, typer.Option(help="When a concept has no mask source: fail | whole_image.")] = "fail",
    sam_checkpoint: Annotated[str | None, typer.Option(help="SAM checkpoint (path or URL; safetensors or weights-only torch).")] = None,
    sam_model_type: Annotated[str, typer.Option(help="vit_b | vit_l | vit_h.")] = "vit_b",
    detector: Annotated[str | None, typer.Option(help="Zero-shot detector (hub id or folder) for text-grounded masks.")] = None,
    max_pixels: Annotated[int, typer.Option(help="Refuse input images above this many pixels.")] = 64_000_000,
    reference_actors: Annotated[str, typer.Option(help="Who computes reference K/V: auto (the generation actor itself when "
                                                  "the run has one: one model load; else a reference actor pool first) | "
                                                  "always (the pool) | never (the generation actors). Same output either way.")] = "auto",
) -> None:
    """Render every (row, seed) of MANIFEST into OUT; rerun the same command to resume."""

    if image_format not in ("png", "jpg", "webp"):
        _fail(f"--image-format {image_format!r}: expected png, jpg or webp")
    try:
        defaults = GenParams(num_inference_steps=num_inference_steps, height=height, width=width,
                             guidance_scale=guidance_scale)
        settings = RunSettings(
            manifest=manifest, out=str(out), model=model, defaults=defaults, root=root,
            allow_roots=tuple(allow_root or ()), max_pixels=max_pixels, kv_cache=str(kv_cache) if kv_cache else None,
            samples_per_shard=samples_per_shard, image_format=image_format, address=address,
            gpus_per_worker=gpus_per_worker, max_workers=max_workers, cpus_per_worker=cpus_per_worker,
            batch_size=batch_size, overwrite=overwrite,
            dtype=dtype, scheduler=scheduler, channels_last=channels_last, compile=compile, mask_policy=mask_policy, sam_checkpoint=sam_checkpoint,
            sam_model_type=sam_model_type, detector=detector, reference_actors=reference_actors,
        )
    except ValueError as e:
        _fail(str(e))
    try:
        summary = _run_with_progress(run_pipeline, settings, ManifestError, OutputRefused)
    except RunFailed as e:
        _fail(str(e), code=1)
    _print_summary(summary)
    raise typer.Exit(summary.exit_code)


def _run_with_progress(run_pipeline, settings, *refusals):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("shards", total=None)

        def on_shard(marker, done, total):
            progress.update(task, completed=done, total=total)

        try:
            return run_pipeline(settings, on_shard=on_shard)
        except refusals as e:
            progress.stop()
            _fail(str(e))
        except (ValueError, FileNotFoundError) as e:
            progress.stop()
            _fail(str(e))


def _print_summary(summary) -> None:
    from rich.console import Console
    from rich.table import Table


    s = summary.stats
    table = Table(title=f"freecustom-pipeline: {summary.out}", show_header=False)
    for key in ("rows", "rows_valid", "rows_failed", "samples_expected", "samples_written", "samples_generated_this_run",
                "shards", "concept_sets", "reference_passes", "images_per_second", "seconds_total"):
        table.add_row(key, str(s.get(key)))
    console = Console(stderr=False)
    console.print(table)
    for e in summary.errors[:20]:
        console.print(f"[red]failed[/red] row {e['row']} (id={e['id']}): {e['stage']}: {e['field']}: {e['reason']}")
    if len(summary.errors) > 20:
        console.print(f"... and {len(summary.errors) - 20} more in {summary.out}/{ERRORS_FILE}")


@app.command(epilog="Example:\n\n    freecustom-pipeline validate manifest.parquet --root /data/catalog")
def validate(
    manifest: Annotated[str, typer.Argument(help="Parquet manifest.")],
    root: Annotated[str | None, typer.Option(help="Folder relative input paths resolve against.")] = None,
    allow_root: Annotated[list[str] | None, typer.Option(help="Only inputs under this folder (repeatable).")] = None,
    max_pixels: Annotated[int, typer.Option(help="Refuse images above this many pixels.")] = 64_000_000,
    num_inference_steps: Annotated[int, typer.Option(help="Run default to validate rows against.")] = DEFAULT_STEPS,
    height: Annotated[int, typer.Option(help="Run default.")] = DEFAULT_HEIGHT,
    width: Annotated[int, typer.Option(help="Run default.")] = DEFAULT_WIDTH,
) -> None:
    """Every static check (schema, ids, seeds, paths exist and decode, sizes, values) without a model.

    One line per problem naming row, id, field and reason; exit 1 if any, 2 if the file is unusable.
    """

    try:
        validation = ManifestValidation(
            read_manifest(manifest),
            defaults=GenParams(num_inference_steps=num_inference_steps, height=height, width=width),
            inputs=InputSettings(root=root, allow_roots=tuple(allow_root or ()), max_pixels=max_pixels),
            base_dir=manifest_base_dir(manifest))
    except (ManifestError, ValueError) as e:
        _fail(str(e))
    valid = bad_rows = n_problems = 0
    for _, spec, found in validation:  # streamed: problems print as they are found, no row is kept
        for p in found:
            typer.echo(format_problem(p))
        n_problems += len(found)
        bad_rows += bool(found)
        valid += spec is not None
    typer.echo(f"{validation.table.num_rows} rows: {valid} valid, {bad_rows} refused ({n_problems} problems)", err=True)
    raise typer.Exit(1 if n_problems else 0)


@app.command(epilog="Examples:\n\n    freecustom-pipeline inspect out/\n\n    freecustom-pipeline inspect out/ --sample dog_hat_park-0")
def inspect(
    out: Annotated[Path, typer.Argument(help="An output folder of `run`.")],
    sample: Annotated[str | None, typer.Option(help="Print this sample's metadata (its key, or a row id).")] = None,
) -> None:
    """Counts, failed rows with reasons, shards and settings of an output folder."""
    import pyarrow.parquet as pq


    folder = OutputFolder(out)
    if not folder.exists(RUN_FILE):
        _fail(f"{out} is not an output folder of freecustom-pipeline run (no {RUN_FILE})")
    tars = folder.list(SHARDS, ".tar")
    if sample is not None:
        for name in folder.list(SHARDS, ".parquet"):
            with folder.fs.open_input_file(folder.path(SHARDS, name)) as f:
                rows = pq.read_table(f, columns=["key", "id", "metadata"]).to_pylist()
            for r in rows:
                if r["key"] == sample or r["id"] == sample:
                    typer.echo(json.dumps(json.loads(r["metadata"]), indent=2, sort_keys=True))
                    raise typer.Exit(0)
        _fail(f"no sample with key or id {sample!r} in {out}", code=1)
    stats = folder.read_json(STATS_FILE) if folder.exists(STATS_FILE) else {}
    settings = folder.read_json(RUN_FILE)
    typer.echo(f"output: {out}")
    for key in ("rows", "rows_valid", "rows_failed", "samples_expected", "samples_written", "shards", "concept_sets",
                "reference_passes", "images_per_second", "complete"):
        typer.echo(f"  {key}: {stats.get(key)}")
    typer.echo("shards:")
    for name in tars:
        table = f"{SHARDS}/{name.removesuffix('.tar')}.parquet"
        if folder.exists(table):
            with folder.fs.open_input_file(folder.path(table)) as f:
                n = pq.read_metadata(f).num_rows
        else:
            n = "?"
        typer.echo(f"  {name}  {n} samples  {folder.size(f'{SHARDS}/{name}')} bytes")
    if folder.exists(ERRORS_FILE):
        with folder.fs.open_input_file(folder.path(ERRORS_FILE)) as f:
            errors = pq.read_table(f).to_pylist()
        typer.echo(f"failed rows: {len(errors)}")
        for e in errors:
            typer.echo(f"  row {e['row']} (id={e['id']}): {e['stage']}: {e['field']}: {e['reason']}")
    typer.echo("settings: " + json.dumps(settings, sort_keys=True))


@manifest_app.command("from-config", epilog="Example:\n\n    freecustom-pipeline manifest from-config "
                      "FreeCustom/dataset/freecustom/multi_concept/*/config_stable_diffusion.yaml --root FreeCustom -o m.parquet")
def from_config(
    configs: Annotated[list[Path], typer.Argument(help="The authors' config_stable_diffusion.yaml files.")],
    root: Annotated[Path, typer.Option(help="The authors' repository root (image paths are relative to it).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Manifest to write.")],
) -> None:
    """Import the FreeCustom authors' run configs into one manifest (row id = the config's folder name)."""

    try:
        table = manifest_from_configs([str(c) for c in configs], root=str(root))
    except ConfigImportError as e:
        _fail(str(e))
    write_manifest(table, output)
    typer.echo(f"wrote {output}: {table.num_rows} rows")


@app.command(epilog="Example:\n\n    freecustom-pipeline demo -o out/demo")
def demo(
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the demo's inputs and outputs.")],
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 10,
    size: Annotated[int, typer.Option(help="Image side in pixels (multiple of 8).")] = 128,
) -> None:
    """End to end on a built-in example: a tiny random-weight SD1.5-topology model, drawn concept images,
    copy-paste context composites, the real Ray pipeline. Images are noise-like (random weights): the
    demo shows the machinery, not quality."""
    from pipeline.tiny_model import build_tiny_sd15

    inputs = out / "inputs"
    model_dir = inputs / "tiny-sd15"
    if not (model_dir / "model_index.json").exists():
        build_tiny_sd15(model_dir)
    manifest = write_example_manifest(inputs)
    settings = RunSettings(manifest=str(manifest), out=str(out / "run"), model=str(model_dir),
                           defaults=GenParams(num_inference_steps=steps, height=size, width=size), samples_per_shard=4)
    summary = _run_with_progress(run_pipeline, settings, ManifestError, OutputRefused)
    _print_summary(summary)
    typer.echo(f"\nshards:     {summary.out}/{SHARDS}/\nreferences: {summary.out}/{REFERENCES}/ (contact sheets)\n"
               f"inspect:    freecustom-pipeline inspect {summary.out}")
    raise typer.Exit(summary.exit_code)


@app.command(epilog="Examples:\n\n    freecustom-pipeline customize ../shared/data/freecustom-samples/dog_hat_sunglasses_0 -o out/dog\n\n"
             "    freecustom-pipeline customize --concept dog.jpg:dog_mask.png:'a dog' --concept hat.png::'a hat' "
             "--prompt 'a dog wearing a hat' --seed 1 --seed 2 -o out/custom --model stable-diffusion-v1-5/stable-diffusion-v1-5")
def customize(
    case: Annotated[Path | None, typer.Argument(help="A case folder in the authors' layout: image/, mask/, config_stable_diffusion.yaml.")] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the images.")] = Path("out/customize"),
    concept: Annotated[list[str] | None, typer.Option(help="IMAGE:MASK:PROMPT[:WEIGHT]; an empty MASK uses the image's alpha.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Target prompt (default: the case config's target_prompt).")] = None,
    seed: Annotated[list[int] | None, typer.Option(help="Seeds (repeatable; default: the case config's seeds).")] = None,
    model: Annotated[str | None, typer.Option(help="Model id or folder; default: a tiny random-weight model built in OUT.")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 10,
    size: Annotated[int, typer.Option(help="Image side (multiple of 8).")] = 256,
) -> None:
    """The engine alone, no Ray: customize one prompt with reference images and masks from the command line."""
    from PIL import Image

    from freecustom_core import ConceptRef, FreeCustomGenerator

    refs, seeds, target = [], list(seed or []), prompt
    try:
        if case is not None:
            import yaml

            config = yaml.safe_load((case / "config_stable_diffusion.yaml").read_text())
            weights = list(config.get("mask_weights") or [])
            for i, (path, concept_prompt) in enumerate(config["ref_image_infos"].items()):
                name = Path(path).name
                refs.append(ConceptRef(Image.open(case / "image" / name), Image.open(case / "mask" / name), concept_prompt,
                                       float(weights[i]) if i < len(weights) else DEFAULT_WEIGHT))
            target = target or config["target_prompt"]
            seeds = seeds or [int(s) for s in config.get("seeds", [0])]
        for spec in concept or []:
            parts = spec.split(":")
            if len(parts) not in (3, 4):
                _fail(f"--concept {spec!r}: expected IMAGE:MASK:PROMPT[:WEIGHT]")
            image = Image.open(parts[0])
            weight = float(parts[3]) if len(parts) == 4 else DEFAULT_WEIGHT
            refs.append(ConceptRef.from_rgba(image, parts[2], weight) if not parts[1]
                        else ConceptRef(image, Image.open(parts[1]), parts[2], weight))
    except (OSError, KeyError, ValueError, TypeError) as e:
        _fail(str(e))
    if not refs or not target:
        _fail("give a case folder or --concept ... with --prompt")
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        from pipeline.tiny_model import build_tiny_sd15

        model = str(out / "tiny-sd15")
        if not (Path(model) / "model_index.json").exists():
            build_tiny_sd15(model)
        typer.echo(f"no --model: using a tiny random-weight model ({model}); images will be noise", err=True)
    gen = FreeCustomGenerator.from_pretrained(model)
    seeds = seeds or [0]
    kv = gen.prepare_references(refs, num_inference_steps=steps, height=size, width=size)
    images = gen.generate([target] * len(seeds), seeds, kv, num_inference_steps=steps, height=size, width=size)
    for s, image in zip(seeds, images, strict=True):
        image.save(out / f"seed{s}.png")
    typer.echo(f"{len(images)} images in {out} (prompt {target!r}; reference K/V {kv.nbytes / 2**20:.1f} MiB, "
               f"{kv.nbytes / max(1, kv.dense_nbytes):.0%} of dense)")


if __name__ == "__main__":
    app()
