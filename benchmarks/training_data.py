"""What ``run --embed-references`` and ``run --annotate`` add to each sample, in bytes.

The sample cases' real references and masks (``shared/data/freecustom-samples``, or the synthetic copy
the tests use) are drawn into a sample exactly as the run draws them (``stages.generation.embed.reference_members``:
resized to the image, PNG); the annotation masks come from an attention map of the latent grid
(``--size / 8``) with one blob per concept, through the run's rule (``stages.generation.annotate``). A rendered image
cannot be made here without the real model, so each case's first reference, resized to the image size,
stands in for the generated image (a photo: the same order of bytes as a render). Prints, per case and
on average, the bytes of each field and the ratio to the sample without them; writes
``results/training_data.json``.

    .venv/bin/python benchmarks/training_data.py               # 512 x 512
    .venv/bin/python benchmarks/training_data.py --size 1024   # SDXL's size
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freecustom_core.heatmap import maps_image  # noqa: E402
from stages.generation.annotate import annotate_sample  # noqa: E402
from stages.generation.embed import reference_members  # noqa: E402
from stages.generation.generate import encode_image  # noqa: E402
from tests.conftest import sample_root  # noqa: E402

RESULTS = Path(__file__).with_name("results")


def case_pairs(case: Path) -> list[tuple[Image.Image, Image.Image]]:
    """A case's (reference, mask) pairs, as the manifest would give them (masks as files)."""
    pairs = []
    for image_path in sorted((case / "image").iterdir()):
        mask_path = next((case / "mask").glob(image_path.stem + ".*"))
        pairs.append((Image.open(image_path).convert("RGB"), Image.open(mask_path).convert("L")))
    return pairs


def attention_png(n: int, size: int, rng: np.random.Generator) -> tuple[bytes, dict]:
    """An ``attn.png`` of ``n`` concepts: per concept a Gaussian blob on the latent grid, plus noise."""
    grid = size // 8
    ys, xs = np.mgrid[0:grid, 0:grid]
    maps = []
    for _ in range(n):
        cy, cx, r = (
            rng.uniform(0.25, 0.75) * grid,
            rng.uniform(0.25, 0.75) * grid,
            rng.uniform(0.1, 0.2) * grid,
        )
        maps.append(
            0.6 * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * r * r)) + 0.05 * rng.random((grid, grid))
        )
    png = encode_image(maps_image(np.stack(maps), (size, size)), "png")
    return png, {"attention": {"panels": n, "panel_size": [size, size], "gap": 4}}


def measure(case: Path, size: int, rng: np.random.Generator) -> dict:
    pairs = case_pairs(case)
    members = reference_members(pairs, (size, size))
    photo = pairs[0][0].resize((size, size), Image.Resampling.LANCZOS)
    attn, meta = attention_png(len(pairs), size, rng)
    fields, masks = annotate_sample(dict(meta, concepts=[{"prompt": ""}] * len(pairs)), attn)
    out = {
        "case": case.name,
        "concepts": len(pairs),
        "image_png": len(encode_image(photo, "png")),
        "image_jpg": len(encode_image(photo, "jpg")),
        "references": sum(len(v) for k, v in members.items() if not k.endswith(".mask.png")),
        "reference_masks": sum(len(v) for k, v in members.items() if k.endswith(".mask.png")),
        "annotation_masks": sum(len(v) for v in masks.values()),
        "annotation_json": len(json.dumps(fields, sort_keys=True)),
        "attention_png": len(attn),
    }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    root = sample_root()
    rows = [
        measure(case, args.size, rng) for case in sorted(p for p in root.iterdir() if (p / "image").is_dir())
    ]
    keys = (
        "image_png",
        "image_jpg",
        "references",
        "reference_masks",
        "annotation_masks",
        "annotation_json",
        "attention_png",
    )
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    embed = mean["references"] + mean["reference_masks"]
    annotate = mean["annotation_masks"] + mean["annotation_json"]
    print(f"samples of {args.size}x{args.size}, {len(rows)} cases from {root}")
    print(f"{'case':24} {'N':>2} " + " ".join(f"{k:>17}" for k in keys))
    for r in rows:
        print(f"{r['case']:24} {r['concepts']:>2} " + " ".join(f"{r[k]:>17,}" for k in keys))
    print(f"{'mean':24} {'':>2} " + " ".join(f"{mean[k]:>17,.0f}" for k in keys))
    for fmt in ("png", "jpg"):
        base = mean[f"image_{fmt}"] + 1500  # + the sample's JSON (about 1.5 kB)
        print(
            f"image as {fmt}: --embed-references x{(base + embed) / base:.2f}, --annotate x{(base + annotate) / base:.2f}, "
            f"both x{(base + embed + annotate) / base:.2f} the bytes of a sample"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"training_data_{args.size}.json").write_text(
        json.dumps({"size": args.size, "cases": rows, "mean": mean}, indent=2)
    )


if __name__ == "__main__":
    main()
