"""Stage: write one shard atomically: ``shards/{n:05d}.tar`` + ``.parquet``, then the done marker.

Every file is written under a temporary name and renamed; the marker
``_progress/{n:05d}.json`` is written last, so a shard is finished exactly when its marker
exists. A write error (disk full, ...) leaves nothing under a final name and is reported in
the result instead of raised, so the run ends with a clear message and a rerun completes it.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path

from .faults import fault_point
from .generate import ERRORS_MEMBER

PARQUET_COLUMNS = ("key", "id", "seed", "prompt", "negative_prompt", "concept_set_id", "width", "height",
                   "num_inference_steps", "guidance_scale", "metadata")


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def _safe_dir(out: Path, sub: str) -> Path:
    path = out / sub
    if path.is_symlink():
        raise OSError(f"{path} is a symbolic link; refusing to write through it")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a hidden temp name in the same folder, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def parquet_bytes(metas: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "key": pa.array([m["key"] for m in metas], pa.string()),
        "id": pa.array([m["id"] for m in metas], pa.string()),
        "seed": pa.array([m["seed"] for m in metas], pa.int64()),
        "prompt": pa.array([m["prompt"] for m in metas], pa.string()),
        "negative_prompt": pa.array([m["negative_prompt"] for m in metas], pa.string()),
        "concept_set_id": pa.array([m["concept_set_id"] for m in metas], pa.string()),
        "width": pa.array([m["width"] for m in metas], pa.int64()),
        "height": pa.array([m["height"] for m in metas], pa.int64()),
        "num_inference_steps": pa.array([m["num_inference_steps"] for m in metas], pa.int64()),
        "guidance_scale": pa.array([m["guidance_scale"] for m in metas], pa.float64()),
        "metadata": pa.array([json.dumps(m, sort_keys=True) for m in metas], pa.string()),
    }
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def write_shard(out_dir: str | Path, shard_id: int, result: bytes, *, expected: int, faults: dict | None = None) -> dict:
    """Write the shard held in ``result`` (from GenerateStage); return its marker (also on failure)."""
    out = Path(out_dir)
    name = shard_name(shard_id)
    with tarfile.open(fileobj=io.BytesIO(result), mode="r") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    errors = json.loads(dict(members)[ERRORS_MEMBER])
    samples = [(n, d) for n, d in members if n != ERRORS_MEMBER]
    metas = [json.loads(d) for n, d in samples if n.endswith(".json")]
    marker = {"shard": shard_id, "samples": len(metas), "expected": expected, "keys": [m["key"] for m in metas],
              "errors": errors, "status": "complete" if not errors and len(metas) == expected else "partial"}
    try:
        shards = _safe_dir(out, "shards")
        progress = _safe_dir(out, "_progress")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for member_name, data in samples:
                info = tarfile.TarInfo(member_name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
        atomic_write(shards / f"{name}.tar", buf.getvalue())
        fault_point("write.tar", faults)
        atomic_write(shards / f"{name}.parquet", parquet_bytes(metas))
        atomic_write(progress / f"{name}.json", json.dumps(marker, sort_keys=True).encode())
    except Exception as e:  # noqa: BLE001 - disk full, permissions, anything: nothing stays under a final name
        for suffix in (".tar", ".parquet"):
            (out / "shards" / f"{name}{suffix}").unlink(missing_ok=True)
        keys = {m["key"] for m in metas}
        return dict(marker, samples=0, keys=[], status="write_failed",
                    errors=errors + [{"id": m["id"], "row": m.get("row"), "seed": m["seed"], "stage": "write", "field": "",
                                      "reason": f"writing shard {name} failed: {e}"} for m in metas if m["key"] in keys])
    return marker


def write_batch(batch: dict, out_dir: str, faults: dict | None = None) -> dict:
    """The stage (a CPU task). Input: ``shard_id``, ``result``, ``expected`` (and ``reference_passes``, passed
    on). Output: ``shard_id``, ``marker`` JSON, ``reference_passes``."""
    out = {"shard_id": [], "marker": [], "reference_passes": []}
    passes = batch.get("reference_passes", [0] * len(batch["shard_id"]))
    for shard_id, result, expected, n in zip(batch["shard_id"], batch["result"], batch["expected"], passes, strict=True):
        marker = write_shard(out_dir, int(shard_id), bytes(result), expected=int(expected), faults=faults)
        out["shard_id"].append(int(shard_id))
        out["marker"].append(json.dumps(marker))
        out["reference_passes"].append(int(n))
    return out
