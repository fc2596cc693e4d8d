"""Reading an output folder for a person or a script: what ``inspect`` shows."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from stages.output.folder import OutputFolder
from stages.output.layout import ERRORS_FILE, REJECTED, RUN_FILE, SHARDS, STATS_FILE


def find_sample(folder: OutputFolder, sample: str) -> dict | None:
    """The metadata of the sample whose key or row id is ``sample`` (the first match), or None."""
    for name in folder.list(SHARDS, ".parquet"):
        with folder.fs.open_input_file(folder.path(SHARDS, name)) as f:
            rows = pq.read_table(f, columns=["key", "id", "metadata"]).to_pylist()
        for r in rows:
            if r["key"] == sample or r["id"] == sample:
                return json.loads(r["metadata"])
    return None


def concept_sets(folder: OutputFolder) -> dict[str, dict]:
    """Per concept set id: ``{"concepts": [its concepts' prompts], "rows": [ids of the rows using it]}``,
    from the shards' (and rejected samples') Parquet, so a person can tell the sets apart by more than a hash."""
    sets: dict[str, dict] = {}
    for kind in (SHARDS, REJECTED):
        for name in folder.list(kind, ".parquet"):
            with folder.fs.open_input_file(folder.path(kind, name)) as f:
                table = pq.read_table(f, columns=["id", "concept_set_id", "metadata"])
            for row_id, csid, meta in zip(*(table[c].to_pylist() for c in table.column_names), strict=True):
                entry = sets.get(csid)
                if entry is None:  # the concepts are the same in every sample of the set: read one
                    prompts = [c.get("prompt") for c in json.loads(meta or "{}").get("concepts", [])]
                    entry = sets[csid] = {"concepts": prompts, "rows": []}
                if row_id not in entry["rows"]:
                    entry["rows"].append(row_id)
    return dict(sorted(sets.items()))


def rows_text(rows: list[str], max_rows: int = 5) -> str:
    """Row ids as a short list: ``a, b, c and 7 more``."""
    return ", ".join(rows[:max_rows]) + (f" and {len(rows) - max_rows} more" if len(rows) > max_rows else "")


def describe_set(entry: dict) -> str:
    """One line naming a concept set: its concepts' prompts and the rows using it."""
    return " + ".join(f'"{p}"' for p in entry["concepts"]) + f" (rows: {rows_text(entry['rows'])})"


def inspect_report(folder: OutputFolder, out: str) -> dict:
    """What ``inspect`` shows, as one JSON-ready dict. ``failed_rows`` is None without errors.parquet;
    a shard's ``samples`` is None when its Parquet twin is missing; ``concept_sets``: see ``concept_sets``."""
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
        "concept_sets": concept_sets(folder),
        "settings": folder.read_json(RUN_FILE),
    }
