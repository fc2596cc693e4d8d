"""Pipeline overhead: images/s of `run` against a hand-written in-process loop over the same rows.

Both sides use the same model, rows, seeds, batch size and image encoding; the loop calls the engine
directly (prepare_references once per concept set, generate, PNG encode) with no Ray, no stages,
no shards. Reported: the ratio of throughput in the phases that run the model (run: reference K/V
and generate+write; loop: prepare_references, generate and encode), the same after run's first
shard (its actor started and model loaded), and the ratio of end-to-end wall time including every
phase. Both run in this process, one after the other, and the medians are compared.

    python benchmarks/pipeline.py --quick         # tiny SD1.5-topology model, 128², 8 steps
    python benchmarks/pipeline.py --size 256 --steps 20 --rows 16
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLES_PER_SHARD = 16


def median(values) -> float | None:
    """The median of the values that were measured (None: not measured in that run), None if none were."""
    measured = [v for v in values if v is not None]
    return statistics.median(measured) if measured else None


def make_manifest(folder: Path, rows: int, seeds: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.examples import draw_example_images
    from pipeline.manifest import MANIFEST_SCHEMA

    paths = draw_example_images(folder / "images")
    sets = [
        [
            {"image": str(paths["dog"]), "prompt": "a dog", "mask": str(paths["dog_mask"])},
            {"image": str(paths["mug"]), "prompt": "a blue mug", "mask": str(paths["mug_mask"])},
        ],
        [{"image": str(paths["hat"]), "prompt": "a red hat", "mask": None}],
    ]
    data = []
    for i in range(rows):
        concepts = [dict(c, weight=3.0, box=None, points=None, label=None, context=None) for c in sets[i % 2]]
        data.append(
            {
                "id": f"r{i:04d}",
                "prompt": f"scene number {i}",
                "seeds": list(range(100 * i, 100 * i + seeds)),
                "concepts": concepts,
            }
        )
    schema = pa.schema([MANIFEST_SCHEMA.field(n) for n in ("id", "prompt", "seeds", "concepts")])
    path = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(data, schema=schema), path)
    return path


def hand_loop(manifest: Path, model: str, *, size: int, steps: int, batch_size: int) -> dict:
    """The baseline: what a user would write by hand around the engine."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from freecustom_core import ConceptRef, FreeCustomGenerator

    t0 = time.perf_counter()
    gen = FreeCustomGenerator.from_pretrained(model, device="cpu")
    rows = pq.read_table(manifest).to_pylist()
    by_set: dict[str, list[dict]] = {}
    for r in rows:
        by_set.setdefault(json.dumps(r["concepts"], sort_keys=True), []).append(r)
    kv_seconds = gen_seconds = 0.0
    images = 0
    for rows_of_set in by_set.values():
        t = time.perf_counter()
        concepts = []
        for c in rows_of_set[0]["concepts"]:
            image = Image.open(c["image"])
            mask = Image.open(c["mask"]) if c["mask"] else image.getchannel("A")
            concepts.append(ConceptRef(image.convert("RGB"), mask, c["prompt"], c["weight"]))
        kv = gen.prepare_references(concepts, num_inference_steps=steps, height=size, width=size)
        kv_seconds += time.perf_counter() - t
        t = time.perf_counter()
        prompts = [r["prompt"] for r in rows_of_set for _ in r["seeds"]]
        seeds = [s for r in rows_of_set for s in r["seeds"]]
        for image in gen.generate(
            prompts, seeds, kv, num_inference_steps=steps, height=size, width=size, batch_size=batch_size
        ):
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=6)
            images += 1
        gen_seconds += time.perf_counter() - t
    del np
    return {
        "images": images,
        "wall_s": time.perf_counter() - t0,
        "generate_s": gen_seconds,
        "kv_s": kv_seconds,
        "images_per_s": images / (gen_seconds + kv_seconds),
    }


def pipeline_run(
    manifest: Path,
    model: str,
    out: Path,
    *,
    size: int,
    steps: int,
    batch_size: int,
    reference_actors: str = "auto",
) -> dict:
    from pipeline.run import run
    from pipeline.settings import RunSettings
    from stages.params import GenParams

    shutil.rmtree(out, ignore_errors=True)
    done: list[tuple[float, int]] = []  # (time, samples) as each shard's write completes

    def on_shard(marker, n, total):
        done.append((time.perf_counter(), marker["samples"]))

    t0 = time.perf_counter()
    summary = run(
        RunSettings(
            manifest=str(manifest),
            out=str(out),
            model=model,
            batch_size=batch_size,
            defaults=GenParams(height=size, width=size, num_inference_steps=steps),
            samples_per_shard=SAMPLES_PER_SHARD,
            cpus_per_worker=2.0,
            reference_actors=reference_actors,
        ),
        on_shard=on_shard,
    )
    wall = time.perf_counter() - t0
    s = summary.stats
    # steady state: from the first finished shard (the actor has started and loaded the model) to the last;
    # None with fewer than 3 shards (SAMPLES_PER_SHARD images each): too few to tell
    steady = (sum(n for _, n in done[1:]) / (done[-1][0] - done[0][0])) if len(done) > 2 else None
    # the phases that run the model: generation, and reference K/V (inside generation with one actor,
    # else a phase of its own, chained with resolve: counted whole, which favours the loop)
    model_s = sum(
        v
        for k, v in s["seconds"].items()
        if k in ("generate_and_write", "reference_kv", "resolve_and_reference_kv")
    )
    return {
        "images": s["samples_written"],
        "wall_s": wall,
        "generate_s": s["seconds"]["generate_and_write"],
        "model_s": model_s,
        "images_per_s": s["samples_written"] / model_s,
        "steady_images_per_s": steady,
        "reference_passes": s["reference_passes"],
        "first_shard_s": done[0][0]
        - (t0 + sum(v for k, v in s["seconds"].items() if k != "generate_and_write"))
        if done
        else None,
        "seconds": s["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/freecustom-pipeline-bench"))
    parser.add_argument(
        "--compare-reference-actors",
        action="store_true",
        help="also run with --reference-actors always (a reference actor pool before generation)",
    )
    args = parser.parse_args()
    if args.quick:
        args.rows, args.seeds, args.size, args.steps, args.repeats = 8, 2, 128, 8, 2

    import ray

    from pipeline.tiny_model import build_tiny_sd15

    shutil.rmtree(args.work, ignore_errors=True)
    model = str(build_tiny_sd15(args.work / "model"))
    manifest = make_manifest(args.work / "inputs", args.rows, args.seeds)
    # logical CPUs: the model actor gets 2 (the loop's torch threads), writers the rest
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    modes = ["auto", "always"] if args.compare_reference_actors else ["auto"]
    loops, runs = [], {m: [] for m in modes}
    for i in range(args.repeats):
        loops.append(hand_loop(manifest, model, size=args.size, steps=args.steps, batch_size=args.batch_size))
        for mode in modes:
            runs[mode].append(
                pipeline_run(
                    manifest,
                    model,
                    args.work / f"out-{mode}-{i}",
                    size=args.size,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    reference_actors=mode,
                )
            )
    med = {k: median(r[k] for r in loops) for k in ("images_per_s", "wall_s")}
    print(json.dumps({"loop": loops, "run": runs}, indent=1, default=str))
    print(
        f"\n{runs['auto'][0]['images']} images, {args.size}², {args.steps} steps, batch {args.batch_size}, "
        "tiny SD1.5-topology model, CPU; medians of",
        args.repeats,
    )
    for mode in modes:
        mer = {k: median(r[k] for r in runs[mode]) for k in ("images_per_s", "wall_s", "steady_images_per_s")}
        print(f"[--reference-actors {mode}]")
        print(
            f"  model phases (reference K/V + generation): run {mer['images_per_s']:.3f} img/s vs loop "
            f"{med['images_per_s']:.3f} img/s -> ratio {mer['images_per_s'] / med['images_per_s']:.2f} (target >= 0.85)"
        )
        if mer["steady_images_per_s"] is None:
            print(
                f"  steady state (after the first shard): not measured: a run wrote fewer than 3 shards of "
                f"{SAMPLES_PER_SHARD} images (use more rows or seeds)"
            )
        else:
            print(
                f"  steady state (after the first shard: actor started, model loaded): run "
                f"{mer['steady_images_per_s']:.3f} img/s -> ratio {mer['steady_images_per_s'] / med['images_per_s']:.2f}"
            )
        print(
            f"  end to end wall: run {mer['wall_s']:.1f} s vs loop {med['wall_s']:.1f} s -> ratio {med['wall_s'] / mer['wall_s']:.2f}"
        )


if __name__ == "__main__":
    main()
