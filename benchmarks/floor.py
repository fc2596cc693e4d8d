"""A run's fixed cost, apart from Ray's own start-up (issue 22 item 5): ``--reuse`` of an identical output.

Reads the work folder ``incremental.py`` leaves (its night-2 manifest, the full render of it, the tiny
model and the K/V cache) and, in one fresh process as the CLI would, times: the imports of
``pipeline.run``, ``ray.init`` (Ray's start-up), the same ``--reuse`` run REPEATS times into a fresh
folder (nothing changed: every shard is copied, ``pipeline.copy_pass``), and ``ray.shutdown``. The
first run pays for the Ray worker processes that Ray Data starts for the first time; the later ones
are what a run costs on a warm cluster.

    python benchmarks/incremental.py          # once: builds the work folder
    python benchmarks/floor.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

t_start = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/freecustom-pipeline-bench-incremental"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = args.work
    if not (work / "night2-full" / "_stats.json").exists():
        sys.exit(f"{work}: no full render of night 2; run benchmarks/incremental.py first")

    import ray

    from pipeline.run import run
    from pipeline.settings import RunSettings
    from stages.params import GenParams

    imported = time.perf_counter()
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    started = time.perf_counter()
    runs = []
    for _ in range(args.repeats):
        out = work / "floor-out"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        stats = run(RunSettings(manifest=str(work / "inputs" / "night2.parquet"), out=str(out), model=str(work / "model"),
                                batch_size=8, device="cpu", defaults=GenParams(height=64, width=64, num_inference_steps=2),
                                samples_per_shard=64, cpus_per_worker=2.0, reuse=(str(work / "night2-full"),),
                                kv_cache=str(work / "kv-night1"))).stats
        runs.append({"wall_s": round(time.perf_counter() - t0, 3), "seconds": stats["seconds"], "nodes": stats["nodes"],
                     "samples_reused": stats["samples_reused"], "samples_rendered": stats["samples_rendered"]})
    t0 = time.perf_counter()
    ray.shutdown()
    record = {"imports_s": round(imported - t_start, 3), "ray_init_s": round(started - imported, 3),
              "ray_shutdown_s": round(time.perf_counter() - t0, 3), "runs": runs}
    print(json.dumps(record, indent=1))
    print(f"\nimports {record['imports_s']:.2f} s, Ray start-up {record['ray_init_s']:.2f} s, "
          f"shutdown {record['ray_shutdown_s']:.2f} s")
    for i, r in enumerate(runs):
        print(f"run {i + 1}: {r['wall_s']:.2f} s ({r['samples_reused']} copied, {r['samples_rendered']} rendered, "
              f"shards by {r['nodes']})")
    print(f"first run + imports (outside Ray's start-up): {record['imports_s'] + runs[0]['wall_s']:.2f} s")


if __name__ == "__main__":
    main()
