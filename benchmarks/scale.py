"""Scale: plan and drive a large manifest with the model swapped for a clearly named no-op engine.

Measures the pipeline around the engine: validation, planning, Ray scheduling, shard writing,
metadata. The no-op engine (``NoOpReferenceKVStage``, ``NoOpGenerateStage``, defined here and used
only here) returns a fixed 8x8 PNG per target. Each size runs in its own process so that the
driver's peak RSS (``VmHWM``: this process image's high-water mark; ``ru_maxrss`` would carry the
parent's peak across fork and exec) belongs to that size alone; the parent writes the manifests, so
building them does not count as the driver's memory.

    python benchmarks/scale.py --quick          # 1k and 10k rows
    python benchmarks/scale.py                  # 10k and 100k rows (100 concept sets)
    python benchmarks/scale.py --rows 10000 100000 1000000 10000000 --tag stream_cpu

Each manifest is a folder of 8 Parquet files. Per size: the driver's peak RSS, validation (and
planning) rows/s, the time from ``run()``'s start to the first finished shard, wall time and
overhead per image; Ray's own start-up is measured apart (``ray_start_s``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class NoOpReferenceKVStage:
    """Benchmark-only stand-in for ReferenceKVStage: no model, no K/V; other columns pass through."""

    def __init__(self, **kwargs):
        pass

    def __call__(self, batch: dict) -> dict:
        from stages.base import row_error, to_column

        n = len(batch["concept_set_id"])
        ok = [row_error(batch, i) is None for i in range(n)]
        out = {c: to_column(list(v)) for c, v in batch.items()}
        out.update(kv_path=["noop" if good else "" for good in ok], reference_pass=[int(good) for good in ok])
        return out


class NoOpGenerateStage:
    """Benchmark-only stand-in for GenerateStage: a fixed 8x8 PNG per target, real metadata and packing."""

    def __init__(self, **kwargs):
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (120, 30, 60)).save(buf, format="PNG")
        self.png = buf.getvalue()

    def __call__(self, batch: dict) -> dict:
        from stages.generation.generate import shard_row
        from stages.generation.units import WorkUnit

        rows = []
        for raw in batch["unit"]:
            unit = WorkUnit.decode(raw)
            samples = [(t.key, "png", self.png, dict(unit.sample_meta(t), model={"id": "noop-engine"}))
                       for t in unit.targets if unit.groups[t.group].error is None]
            rows.append(shard_row(unit.shard_id, samples, [], expected=len(unit.targets)))
        return {column: [r[column] for r in rows] for column in rows[0]}


def make_manifest(folder: Path, rows: int, sets: int, files: int = 8) -> Path:
    """A manifest folder of ``files`` Parquet files (rows split evenly, as Spark writes them), its images
    beside them (``images/``, relative paths resolve against the folder). Written file by file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.manifest import MANIFEST_SCHEMA

    manifest = folder / "manifest"
    images = manifest / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(sets):
        arr = np.zeros((64, 64, 4), np.uint8)
        arr[..., :3] = rng.integers(0, 255, 3)
        arr[16:48, 16:48, 3] = 255  # an RGBA cut-out: the alpha is the mask
        Image.fromarray(arr, "RGBA").save(images / f"p{s:04d}.png")
    concepts = [[{"image": f"images/p{s:04d}.png", "prompt": f"product {s}", "mask": None, "weight": 3.0, "box": None,
                  "points": None, "label": None, "context": None}] for s in range(sets)]
    schema = pa.schema([MANIFEST_SCHEMA.field(n) for n in ("id", "prompt", "seeds", "concepts")]
                       + [pa.field("sku", pa.string())])
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for f in range(files):
        lo, hi = int(bounds[f]), int(bounds[f + 1])
        table = pa.table({
            "id": [f"row{i:08d}" for i in range(lo, hi)],
            "prompt": [f"product {i % sets} in scene {i}" for i in range(lo, hi)],
            "seeds": [[i] for i in range(lo, hi)],
            "concepts": [concepts[i % sets] for i in range(lo, hi)],
            "sku": [f"SKU-{i % sets:04d}" for i in range(lo, hi)],
        }, schema=schema)
        pq.write_table(table, manifest / f"part-{f:05d}.parquet", row_group_size=65536)
    return manifest


def peak_rss_mib() -> float:
    """This process's peak resident memory since its ``exec`` (``VmHWM``). ``ru_maxrss`` is not it: Linux
    keeps the larger of the parent's peak (inherited by ``fork``) and the new image's across ``exec``, so a
    child of the parent that built a 10M-row manifest would report the parent's gigabyte."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Enough(Exception):
    """``--stop-after``: the shards wanted are done; the rest of the run is left (and extrapolated)."""


def child(rows: int, sets: int, work: Path, samples_per_shard: int, stop_after: int | None = None) -> dict:
    import ray

    from pipeline.run import RunFailed, RunSettings, run
    from stages.params import GenParams

    os.environ["HF_HUB_OFFLINE"] = "1"  # "noop-engine" is no hub model: its family is looked up locally only
    manifest = work / f"m{rows}" / "manifest"  # written by the parent: its memory is not the driver's
    t = time.perf_counter()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_start = time.perf_counter() - t
    settings = RunSettings(manifest=str(manifest), out=str(work / f"out{rows}"), model="noop-engine",
                           defaults=GenParams(height=64, width=64, num_inference_steps=2),
                           samples_per_shard=samples_per_shard)
    first_shard, done = [], []

    def on_shard(marker, n, total):
        first_shard or first_shard.append(time.perf_counter() - t)
        done.append(marker["samples"])
        if stop_after and n >= stop_after:
            raise Enough

    t = time.perf_counter()
    try:
        summary = run(settings, engine={"reference_kv": NoOpReferenceKVStage, "generate": NoOpGenerateStage},
                      on_shard=on_shard)
    except RunFailed:
        if not (stop_after and len(done) >= stop_after):
            raise
        wall = time.perf_counter() - t
        peak_mib = peak_rss_mib()
        planned = [json.loads(p.read_text()) for p in (Path(settings.out) / "_plan").glob("*.summary.json")]
        return {"rows": rows, "files": 8, "concept_sets": sets, "samples": sum(done), "stopped_after_shards": len(done),
                "ray_start_s": round(ray_start, 2), "wall_s_partial": round(wall, 2),
                "first_shard_s": round(first_shard[0], 2), "driver_peak_rss_mib": round(peak_mib, 1),
                "files_planned_by_then": len(planned), "samples_planned_by_then": sum(p["samples"] for p in planned)}
    wall = time.perf_counter() - t
    peak_mib = peak_rss_mib()  # the run's; not the check's below
    # output metadata correct: every (id, seed) once, pass-through column carried (read column by column)
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = Path(settings.out)
    written = distinct = 0
    first = None
    for p in sorted((out / "shards").glob("*.parquet")):
        ids = pq.read_table(p, columns=["id"]).column("id")
        written += len(ids)
        distinct += len(pc.unique(ids))  # shards hold distinct rows (one seed each): sum of per-shard uniques
        if first is None:
            first = json.loads(pq.read_table(p, columns=["metadata"])["metadata"][0].as_py())
    correct = (written == rows == distinct == summary.stats["samples_written"]
               and first["passthrough"]["sku"].startswith("SKU-") and first["model"]["id"] == "noop-engine")
    plan_s = summary.stats["seconds"].get("plan_tasks", 0.0)
    return {"rows": rows, "files": 8, "concept_sets": sets, "samples": summary.stats["samples_written"],
            "ray_start_s": round(ray_start, 2), "wall_s": round(wall, 2),
            "first_shard_s": round(first_shard[0], 2) if first_shard else None,
            # validation and planning run in one Ray task per file: rows per second of those tasks, per core
            "plan_rows_per_task_s": round(rows / plan_s) if plan_s else None,
            "ms_per_image": round(1000 * wall / max(1, summary.stats["samples_written"]), 3),
            "seconds": summary.stats["seconds"], "driver_peak_rss_mib": round(peak_mib, 1),
            "metadata_correct": correct, "exit_code": summary.exit_code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1k and 10k rows instead of 10k and 100k")
    parser.add_argument("--rows", type=int, nargs="+", help="manifest sizes to run, smallest first (e.g. 10000 100000 1000000)")
    parser.add_argument("--sets", type=int, default=100)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/freecustom-scale"))
    parser.add_argument("--tag", help="append the rows to results/scale_TAG.jsonl")
    parser.add_argument("--stop-after", type=int, help="stop each run after this many shards (sizes too big to "
                        "render whole here: planning, first shard and driver memory are measured, the rest not)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.sets, args.work, args.samples_per_shard, args.stop_after)))
        return
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    sizes = args.rows or ((1_000, 10_000) if args.quick else (10_000, 100_000))
    results = []
    for rows in sizes:
        make_manifest(args.work / f"m{rows}", rows, args.sets)
        cmd = [sys.executable, __file__, "--child", str(rows), "--sets", str(args.sets),
               "--samples-per-shard", str(args.samples_per_shard), "--work", str(args.work),
               *(["--stop-after", str(args.stop_after)] if args.stop_after else [])]
        stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        line = [line for line in stdout.splitlines() if line.startswith("{")][-1]  # Ray may print after it
        results.append(json.loads(line))
        print(json.dumps(results[-1]), flush=True)
        if args.tag:
            with open(ROOT / "benchmarks" / "results" / f"scale_{args.tag}.jsonl", "a") as f:
                f.write(json.dumps(dict(results[-1], date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                        load_avg=os.getloadavg())) + "\n")
    if any("stopped_after_shards" in r for r in results):
        return
    small, big = results[0], results[-1]
    for mid in results[1:-1]:
        print(f"rows {mid['rows']:>7}: driver peak RSS {mid['driver_peak_rss_mib']} MiB, {mid['ms_per_image']} ms/image")
    print(f"\nrows {small['rows']:>7} -> {big['rows']:>7}: driver peak RSS {small['driver_peak_rss_mib']} -> "
          f"{big['driver_peak_rss_mib']} MiB (x{big['driver_peak_rss_mib'] / small['driver_peak_rss_mib']:.2f} for "
          f"x{big['rows'] / small['rows']:.0f} rows); overhead {small['ms_per_image']} -> {big['ms_per_image']} ms/image "
          f"(target <= 5); metadata correct: {small['metadata_correct'] and big['metadata_correct']}")


if __name__ == "__main__":
    main()
