"""Engine benchmark: what one customized image costs, against plain Stable Diffusion.

Four ways to make an image, timed in the same process, interleaved, repeated, medians:

  plain     ``generate(prompts, seeds, None)``: Stable Diffusion, the floor.
  release   ``tests/oracle.py::release_generate``: the authors' release, one target per call,
            target + N references in one UNet batch (2(N+1) samples per step), einsum attention.
  inline    ``generate(prompts, seeds, [ConceptRef...])``: the reference pass runs inside the loop,
            once per step per batch of targets, nothing stored.
  cached    ``prepare_references(...)`` once per concept set, then ``generate(..., references=kv)``;
            per image = (prepare + generate) / targets, and prepare is also reported alone.

Per image cost is split into the UNet time (measured by wrapping ``unet.forward``: a per-step
cost) and the rest (text and VAE encoding, setup: a per-call cost), so a run at a few steps also
gives a projection to ``--project-steps`` (default 50): ``rest + project_steps * unet / steps``.
Few-step runs overweight the per-call costs (the release VAE-encodes its references for every
image), so read the projected ratios against the targets, the measured ones as the raw data.

Also: step peak memory per path (CUDA: ``max_memory_allocated``; CPU: resident set size sampled
every millisecond in a child process whose allocator returns freed memory to the system) and the
reference K/V size against its dense size and the masked area.

    python benchmarks/core.py --quick              # CPU, 128x128, 1 step, a few minutes on 2 cores
    python benchmarks/core.py                      # CPU 256x256 x 3 steps; CUDA 512x512 x 50 steps
    python benchmarks/core.py --device cuda --dtype float16
    python benchmarks/core.py --sweep [--quick]    # cost vs N, targets per set, resolution

The model is SD1.5's real UNet / VAE / text-encoder architecture with random weights
(``pipeline/tiny_model.py``), built once into ``--model-dir``; ``--model`` takes a real checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/core.py` from anywhere: the engine and tests.oracle
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
SAMPLES = REPO.parent / "shared" / "data" / "freecustom-samples"
DEFAULT_MODEL_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "freecustom-pipeline"
    / "sd15-arch-random-seed0"
)
PROMPT = "a photo of a dog wearing a hat and sunglasses"
MMAP_THRESHOLD = "65536"  # child processes: every block >= 64 KiB is mmapped, so free() gives it back

# Concepts from the shared FreeCustom samples (real masks, so real masked areas), in order of use.
SAMPLE_CONCEPTS = (
    ("dog_hat_sunglasses_0", "dog.jpg", "a dog", 3.0),
    ("dog_hat_sunglasses_0", "hat.jpg", "a man wearing a hat", 3.0),
    ("dog_hat_sunglasses_0", "sunglasses.jpg", "a man wearing sunglasses", 3.0),
    ("dog_flower", "flower.jpg", "a man with flowers around the neck", 3.0),
    ("cat_phone", "phone.jpg", "a dog holding a phone", 3.0),
)
# Fallback when the samples are absent: synthetic shapes (tests/conftest.py's draw_concept idea).
SYNTHETIC_CONCEPTS = (
    ("sienna", (0.15, 0.25, 0.85, 0.95), "a dog", True),
    ("navy", (0.25, 0.0, 0.75, 0.3), "a hat", True),
    ("black", (0.3, 0.3, 0.7, 0.45), "sunglasses", False),
    ("gold", (0.2, 0.55, 0.8, 0.75), "flowers", True),
    ("gray", (0.55, 0.5, 0.8, 0.95), "a phone", False),
)

PATHS = ("plain", "release", "inline", "cached")


# ---- settings ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    device: str
    dtype: str
    size: int
    steps: int
    repeats: int
    project_steps: int
    concepts: tuple[int, ...]
    targets: tuple[int, ...]
    batch_size: int | None
    model: str
    memory: bool
    threads: int | None = None
    seed: int = 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="a few minutes on 2 CPU cores (128x128, 1 step, 3 repeats)"
    )
    p.add_argument(
        "--sweep", action="store_true", help="cost vs N (1..5), targets per set (1..32), resolution"
    )
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float16", "bfloat16"),
        help="default: float32 on CPU, float16 on CUDA",
    )
    p.add_argument("--size", type=int, default=None, help="height = width in pixels (multiple of 8)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per measured call")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repetitions; medians are reported")
    p.add_argument("--project-steps", type=int, default=50, help="step count the projection is made for")
    p.add_argument("--concepts", type=int, nargs="+", default=None, help="concept-set sizes N (default 1 3)")
    p.add_argument(
        "--targets", type=int, nargs="+", default=None, help="targets per concept set (default 1 8)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="generate(batch_size=); default: the engine's choice"
    )
    p.add_argument(
        "--model",
        default=None,
        help="a diffusers SD1.x folder or hub id instead of the random-weight SD1.5 architecture",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help="where the random-weight model is built once",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice). On a shared machine 1 thread makes CPU time a steady "
        "measure of work: no thread waits at a barrier for a sibling that lost its core",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--memory-only", action="store_true", help="only the K/V size and peak-memory measurements (no timings)")
    p.add_argument(
        "--sweep-sizes", type=int, nargs="+", default=None, help="resolutions of the resolution sweep"
    )
    p.add_argument(
        "--sweep-size-targets", type=int, default=None, help="targets per set in the resolution sweep"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV / JSON results")
    p.add_argument("--tag", default=None, help="name of the result files (default from the mode and device)")
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="recompute tables and checks from a result JSON's raw timings",
    )
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: child process
    return p.parse_args(argv)


def resolve(args) -> Settings:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    dtype = args.dtype or ("float16" if gpu else "float32")
    if args.quick:
        size, steps, repeats = (256, 10, 3) if gpu else (128, 1, 3)
    else:
        size, steps, repeats = (512, 50, 3) if gpu else (256, 3, 3)
    if args.sweep and not gpu:
        size, steps, repeats = 128, 1, (1 if args.quick else 2)
    size = args.size or size
    if size % 8:
        raise SystemExit(f"--size={size}: must be a multiple of 8")
    return Settings(
        device=device,
        dtype=dtype,
        size=size,
        steps=args.steps or steps,
        repeats=args.repeats or repeats,
        project_steps=args.project_steps,
        concepts=tuple(args.concepts or (1, 3)),
        targets=tuple(args.targets or (1, 8)),
        batch_size=args.batch_size,
        model=args.model or str(args.model_dir),
        memory=not args.no_memory,
        threads=args.threads,
    )


# ---- model and concepts -------------------------------------------------------------------------
def load_generator(settings: Settings, model_dir: Path | None = None):
    import torch

    from freecustom_core import FreeCustomGenerator

    if model_dir is not None and not (model_dir / "model_index.json").exists():
        from pipeline.tiny_model import build_tiny_sd15

        print(
            f"building the random-weight SD1.5 architecture into {model_dir} (once, about a minute) ...",
            flush=True,
        )
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = model_dir.with_name(model_dir.name + f".tmp-{os.getpid()}")
        build_tiny_sd15(tmp, seed=0, real_sd15_unet=True)
        os.replace(tmp, model_dir)
    gen = FreeCustomGenerator.from_pretrained(
        settings.model, torch_dtype=getattr(torch, settings.dtype), device=settings.device
    )
    return gen


def concept_pool(size: int) -> tuple[list, str]:
    """Up to five ConceptRefs at ``size x size`` (pre-resized once, as a pipeline would store them)."""
    from PIL import Image, ImageDraw

    from freecustom_core import ConceptRef

    if all(
        (SAMPLES / d / "image" / f).exists() and (SAMPLES / d / "mask" / f).exists()
        for d, f, _, _ in SAMPLE_CONCEPTS
    ):
        out = []
        for folder, name, prompt, weight in SAMPLE_CONCEPTS:
            image = (
                Image.open(SAMPLES / folder / "image" / name)
                .convert("RGB")
                .resize((size, size), Image.Resampling.LANCZOS)
            )
            mask = (
                Image.open(SAMPLES / folder / "mask" / name)
                .convert("L")
                .resize((size, size), Image.Resampling.NEAREST)
            )
            out.append(ConceptRef(image=image, mask=mask, prompt=prompt, weight=weight))
        return out, f"shared samples ({SAMPLES.name})"
    import numpy as np

    out = []
    for i, (color, box, prompt, ellipse) in enumerate(SYNTHETIC_CONCEPTS):
        rng = np.random.default_rng(i)
        image = Image.fromarray((rng.random((size, size, 3)) * 80).astype(np.uint8))
        xy = tuple(v * size for v in box)
        (ImageDraw.Draw(image).ellipse if ellipse else ImageDraw.Draw(image).rectangle)(xy, fill=color)
        mask = Image.new("L", (size, size), 0)
        (ImageDraw.Draw(mask).ellipse if ellipse else ImageDraw.Draw(mask).rectangle)(xy, fill=255)
        out.append(ConceptRef(image=image, mask=mask, prompt=prompt))
    return out, "synthetic shapes (shared samples not found)"


def masked_area(concepts, size: int) -> float:
    """Mean over concepts of the fraction of pixels inside the mask (>= 50 %) at the generation size."""
    import torch
    import torch.nn.functional as F

    from freecustom_core.concept import MASK_THRESHOLD

    fractions = []
    for c in concepts:
        m = torch.from_numpy(c.mask_array())[None, None]
        m = F.interpolate(m, size=(size, size), mode="nearest")
        fractions.append(float((m >= MASK_THRESHOLD).float().mean()))
    return sum(fractions) / len(fractions)


# ---- release-style baseline ----------------------------------------------------------------------
def release_style(settings: Settings):
    """The release-style baseline: tests/oracle.py (device- and dtype-aware), checked against the engine by the tests."""
    from tests.oracle import release_generate

    return release_generate, "tests/oracle.py::release_generate"


# ---- timing and memory ---------------------------------------------------------------------------
class UNetTimer:
    """Wraps ``unet.forward`` on the instance: accumulates the seconds spent in UNet calls.

    Exceptions pass through (the reference pass stops early with one) and are still timed. On
    CUDA each call is synchronised, which costs the loop its CPU/GPU overlap (small for SD1.5).
    """

    def __init__(self, unet, device: str):
        import torch

        self.seconds = self.cpu_seconds = 0.0
        self.calls = 0
        self._sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.wrap(unet)

    def wrap(self, module) -> None:
        """Also count ``module.forward`` as per-step time (a ControlNet runs once per step, as the UNet)."""
        inner = module.forward

        def timed(*args, **kwargs):
            self._sync()
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self._sync()
                self.seconds += time.perf_counter() - start
                self.cpu_seconds += time.process_time() - cpu
                self.calls += 1

        module.forward = timed

    def reset(self) -> None:
        self.seconds = self.cpu_seconds = 0.0
        self.calls = 0


class PeakMemory:
    """Peak memory above the level at entry. CUDA: the allocator's peak. CPU: sampled RSS."""

    def __init__(self, device: str, interval: float = 0.001):
        self.device, self.interval = device, interval
        self.peak_delta = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._peak = self.rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, self.rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_delta = torch.cuda.max_memory_allocated() - self._base
            return False
        self._stop.set()
        self._thread.join()
        self.peak_delta = max(self._peak, self.rss()) - self._base
        return False


# ---- the work units ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    path: str  # plain | release | inline | prepare | cached
    n: int  # concepts (0 for plain)
    targets: int  # targets in this call (release: always 1; prepare: 0)
    size: int

    @property
    def key(self) -> str:
        return f"{self.path}:N{self.n}:T{self.targets}:{self.size}"


def jobs_for(combos, *, inline: bool = True) -> list[Job]:
    """Every call needed to price the (N, targets, size) combinations, each once."""
    jobs: dict[str, Job] = {}
    for n, t, size in combos:
        for job in (
            Job("plain", 0, t, size),
            Job("release", n, 1, size),
            *([Job("inline", n, t, size)] if inline else []),
            Job("prepare", n, 0, size),
            Job("cached", n, t, size),
        ):
            jobs.setdefault(job.key, job)
    return list(jobs.values())


class Bench:
    """The loaded model, concepts per size, cached K/V per (N, size), and one runner per job."""

    def __init__(self, settings: Settings, model_dir: Path | None):
        import torch

        self.torch = torch
        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.gen = self.load(settings, model_dir)
        self.timer = UNetTimer(self.gen.unet, settings.device)
        self.release, self.release_name = release_style(settings)
        self.layers = self.gen.layer_names()
        self._pools: dict[int, list] = {}
        self.concept_source = ""
        self.kv: dict[tuple[int, int], object] = {}

    def load(self, settings: Settings, model_dir: Path | None):
        """The generator under test (``benchmarks/families.py`` loads SDXL or a ControlNet pipeline)."""
        return load_generator(settings, model_dir)

    def concepts(self, n: int, size: int) -> list:
        if size not in self._pools:
            self._pools[size], self.concept_source = concept_pool(size)
        pool = self._pools[size]
        if n > len(pool):
            raise SystemExit(f"--concepts {n}: at most {len(pool)} concepts are available")
        return pool[:n]

    def call(self, job: Job, steps: int):
        s = self.settings
        common = dict(num_inference_steps=steps, height=job.size, width=job.size)
        prompts, seeds = [PROMPT] * job.targets, list(range(s.seed, s.seed + job.targets))
        gen = self.gen
        if job.path == "plain":
            return gen.generate(prompts, seeds, None, output_type="latent", batch_size=s.batch_size, **common)
        concepts = self.concepts(job.n, job.size)
        if job.path == "release":
            from freecustom_core import DEFAULT_NEGATIVE_PROMPT

            return self.release(
                gen.pipe,
                self.layers,
                concepts,
                PROMPT,
                s.seed,
                negative_prompt=DEFAULT_NEGATIVE_PROMPT,
                **common,
            )
        if job.path == "inline":
            return gen.generate(
                prompts, seeds, concepts, output_type="latent", batch_size=s.batch_size, **common
            )
        if job.path == "prepare":
            kv = gen.prepare_references(concepts, **common)
            self.kv[(job.n, job.size, steps)] = kv
            return kv
        if job.path == "cached":
            kv = self.kv.get((job.n, job.size, steps))
            if kv is None:
                kv = self.call(Job("prepare", job.n, 0, job.size), steps)
            return gen.generate(prompts, seeds, kv, output_type="latent", batch_size=s.batch_size, **common)
        raise ValueError(job.path)

    def sync(self) -> None:
        if self.settings.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def time_once(self, job: Job, steps: int) -> dict:
        self.sync()
        self.timer.reset()
        start, cpu = time.perf_counter(), time.process_time()
        self.call(job, steps)
        self.sync()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        return {
            "wall_s": wall,
            "unet_s": self.timer.seconds,
            "cpu_s": cpu,
            "unet_cpu_s": self.timer.cpu_seconds,
            "unet_calls": self.timer.calls,
        }


def measure(
    bench: Bench,
    jobs: list[Job],
    *,
    steps: int,
    repeats: int,
    log: Callable[[str], None],
    warm_all: bool = True,
) -> dict[str, list[dict]]:
    """Warm up (1 step), then ``repeats`` rounds, each running every job once in a new random order.

    ``warm_all``: every job once (per-shape kernel and primitive caches); otherwise the first job of
    each path and size only (first calls of a new batch shape cost little extra on CPU).
    """
    rng = random.Random(0)
    raw: dict[str, list[dict]] = {job.key: [] for job in jobs}
    t0 = time.perf_counter()
    warm = jobs if warm_all else list({(job.path, job.size): job for job in reversed(jobs)}.values())
    for job in warm:
        bench.call(job, 1)
    log(f"  warm-up {time.perf_counter() - t0:.0f} s")
    for job in jobs:  # K/V at the measured step count for every cached job, before timing starts
        if job.path == "cached" and (job.n, job.size, steps) not in bench.kv:
            bench.call(Job("prepare", job.n, 0, job.size), steps)
    for r in range(repeats):
        order = list(jobs)
        rng.shuffle(order)
        t0 = time.perf_counter()
        for job in order:
            raw[job.key].append(bench.time_once(job, steps))
        log(
            f"  round {r + 1}/{repeats}: {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}"
        )
    return raw


UNDISTURBED = 0.75  # CPU: a round counts when the call kept >= 75 % of its best CPU utilisation


def medians(samples: list[dict], steps: int, project_steps: int, *, filter_disturbed: bool = True) -> dict:
    """Median wall, UNet and non-UNet seconds of a job over its undisturbed rounds, and the projection.

    On a shared CPU a call that loses its cores to another process gets slower in wall time and
    its utilisation (process CPU seconds / wall seconds) drops, so rounds below ``UNDISTURBED``
    times the job's best utilisation are left out (``kept`` says how many stayed; the raw rounds
    are all in the JSON). Not applied on CUDA, where utilisation means nothing.
    """
    kept = samples
    if filter_disturbed:
        best = max(s["cpu_s"] / s["wall_s"] for s in samples)
        kept = [s for s in samples if s["cpu_s"] / s["wall_s"] >= UNDISTURBED * best]

    def med(values):
        return statistics.median(list(values))

    wall, unet = med(s["wall_s"] for s in kept), med(s["unet_s"] for s in kept)
    cpu, unet_cpu = med(s["cpu_s"] for s in kept), med(s["unet_cpu_s"] for s in kept)
    rest = med(max(0.0, s["wall_s"] - s["unet_s"]) for s in kept)
    rest_cpu = med(max(0.0, s["cpu_s"] - s["unet_cpu_s"]) for s in kept)
    walls = [s["wall_s"] for s in samples]
    return {
        "wall_s": wall,
        "unet_s": unet,
        "rest_s": rest,
        "projected_s": rest + unet * project_steps / steps,
        "cpu_s": cpu,
        "unet_cpu_s": unet_cpu,
        "projected_cpu_s": rest_cpu + unet_cpu * project_steps / steps,
        "min_wall_s": min(walls),
        "spread": (max(walls) - min(walls)) / wall if wall else 0.0,
        "rounds": len(samples),
        "kept": len(kept),
    }


@dataclass
class Row:
    """Per image cost of one path for one (N, targets, size), measured and projected."""

    path: str
    n: int
    targets: int
    size: int
    steps: int
    project_steps: int
    per_image_s: float
    per_image_projected_s: float
    x_plain: float = 0.0
    x_plain_projected: float = 0.0
    release_over_this: float = 0.0
    release_over_this_projected: float = 0.0
    per_image_projected_cpu_s: float = 0.0
    x_plain_projected_cpu: float = 0.0
    release_over_this_projected_cpu: float = 0.0
    prepare_s: float | None = None
    prepare_projected_s: float | None = None
    generate_only_per_image_s: float | None = None
    spread: float = 0.0
    rounds_kept: str = ""
    note: str = ""


def summarize(combos, stats: dict[str, dict], steps: int, project_steps: int) -> list[Row]:
    rows: list[Row] = []
    for n, t, size in combos:
        plain, release = stats[Job("plain", 0, t, size).key], stats[Job("release", n, 1, size).key]
        inline, cached = stats.get(Job("inline", n, t, size).key), stats[Job("cached", n, t, size).key]
        prepare = stats[Job("prepare", n, 0, size).key]
        # per image: plain, release (one target per call), inline, cached with prepare amortised
        wall, proj, cpu = (
            {
                "plain": plain[key] / t,
                "release": release[key],
                "cached": (cached[key] + prepare[key]) / t,
                **({"inline": inline[key] / t} if inline else {}),
            }
            for key in ("wall_s", "projected_s", "projected_cpu_s")
        )
        kept = {
            "plain": f"{plain['kept']}/{plain['rounds']}",
            "release": f"{release['kept']}/{release['rounds']}",
            "inline": f"{inline['kept']}/{inline['rounds']}" if inline else "",
            "cached": f"{min(cached['kept'], prepare['kept'])}/{cached['rounds']}",
        }
        spread = {
            "plain": plain["spread"],
            "release": release["spread"],
            "inline": inline["spread"] if inline else 0.0,
            "cached": max(cached["spread"], prepare["spread"]),
        }
        notes = {"release": "one target per call", "cached": "prepare amortised over the targets"}
        for path in [p for p in PATHS if p in wall]:
            row = Row(
                path=path,
                n=n,
                targets=t,
                size=size,
                steps=steps,
                project_steps=project_steps,
                per_image_s=wall[path],
                per_image_projected_s=proj[path],
                per_image_projected_cpu_s=cpu[path],
                spread=spread[path],
                rounds_kept=kept[path],
                note=notes.get(path, ""),
            )
            row.x_plain, row.x_plain_projected = wall[path] / wall["plain"], proj[path] / proj["plain"]
            row.x_plain_projected_cpu = cpu[path] / cpu["plain"]
            row.release_over_this = wall["release"] / wall[path]
            row.release_over_this_projected = proj["release"] / proj[path]
            row.release_over_this_projected_cpu = cpu["release"] / cpu[path]
            if path == "cached":
                row.prepare_s, row.prepare_projected_s = prepare["wall_s"], prepare["projected_s"]
                row.generate_only_per_image_s = cached["wall_s"] / t
            rows.append(row)
    return rows


def kv_report(bench: Bench, ns, size: int, steps: int) -> list[dict]:
    out = []
    for n in ns:
        kv = bench.kv.get((n, size, steps)) or bench.call(Job("prepare", n, 0, size), steps)
        concepts = bench.concepts(n, size)
        area = masked_area(concepts, size)
        bias = sum(t.numel() * t.element_size() for t in kv.bias.values())
        kept = sum(sum(c) for c in kv.meta["tokens"].values())
        out.append(
            {
                "n": n,
                "size": size,
                "steps": len(kv.steps),
                "dtype": bench.settings.dtype,
                "nbytes": kv.nbytes,
                "dense_nbytes": kv.dense_nbytes,
                "fraction": kv.nbytes / kv.dense_nbytes,
                "fraction_without_bias": (kv.nbytes - bias) / kv.dense_nbytes,
                "masked_area": area,
                "kept_tokens_per_step": kept,
                "target": area + 0.05,
                "meets_target": kv.nbytes / kv.dense_nbytes <= area + 0.05,
                "per_concept_area": [masked_area([c], size) for c in concepts],
            }
        )
    return out


# ---- peak memory ---------------------------------------------------------------------------------
def memory_cases(settings: Settings) -> list[Job]:
    """Plain at each target count, and every customized path for the largest N."""
    n, size = max(settings.concepts), settings.size
    jobs = [Job("plain", 0, t, size) for t in settings.targets]
    jobs += [Job("release", n, 1, size), Job("prepare", n, 0, size)]
    return jobs + [Job(p, n, t, size) for t in settings.targets for p in ("inline", "cached")]


def run_memory(bench: Bench, settings: Settings) -> dict:
    """Step peak memory of each path (1 step: a step's peak does not depend on the step count)."""
    results = {}
    jobs = memory_cases(settings)
    for (
        job
    ) in jobs:  # warm: first calls make one-off allocations (kernel scratch, caches) that later calls reuse
        bench.call(job, 1)
    for job in jobs:
        kv = bench.kv.get((job.n, job.size, 1)) if job.path == "cached" else None
        with PeakMemory(settings.device) as pm:
            bench.call(job, 1)
        results[job.key] = {
            "peak_delta_bytes": pm.peak_delta,
            "kv_bytes": kv.nbytes if kv is not None else 0,
            "kv_steps": len(kv.steps) if kv is not None else 0,
        }
    import resource

    results["_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return results


def memory_in_child(settings: Settings, model_dir: Path | None, log) -> dict:
    """CPU: run ``run_memory`` in a fresh process whose malloc returns freed blocks to the system."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD_=MMAP_THRESHOLD)
    spec = json.dumps({"settings": asdict(settings), "model_dir": str(model_dir) if model_dir else None})
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-probe", spec], env=env, capture_output=True, text=True
    )
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY_PROBE "):
            return json.loads(line.removeprefix("MEMORY_PROBE "))
    log(f"  memory probe failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return {}


def memory_probe_main(spec: str) -> None:
    logging_quiet()
    spec = json.loads(spec)
    settings = settings_from(spec["settings"])
    bench = Bench(settings, Path(spec["model_dir"]) if spec["model_dir"] else None)
    print("MEMORY_PROBE " + json.dumps(run_memory(bench, settings)), flush=True)


def memory_rows(mem: dict, settings: Settings) -> list[dict]:
    rows = []
    for t in settings.targets:
        plain = mem.get(Job("plain", 0, t, settings.size).key, {}).get("peak_delta_bytes")
        for n in [0, *settings.concepts]:
            paths = ("plain",) if n == 0 else ("release", "prepare", "inline", "cached")
            for path in paths:
                job = Job(path, n, 1 if path == "release" else (0 if path == "prepare" else t), settings.size)
                m = mem.get(job.key)
                if m is None:
                    continue
                # the K/V of every step live in host memory and generate() copies one step at a time to the
                # device: on CUDA the measured allocator peak already counts the steps in flight; on a CPU the
                # host *is* the device, so the whole cache (projected to project_steps) is added
                kv_projected = m["kv_bytes"] * settings.project_steps // m["kv_steps"] if m["kv_steps"] else 0
                if settings.device != "cpu":
                    kv_projected = 0
                rows.append(
                    {
                        "path": path,
                        "n": n,
                        "targets": t,
                        "batch_targets": job.targets,
                        "peak_delta_bytes": m["peak_delta_bytes"],
                        "x_plain": m["peak_delta_bytes"] / plain if plain else None,
                        "kv_bytes": m["kv_bytes"],
                        "kv_bytes_projected": kv_projected,
                        "kv_steps_projected": settings.project_steps,
                        "x_plain_with_kv_projected": (m["peak_delta_bytes"] + kv_projected) / plain
                        if plain
                        else None,
                    }
                )
    return rows


# ---- output --------------------------------------------------------------------------------------
def machine_info(settings: Settings) -> dict:
    import diffusers
    import torch

    info = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "load_average_start": os.getloadavg(),
    }
    if settings.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def write_results(out: Path, tag: str, payload: dict, rows: list[dict]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    js, cs = out / f"{tag}.json", out / f"{tag}.csv"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, js)
    paths.append(js)
    if rows:
        tmp = cs.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, cs)
        paths.append(cs)
    return paths


def fmt_s(x: float | None) -> str:
    return "-" if x is None else (f"{x:8.2f}" if x < 1000 else f"{x:8.0f}")


def print_table(rows: list[Row], settings: Settings, steps: int) -> None:
    p = settings.project_steps
    print(
        f"\nper image cost, {settings.device} {settings.dtype}; measured at {steps} step(s), projected to {p} steps "
        f"(non-UNet time + {p}/{steps} x UNet time); x plain = ratio to plain at the same targets per set; "
        f"rel/this = release-style / this; cpu = the same from process CPU time; spread = (max - min) / median wall; "
        f"kept = rounds not disturbed by other processes (CPU utilisation >= {UNDISTURBED:.0%} of the job's best)"
    )
    head = (
        f"{'N':>2} {'tgt':>4} {'size':>5}  {'path':<8} {'s/img':>8} {'x plain':>8} {'rel/this':>8} | {'s/img@' + str(p):>9} "
        f"{'x plain':>8} {'rel/this':>8} | {'cpu x pl':>8} {'rel/this':>8}  {'spread':>6} {'kept':>4}  note"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.n:>2} {r.targets:>4} {r.size:>5}  {r.path:<8} {fmt_s(r.per_image_s)} {r.x_plain:8.2f} {r.release_over_this:8.2f} | "
            f"{fmt_s(r.per_image_projected_s):>9} {r.x_plain_projected:8.2f} {r.release_over_this_projected:8.2f} | "
            f"{r.x_plain_projected_cpu:8.2f} {r.release_over_this_projected_cpu:8.2f}  "
            f"{r.spread:6.0%} {r.rounds_kept:>4}  {r.note}"
            + (
                f"; prepare {r.prepare_s:.2f} s ({r.prepare_projected_s:.1f} s @{p})"
                if r.prepare_s is not None
                else ""
            )
        )


def target_checks(rows: list[Row], kv: list[dict], mem_rows: list[dict]) -> list[str]:
    lines = []
    find = {(r.path, r.n, r.targets): r for r in rows}
    for t, goal in ((8, 3.0), (1, 1.5)):
        c = find.get(("cached", 3, t))
        if c is None:
            continue
        if t == 8:
            lines.append(
                f"cached N=3, 8 targets: {c.x_plain_projected:.2f}x plain projected ({c.x_plain:.2f}x measured); "
                f"target <= 1.3x: {'MET' if c.x_plain_projected <= 1.3 else 'NOT MET'}"
            )
        lines.append(
            f"cached N=3, {t} target(s): release-style / cached = {c.release_over_this_projected:.2f} projected "
            f"({c.release_over_this:.2f} measured); target >= {goal}x: "
            f"{'MET' if c.release_over_this_projected >= goal else 'NOT MET'}"
        )
    for k in kv:
        lines.append(
            f"K/V N={k['n']}: {k['fraction']:.1%} of dense, masked area {k['masked_area']:.1%}; "
            f"target <= {k['target']:.1%}: {'MET' if k['meets_target'] else 'NOT MET'}"
        )
    for m in mem_rows:
        if m["path"] in ("cached", "inline") and m["n"] == 3 and m["x_plain"] is not None:
            with_kv = m["x_plain_with_kv_projected"]
            lines.append(
                f"step peak memory, {m['path']} N=3, {m['targets']} target(s): {m['x_plain']:.2f}x plain"
                + (
                    f", {with_kv:.2f}x with the K/V of all {m['kv_steps_projected']} steps in host memory (CPU run)"
                    if m["kv_bytes_projected"]
                    else ""
                )
                + f"; target <= 1.25x: {'MET' if max(m['x_plain'], with_kv or 0) <= 1.25 else 'NOT MET'}"
            )
    return lines


# ---- modes ---------------------------------------------------------------------------------------
def run_grid(args, settings: Settings, model_dir: Path | None, log) -> None:
    combos = [(n, t, settings.size) for n in settings.concepts for t in settings.targets]
    bench = Bench(settings, model_dir)
    info = machine_info(settings)
    log(f"model {settings.model}; release-style baseline {bench.release_name}; layers {len(bench.layers)}")
    jobs = jobs_for(combos)
    log(
        f"{len(jobs)} calls per round, {settings.repeats} rounds, {settings.size}x{settings.size}, {settings.steps} step(s)"
    )
    raw = {} if args.memory_only else measure(bench, jobs, steps=settings.steps, repeats=settings.repeats, log=log)
    kv = kv_report(bench, settings.concepts, settings.size, settings.steps)
    release_name, concept_source = bench.release_name, bench.concept_source
    mem = {}
    if settings.memory:
        log("peak memory ...")
        if settings.device == "cpu":
            del bench
            gc.collect()
            mem = memory_in_child(settings, model_dir, log)
        else:
            mem = run_memory(bench, settings)
    info["load_average_end"] = os.getloadavg()
    payload = {
        "mode": "grid",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": asdict(settings),
        "machine": info,
        "release_style": release_name,
        "concepts": concept_source,
        "combos": [list(c) for c in combos],
        "raw": raw,
        "kv": kv,
        "memory_raw": mem,
    }
    tag = args.tag or f"core_{'quick' if args.quick else 'full'}_{settings.device.split(':')[0]}"
    finish(payload, args.out, tag, log)


def analyse_grid(payload: dict) -> list[dict]:
    """Tables, memory and target checks from a grid run's raw timings (live or ``--from-json``)."""
    settings = settings_from(payload["settings"])
    combos = [tuple(c) for c in payload["combos"]]
    cpu = settings.device == "cpu"
    stats = {
        k: medians(s, settings.steps, settings.project_steps, filter_disturbed=cpu)
        for k, s in payload["raw"].items()
    }
    rows = summarize(combos, stats, settings.steps, settings.project_steps) if stats else []
    if rows:
        print_table(rows, settings, settings.steps)
    kv = payload["kv"]
    print("\nreference K/V (bias mode, style_fidelity 1: conditional branch only)")
    for k in kv:
        print(
            f"  N={k['n']}: {k['nbytes'] / 2**20:8.1f} MiB of {k['dense_nbytes'] / 2**20:8.1f} MiB dense = {k['fraction']:.1%}; "
            f"masked area {k['masked_area']:.1%} (per concept {', '.join(f'{a:.1%}' for a in k['per_concept_area'])})"
        )
    mem_rows = memory_rows(payload["memory_raw"], settings) if payload.get("memory_raw") else []
    if mem_rows:
        what = (
            "allocator peak above the level before the call"
            if not cpu
            else "sampled RSS peak above RSS before the call, child process, malloc mmap threshold 64 KiB"
        )
        print(f"\nstep peak memory, 1-step calls ({what})")
        for m in mem_rows:
            print(
                f"  {m['path']:<8} N={m['n']} targets={m['targets']:>2} (batch of {m['batch_targets']:>2}): "
                f"{m['peak_delta_bytes'] / 2**20:8.0f} MiB"
                + (f"  {m['x_plain']:.2f}x plain" if m["x_plain"] else "")
                + (
                    f"; + K/V of {settings.project_steps} steps in host memory {m['kv_bytes_projected'] / 2**20:.0f} MiB"
                    f" -> {m['x_plain_with_kv_projected']:.2f}x plain"
                    if m["kv_bytes_projected"]
                    else ""
                )
            )
    checks = target_checks(rows, kv, mem_rows)
    print("\ntargets (issue 6):")
    for line in checks:
        print("  " + line)
    payload.update(stats=stats, rows=[asdict(r) for r in rows], memory=mem_rows, checks=checks)
    return payload["rows"]


def run_sweep(args, settings: Settings, model_dir: Path | None, log) -> None:
    """Cost vs N (1..5), vs targets per set (1..32) and vs resolution; one job pool, interleaved."""
    gpu = settings.device.startswith("cuda")
    base = settings.size
    sizes = tuple(args.sweep_sizes or (256, 512))
    size_targets = args.sweep_size_targets or (8 if gpu else 1)
    combos_n = [(n, 8, base) for n in (1, 2, 3, 4, 5)]
    combos_t = [(3, t, base) for t in (1, 2, 4, 8, 16, 32)]
    combos_s = [(3, size_targets, s) for s in sizes]
    sweeps = {"concepts": combos_n, "targets": combos_t, "resolution": combos_s}
    all_combos = list(dict.fromkeys(combos_n + combos_t + combos_s))
    bench = Bench(settings, model_dir)
    info = machine_info(settings)
    # inline only in the N sweep: elsewhere it tracks cached + prepare (same work, per batch)
    jobs = list({j.key: j for j in jobs_for(combos_n) + jobs_for(all_combos, inline=False)}.values())
    log(
        f"sweep: {len(jobs)} calls per round, {settings.repeats} round(s), {settings.steps} step(s); base {base}x{base}; sizes {sizes}"
    )
    raw = measure(bench, jobs, steps=settings.steps, repeats=settings.repeats, log=log, warm_all=False)
    kv = []
    for n in (1, 2, 3, 4, 5):
        kv += kv_report(bench, [n], base, settings.steps)
    for size in sizes:
        kv += kv_report(bench, [3], size, settings.steps)
    info["load_average_end"] = os.getloadavg()
    payload = {
        "mode": "sweep",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": asdict(settings),
        "machine": info,
        "release_style": bench.release_name,
        "concepts": bench.concept_source,
        "sweeps": {k: [list(c) for c in v] for k, v in sweeps.items()},
        "raw": raw,
        "kv": kv,
    }
    tag = args.tag or f"sweep_{'quick_' if args.quick else ''}{settings.device.split(':')[0]}"
    finish(payload, args.out, tag, log)


def analyse_sweep(payload: dict) -> list[dict]:
    settings = settings_from(payload["settings"])
    cpu = settings.device == "cpu"
    stats = {
        k: medians(s, settings.steps, settings.project_steps, filter_disturbed=cpu)
        for k, s in payload["raw"].items()
    }
    out_rows = []
    for sweep, combos in payload["sweeps"].items():
        rows = summarize([tuple(c) for c in combos], stats, settings.steps, settings.project_steps)
        print(f"\n== sweep: {sweep}")
        print_table(rows, settings, settings.steps)
        out_rows += [{"sweep": sweep, **asdict(r)} for r in rows]
    print("\nreference K/V vs N and size")
    for k in payload["kv"]:
        print(
            f"  N={k['n']} {k['size']}x{k['size']}: {k['fraction']:.1%} of dense (masked area {k['masked_area']:.1%}), "
            f"{k['nbytes'] / 2**20:.1f} MiB for {k['steps']} step(s)"
        )
    payload.update(stats=stats, rows=out_rows)
    return out_rows


def settings_from(d: dict) -> Settings:
    return Settings(**{**d, "concepts": tuple(d["concepts"]), "targets": tuple(d["targets"])})


def finish(payload: dict, out: Path, tag: str, log) -> None:
    """Analyse raw timings, print the tables, write ``tag``.json / .csv."""
    rows = (analyse_grid if payload["mode"] == "grid" else analyse_sweep)(payload)
    for p in write_results(out, tag, payload, rows):
        log(f"wrote {p.relative_to(REPO) if p.is_relative_to(REPO) else p}")


def reanalyse(path: Path, log) -> None:
    """``--from-json``: recompute tables and checks from a result file's raw timings; rewrite it."""
    payload = json.loads(path.read_text())
    if "combos" not in payload and payload["mode"] == "grid":  # files written before combos were stored
        s = payload["settings"]
        payload["combos"] = [[n, t, s["size"]] for n in s["concepts"] for t in s["targets"]]
    payload.setdefault("reanalysed", []).append(datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    finish(payload, path.parent, path.stem, log)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_probe:
        memory_probe_main(args.memory_probe)
        return

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.from_json:
        reanalyse(args.from_json, log)
        return
    settings = resolve(args)
    model_dir = None if args.model else args.model_dir

    logging_quiet()
    t0 = time.perf_counter()
    (run_sweep if args.sweep else run_grid)(args, settings, model_dir, log)
    log(f"done in {time.perf_counter() - t0:.0f} s")


def logging_quiet() -> None:
    """No progress bars or load chatter in the tables."""
    with contextlib.suppress(ImportError):
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()


if __name__ == "__main__":
    main()
