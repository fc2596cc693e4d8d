"""FreeCustom on FLUX.1: cost per image against plain FLUX at N = 1..3 concepts, and K/V size per concept set.

The model has FLUX.1's topology and depth (19 double-stream + 38 single-stream blocks, the default
MRSA layers are FreeCus's ten vital layers) at a reduced width (``--heads`` x 64; FLUX.1 is 24 x 128)
with random weights, built once by ``tests/flux_tiny.py`` into ``--model-dir``; ``--model`` takes a
real checkpoint instead. One process, the calls of a round in a new random order each round,
medians over rounds; ratios against plain measured in the same rounds. Per image:

  plain    generate(T prompts, T seeds, None) / T
  cached   (prepare_references once + generate(T, kv)) / T; generate(T, kv) / T alone is the cost
           once a concept set's K/V exist (cached on disk, reused across runs)
  inline   generate(T, [ConceptRef...]) / T: the reference pass inside the loop, once per batch
  in-batch tests/oracle_flux.py, one target and its N references in one transformer batch (the
           definition; what a method without caching pays per image)

    .venv/bin/python benchmarks/flux.py                      # CPU: 128x128, width 128, 1 step, T=4, 3 rounds
    .venv/bin/python benchmarks/flux.py --heads 6 --size 256 --seq 128   # CPU, larger (long on 2 cores)
    .venv/bin/python benchmarks/flux.py --device cuda --dtype bfloat16 --model black-forest-labs/FLUX.1-dev \
        --size 1024 --steps 28 --targets 8 --seq 512
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def concepts(n: int):
    """Drawn concepts (tests/conftest.py): masks of about 25 %, 13 % and 35 % of the image."""
    from tests.conftest import draw_concept

    drawn = [
        draw_concept("red", (6, 6, 30, 30), "a red cube"),
        draw_concept("blue", (20, 4, 44, 20), "a blue hat", ellipse=True, weight=2.0),
        draw_concept("green", (0, 30, 47, 47), "green grass", weight=3.5),
    ]
    return drawn[:n]


def mask_share(kv) -> float:
    """Kept reference tokens over all reference tokens (the masked area on the token grid)."""
    return kv.nbytes / kv.dense_nbytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="a FLUX.1 checkpoint (hub id or folder); default: a random-weight one"
    )
    parser.add_argument(
        "--model-dir", default="/tmp/freecustom-bench-flux", help="where the random model is built"
    )
    parser.add_argument("--heads", type=int, default=2, help="attention heads of 64 of the random model")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--targets", type=int, default=4, help="targets per concept set (T)")
    parser.add_argument("--concepts", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--seq", type=int, default=32, help="T5 tokens (FLUX.1-dev: 512)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--tag", default="flux_cpu")
    args = parser.parse_args(argv)

    import torch

    from freecustom_core.flux import FluxFreeCustomGenerator
    from tests.flux_tiny import build_tiny_flux
    from tests.oracle_flux import in_batch_generate

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        folder = Path(args.model_dir) / f"h{args.heads}"
        if not (folder / "model_index.json").exists():
            build_tiny_flux(
                folder,
                num_layers=19,
                num_single_layers=38,
                heads=args.heads,
                head_dim=64,
                axes_dims_rope=(8, 28, 28),
            )
        model = str(folder)
    dtype = getattr(torch, args.dtype)
    gen = FluxFreeCustomGenerator.from_pretrained(model, torch_dtype=dtype, device=args.device)
    t_count = args.targets
    prompts = [f"a photo of a cube number {i}" for i in range(t_count)]
    seeds = list(range(t_count))
    common = dict(
        num_inference_steps=args.steps,
        height=args.size,
        width=args.size,
        max_sequence_length=args.seq,
        output_type="latent",
    )
    sets = {n: concepts(n) for n in args.concepts}

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - start, time.process_time() - cpu

    calls = {"plain": lambda: gen.generate(prompts, seeds, None, **common)}
    kv_by_n = {}
    for n, refs in sets.items():
        calls[f"prepare N={n}"] = lambda refs=refs, n=n: kv_by_n.__setitem__(
            n, gen.prepare_references(refs, **{k: v for k, v in common.items() if k != "output_type"})
        )
        calls[f"cached N={n}"] = lambda n=n: gen.generate(prompts, seeds, kv_by_n[n], **common)
        calls[f"inline N={n}"] = lambda refs=refs: gen.generate(prompts, seeds, refs, **common)
        calls[f"in-batch N={n}"] = lambda refs=refs: in_batch_generate(
            gen.pipe,
            gen.layer_names(),
            refs,
            prompts[0],
            0,
            num_inference_steps=args.steps,
            height=args.size,
            width=args.size,
            max_sequence_length=args.seq,
        )
    # warm-up, and the K/V the cached calls need (prepare runs before cached in every round)
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu_times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for _ in range(args.rounds):
        random.shuffle(order)
        order.sort(key=lambda name: name.startswith("cached"))  # after every prepare of the round
        for name in order:
            wall, cpu = timed(calls[name])
            times[name].append(wall)
            cpu_times[name].append(cpu)
    med = {name: statistics.median(v) for name, v in times.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu_times.items()}

    def per_image_costs(m):
        out = {"plain": m["plain"] / t_count}
        for n in args.concepts:
            out[f"cached N={n}"] = (m[f"prepare N={n}"] + m[f"cached N={n}"]) / t_count
            out[f"cached N={n}, K/V reused"] = m[f"cached N={n}"] / t_count
            out[f"inline N={n}"] = m[f"inline N={n}"] / t_count
            out[f"in-batch N={n}"] = m[f"in-batch N={n}"]
        return out

    per_image, per_image_cpu = per_image_costs(med), per_image_costs(med_cpu)
    rows = []
    for n in args.concepts:
        kv = kv_by_n[n]
        rows.append(
            {
                "n": n,
                "kv_bytes": kv.nbytes,
                "kv_dense_bytes": kv.dense_nbytes,
                "kept_share": round(mask_share(kv), 4),
                "kv_bytes_per_step": kv.nbytes // max(1, len(kv.steps)),
                "layers": len(kv.layers),
                "prepare_s": round(med[f"prepare N={n}"], 3),
            }
        )
    plain, plain_cpu = per_image["plain"], per_image_cpu["plain"]
    print(
        f"FLUX.1 topology, {args.size}x{args.size}, {args.steps} step(s), T={t_count} targets per set, "
        f"{args.seq} T5 tokens, {args.dtype} on {args.device}; medians of {args.rounds} rounds"
    )
    print(f"{'path':28s} {'s/img':>8s} {'x plain':>8s} {'CPU x plain':>11s}")
    for name, value in per_image.items():
        print(f"{name:28s} {value:8.3f} {value / plain:8.2f} {per_image_cpu[name] / plain_cpu:11.2f}")
    print(f"{'N':>2s} {'K/V bytes':>12s} {'per step':>10s} {'dense':>12s} {'kept':>6s} {'prepare s':>9s}")
    for r in rows:
        print(
            f"{r['n']:2d} {r['kv_bytes']:12d} {r['kv_bytes_per_step']:10d} {r['kv_dense_bytes']:12d} "
            f"{r['kept_share']:6.3f} {r['prepare_s']:9.3f}"
        )
    result = {
        "settings": vars(args) | {"model": model, "layers": list(gen.layer_names())},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "times": times,
        "cpu_times": cpu_times,
        "per_image": per_image,
        "ratio_to_plain": {k: v / plain for k, v in per_image.items()},
        "cpu_ratio_to_plain": {k: v / plain_cpu for k, v in per_image_cpu.items()},
        "kv": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    print(f"written: {RESULTS / (args.tag + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
