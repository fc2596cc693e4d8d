"""The CLI's ``export`` command: an output folder as a Hugging Face ``datasets`` folder or a JSONL +
images folder for training (``pipeline.export``). Registered on ``pipeline.cli``'s app by ``register_export``."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.cli_common import AsJson, Quiet, Verbose, answer, fail, path_or_uri, say, set_voice
from pipeline.export import FORMATS, export_output
from stages.scoring.score import parse_min_score


def export(
    ctx: typer.Context,
    out: Annotated[str, typer.Argument(help="An output folder of `run` (a path or a URI).")],
    output: Annotated[str, typer.Option("-o", "--output", help="Folder to export into (a path or a URI).")],
    fmt: Annotated[
        str, typer.Option("--format", help=f"Layout: {' or '.join(FORMATS)} (see docs/training-data.md).")
    ] = "hf",
    min_score: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=VALUE (a minimum) or NAME<VALUE (an upper bound), repeatable: only samples that have the "
            "value and pass are exported (dino, dino_paper, dino_masked, clip_i, clip_t, presence, overlap)."
        ),
    ] = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Export OUT's samples for training: `hf` (datasets.load_from_disk) or `jsonl` (metadata.jsonl + images).

    One shard at a time (bounded memory); rerun the same command to resume. Exit 2 on bad options or
    when OUT is no output folder.
    """
    quiet = set_voice(ctx, verbose, quiet)
    try:
        thresholds = dict(parse_min_score(spec) for spec in min_score or ())
        summary = export_output(
            path_or_uri(out),
            path_or_uri(output),
            fmt,
            thresholds,
            on_shard=lambda shard, what: say(f"shards/{shard}: {what}", quiet, err=True),
        )
    except (ValueError, OSError) as e:
        fail(str(e), as_json=as_json)
    if as_json:
        answer(summary)
    else:
        say(
            f"exported {summary['samples']} samples ({summary['filtered_out']} filtered out) to {summary['out']}",
            quiet,
        )


def register_export(app: typer.Typer) -> None:
    """Add ``export`` to the CLI's app."""
    app.command(
        epilog="Examples:\n\n    freecustom-pipeline export out/ -o out-hf --format hf\n\n"
        "    freecustom-pipeline export s3://bucket/out -o s3://bucket/out-jsonl --format jsonl "
        "--min-score clip_t=20 --min-score 'overlap<0.5'"
    )(export)
