"""The ``--compile`` fast path: per-image cost of plain and cached FreeCustom, eager vs ``torch.compile``.

One process loads the model twice (eager, and compiled with ``FreeCustomGenerator.enable_compile``),
prepares the reference K/V once (eager: the same K/V for both), then times, interleaved over rounds
after a warm-up that pays the compile: plain eager, plain compiled, cached eager, cached compiled,
each generating ``--targets`` images of one concept set per call. Prints seconds per image, the
ratios compiled / eager, and the largest latent difference between the two (the equivalence cost).

    python benchmarks/compile.py --tiny                       # tiny random model on CPU: checks the path (minutes of compiling)
    python benchmarks/compile.py --device cuda --dtype float16 --size 512 --steps 50 --targets 8   # the GPU question
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # after ROOT: benchmarks/pipeline.py must not shadow the package


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny random-weight SD1.5-topology model (a path check)")
    p.add_argument("--model", default=None, help="a diffusers SD1.x folder or hub id (default: core.py's random SD1.5)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--concepts", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune")
    args = p.parse_args()

    import core  # benchmarks/core.py: model building and the concept pool
    import torch

    from freecustom_core import FreeCustomGenerator

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    size = args.size or (64 if args.tiny else (512 if device.startswith("cuda") else 128))
    steps = args.steps or (4 if args.tiny or not device.startswith("cuda") else 50)
    from pipeline.tiny_model import build_tiny_sd15

    if args.tiny:
        model = str(build_tiny_sd15(Path("/tmp/freecustom-compile-bench/tiny")))
    elif args.model:
        model = args.model
    else:  # SD1.5's real architecture with random weights, built once (as core.py does)
        if not (core.DEFAULT_MODEL_DIR / "model_index.json").exists():
            build_tiny_sd15(core.DEFAULT_MODEL_DIR, seed=0, real_sd15_unet=True)
        model = str(core.DEFAULT_MODEL_DIR)
    torch_dtype = getattr(torch, dtype)
    eager = FreeCustomGenerator.from_pretrained(model, torch_dtype=torch_dtype, device=device)
    compiled = FreeCustomGenerator.from_pretrained(model, torch_dtype=torch_dtype, device=device,
                                                   compile={"mode": args.mode} if args.mode else True)
    concepts = core.concept_pool(size)[0][: args.concepts]
    common = dict(num_inference_steps=steps, height=size, width=size)
    kv = eager.prepare_references(concepts, **common)
    prompts, seeds = [core.PROMPT] * args.targets, list(range(args.targets))

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    calls = {
        "plain eager": lambda: eager.generate(prompts, seeds, None, output_type="latent", **common),
        "plain compiled": lambda: compiled.generate(prompts, seeds, None, output_type="latent", **common),
        "cached eager": lambda: eager.generate(prompts, seeds, kv, output_type="latent", **common),
        "cached compiled": lambda: compiled.generate(prompts, seeds, kv, output_type="latent", **common),
    }
    t = time.perf_counter()
    outputs = {name: fn() for name, fn in calls.items()}  # warm-up: pays the compile
    sync()
    print(f"warm-up (compiling) {time.perf_counter() - t:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(args.rounds):
        for name in (list(calls) if r % 2 == 0 else list(reversed(calls))):
            sync()
            t = time.perf_counter()
            calls[name]()
            sync()
            times[name].append((time.perf_counter() - t) / args.targets)
    med = {name: statistics.median(v) for name, v in times.items()}
    diff = {kind: float((outputs[f"{kind} compiled"].float() - outputs[f"{kind} eager"].float()).abs().max())
            for kind in ("plain", "cached")}
    result = {"device": device, "dtype": dtype, "size": size, "steps": steps, "targets": args.targets,
              "concepts": args.concepts, "model": model, "mode": args.mode, "s_per_image": med,
              "compiled_over_eager": {k: med[f"{k} compiled"] / med[f"{k} eager"] for k in ("plain", "cached")},
              "max_latent_diff": diff}
    print(json.dumps(result, indent=1))
    for kind in ("plain", "cached"):
        print(f"{kind}: eager {med[f'{kind} eager']:.3f} s/img, compiled {med[f'{kind} compiled']:.3f} s/img "
              f"-> x{med[f'{kind} eager'] / med[f'{kind} compiled']:.2f} faster; max |latent diff| {diff[kind]:.2e}")
    print(f"cached / plain: eager {med['cached eager'] / med['plain eager']:.2f}, "
          f"compiled {med['cached compiled'] / med['plain compiled']:.2f}")


if __name__ == "__main__":
    main()
