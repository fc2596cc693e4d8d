"""Few-step benchmark: what one customized image costs with LCM-LoRA / TCD at 4-8 steps, against the 50-step default.

Configurations (one concept set, ``--targets`` images rendered from it, MRSA on every step):

  default   the release's DDIM, 50 steps, guidance 7.5 (classifier-free guidance: 2 UNet rows per target)
  lcm-N     a LoRA + ``LCMScheduler``, N steps, guidance 1 (no CFG), as LCM-LoRA is run
  tcd-N     a LoRA + ``TCDScheduler``, N steps, guidance 1 (no CFG), eta 0.3 (TCD's default gamma)

Per image = (``prepare_references`` + ``generate``) / targets; both are timed. The LoRA is a random
rank-2 adapter on the UNet's attention projections, active unfused (as ``run --lora`` runs it): the
real LCM-LoRA (rank 64, more modules) adds somewhat more per step. The model is SD1.5's real
architecture with random weights (``pipeline/tiny_model.py``), or ``--tiny`` for the tiny one; the
weights being random, this measures cost only: the quality of 4-step LCM/TCD images against 50-step
DDIM cannot be measured here (no real LCM-LoRA or TCD-LoRA weights can be downloaded).

    python benchmarks/fewstep.py                   # CPU, SD1.5-sized, 128x128, 2 rounds (~10 min on 2 busy cores)
    python benchmarks/fewstep.py --tiny --size 64  # seconds: a smoke run
    python benchmarks/fewstep.py --device cuda --dtype float16 --size 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "freecustom-pipeline"

CONFIGS = {  # name -> (scheduler spec, steps, guidance, LoRA)
    "default": ("release", 50, 7.5, False),
    "lcm-4": ("LCMScheduler", 4, 1.0, True),
    "lcm-8": ("LCMScheduler", 8, 1.0, True),
    "tcd-4": ("TCDScheduler", 4, 1.0, True),
}


def _model(tiny: bool) -> Path:
    from pipeline.tiny_model import build_tiny_sd15

    folder = CACHE / ("fewstep-tiny" if tiny else "sd15-random")
    if not (folder / "model_index.json").exists():
        print(f"building the random-weight model into {folder} (once) ...", flush=True)
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        build_tiny_sd15(tmp, seed=0, real_sd15_unet=not tiny)
        os.replace(tmp, folder)
    return folder


def _concept(size: int):
    from PIL import Image, ImageDraw

    from freecustom_core import ConceptRef

    image = Image.new("RGB", (size, size), (90, 120, 60))
    ImageDraw.Draw(image).ellipse((size // 5, size // 5, 4 * size // 5, 4 * size // 5), fill=(200, 30, 30))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse((size // 5, size // 5, 4 * size // 5, 4 * size // 5), fill=255)
    return ConceptRef(image=image, mask=mask, prompt="a red ball", weight=3.0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead of SD1.5's architecture")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--targets", type=int, default=2, help="images rendered from one concept set")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tag", default=None, help="results file name (default fewstep_<model>_<size>_<device>)")
    args = parser.parse_args(argv)

    import torch

    from freecustom_core import FreeCustomGenerator
    from freecustom_core.lora import use_loras
    from freecustom_core.schedulers import build_scheduler
    from tests.model_variants import write_random_lora

    model = _model(args.tiny)
    gen = FreeCustomGenerator.from_pretrained(str(model), torch_dtype=getattr(torch, args.dtype), device=args.device)
    checkpoint_scheduler = dict(gen.pipe.scheduler.config)
    lora_dir = Path(tempfile.mkdtemp(prefix="fewstep-lora-"))
    lora = write_random_lora(model, lora_dir, seed=0, std=0.02)
    concept = _concept(args.size)
    prompts = [f"a red ball on a table, photo {i}" for i in range(args.targets)]
    seeds = list(range(args.targets))

    def run(name: str) -> dict:
        spec, steps, guidance, with_lora = CONFIGS[name]
        gen.pipe.scheduler = build_scheduler(spec, checkpoint_scheduler)
        use_loras(gen.pipe, [(str(lora), 1.0)] if with_lora else [])
        common = dict(num_inference_steps=steps, height=args.size, width=args.size)
        t0 = time.perf_counter()
        kv = gen.prepare_references([concept], **common)
        t1 = time.perf_counter()
        gen.generate(prompts, seeds, kv, guidance_scale=guidance, output_type="pil", batch_size=args.targets,
                     **common)
        t2 = time.perf_counter()
        return {"prepare_s": t1 - t0, "generate_s": t2 - t1, "per_image_s": (t2 - t0) / args.targets}

    info = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
        "model": "tiny" if args.tiny else "sd15-architecture-random",
        "size": args.size,
        "targets": args.targets,
        "device": args.device,
        "dtype": args.dtype,
        "lora": "random rank-2 on to_q/to_k/to_v/to_out.0, unfused",
    }
    for name in args.configs:  # warm-up: one call each, not counted
        spec, _steps, guidance, with_lora = CONFIGS[name]
        gen.pipe.scheduler = build_scheduler(spec, checkpoint_scheduler)
        use_loras(gen.pipe, [(str(lora), 1.0)] if with_lora else [])
        kv = gen.prepare_references([concept], num_inference_steps=1, height=args.size, width=args.size)
        gen.generate(prompts[:1], seeds[:1], kv, num_inference_steps=1, height=args.size, width=args.size,
                     guidance_scale=guidance, output_type="latent")
    rounds: dict[str, list[dict]] = {name: [] for name in args.configs}
    for r in range(args.repeats):
        order = random.Random(r).sample(args.configs, len(args.configs))
        for name in order:
            rounds[name].append(run(name))
        print(f"round {r + 1}/{args.repeats} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    info["load_average_end"] = os.getloadavg()

    summary = {}
    base = statistics.median(x["per_image_s"] for x in rounds["default"]) if "default" in rounds else None
    for name, xs in rounds.items():
        spec, steps, guidance, with_lora = CONFIGS[name]
        per_image = statistics.median(x["per_image_s"] for x in xs)
        summary[name] = {
            "scheduler": spec, "steps": steps, "guidance_scale": guidance, "lora": with_lora,
            "per_image_s": round(per_image, 3),
            "prepare_s": round(statistics.median(x["prepare_s"] for x in xs), 3),
            "generate_s": round(statistics.median(x["generate_s"] for x in xs), 3),
            "vs_default": round(per_image / base, 3) if base else None,
        }
    result = {"machine": info, "summary": summary, "rounds": rounds}
    tag = args.tag or f"fewstep_{'tiny' if args.tiny else 'sd15'}_{args.size}_{args.device.split(':')[0]}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'config':10} {'steps':>5} {'cfg':>4} {'s/img':>8} {'prepare':>8} {'generate':>9} {'x default':>9}")
    for name, s in summary.items():
        print(f"{name:10} {s['steps']:>5} {s['guidance_scale']:>4} {s['per_image_s']:>8.2f} {s['prepare_s']:>8.2f} "
              f"{s['generate_s']:>9.2f} {s['vs_default'] or float('nan'):>9.3f}")
    print(f"written: {RESULTS / f'{tag}.json'}")
    return result


if __name__ == "__main__":
    main()
