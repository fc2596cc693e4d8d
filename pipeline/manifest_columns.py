"""Misspelled manifest columns: a column the pipeline does not know is passed through to the shard
Parquet untouched, so ``guidance_scal`` would silently leave every row at the run's guidance. A column
within a small edit distance of a known one is therefore a mistake unless declared pass-through:

- ``--passthrough COLUMN`` (``run`` and ``validate``; repeatable), or
- a name starting with ``x_`` (``x_source``, ``x_prompt_v2``): never checked, pass-through by name.

``validate`` reports such columns as problems (exit 1); ``run`` refuses to start (exit 2).
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.manifest import MANIFEST_SCHEMA, ManifestError
from pipeline.manifest_files import ManifestSource

PASSTHROUGH_PREFIX = "x_"


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), case-insensitive."""
    a, b = a.lower(), b.lower()
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def near_miss(column: str, known: Iterable[str]) -> str | None:
    """The known column ``column`` is probably a typo of: another case only for names up to 3 characters
    (``ID``; ``idx`` stays pass-through), 1 edit up to 5 (``seed``, ``Prompt``), 2 beyond (``negative_promt``,
    ``num_inference_step``); None when none is that close."""
    best = min(known, key=lambda name: edit_distance(column, name))
    shortest = min(len(best), len(column))
    allowed = 0 if shortest <= 3 else 1 if shortest <= 5 else 2
    return best if edit_distance(column, best) <= allowed else None


def misspelled_columns(columns: Iterable[str], passthrough: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(column, the known column it resembles) for each unknown, undeclared column close to a known one."""
    known, declared = MANIFEST_SCHEMA.names, set(passthrough)
    out = []
    for column in columns:
        if column in known or column in declared or column.startswith(PASSTHROUGH_PREFIX):
            continue
        if (target := near_miss(column, known)) is not None:
            out.append((column, target))
    return out


def column_problem(column: str, target: str) -> str:
    """Why a misspelled column is refused and the two ways out."""
    return (
        f"column {column!r} is not a manifest column but looks like {target!r}: rename it, or declare it "
        f"pass-through (--passthrough {column}, or a name starting with {PASSTHROUGH_PREFIX!r})"
    )


def manifest_column_names(manifest: str) -> list[str]:
    """The column names of a manifest (a Parquet file, a folder, glob or prefix of them, with hive partition
    columns), from the files' schemas only; empty when it cannot be read (the run then says why)."""
    try:
        source = ManifestSource.open(manifest)
        names: dict[str, None] = {}
        for part in source.parts:
            names.update(dict.fromkeys(part.open().schema_arrow.names))
            names.update(dict.fromkeys(column for column, _ in part.partitions))
        return list(names)
    except (ManifestError, OSError, ValueError):
        return []


def check_columns(manifest: str, passthrough: Iterable[str] = ()) -> None:
    """``ValueError`` naming every misspelled column of ``manifest`` (the run's refusal)."""
    found = misspelled_columns(manifest_column_names(manifest), passthrough)
    if found:
        raise ValueError(f"{manifest}: " + "; ".join(column_problem(c, t) for c, t in found))
