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

import enum
import importlib.metadata
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.examples import write_example_manifest
from pipeline.from_config import ConfigImportError, manifest_from_configs, write_manifest
from pipeline.manifest import ManifestError, manifest_base_dir, read_manifest
from pipeline.run import RunFailed
from pipeline.run import run as run_pipeline
from pipeline.settings import DEFAULT_MODEL, IMAGE_FORMATS, REFERENCE_ACTORS, RunSettings
from pipeline.validate import ManifestValidation, RowProblem, format_problem
from stages.inputs import InputSettings, is_uri
from stages.output import ERRORS_FILE, REFERENCES, RUN_FILE, SHARDS, STATS_FILE, OutputFolder, OutputRefused
from stages.params import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_HEIGHT,
    DEFAULT_STEPS,
    DEFAULT_WEIGHT,
    DEFAULT_WIDTH,
    GenParams,
)
from stages.segment import MASK_POLICIES
from stages.segment_models import SAM_ARCHS

PACKAGE = "freecustom-pipeline"
PROJECT_LOGGERS = ("freecustom_core", "stages", "pipeline")  # what -v turns to DEBUG and -q to ERROR
DTYPES = ("auto", "float16", "bfloat16", "float32")  # "auto": float16 on CUDA, float32 on the CPU
# options of `run` a user sets in every run -> the environment variable each falls back to
# (validate's --allow-root and customize's --model read theirs too)
ENV_VARS = {
    "model": "FREECUSTOM_MODEL",
    "kv_cache": "FREECUSTOM_KV_CACHE",
    "allow_root": "FREECUSTOM_ALLOW_ROOT",
    "max_workers": "FREECUSTOM_MAX_WORKERS",
    "gpus_per_worker": "FREECUSTOM_GPUS_PER_WORKER",
    "dtype": "FREECUSTOM_DTYPE",
    "scheduler": "FREECUSTOM_SCHEDULER",
    "sam_checkpoint": "FREECUSTOM_SAM_CHECKPOINT",
    "sam_model_type": "FREECUSTOM_SAM_MODEL_TYPE",
    "detector": "FREECUSTOM_DETECTOR",
}


def _choices(name: str, values) -> type[enum.Enum]:
    """A closed set of strings as an enum: typer lists it in --help and refuses others while parsing."""
    return enum.Enum(name, {v: v for v in values}, type=str)


Dtype = _choices("Dtype", DTYPES)
ImageFormat = _choices("ImageFormat", IMAGE_FORMATS)
MaskPolicy = _choices("MaskPolicy", MASK_POLICIES)
ReferenceActors = _choices("ReferenceActors", REFERENCE_ACTORS)
SamModelType = _choices("SamModelType", SAM_ARCHS)  # "custom" needs a SamArch: Python API only

Verbose = Annotated[
    bool, typer.Option("-v", "--verbose", help="Debug logging of the pipeline's own modules, on stderr.")
]
Quiet = Annotated[
    bool,
    typer.Option(
        "-q",
        "--quiet",
        help="Only errors and the command's answer (--json, the exit code): no progress, tables or notes.",
    ),
]
AsJson = Annotated[
    bool, typer.Option("--json", help="Answer with one JSON object on stdout, nothing else there.")
]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="FreeCustom multi-concept customization at scale: a Parquet manifest in, WebDataset shards out.",
)
manifest_app = typer.Typer(no_args_is_help=True, help="Build manifests.")
app.add_typer(manifest_app, name="manifest")


# --------------------------------------------------------------------------- output and logging


class _EchoHandler(logging.Handler):
    """Log records as lines on the current stderr (looked up per record: CliRunner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(self.format(record), err=True)


def _set_voice(ctx: typer.Context, verbose: bool, quiet: bool) -> bool:
    """Apply -v / -q and return whether the command is quiet. Flags given before the command and
    after it add up (``ctx.meta`` is shared by the group's and the command's contexts)."""
    verbose = ctx.meta["freecustom.verbose"] = verbose or ctx.meta.get("freecustom.verbose", False)
    quiet = ctx.meta["freecustom.quiet"] = quiet or ctx.meta.get("freecustom.quiet", False)
    if verbose and quiet:
        raise typer.BadParameter("-v/--verbose and -q/--quiet exclude each other")
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
            handler = _EchoHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
    return quiet


def _say(message: str, quiet: bool, *, err: bool = False) -> None:
    """A line for a person (a note, a summary): -q drops it."""
    if not quiet:
        typer.echo(message, err=err)


def _fail(message: str, code: int = 2, *, as_json: bool = False) -> None:
    if as_json:
        _answer({"error": message})
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _answer(obj: Any) -> None:
    """The one JSON object of --json on stdout (one line)."""
    typer.echo(json.dumps(obj, sort_keys=True, default=str))


def _path_or_uri(value: str) -> str:
    """A local path as ``Path`` spells it (``out/`` -> ``out``); ``s3://...`` and other URIs untouched."""
    return value if is_uri(value) else str(Path(value))


def _print_version(value: bool) -> None:
    if value:
        try:
            version = importlib.metadata.version(PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown (not installed)"
        typer.echo(f"{PACKAGE} {version}")
        raise typer.Exit(0)


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    _set_voice(ctx, verbose, quiet)


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
        typer.Option(envvar=ENV_VARS["model"], help="Diffusers SD1.5-family model: hub id or local folder."),
    ] = DEFAULT_MODEL,
    num_inference_steps: Annotated[
        int, typer.Option(help="Denoising steps (rows may override).")
    ] = DEFAULT_STEPS,
    height: Annotated[
        int, typer.Option(help="Image height, multiple of 8 (rows may override).")
    ] = DEFAULT_HEIGHT,
    width: Annotated[
        int, typer.Option(help="Image width, multiple of 8 (rows may override).")
    ] = DEFAULT_WIDTH,
    guidance_scale: Annotated[
        float, typer.Option(help="Classifier-free guidance scale.")
    ] = DEFAULT_GUIDANCE_SCALE,
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
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Render every (row, seed) of MANIFEST into OUT; rerun the same command to resume."""

    quiet = _set_voice(ctx, verbose, quiet)
    try:
        defaults = GenParams(
            num_inference_steps=num_inference_steps, height=height, width=width, guidance_scale=guidance_scale
        )
        settings = RunSettings(
            manifest=manifest,
            out=_path_or_uri(out),
            model=model,
            defaults=defaults,
            root=root,
            allow_roots=tuple(allow_root or ()),
            max_pixels=max_pixels,
            kv_cache=_path_or_uri(kv_cache) if kv_cache else None,
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
        )
    except (ValueError, OSError) as e:  # OSError: storage named by -o / --kv-cache unreachable
        _fail(str(e))
    try:
        summary = _run_with_progress(run_pipeline, settings, ManifestError, OutputRefused, quiet=quiet)
    except RunFailed as e:
        _fail(str(e), code=1)
    _print_summary(summary, quiet)
    raise typer.Exit(summary.exit_code)


def _run_with_progress(run_pipeline, settings, *refusals, quiet: bool = False):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
            _fail(str(e))
        except (ValueError, FileNotFoundError) as e:
            progress.stop()
            _fail(str(e))


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
    if len(summary.errors) > 20:
        console.print(f"... and {len(summary.errors) - 20} more in {summary.out}/{ERRORS_FILE}")


# --------------------------------------------------------------------------- validate, inspect


@app.command(
    epilog="Examples:\n\n    freecustom-pipeline validate manifest.parquet --root /data/catalog\n\n"
    "    freecustom-pipeline validate manifest.parquet --json | jq '.problems[] | .field'"
)
def validate(
    ctx: typer.Context,
    manifest: Annotated[str, typer.Argument(help="Parquet manifest.")],
    root: Annotated[str | None, typer.Option(help="Folder relative input paths resolve against.")] = None,
    allow_root: Annotated[
        list[str] | None,
        typer.Option(
            envvar=ENV_VARS["allow_root"],
            help="Only inputs under this folder (repeatable; the variable: folders separated by spaces).",
        ),
    ] = None,
    max_pixels: Annotated[int, typer.Option(help="Refuse images above this many pixels.")] = 64_000_000,
    num_inference_steps: Annotated[
        int, typer.Option(help="Run default to validate rows against.")
    ] = DEFAULT_STEPS,
    height: Annotated[int, typer.Option(help="Run default.")] = DEFAULT_HEIGHT,
    width: Annotated[int, typer.Option(help="Run default.")] = DEFAULT_WIDTH,
    as_json: AsJson = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Every static check (schema, ids, seeds, paths exist and decode, sizes, values) without a model.

    One line per problem naming row, id, field and reason; exit 1 if any, 2 if the file is unusable.
    With --json: `{"rows", "valid", "refused", "problems": [{"id", "row", "field", "reason"}]}`
    (exit 2: `{"error": ...}`).
    """

    quiet = _set_voice(ctx, verbose, quiet)
    try:
        validation = ManifestValidation(
            read_manifest(manifest),
            defaults=GenParams(num_inference_steps=num_inference_steps, height=height, width=width),
            inputs=InputSettings(root=root, allow_roots=tuple(allow_root or ()), max_pixels=max_pixels),
            base_dir=manifest_base_dir(manifest),
        )
    except (ManifestError, ValueError) as e:
        _fail(str(e), as_json=as_json)
    valid = refused = n_problems = 0
    problems: list[RowProblem] = []  # kept for --json only
    for _, spec, found in validation:  # streamed: problems print as they are found, no row is kept
        if as_json:
            problems += found
        else:
            for p in found:
                typer.echo(format_problem(p))
        n_problems += len(found)
        refused += bool(found)
        valid += spec is not None
    rows = validation.table.num_rows
    if as_json:
        _answer(
            {
                "rows": rows,
                "valid": valid,
                "refused": refused,
                "problems": [
                    {"id": p.id, "row": p.index, "field": p.field, "reason": p.reason} for p in problems
                ],
            }
        )
    _say(f"{rows} rows: {valid} valid, {refused} refused ({n_problems} problems)", quiet, err=True)
    raise typer.Exit(1 if n_problems else 0)


@app.command(
    epilog="Examples:\n\n    freecustom-pipeline inspect out/\n\n"
    "    freecustom-pipeline inspect out/ --sample dog_hat_park-0\n\n"
    "    freecustom-pipeline inspect out/ --json | jq .stats.samples_written"
)
def inspect(
    ctx: typer.Context,
    out: Annotated[str, typer.Argument(help="An output folder of `run`.")],
    sample: Annotated[
        str | None, typer.Option(help="Print this sample's metadata (its key, or a row id).")
    ] = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Counts, failed rows with reasons, shards and settings of an output folder.

    With --json: `{"output", "stats" (all of _stats.json), "shards": [{"name", "samples", "bytes"}],
    "failed_rows": [{"id", "row", "stage", "field", "reason", "seeds"}], "settings" (_run.json)}`;
    with --sample, that sample's metadata. Exit 2 (`{"error": ...}`) if OUT is no output folder,
    1 if the sample is not there.
    """
    _set_voice(ctx, verbose, quiet)  # inspect's report is its answer: -q leaves it
    out = _path_or_uri(out)
    try:
        folder = OutputFolder(out, option="OUT")
    except (ValueError, OSError) as e:  # a scheme pyarrow.fs does not know, unreachable storage
        _fail(str(e), as_json=as_json)
    if not folder.exists(RUN_FILE):
        _fail(f"{out} is not an output folder of freecustom-pipeline run (no {RUN_FILE})", as_json=as_json)
    if sample is not None:
        metadata = _find_sample(folder, sample)
        if metadata is None:
            _fail(f"no sample with key or id {sample!r} in {out}", code=1, as_json=as_json)
        typer.echo(
            json.dumps(metadata, sort_keys=True)
            if as_json
            else json.dumps(metadata, indent=2, sort_keys=True)
        )
        raise typer.Exit(0)
    report = _inspect_report(folder, out)
    if as_json:
        _answer(report)
        return
    typer.echo(f"output: {out}")
    for key in (
        "rows",
        "rows_valid",
        "rows_failed",
        "samples_expected",
        "samples_written",
        "shards",
        "concept_sets",
        "reference_passes",
        "images_per_second",
        "complete",
    ):
        typer.echo(f"  {key}: {report['stats'].get(key)}")
    typer.echo("shards:")
    for shard in report["shards"]:
        n = "?" if shard["samples"] is None else shard["samples"]
        typer.echo(f"  {shard['name']}  {n} samples  {shard['bytes']} bytes")
    if report["failed_rows"] is not None:
        typer.echo(f"failed rows: {len(report['failed_rows'])}")
        for e in report["failed_rows"]:
            typer.echo(f"  row {e['row']} (id={e['id']}): {e['stage']}: {e['field']}: {e['reason']}")
    typer.echo("settings: " + json.dumps(report["settings"], sort_keys=True))


def _find_sample(folder: OutputFolder, sample: str) -> dict | None:
    """The metadata of the sample whose key or row id is ``sample`` (the first match), or None."""
    import pyarrow.parquet as pq

    for name in folder.list(SHARDS, ".parquet"):
        with folder.fs.open_input_file(folder.path(SHARDS, name)) as f:
            rows = pq.read_table(f, columns=["key", "id", "metadata"]).to_pylist()
        for r in rows:
            if r["key"] == sample or r["id"] == sample:
                return json.loads(r["metadata"])
    return None


def _inspect_report(folder: OutputFolder, out: str) -> dict:
    """What ``inspect`` shows, as one JSON-ready dict. ``failed_rows`` is None without errors.parquet;
    a shard's ``samples`` is None when its Parquet twin is missing."""
    import pyarrow.parquet as pq

    shards = []
    for name in folder.list(SHARDS, ".tar"):
        table = f"{SHARDS}/{name.removesuffix('.tar')}.parquet"
        samples = None
        if folder.exists(table):
            with folder.fs.open_input_file(folder.path(table)) as f:
                samples = pq.read_metadata(f).num_rows
        shards.append({"name": name, "samples": samples, "bytes": folder.size(f"{SHARDS}/{name}")})
    failed_rows = None
    if folder.exists(ERRORS_FILE):
        with folder.fs.open_input_file(folder.path(ERRORS_FILE)) as f:
            failed_rows = pq.read_table(f).to_pylist()
    return {
        "output": out,
        "stats": folder.read_json(STATS_FILE) if folder.exists(STATS_FILE) else {},
        "shards": shards,
        "failed_rows": failed_rows,
        "settings": folder.read_json(RUN_FILE),
    }


# --------------------------------------------------------------------------- manifest, demo, customize


@manifest_app.command(
    "from-config",
    epilog="Example:\n\n    freecustom-pipeline manifest from-config "
    "FreeCustom/dataset/freecustom/multi_concept/*/config_stable_diffusion.yaml --root FreeCustom -o m.parquet",
)
def from_config(
    ctx: typer.Context,
    configs: Annotated[list[Path], typer.Argument(help="The authors' config_stable_diffusion.yaml files.")],
    root: Annotated[
        Path, typer.Option(help="The authors' repository root (image paths are relative to it).")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Manifest to write.")],
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Import the FreeCustom authors' run configs into one manifest (row id = the config's folder name)."""

    quiet = _set_voice(ctx, verbose, quiet)
    try:
        table = manifest_from_configs([str(c) for c in configs], root=str(root))
    except ConfigImportError as e:
        _fail(str(e))
    write_manifest(table, output)
    _say(f"wrote {output}: {table.num_rows} rows", quiet)


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

    quiet = _set_voice(ctx, verbose, quiet)
    inputs = out / "inputs"
    model_dir = inputs / "tiny-sd15"
    if not (model_dir / "model_index.json").exists():
        build_tiny_sd15(model_dir)
    manifest = write_example_manifest(inputs)
    settings = RunSettings(
        manifest=str(manifest),
        out=str(out / "run"),
        model=str(model_dir),
        defaults=GenParams(num_inference_steps=steps, height=size, width=size),
        samples_per_shard=4,
    )
    summary = _run_with_progress(run_pipeline, settings, ManifestError, OutputRefused, quiet=quiet)
    _print_summary(summary, quiet)
    _say(
        f"\nshards:     {summary.out}/{SHARDS}/\nreferences: {summary.out}/{REFERENCES}/ (contact sheets)\n"
        f"inspect:    freecustom-pipeline inspect {summary.out}",
        quiet,
    )
    raise typer.Exit(summary.exit_code)


@app.command(
    epilog="Examples:\n\n    freecustom-pipeline customize ../shared/data/freecustom-samples/dog_hat_sunglasses_0 -o out/dog\n\n"
    "    freecustom-pipeline customize --concept dog.jpg:dog_mask.png:'a dog' --concept hat.png::'a hat' "
    "--prompt 'a dog wearing a hat' --seed 1 --seed 2 -o out/custom --model stable-diffusion-v1-5/stable-diffusion-v1-5"
)
def customize(
    ctx: typer.Context,
    case: Annotated[
        Path | None,
        typer.Argument(
            help="A case folder in the authors' layout: image/, mask/, config_stable_diffusion.yaml."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the images.")] = Path("out/customize"),
    concept: Annotated[
        list[str] | None,
        typer.Option(help="IMAGE:MASK:PROMPT[:WEIGHT]; an empty MASK uses the image's alpha."),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(help="Target prompt (default: the case config's target_prompt).")
    ] = None,
    seed: Annotated[
        list[int] | None, typer.Option(help="Seeds (repeatable; default: the case config's seeds).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            envvar=ENV_VARS["model"],
            help="Model id or folder; default: a tiny random-weight model built in OUT.",
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 10,
    size: Annotated[int, typer.Option(help="Image side (multiple of 8).")] = 256,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """The engine alone, no Ray: customize one prompt with reference images and masks from the command line."""
    from PIL import Image

    from freecustom_core import ConceptRef, FreeCustomGenerator

    quiet = _set_voice(ctx, verbose, quiet)
    refs, seeds, target = [], list(seed or []), prompt
    try:
        if case is not None:
            import yaml

            config = yaml.safe_load((case / "config_stable_diffusion.yaml").read_text())
            weights = list(config.get("mask_weights") or [])
            for i, (path, concept_prompt) in enumerate(config["ref_image_infos"].items()):
                name = Path(path).name
                refs.append(
                    ConceptRef(
                        Image.open(case / "image" / name),
                        Image.open(case / "mask" / name),
                        concept_prompt,
                        float(weights[i]) if i < len(weights) else DEFAULT_WEIGHT,
                    )
                )
            target = target or config["target_prompt"]
            seeds = seeds or [int(s) for s in config.get("seeds", [0])]
        for spec in concept or []:
            parts = spec.split(":")
            if len(parts) not in (3, 4):
                _fail(f"--concept {spec!r}: expected IMAGE:MASK:PROMPT[:WEIGHT]")
            image = Image.open(parts[0])
            weight = float(parts[3]) if len(parts) == 4 else DEFAULT_WEIGHT
            refs.append(
                ConceptRef.from_rgba(image, parts[2], weight)
                if not parts[1]
                else ConceptRef(image, Image.open(parts[1]), parts[2], weight)
            )
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
        _say(f"no --model: using a tiny random-weight model ({model}); images will be noise", quiet, err=True)
    gen = FreeCustomGenerator.from_pretrained(model)
    seeds = seeds or [0]
    kv = gen.prepare_references(refs, num_inference_steps=steps, height=size, width=size)
    images = gen.generate(
        [target] * len(seeds), seeds, kv, num_inference_steps=steps, height=size, width=size
    )
    for s, image in zip(seeds, images, strict=True):
        image.save(out / f"seed{s}.png")
    _say(
        f"{len(images)} images in {out} (prompt {target!r}; reference K/V {kv.nbytes / 2**20:.1f} MiB, "
        f"{kv.nbytes / max(1, kv.dense_nbytes):.0%} of dense)",
        quiet,
    )


if __name__ == "__main__":
    app()
