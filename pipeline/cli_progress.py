"""How ``run`` and ``demo`` show a run: its progress while it runs (a rich bar on a terminal, plain
``ProgressLog`` lines in a job log) and its summary when it ends."""

from __future__ import annotations

import sys

from pipeline.cli_common import fail
from pipeline.progress import ProgressLog
from stages.output.layout import ERRORS_FILE


def run_with_progress(run_pipeline, settings, *refusals, quiet: bool = False):
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


def print_summary(summary, quiet: bool) -> None:
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
        if s.get("shards_pending_before_run") == 0 and s.get("shards"):
            console.print(f"nothing to do: all {s['shards']} shards were already complete (this run resumed a finished one)")
    for e in summary.errors[:20]:
        console.print(
            f"[red]failed[/red] row {e['row']} (id={e['id']}): {e['stage']}: {e['field']}: {e['reason']}"
        )
    if summary.failed > 20:
        console.print(f"... and {summary.failed - 20} more in {summary.out}/{ERRORS_FILE}")
