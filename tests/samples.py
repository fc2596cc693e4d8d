"""A synthetic stand-in for the shared FreeCustom sample cases (``../shared/data/freecustom-samples``).

``synthetic_samples(dest)`` writes the same layout as the real folder: the five case folders,
each with the authors' ``config_stable_diffusion.yaml`` (byte for byte the release's text: a
flow mapping of image path -> prompt, one without a trailing comma, comments, paths relative to
the authors' repository root), ``image/<name>.jpg`` (RGB JPEG) and ``mask/<name>.jpg``
(greyscale JPEG, so with grey compression noise at the edges that a 50 % threshold removes).
The pictures are simple drawn shapes, but the quirks of the real files are kept:

- masks of another size than their image with the same aspect ratio (hat, sunglasses, phone,
  flower), one of them not square and with an aspect a little off its image's (flower, as in
  the release: within the 2 % tolerance);
- the dog of ``dog_hat_sunglasses_0`` is 780 x 780, and it and the phone are byte-identical
  in the two cases that share them (``dog_phone``), as in the release;
- embedded sRGB ICC profiles on some images, an EXIF block (orientation 1, dpi) on one.

The shapes are made for the tests that look at the geometry: a dog (ellipse, taller than
wide) and a top hat whose box is narrower relative to its height, so a hat pasted on the
dog's head at scale 0.5 ends up 0.4-0.5 of the dog's width. Deterministic (no ``hash()``,
fixed seeds), small, and written in well under a second.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CONFIG_NAME = "config_stable_diffusion.yaml"
CASES_PREFIX = "dataset/freecustom/multi_concept"
NEGATIVE_PROMPT = "lowres, bad anatomy, text, error, cropped, worst quality, low quality, normal quality, jpeg artifacts, blurry"

# case -> (gpu, seeds, [(concept name, concept prompt)], target prompt, mask weights): the values
# of the release's configs, so tests that check what an import yields hold on either copy.
CASES: dict[str, tuple[int, list[int], list[tuple[str, str]], str, list[float]]] = {
    "cat_necklace": (
        1,
        [15207, 20394],
        [("cat", "a cat"), ("necklace", "a woman wearing a necklace")],
        "a cat wearing a necklace",
        [2.0, 3.0],
    ),
    "cat_phone": (
        1,
        [16, 27349, 394353],
        [("cat", "a cat"), ("phone", "a dog holding a phone")],
        "a cat holding a phone",
        [3.0, 3.0],
    ),
    "dog_flower": (
        1,
        [69, 88, 100, 278, 5765, 9358, 394353, 970912],
        [("dog", "a dog"), ("flower", "a man with flowers around the neck")],
        "a dog with flowers around the neck",
        [3.0, 3.0],
    ),
    "dog_hat_sunglasses_0": (
        0,
        [2, 278, 9358, 324091, 53839932],
        [
            ("dog", "a dog"),
            ("hat", "a cat wearing a red and black hat"),
            ("sunglasses", "a cat with sunglasses"),
        ],
        "a dog with sunglasses wearing a red and black hat",
        [3.0, 3.0, 3.0],
    ),
    "dog_phone": (
        1,
        [393595],
        [("dog", "a dog"), ("phone", "a dog holding a phone")],
        "a dog holding a phone",
        [3.0, 3.0],
    ),
}

# (case, name) -> (image size, mask size), (width, height). The release's sizes divided by about
# 5, except the 780 x 780 dog that tests/test_composite.py checks.
SIZES: dict[tuple[str, str], tuple[tuple[int, int], tuple[int, int]]] = {
    ("cat_necklace", "cat"): ((256, 256), (256, 256)),
    ("cat_necklace", "necklace"): ((268, 268), (268, 268)),
    ("cat_phone", "cat"): ((258, 258), (258, 258)),
    ("cat_phone", "phone"): ((232, 232), (462, 462)),
    ("dog_flower", "dog"): ((256, 256), (256, 256)),
    ("dog_flower", "flower"): ((240, 239), (463, 462)),
    ("dog_hat_sunglasses_0", "dog"): ((780, 780), (780, 780)),
    ("dog_hat_sunglasses_0", "hat"): ((276, 276), (462, 462)),
    ("dog_hat_sunglasses_0", "sunglasses"): ((200, 200), (462, 462)),
    ("dog_phone", "dog"): ((780, 780), (780, 780)),
    ("dog_phone", "phone"): ((232, 232), (462, 462)),
}

_ICC = {"cat", "hat", "sunglasses", "phone", "flower"}  # images with an embedded sRGB profile
_EXIF = {"necklace"}  # an EXIF block with orientation 1 (top-left) and a dpi


def _garland() -> list[tuple[str, tuple[float, ...], tuple[int, int, int]]]:
    """Seven overlapping flowers on a U-shaped arc, as around a neck."""
    shapes = []
    for k in range(7):
        x, y = 0.2 + 0.1 * k, 0.55 + 0.12 * (1 - ((k - 3) / 3) ** 2)
        color = (230, 60, 90) if k % 2 == 0 else (250, 200, 40)
        shapes.append(("ellipse", (x - 0.07, y - 0.07, x + 0.07, y + 0.07), color))
    return shapes


# name -> shapes, each (kind, coordinates as fractions of the picture, colour). The mask is the
# union of the shapes; a "detail_" shape is drawn on the image only, over another shape.
_SHAPES: dict[str, list[tuple[str, tuple[float, ...], tuple[int, int, int]]]] = {
    # taller than wide (box aspect ~0.85), low enough in the frame that a hat fits above it
    "dog": [
        ("ellipse", (0.22, 0.30, 0.78, 0.96), (160, 82, 45)),
        ("detail_ellipse", (0.45, 0.45, 0.55, 0.52), (30, 20, 15)),
    ],
    # a top hat: black crown, red band, black brim; box aspect 0.76
    "hat": [
        ("rectangle", (0.32, 0.12, 0.68, 0.75), (20, 20, 20)),
        ("detail_rectangle", (0.32, 0.62, 0.68, 0.72), (200, 20, 30)),
        ("rectangle", (0.215, 0.75, 0.785, 0.87), (20, 20, 20)),
    ],
    "sunglasses": [
        ("ellipse", (0.15, 0.40, 0.45, 0.58), (10, 10, 10)),
        ("ellipse", (0.55, 0.40, 0.85, 0.58), (10, 10, 10)),
        ("rectangle", (0.44, 0.46, 0.56, 0.50), (10, 10, 10)),
    ],
    "cat": [
        ("ellipse", (0.20, 0.35, 0.80, 0.95), (128, 128, 128)),
        ("polygon", (0.25, 0.50, 0.30, 0.20, 0.45, 0.40), (128, 128, 128)),
        ("polygon", (0.55, 0.40, 0.70, 0.20, 0.75, 0.50), (128, 128, 128)),
    ],
    "necklace": [
        ("ring", (0.25, 0.45, 0.75, 0.80), (230, 200, 60)),
    ],
    "phone": [
        ("rectangle", (0.38, 0.20, 0.62, 0.80), (40, 40, 48)),
        ("detail_rectangle", (0.41, 0.25, 0.59, 0.72), (90, 140, 220)),
    ],
    "flower": _garland(),
}


def _seed(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


def _draw(size: tuple[int, int], name: str, *, mask: bool) -> Image.Image:
    w, h = size
    if mask:
        im = Image.new("L", size, 0)
    else:  # a soft gradient with a little noise, so the JPEG is not trivially flat
        rng = np.random.default_rng(_seed(name, f"{w}x{h}"))
        yy, xx = np.mgrid[:h, :w]
        base = np.stack([90 + 60 * xx / w, 110 + 40 * yy / h, np.full((h, w), 150.0)], axis=-1)
        im = Image.fromarray(np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for kind, box, color in _SHAPES[name]:
        detail = kind.startswith("detail_")
        if mask and detail:
            continue
        fill = 255 if mask else color
        xy = [v * (w if i % 2 == 0 else h) for i, v in enumerate(box)]
        shape = kind.removeprefix("detail_")
        if shape == "ring":
            draw.ellipse(xy, outline=fill, width=max(2, round(0.06 * min(w, h))))
        elif shape == "polygon":
            draw.polygon(list(zip(xy[::2], xy[1::2], strict=True)), fill=fill)
        else:
            getattr(draw, shape)(xy, fill=fill)
    return im


def _icc_profile() -> bytes | None:
    try:
        from PIL import ImageCms

        return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    except Exception:  # Pillow without littlecms: no profile, nothing else changes
        return None


def _config(case: str) -> str:
    """The release's config text for ``case``, down to its spacing and trailing commas."""
    gpu, seeds, concepts, target, weights = CASES[case]
    lines = [f"  {CASES_PREFIX}/{case}/image/{name}.jpg: {prompt}," for name, prompt in concepts]
    if case == "cat_phone":  # the release's one flow mapping without a trailing comma
        lines[-1] = lines[-1].removesuffix(",")
    seeds_sep = "," if case == "dog_flower" else ", "  # as written in the release
    weights_text = ("[" + ", ".join(str(w) for w in weights) + "]").ljust(17)  # the comments line up
    return (
        'mark: ""\n\nmodel_path: "runwayml/stable-diffusion-v1-5"\n\n'
        f"gpu: {gpu}\n\n"
        "# feature injection setting\nstart_step: 0\nend_step: 50\nlayer_idx: [10,11,12,13,14,15]\n\n"
        f"# set seeds\nseeds: [{seeds_sep.join(map(str, seeds))}]\n\n"
        "# set reference image infos\nref_image_infos: {\n" + "\n".join(lines) + "\n}\n"
        f'target_prompt: "{target}"\n\n'
        "# ref image setting\n"
        "use_null_ref_prompts: False     # Whether or not to use an empty prompt when denoising reference images.\n"
        f"mask_weights: {weights_text} # The larger the mask_weight is, the higher attention is for the reference image.\n\n"
        f'negative_prompt: "{NEGATIVE_PROMPT}"\n'
        "style_fidelity: 1 # The larger the style_fidelity, the more like the reference concepts, range of values: [0,1]"
    )  # no final newline, like the release's files


def _exif_bytes() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 1  # orientation: top-left (as stored)
    return exif.tobytes()


def synthetic_samples(dest: Path) -> Path:
    """Write the synthetic sample cases into ``dest`` (created if needed) and return ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "README.txt").write_text(
        "Synthetic stand-in for the FreeCustom sample cases, written by tests/samples.py.\n"
    )
    icc = _icc_profile()
    cache: dict[tuple[str, tuple[int, int], bool], bytes] = {}
    for case in CASES:
        folder = dest / case
        (folder / "image").mkdir(parents=True, exist_ok=True)
        (folder / "mask").mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(_config(case))
        for name, _ in CASES[case][2]:
            image_size, mask_size = SIZES[(case, name)]
            for is_mask, size in ((False, image_size), (True, mask_size)):
                key = (name, size, is_mask)
                if key not in cache:  # same name and size: the same bytes, as the release shares files
                    buf = io.BytesIO()
                    save: dict = {"quality": 90}
                    if not is_mask and name in _ICC and icc:
                        save["icc_profile"] = icc
                    if not is_mask and name in _EXIF:
                        save.update(exif=_exif_bytes(), dpi=(72, 72))
                    _draw(size, name, mask=is_mask).save(buf, "JPEG", **save)
                    cache[key] = buf.getvalue()
                (folder / ("mask" if is_mask else "image") / f"{name}.jpg").write_bytes(cache[key])
    return dest
