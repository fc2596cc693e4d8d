"""Reading an output folder for a person or a script: what ``inspect`` shows."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from stages.output import ERRORS_FILE, RUN_FILE, SHARDS, STATS_FILE, OutputFolder


def find_sample(folder: OutputFolder, sample: str) -> dict | None:
    """The metadata of the sample whose key or row id is ``sample`` (the first match), or None."""
    for name in folder.list(SHARDS, ".parquet"):
        with folder.fs.open_input_file(folder.path(SHARDS, name)) as f:
            rows = pq.read_table(f, columns=["key", "id", "metadata"]).to_pylist()
        for r in rows:
            if r["key"] == sample or r["id"] == sample:
                return json.loads(r["metadata"])
    return None


def inspect_report(folder: OutputFolder, out: str) -> dict:
    """What ``inspect`` shows, as one JSON-ready dict. ``failed_rows`` is None without errors.parquet;
    a shard's ``samples`` is None when its Parquet twin is missing."""
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
