"""Scoring benchmark: what the quality scores (``run --score``) cost per image, against generating it.

Timed in one process, interleaved (every call once per round, a new random order each round),
medians over rounds (``core.medians``: on a CPU, rounds in which a call lost its cores are left out):

  prepare     ``prepare_references(concepts)``: the concept set's K/V, once per concept set
  generate    ``generate(prompts, seeds, kv, output_type="pil")``: T targets, VAE decode included
  score_refs  ``Scorer.reference_features``: DINOv2 (unmasked and masked) and CLIP-I features of the
              concept set's references, once per concept set (the stage caches them)
  score       decode the T PNGs and ``Scorer.score``: DINOv2, CLIP-I and CLIP-T image features, the
              prompt's CLIP-T text features, the scores

per image: generation = (prepare + generate) / T, scoring = (score_refs + score) / T; the ratio
scoring / generation is printed measured and projected to ``--project-steps`` (default 50)
denoising steps the way ``core.py`` does (UNet time x 50 / steps + the rest): a CPU fits only a
few steps, and scoring does not depend on the step count.

Models (default): the paper's scorer architectures at their real sizes with random weights, built
from their configs' key numbers below into ``--scorer-dir`` once (no download): DINOv2 ViT-B/14
(``facebook/dinov2-base``), CLIP ViT-B/16 (``openai/clip-vit-base-patch16``) and CLIP ViT-L/14
(``openai/clip-vit-large-patch14``) with their processors (224 px); the text towers are full size
with a small tokenizer vocabulary (an embedding lookup: no cost). Generation: SD1.5's architecture
with random weights (``pipeline/tiny_model.py``, ``real_sd15_unet=True``, as ``core.py``). A
call's cost does not depend on the weights' values. ``--quick``: tiny scorers and a tiny SD model
(checks the path in seconds; its ratio means nothing).

    python benchmarks/score.py                                 # CPU: 256x256, 2 steps, N=3, T=4, 3 rounds
    python benchmarks/score.py --quick                         # tiny models, 64x64
    python benchmarks/score.py --device cuda --dtype float16   # GPU: 512x512, 50 steps, T=8
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import core  # noqa: E402  (benchmarks/core.py: settings, model, timers, medians, result files)

DEFAULT_SCORER_DIR = core.DEFAULT_MODEL_DIR.parent / "scorers-arch-random-seed0"
PROMPT = core.PROMPT
JOBS = ("prepare", "generate", "score_refs", "score")

# The key numbers of the paper's scorers' configs (Hub config.json of each model).
DINOV2_BASE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14, image_size=518
)
CLIP_B16 = dict(
    text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
    vision=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16
    ),
    projection_dim=512,
)
CLIP_L14 = dict(
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    vision=dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14
    ),
    projection_dim=768,
)


def build_full_dino(folder: Path, seed: int) -> Path:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from pipeline.tiny_scorers import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(**DINOV2_BASE)).save_pretrained(folder)
    BitImageProcessor(  # facebook/dinov2-base's preprocessor_config.json
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        resample=3,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    ).save_pretrained(folder)
    return folder


def build_full_clip(folder: Path, spec: dict, seed: int) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from pipeline.tiny_model import write_tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tiny_tokenizer(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            spec["text"],
            vocab_size=vocab,
            max_position_embeddings=77,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        ),
        vision_config=dict(spec["vision"], image_size=224),
        projection_dim=spec["projection_dim"],
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def full_scorers(folder: Path, log):
    """The three full-size random-weight scorers in ``folder`` (built once)."""
    from stages.scoring.score_models import ScoreModels

    parts = {"dino": None, "clip-i": CLIP_B16, "clip-t": CLIP_L14}
    for i, (name, spec) in enumerate(parts.items()):
        target = folder / name
        if (target / "model.safetensors").exists():
            continue
        log(f"building the random-weight {name} scorer into {target} (once) ...")
        tmp = target.with_name(f"{name}.tmp-{os.getpid()}")
        build_full_dino(tmp, i) if spec is None else build_full_clip(tmp, spec, i)
        os.replace(tmp, target)
    return ScoreModels(
        dino=str(folder / "dino"), clip_image=str(folder / "clip-i"), clip_text=str(folder / "clip-t")
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="tiny scorers and a tiny SD model, 64x64 (checks the path)"
    )
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument(
        "--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="the generator's"
    )
    p.add_argument("--size", type=int, default=None, help="generation size (default 256 CPU, 512 GPU)")
    p.add_argument(
        "--steps", type=int, default=None, help="denoising steps per measured call (default 2 CPU, 50 GPU)"
    )
    p.add_argument("--project-steps", type=int, default=50)
    p.add_argument("--concepts", type=int, default=3, help="concepts per set N")
    p.add_argument(
        "--targets", type=int, default=None, help="images per concept set T (default 4 CPU, 8 GPU)"
    )
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; --quick 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--model", default=None, help="a diffusers SD1.x folder or hub id instead of the random one"
    )
    p.add_argument("--model-dir", type=Path, default=core.DEFAULT_MODEL_DIR)
    p.add_argument(
        "--scorer-dir", type=Path, default=DEFAULT_SCORER_DIR, help="where the scorers are built once"
    )
    p.add_argument("--batch-size", type=int, default=16, help="the scorers' batch (ScoreModels.batch_size)")
    p.add_argument("--out", type=Path, default=core.RESULTS)
    p.add_argument("--tag", default=None, help="result file name (default score_{quick,full}_{cpu,cuda})")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    import torch

    from stages.scoring.score import Scorer
    from stages.scoring.score_models import ScoreModels, ScoreModelSet

    core.logging_quiet()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or (64 if args.quick else 512 if gpu else 256)
    steps = args.steps or (2 if args.quick or not gpu else 50)
    targets = args.targets or (2 if args.quick else 8 if gpu else 4)
    repeats = args.repeats or (2 if args.quick else 3)
    tmp = tempfile.TemporaryDirectory(prefix="score-bench-") if args.quick else None
    model_dir = None if args.model else args.model_dir
    if args.quick:
        from pipeline.tiny_model import build_tiny_sd15
        from pipeline.tiny_scorers import build_tiny_scorers

        model = str(build_tiny_sd15(Path(tmp.name) / "sd", seed=0))
        model_dir = None
        scorer_models = build_tiny_scorers(Path(tmp.name) / "scorers")
    else:
        model = args.model or str(args.model_dir)
        scorer_models = full_scorers(args.scorer_dir, log)
    scorer_models = ScoreModels(
        scorer_models.dino, scorer_models.clip_image, scorer_models.clip_text, batch_size=args.batch_size
    )
    settings = core.Settings(
        device=device,
        dtype=args.dtype or ("float16" if gpu else "float32"),
        size=size,
        steps=steps,
        repeats=repeats,
        project_steps=args.project_steps,
        concepts=(args.concepts,),
        targets=(targets,),
        batch_size=None,
        model=model,
        memory=False,
        threads=args.threads,
    )
    machine = core.machine_info(settings)  # load average at the start
    t0 = time.perf_counter()
    gen = core.load_generator(settings, model_dir)
    timer = core.UNetTimer(gen.unet, device)
    scorer = Scorer(ScoreModelSet(scorer_models, device))  # float32, on the generator's device (as the stage)
    log(f"models loaded in {time.perf_counter() - t0:.0f} s")
    pool, concept_source = core.concept_pool(size)
    if args.concepts > len(pool):
        raise SystemExit(f"--concepts {args.concepts}: at most {len(pool)} concepts are available")
    concepts = pool[: args.concepts]
    pairs = [(c.image, c.mask) for c in concepts]  # the stored references and masks at the generation size
    prompts, seeds = [PROMPT] * targets, list(range(targets))
    common = dict(num_inference_steps=steps, height=size, width=size)
    state: dict = {}

    def call(job: str, n_steps: int = steps):
        kw = dict(common, num_inference_steps=n_steps)
        if job == "prepare":
            state["kv"] = gen.prepare_references(concepts, **kw)
        elif job == "generate":
            state["images"] = gen.generate(prompts, seeds, state["kv"], output_type="pil", **kw)
        elif job == "score_refs":
            state["refs"] = scorer.reference_features(pairs)
        elif job == "score":
            from PIL import Image

            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in state["png"]]
            state["scores"] = scorer.score(images, prompts, [state["refs"]] * len(images))
        else:
            raise ValueError(job)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for job in ("prepare", "generate", "score_refs"):  # warm-up at 1 step
        call(job, 1)
    state["png"] = []  # the images as the stage gets them: PNG bytes
    for image in state["images"]:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        state["png"].append(buf.getvalue())
    call("score")
    call("prepare")  # K/V at the measured step count before timing starts
    log(f"warm-up {time.perf_counter() - t0:.0f} s")

    rng = random.Random(0)
    raw: dict[str, list[dict]] = {job: [] for job in JOBS}
    for r in range(repeats):
        order = list(JOBS)
        rng.shuffle(order)  # generate uses the K/V of the last prepare (same steps and concepts)
        t0 = time.perf_counter()
        for job in order:
            sync()
            timer.reset()
            start, cpu = time.perf_counter(), time.process_time()
            call(job)
            sync()
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            raw[job].append(
                {
                    "wall_s": wall,
                    "unet_s": timer.seconds,
                    "cpu_s": cpu,
                    "unet_cpu_s": timer.cpu_seconds,
                    "unet_calls": timer.calls,
                }
            )
        log(
            f"round {r + 1}/{repeats}: {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}"
        )

    payload = {
        "benchmark": "score",
        "settings": {
            "device": device,
            "dtype": settings.dtype,
            "size": size,
            "steps": steps,
            "project_steps": args.project_steps,
            "concepts": args.concepts,
            "targets": targets,
            "repeats": repeats,
            "threads": args.threads,
            "quick": args.quick,
            "model": "tiny SD (quick)" if args.quick else model,
            "scorers": "tiny (quick)" if args.quick else scorer_models.identity(),
            "scorer_batch_size": args.batch_size,
            "concept_source": concept_source,
        },
        "machine": machine | {"load_average_end": os.getloadavg()},
        "raw": raw,
    }
    rows = analyse(payload)
    payload["summary"] = rows
    tag = args.tag or f"score_{'quick' if args.quick else 'full'}_{'cuda' if gpu else 'cpu'}"
    paths = core.write_results(args.out, tag, payload, rows)
    print_summary(rows, payload["settings"])
    log("wrote " + ", ".join(str(p) for p in paths))
    if tmp is not None:
        tmp.cleanup()


def analyse(payload: dict) -> list[dict]:
    s = payload["settings"]
    steps, proj, t = s["steps"], s["project_steps"], s["targets"]
    filt = not s["device"].startswith("cuda")
    m = {job: core.medians(payload["raw"][job], steps, proj, filter_disturbed=filt) for job in JOBS}
    gen = (m["prepare"]["wall_s"] + m["generate"]["wall_s"]) / t
    gen_proj = (m["prepare"]["projected_s"] + m["generate"]["projected_s"]) / t
    gen_cpu_proj = (m["prepare"]["projected_cpu_s"] + m["generate"]["projected_cpu_s"]) / t
    score = (m["score_refs"]["wall_s"] + m["score"]["wall_s"]) / t
    score_cpu = (m["score_refs"]["cpu_s"] + m["score"]["cpu_s"]) / t
    rows = [
        {
            "job": job,
            "median_wall_s": m[job]["wall_s"],
            "projected_s": m[job]["projected_s"] if job in ("prepare", "generate") else m[job]["wall_s"],
            "spread": m[job]["spread"],
            "kept": f"{m[job]['kept']}/{m[job]['rounds']}",
        }
        for job in JOBS
    ]
    rows.append(
        {
            "job": "per image",
            "generation_s": gen,
            "generation_projected_s": gen_proj,
            "scoring_s": score,
            "score_over_generation": score / gen,
            "score_over_generation_projected": score / gen_proj,
            "cpu_time_score_over_generation_projected": score_cpu / gen_cpu_proj,
        }
    )
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]  # one CSV header for every row


def print_summary(rows: list[dict], s: dict) -> None:
    print(
        f"\n{s['device']} {s['dtype']}, {s['size']}x{s['size']}, {s['steps']} steps (projected to "
        f"{s['project_steps']}), N={s['concepts']} concepts, T={s['targets']} images per concept set"
    )
    print(f"{'job':<12}{'median s':>10}{'@' + str(s['project_steps']) + ' s':>10}{'spread':>8}{'kept':>6}")
    for r in rows[:-1]:
        print(
            f"{r['job']:<12}{r['median_wall_s']:>10.2f}{r['projected_s']:>10.2f}{r['spread']:>8.0%}{r['kept']:>6}"
        )
    last = rows[-1]
    print(
        f"per image: generation {last['generation_s']:.2f} s measured, "
        f"{last['generation_projected_s']:.2f} s at {s['project_steps']} steps; scoring {last['scoring_s']:.3f} s\n"
        f"scoring / generation: {last['score_over_generation']:.3f} measured, "
        f"{last['score_over_generation_projected']:.4f} projected "
        f"(CPU time: {last['cpu_time_score_over_generation_projected']:.4f})"
    )


if __name__ == "__main__":
    main()
