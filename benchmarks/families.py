"""FreeCustom on SDXL and on SD1.5 + ControlNet: cost per image against plain generation of the same family.

Issue 14. ``core.py``'s method, imported from it: one process, every call of a round once in a new
random order each round, medians over rounds (rounds that lost their CPU left out), ratios against
plain measured in the same rounds, the per-step time (UNet, and ControlNet when there is one) split
from the per-call time and projected to ``--project-steps`` (50).

``--family sdxl``: SDXL-base-1.0's real UNet, VAE and both text encoders (``pipeline/tiny_model.py``
``SDXL_BASE_*``, random weights, built once into ``--model-dir``; 13 GB in float32). Per image, T
targets per concept set:

  plain     generate(T prompts, T seeds, None) / T
  cached    (prepare_references once + generate(T, kv)) / T; generate(T, kv) / T alone ("K/V reused")
            is the cost once a concept set's K/V exist
  inline    generate(T, [ConceptRef...]) / T: the reference pass inside the loop, once per batch

``--family controlnet``: SD1.5's real architecture (as ``core.py``) and a ControlNet of
``lllyasviel/sd-controlnet-*``'s architecture (its UNet's encoder, condition embedding 16/32/96/256;
random weights). Every target gets one canny control image. Per image:

  plain       generate(T, None, control_image) / T: plain ControlNet generation
  sd          generate(T, None) / T: SD1.5 without ControlNet (what ControlNet itself costs)
  cached      (prepare_references(concepts) + generate(T, kv, control_image)) / T: the default,
              references without ControlNet, K/V per concept set whatever the control image
  control_references
              (prepare_references(concepts, control_image) + generate(T, kv, control_image,
              control_references=True)) / T: the release's behaviour, K/V per (concept set, control
              image); T targets sharing one control image. With a control image per target the K/V
              are prepared per image: prepare + generate / T ("cr, image per target").

K/V per concept set: exact bytes of the ``ReferenceKV`` at the measured size and steps, and projected
to ``--kv-size`` (1024 SDXL, 512 SD1.5), 50 steps, float16 by counting, for every MRSA layer, the
in-mask tokens of each concept at that layer's token grid at the projected size (the engine's rule:
mask resized to the image, then nearest to the grid, >= 50 %):

  bytes = steps x sum_layers kept_tokens x 2 (K, V) x heads x head_dim x 2 B  +  sum_layers kept_tokens x 2 B (bias)

The same formula at the measured size and dtype is checked against the measured bytes.

    python benchmarks/families.py --family sdxl --quick          # smoke: 128x128, 1 step, N = 1, T = 2, 1 round
    python benchmarks/families.py --family sdxl --size 256 --steps 1 --concepts 1 2 3 --targets 4 --repeats 3 --threads 1
    python benchmarks/families.py --family controlnet --size 256 --steps 1 --concepts 1 3 --targets 4 --threads 1
    python benchmarks/families.py --family sdxl --device cuda --dtype float16 \\
        --model stabilityai/stable-diffusion-xl-base-1.0 --size 1024 --steps 50 --targets 8
    python benchmarks/families.py --family controlnet --device cuda --dtype float16 \\
        --model runwayml/stable-diffusion-v1-5 --controlnet lllyasviel/sd-controlnet-canny --size 512 --steps 50
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # after ROOT: benchmarks/pipeline.py must not shadow the package
import core  # noqa: E402  (benchmarks/core.py: the timing method, the SD1.5 model, the concepts)

CACHE = core.DEFAULT_MODEL_DIR.parent
SDXL_DIR = CACHE / "sdxl-base-arch-random-seed0"
CONTROLNET_DIR = CACHE / "controlnet-sd15-arch-random-seed0"
CN_EMBEDDING = (16, 32, 96, 256)  # lllyasviel/sd-controlnet-*: conditioning_embedding_out_channels

PATHS = {
    "sdxl": ("plain", "inline", "cached"),
    "controlnet": ("sd", "plain", "cached", "cr"),
}


# ---- models --------------------------------------------------------------------------------------
def _build(kind: str, folder: str, base: str | None) -> None:
    """In a child process (13 GB for SDXL are given back when it exits): build and save a random model."""
    import torch

    from pipeline.tiny_model import build_tiny_controlnet, build_tiny_sdxl

    torch.set_num_threads(1)
    tmp = Path(folder).with_name(Path(folder).name + f".tmp-{os.getpid()}")
    if kind == "sdxl":
        build_tiny_sdxl(tmp, seed=0, real_sdxl=True)
    else:
        build_tiny_controlnet(base, tmp, seed=0, conditioning_embedding_out_channels=CN_EMBEDDING)
    os.replace(tmp, folder)


def ensure_built(kind: str, folder: Path, base: Path | None = None, log=print) -> None:
    marker = "model_index.json" if kind == "sdxl" else "config.json"
    if (folder / marker).exists():
        return
    log(f"building the random-weight {kind} architecture into {folder} (once) ...")
    folder.parent.mkdir(parents=True, exist_ok=True)
    proc = multiprocessing.get_context("spawn").Process(
        target=_build, args=(kind, str(folder), str(base) if base else None)
    )
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"building {folder} failed (exit {proc.exitcode})")


class FamilyBench(core.Bench):
    """``core.Bench`` on an SDXL or a ControlNet generator, with the family's paths."""

    def __init__(self, settings: core.Settings, model_dir: Path | None, family: str, controlnet: str | None):
        self.family, self.controlnet_id = family, controlnet
        super().__init__(settings, model_dir)
        if family == "controlnet":
            self.timer.wrap(self.gen.controlnet)  # ControlNet runs once per step: per-step time
        self._control: dict[int, object] = {}

    def load(self, settings: core.Settings, model_dir: Path | None):
        import torch

        from freecustom_core import FreeCustomGenerator
        from freecustom_core.controlnet import load_controlnet, with_controlnet

        if self.family == "sdxl":
            if model_dir is not None:
                ensure_built("sdxl", model_dir)
            return core.load_generator(settings, None)
        gen = core.load_generator(settings, model_dir)  # builds SD1.5's architecture once if needed
        if self.controlnet_id is None:
            ensure_built("controlnet", CONTROLNET_DIR, Path(settings.model))
            self.controlnet_id = str(CONTROLNET_DIR)
        net = load_controlnet(self.controlnet_id, torch_dtype=getattr(torch, settings.dtype))
        pipe = with_controlnet(gen.pipe, net)
        pipe.to(settings.device)
        return FreeCustomGenerator.from_pipe(pipe, model_id=gen.model_id, controlnet_id=self.controlnet_id)

    def control(self, size: int):
        """One canny control image at ``size`` (from the first concept's photo), as the release's example."""
        if size not in self._control:
            from freecustom_core.controlnet import canny

            self._control[size] = canny(self.concepts(1, size)[0].image)
        return self._control[size]

    def call(self, job: core.Job, steps: int):
        s, gen = self.settings, self.gen
        common = dict(num_inference_steps=steps, height=job.size, width=job.size)
        prompts, seeds = [core.PROMPT] * job.targets, list(range(s.seed, s.seed + job.targets))
        out = dict(output_type="latent", batch_size=s.batch_size)
        control = (
            {} if self.family == "sdxl" or job.path == "sd" else {"control_image": self.control(job.size)}
        )
        cr = job.path in ("prepare_cr", "cr")
        key = ("cr" if cr else "kv", job.n, job.size, steps)
        if job.path in ("plain", "sd"):
            return gen.generate(prompts, seeds, None, **common, **out, **control)
        concepts = self.concepts(job.n, job.size)
        if job.path == "inline":
            return gen.generate(prompts, seeds, concepts, **common, **out, **control)
        if job.path in ("prepare", "prepare_cr"):
            kv = gen.prepare_references(concepts, **common, **(control if cr else {}))
            self.kv[key] = kv
            if not cr:
                self.kv[key[1:]] = kv  # core.kv_report's key
            return kv
        if job.path in ("cached", "cr"):
            kv = self.kv.get(key)
            if kv is None:
                kv = self.call(core.Job("prepare_cr" if cr else "prepare", job.n, 0, job.size), steps)
            return gen.generate(prompts, seeds, kv, **common, **out, **control, control_references=cr)
        raise ValueError(job.path)


def jobs_for(family: str, concepts, targets: int, size: int) -> list[core.Job]:
    jobs = [core.Job("plain", 0, targets, size)]
    if family == "controlnet":
        jobs.append(core.Job("sd", 0, targets, size))
    for n in concepts:
        jobs += [core.Job("prepare", n, 0, size), core.Job("cached", n, targets, size)]
        if family == "sdxl":
            jobs.append(core.Job("inline", n, targets, size))
        else:
            jobs += [core.Job("prepare_cr", n, 0, size), core.Job("cr", n, targets, size)]
    return jobs


# ---- analysis ------------------------------------------------------------------------------------
def summarize(payload: dict) -> list[dict]:
    """Per image cost of each path against plain (same rounds): measured, projected, projected CPU time."""
    settings = core.settings_from(payload["settings"])
    family, t, size = payload["family"], payload["targets"], settings.size
    cpu = settings.device == "cpu"
    stats = {
        k: core.medians(v, settings.steps, settings.project_steps, filter_disturbed=cpu)
        for k, v in payload["raw"].items()
    }
    payload["stats"] = stats

    def get(path, n, targets):
        return stats[core.Job(path, n, targets, size).key]

    keys = (("wall_s", "measured"), ("projected_s", "projected"), ("projected_cpu_s", "projected_cpu"))
    plain = {label: get("plain", 0, t)[k] / t for k, label in keys}
    rows = []

    def add(path: str, n: int, parts: list[tuple[dict, float]], note: str = "") -> None:
        row = {"family": family, "path": path, "n": n, "targets": t, "size": size, "steps": settings.steps}
        for k, label in keys:
            per_image = sum(st[k] * w for st, w in parts)
            row[f"s_per_image_{label}"] = per_image
            row[f"x_plain_{label}"] = per_image / plain[label]
        row["spread"] = max(st["spread"] for st, _ in parts)
        row["kept"] = f"{min(st['kept'] for st, _ in parts)}/{parts[0][0]['rounds']}"
        row["note"] = note
        rows.append(row)

    add("plain", 0, [(get("plain", 0, t), 1 / t)], "ControlNet" if family == "controlnet" else "")
    if family == "controlnet":
        add("sd", 0, [(get("sd", 0, t), 1 / t)], "SD1.5 without ControlNet")
    for n in payload["concepts"]:
        prep = get("prepare", n, 0)
        add("cached", n, [(prep, 1 / t), (get("cached", n, t), 1 / t)], "prepare amortised over T")
        add("cached, K/V reused", n, [(get("cached", n, t), 1 / t)], "generate only")
        if family == "sdxl":
            add("inline", n, [(get("inline", n, t), 1 / t)])
        else:
            prep_cr, cr = get("prepare_cr", n, 0), get("cr", n, t)
            add("control_references", n, [(prep_cr, 1 / t), (cr, 1 / t)], "T targets share one control image")
            add("cr, image per target", n, [(prep_cr, 1.0), (cr, 1 / t)], "a prepare per target")
    return rows


def kv_projection(bench: FamilyBench, n: int, size: int, steps: int, *, to_size: int, to_steps: int) -> dict:
    """Exact K/V bytes at the measured size, and the formula at that size (check) and at ``to_size`` in fp16."""
    import torch
    import torch.nn.functional as F

    from freecustom_core.concept import MASK_THRESHOLD

    kv = bench.kv[("kv", n, size, steps)]
    concepts = bench.concepts(n, size)
    layers = list(kv.k)
    widths = {name: kv.k[name].shape[1] * kv.k[name].shape[3] for name in layers}  # heads x head_dim
    measured_dtype_bytes = kv.k[layers[0]].element_size()

    def kept(name: str, at: int) -> int:
        gh = gw = layer_grid(
            name, at // bench.gen.vae_scale_factor, len(bench.gen.unet.config.block_out_channels)
        )
        total = 0
        for c in concepts:
            m = F.interpolate(torch.from_numpy(c.mask_array())[None, None], size=(at, at), mode="nearest")
            total += int((F.interpolate(m, size=(gh, gw), mode="nearest") >= MASK_THRESHOLD).sum())
        return total

    def formula(at: int, n_steps: int, dtype_bytes: int) -> int:
        per_step = sum(kept(name, at) * 2 * widths[name] * dtype_bytes for name in layers)
        return n_steps * per_step + sum(kept(name, at) * dtype_bytes for name in layers)

    check = formula(size, len(kv.steps), measured_dtype_bytes)
    projected = formula(to_size, to_steps, 2)
    return {
        "n": n,
        "size": size,
        "steps": len(kv.steps),
        "layers": len(layers),
        "nbytes": kv.nbytes,
        "dense_nbytes": kv.dense_nbytes,
        "kept_tokens_per_step": sum(sum(kv.meta["tokens"][name]) for name in layers),
        "formula_at_measured": check,
        "formula_matches": check == kv.nbytes,
        "projected_size": to_size,
        "projected_steps": to_steps,
        "projected_dtype": "float16",
        "projected_nbytes": projected,
    }


def layer_grid(name: str, latent: int, levels: int) -> int:
    """Token grid side of an attention layer of a diffusers UNet2DConditionModel at latent side ``latent``:
    every down block but the last halves it, every up block but the last doubles it."""
    block, index = name.split(".")[:2]
    if block == "mid_block":
        return latent >> (levels - 1)
    return latent >> (int(index) if block == "down_blocks" else levels - 1 - int(index))


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--family", required=True, choices=("sdxl", "controlnet"))
    p.add_argument("--quick", action="store_true", help="smoke run: 128x128, 1 step, N = 1, T = 2, 1 round")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--project-steps", type=int, default=50)
    p.add_argument("--concepts", type=int, nargs="+", default=None, help="N (default 1 2 3)")
    p.add_argument("--targets", type=int, default=4, help="targets per concept set T")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--model", default=None, help="a real checkpoint (SDXL, or SD1.x for controlnet)")
    p.add_argument("--model-dir", type=Path, default=None, help="where the random-weight base model is built")
    p.add_argument(
        "--controlnet",
        default=None,
        help="a ControlNet id or folder (default: random, SD ControlNet architecture)",
    )
    p.add_argument(
        "--kv-size", type=int, default=None, help="size of the K/V projection (default 1024 SDXL, 512 SD1.5)"
    )
    p.add_argument("--out", type=Path, default=core.RESULTS)
    p.add_argument("--tag", default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    import torch

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    size, steps, repeats, concepts, targets = (
        args.size,
        args.steps,
        args.repeats,
        args.concepts or [1, 2, 3],
        args.targets,
    )
    if args.quick:
        size, steps, repeats, concepts, targets = 128, 1, 1, [1], 2
    default_dir = SDXL_DIR if args.family == "sdxl" else core.DEFAULT_MODEL_DIR
    model_dir = None if args.model else (args.model_dir or default_dir)
    settings = core.Settings(
        device=device,
        dtype=dtype,
        size=size,
        steps=steps,
        repeats=repeats,
        project_steps=args.project_steps,
        concepts=tuple(concepts),
        targets=(targets,),
        batch_size=args.batch_size,
        model=args.model or str(model_dir),
        memory=False,
        threads=args.threads,
    )

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    core.logging_quiet()
    t0 = time.perf_counter()
    bench = FamilyBench(settings, model_dir, args.family, args.controlnet)
    n_params = sum(p.numel() for p in bench.gen.unet.parameters())
    info = core.machine_info(settings)
    log(
        f"{args.family}: model {settings.model} (UNet {n_params / 1e9:.2f} B parameters), loaded in {time.perf_counter() - t0:.0f} s; "
        f"MRSA layers {len(bench.layers)}"
    )
    jobs = jobs_for(args.family, concepts, targets, size)
    for job in jobs:  # the K/V every cached call reads, at the measured step count, before any timing
        if job.path in ("cached", "cr"):
            bench.call(core.Job("prepare_cr" if job.path == "cr" else "prepare", job.n, 0, size), steps)
    log(f"{len(jobs)} calls per round, {repeats} round(s), {size}x{size}, {steps} step(s), T = {targets}")
    raw = core.measure(bench, jobs, steps=steps, repeats=repeats, log=log, warm_all=False)
    kv_size = args.kv_size or (1024 if args.family == "sdxl" else 512)
    kv = [
        {**a, **b}
        for a, b in zip(
            core.kv_report(bench, concepts, size, steps),
            [
                kv_projection(bench, n, size, steps, to_size=kv_size, to_steps=args.project_steps)
                for n in concepts
            ],
            strict=True,
        )
    ]
    info["load_average_end"] = os.getloadavg()
    payload = {
        "mode": f"family:{args.family}",
        "family": args.family,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": asdict(settings),
        "machine": info,
        "model_unet_parameters": n_params,
        "controlnet": bench.controlnet_id,
        "layers": list(bench.layers),
        "concepts": list(concepts),
        "targets": targets,
        "concept_source": bench.concept_source,
        "raw": raw,
        "kv": kv,
    }
    rows = summarize(payload)
    payload["rows"] = rows
    print_report(payload, rows)
    tag = args.tag or f"{args.family}_{'quick' if args.quick else size}_{device.split(':')[0]}"
    for path in core.write_results(args.out, tag, payload, rows):
        log(f"wrote {path}")
    log(f"done in {time.perf_counter() - t0:.0f} s")


def print_report(payload: dict, rows: list[dict]) -> None:
    s = payload["settings"]
    p = s["project_steps"]
    print(
        f"\n{payload['family']}: per image, {s['device']} {s['dtype']}, {s['size']}x{s['size']}, measured at {s['steps']} step(s), "
        f"projected to {p} (non-step time + {p}/{s['steps']} x UNet{' + ControlNet' if payload['family'] == 'controlnet' else ''} time); "
        f"x plain against plain in the same rounds; T = {payload['targets']}"
    )
    head = f"{'path':<24} {'N':>2} {'s/img':>8} {'x plain':>8} {'s/img@' + str(p):>10} {'x plain':>8} {'cpu x pl':>8} {'spread':>7} {'kept':>5}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['path']:<24} {r['n']:>2} {r['s_per_image_measured']:8.2f} {r['x_plain_measured']:8.2f} "
            f"{r['s_per_image_projected']:10.1f} {r['x_plain_projected']:8.2f} {r['x_plain_projected_cpu']:8.2f} "
            f"{r['spread']:7.0%} {r['kept']:>5}  {r['note']}"
        )
    print(
        "\nreference K/V per concept set (exact at the measured size; projected by counting kept tokens per layer)"
    )
    for k in payload["kv"]:
        print(
            f"  N={k['n']}: {k['nbytes'] / 2**20:.2f} MiB at {k['size']}² x {k['steps']} step(s) ({k['fraction']:.1%} of dense, "
            f"masked area {k['masked_area']:.1%}; formula {'matches' if k['formula_matches'] else 'DIFFERS: ' + str(k['formula_at_measured'])}); "
            f"{k['projected_size']}², {k['projected_steps']} steps, fp16: {k['projected_nbytes'] / 2**30:.2f} GiB"
        )


if __name__ == "__main__":
    main()
