"""Incremental runs (issue 12): "1,000 rows of which 50 are new or changed costs the 50".

Night 1 renders a manifest of N rows into OUT1. Night 2's manifest holds the same rows with a
fraction (default 5 %) new or changed, in three kinds: new rows, rows with a changed prompt, and
rows whose concept image changed (a new concept set). Night 2 is rendered twice in this process,
one after the other (the order alternates between repeats): in full into a fresh folder (the
baseline), and with ``--reuse OUT1`` into another. All nights use a ``--kv-cache`` as nightly runs
do; each night-2 run starts from a copy of the cache as night 1 left it. Printed: wall-time ratios incremental / full and
incremental / (fraction x full), where fraction = changed samples / night 2's samples, and
``samples_reused`` / ``samples_rendered`` from the incremental run's ``_stats.json``. A third run of
night 2, with ``--reuse`` of its own full render (nothing to render), gives a run's fixed cost
(start-up, model load, copying every sample); above that floor, the changed samples' cost is
compared with their share of the full run's. The model is the
tiny random-weight SD1.5-topology model of ``pipeline/tiny_model.py``; a sample's cost does not
depend on the weights.

    python benchmarks/incremental.py --tag 1000rows_cpu    # 1,000 rows, 64², 2 steps, one repeat
    python benchmarks/incremental.py --rows 200 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def make_manifests(folder: Path, rows: int, changed_fraction: float) -> tuple[Path, Path, dict]:
    """Night 1's and night 2's manifests (one seed per row) and what changed between them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.examples import draw_example_images
    from pipeline.manifest import MANIFEST_SCHEMA

    paths = draw_example_images(folder / "images")
    hat_v2 = folder / "images" / "hat_v2.png"  # the product photo changed: one pixel is enough
    image = Image.open(paths["hat"])
    image.putpixel((5, 5), (0, 0, 255, 255) if image.mode == "RGBA" else (0, 0, 255))
    image.save(hat_v2)

    def concepts(kind: str, hat: Path = paths["hat"]) -> list[dict]:
        base = {"weight": 3.0, "box": None, "points": None, "label": None, "context": None}
        if kind == "dog_mug":
            return [dict(base, image=str(paths["dog"]), prompt="a dog", mask=str(paths["dog_mask"])),
                    dict(base, image=str(paths["mug"]), prompt="a blue mug", mask=str(paths["mug_mask"]))]
        return [dict(base, image=str(hat), prompt="a red hat", mask=None)]

    night1 = [{"id": f"r{i:05d}", "prompt": f"scene number {i}", "seeds": [i],
               "concepts": concepts("dog_mug" if i % 2 else "hat")} for i in range(rows)]
    changes = max(3, round(rows * changed_fraction))
    new, prompts, images = changes // 3, changes // 3, changes - 2 * (changes // 3)
    night2 = [dict(r) for r in night1]
    # spread over the manifest (every shard holds a few): hat rows are the even ones, the others odd
    hat_rows = list(range(0, rows, 2))[:: max(1, (rows // 2) // images)][:images]
    prompt_rows = list(range(1, rows, 2))[:: max(1, (rows // 2) // prompts)][:prompts]
    for i in prompt_rows:
        night2[i]["prompt"] += " at dusk"
    for i in hat_rows:
        night2[i]["concepts"] = concepts("hat", hat_v2)
    night2 += [{"id": f"n{i:05d}", "prompt": f"new scene {i}", "seeds": [rows + i],
                "concepts": concepts("dog_mug" if i % 2 else "hat")} for i in range(new)]
    schema = pa.schema([MANIFEST_SCHEMA.field(n) for n in ("id", "prompt", "seeds", "concepts")])
    manifests = folder / "night1.parquet", folder / "night2.parquet"
    for path, data in zip(manifests, (night1, night2), strict=True):
        pq.write_table(pa.Table.from_pylist(data, schema=schema), path)
    return *manifests, {"new_rows": new, "changed_prompts": len(prompt_rows), "changed_images": len(hat_rows),
                        "changed_samples": new + len(prompt_rows) + len(hat_rows), "samples": len(night2)}


def render(manifest: Path, model: str, out: Path, args, kv_cache: Path, reuse: tuple[str, ...] = ()) -> dict:
    from pipeline.run import run
    from pipeline.settings import RunSettings
    from stages.params import GenParams

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run(RunSettings(
        manifest=str(manifest), out=str(out), model=model, batch_size=args.batch_size, device="cpu",
        defaults=GenParams(height=args.size, width=args.size, num_inference_steps=args.steps),
        samples_per_shard=args.samples_per_shard, cpus_per_worker=2.0, reuse=reuse, kv_cache=str(kv_cache),
    ))
    wall = time.perf_counter() - t0
    s = summary.stats
    assert s["complete"], f"{out}: the run did not complete: {s}"
    return {"wall_s": round(wall, 3), "seconds": s["seconds"], "samples_written": s["samples_written"],
            "samples_reused": s["samples_reused"], "samples_rendered": s["samples_rendered"],
            "reference_passes": s["reference_passes"], "shards_copied": s["nodes"].get("copy", 0),
            "load_avg": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--changed", type=float, default=0.05, help="fraction of rows new or changed")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="full and incremental runs of night 2, alternating")
    parser.add_argument("--work", type=Path, default=Path("/tmp/freecustom-pipeline-bench-incremental"))
    parser.add_argument("--tag", default=None, help="write results/incremental_TAG.json")
    args = parser.parse_args()

    import ray

    from pipeline.tiny_model import build_tiny_sd15

    shutil.rmtree(args.work, ignore_errors=True)
    model = str(build_tiny_sd15(args.work / "model"))
    night1, night2, change = make_manifests(args.work / "inputs", args.rows, args.changed)
    # logical CPUs: the model actor gets 2 (its torch threads), writers the rest
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")

    # the nights share a --kv-cache, as nightly.sh's do: each night-2 run starts from the cache night 1 left
    first = render(night1, model, args.work / "night1", args, args.work / "kv-night1")
    # "unchanged": night 2 again with --reuse of its own full render, nothing to render: the fixed cost of
    # a run (start-up, model load, reading and copying every sample), the floor of any incremental run
    runs: dict[str, list[dict]] = {"full": [], "incremental": [], "unchanged": []}
    for i in range(args.repeats):
        order = ("full", "incremental") if i % 2 == 0 else ("incremental", "full")
        for kind in (*order, "unchanged"):
            kv = args.work / f"kv-{kind}"
            shutil.rmtree(kv, ignore_errors=True)
            shutil.copytree(args.work / "kv-night1", kv)
            reuse = {"full": (), "incremental": (str(args.work / "night1"),),
                     "unchanged": (str(args.work / "night2-full"),)}[kind]
            runs[kind].append(render(night2, model, args.work / f"night2-{kind}", args, kv, reuse))

    fraction = change["changed_samples"] / change["samples"]
    full = statistics.median(r["wall_s"] for r in runs["full"])
    incr = statistics.median(r["wall_s"] for r in runs["incremental"])
    floor = statistics.median(r["wall_s"] for r in runs["unchanged"])
    # a run whose shards were all copied (pipeline.copy_pass) has no generate_and_write phase
    gen_full = statistics.median(r["seconds"].get("generate_and_write", 0.0) for r in runs["full"])
    gen_incr = statistics.median(r["seconds"].get("generate_and_write", 0.0) for r in runs["incremental"])
    last = runs["incremental"][-1]
    summary = {
        "rows": args.rows, "changes": change, "fraction": round(fraction, 4),
        "full_wall_s": full, "incremental_wall_s": incr,
        "incremental_over_full": round(incr / full, 4),
        "incremental_over_fraction_x_full": round(incr / (fraction * full), 3),
        "generate_and_write_incremental_over_full": round(gen_incr / gen_full, 4),
        "unchanged_wall_s": floor,
        # what the changed samples cost above a run's fixed cost, against their share of the full run's
        "above_floor_incremental_over_fraction_x_full": round((incr - floor) / (fraction * (full - floor)), 3),
        "samples_reused": last["samples_reused"], "samples_rendered": last["samples_rendered"],
    }
    record = {
        "benchmark": "incremental", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "night1": first, "runs": runs, "summary": summary,
    }
    print(json.dumps(record, indent=1))
    print(f"\nnight 2: {change['samples']} samples ({args.rows} rows of night 1; {change['new_rows']} new, "
          f"{change['changed_prompts']} with a changed prompt, {change['changed_images']} with a changed concept "
          f"image), {args.size}², {args.steps} steps, tiny model, CPU; medians of {args.repeats}")
    print(f"  full render      {full:8.1f} s   ({runs['full'][-1]['samples_rendered']} rendered)")
    print(f"  with --reuse     {incr:8.1f} s   ({summary['samples_reused']} reused, "
          f"{summary['samples_rendered']} rendered)")
    print(f"  incremental / full                  {summary['incremental_over_full']:.3f}")
    print(f"  incremental / (fraction x full)     {summary['incremental_over_fraction_x_full']:.2f}   "
          f"(fraction {fraction:.4f}; 1.0 = costs exactly its share)")
    print(f"  generate_and_write phase: incremental / full {summary['generate_and_write_incremental_over_full']:.3f}")
    print(f"  nothing changed  {floor:8.1f} s   (--reuse of the full render: a run's fixed cost)")
    print(f"  above that floor: (incremental - floor) / (fraction x (full - floor)) "
          f"{summary['above_floor_incremental_over_fraction_x_full']:.2f}")
    if args.tag:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"incremental_{args.tag}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"  raw results: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
