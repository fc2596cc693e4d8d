"""``freecustom-pipeline manifest build SPEC.yaml -o MANIFEST_DIR``: registered on ``manifest`` by ``pipeline.cli``."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.cli_common import AsJson, Quiet, Verbose, answer, fail, say, set_voice
from pipeline.manifest_build import BuildError, BuildOptions, build_manifest

EPILOG = (
    "Examples:\n\n    freecustom-pipeline manifest build spec.yaml -o manifest/\n\n"
    "    freecustom-pipeline manifest build spec.yaml --dry-run --seconds-per-image 4.5\n\n"
    "    freecustom-pipeline manifest build spec.yaml -o m.parquet --check-images --json"
)


def build(
    ctx: typer.Context,
    spec: Annotated[str, typer.Argument(help="The build spec (YAML): pools, compositions, templates.")],
    out: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--out",
            help="Manifest to write: a folder of Parquet files, or one file with "
            "--single-file or a name ending in .parquet.",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count and show rows; write nothing.")] = False,
    as_json: AsJson = False,
    seconds_per_image: Annotated[
        float | None,
        typer.Option(min=0, help="Seconds one sample takes on a GPU: adds a GPU-hours estimate."),
    ] = None,
    check_images: Annotated[
        bool, typer.Option("--check-images", help="Read and probe every image, mask and control image first.")
    ] = False,
    rows_per_file: Annotated[int, typer.Option(min=1, help="Rows per Parquet file of the folder.")] = 100_000,
    single_file: Annotated[bool, typer.Option("--single-file", help="Write one Parquet file at -o.")] = False,
    sample_rows: Annotated[int, typer.Option(min=0, help="Rows shown as text in the summary.")] = 5,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Build a manifest from a spec: pools of concepts (a feed, folders, a datasets folder), compositions
    and prompt templates. Row ids derive from what a row is, so rebuilding keeps them (run --reuse)."""
    quiet = set_voice(ctx, verbose, quiet)
    if out is None and not dry_run:
        fail("give -o MANIFEST (or --dry-run)", as_json=as_json)
    single = single_file or (out is not None and out.endswith(".parquet"))
    options = BuildOptions(
        out=None if dry_run else out,
        rows_per_file=rows_per_file,
        single_file=single,
        check_images=check_images,
        seconds_per_image=seconds_per_image,
        sample_rows=sample_rows,
    )
    try:
        summary = build_manifest(spec, options)
    except BuildError as exc:
        fail(str(exc), as_json=as_json)
    if as_json:
        answer(summary)
        return
    _print(summary, dry_run, quiet)


def _print(s: dict, dry_run: bool, quiet: bool) -> None:
    head = "would write" if dry_run else f"wrote {s['output']} ({s['files']} file(s)):"
    lines = [
        f"{head} {s['rows']} rows, {s['concept_sets']} concept sets, {s['samples']} samples, "
        f"{s['reference_passes']} reference passes"
    ]
    if "gpu_hours" in s:
        lines.append(f"GPU time: {s['gpu_hours']} GPU-hours at {s['seconds_per_image']} s per image")
    for name, c in s["compositions"].items():
        lines.append(f"composition {name}: {c['sets']} sets, {c['rows']} rows, {c['samples']} samples")
        for slot, u in c["slots"].items():
            lines.append(
                f"  slot {slot} (pool {u['pool']}, {u['items_in_pool']} items): {u['items_used']} used, "
                f"{u['min_per_item']}-{u['max_per_item']} sets per item"
            )
    if s["sample"]:
        lines.append("sample rows:")
        lines += [f"  {r}" for r in s["sample"]]
    say("\n".join(lines), quiet and not dry_run)
