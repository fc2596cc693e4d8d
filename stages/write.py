"""Stage: store one shard: ``write_batch`` takes the generation stage's rows (``generate.shard_row``)
and writes each shard's tar, its Parquet table and then its done marker through ``OutputFolder``.

A write error (disk full, ...) leaves nothing under a final name and is reported in the marker
(status ``write_failed``, an error per sample) instead of raised, so the run ends with a clear
message and a rerun completes it.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ErrorRecord
from .output import OutputFolder, shard_name

# The shard Parquet's columns, each read from the sample's metadata (plus ``metadata``, the whole
# JSON). A new output column is one entry here (and the metadata field it reads).
SHARD_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "id": pa.string(),
    "seed": pa.int64(),
    "prompt": pa.string(),
    "negative_prompt": pa.string(),
    "concept_set_id": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
    "num_inference_steps": pa.int64(),
    "guidance_scale": pa.float64(),
}
STAGE = "write"


def parquet_bytes(metas: list[dict]) -> bytes:
    """One row per sample: ``SHARD_COLUMNS`` and ``metadata`` (its JSON)."""
    columns = {name: pa.array([m[name] for m in metas], dtype) for name, dtype in SHARD_COLUMNS.items()}
    columns["metadata"] = pa.array([json.dumps(m, sort_keys=True) for m in metas], pa.string())
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def write_shard(out: OutputFolder, shard_id: int, tar: bytes, metas: list[dict], errors: list[dict], *,
                expected: int, reused: int = 0, faults: dict | None = None) -> dict:
    """Write one shard; return its marker (also when the write failed). ``reused``: samples copied from
    a previous output (``--reuse``), recorded in the marker when there are any."""
    marker = {"shard": shard_id, "samples": len(metas), "expected": expected, "keys": [m["key"] for m in metas],
              "errors": errors, "status": "complete" if not errors and len(metas) == expected else "partial",
              **({"reused": reused} if reused else {})}
    try:
        return out.write_shard(shard_id, tar, parquet_bytes(metas), marker, faults=faults)
    except Exception as e:  # noqa: BLE001 - disk full, permissions, anything: nothing stays under a final name
        failed = [ErrorRecord(STAGE, "", f"writing shard {shard_name(shard_id)} failed: {e}", id=m["id"],
                              row=m.get("row"), seed=m["seed"]).to_row() for m in metas]
        return dict(marker, samples=0, keys=[], status="write_failed", errors=errors + failed, reused=0)


def write_batch(batch: dict, out_dir: str, faults: dict | None = None) -> dict:
    """The stage (a CPU task). Input: ``generate.shard_row`` columns. Output: ``shard_id``, ``marker``
    (JSON), and ``reference_passes``, ``node`` and ``warnings`` (when given) passed on."""
    out = OutputFolder(out_dir)
    markers = []
    reused = batch["reused"] if "reused" in batch else [0] * len(batch["shard_id"])
    for shard_id, tar, metas, errors, expected, n_reused in zip(batch["shard_id"], batch["tar"], batch["metas"],
                                                                batch["errors"], batch["expected"], reused, strict=True):
        marker = write_shard(out, int(shard_id), bytes(tar), json.loads(metas), json.loads(errors),
                             expected=int(expected), reused=int(n_reused), faults=faults)
        markers.append(json.dumps(marker))
    passed = {c: list(batch[c]) for c in ("node", "warnings") if c in batch}
    return {"shard_id": [int(n) for n in batch["shard_id"]], "marker": markers,
            "reference_passes": [int(n) for n in batch["reference_passes"]], **passed}
