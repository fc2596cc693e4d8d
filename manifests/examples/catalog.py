"""A catalog team's product feed and the build spec that turns it into a manifest.

    python manifests/examples/catalog.py DIR
    freecustom-pipeline manifest build DIR/spec.yaml -o DIR/manifest --dry-run
    freecustom-pipeline manifest build DIR/spec.yaml -o DIR/manifest
    freecustom-pipeline run DIR/manifest -o DIR/out

writes ``DIR/feed.csv`` (20 products: sku, title, category, color, image, mask), the product pictures
drawn with PIL under ``DIR/images/`` (cut-outs with alpha for mugs and lamps, photos with a mask file
for vases and sneakers) and ``DIR/spec.yaml``: every product in two scene templates of its category,
two seeds each. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (200, 40, 40),
    "blue": (40, 70, 200),
    "green": (40, 150, 80),
    "yellow": (220, 190, 40),
    "black": (30, 30, 30),
}
CATEGORIES = ("mug", "vase", "lamp", "sneaker")
SCENES = {
    "mug": [
        ("counter", "a {title} on a marble kitchen counter, {morning|evening} light"),
        ("desk", "a {title} on a wooden desk next to a laptop"),
    ],
    "vase": [
        ("shelf", "a {title} on a living room shelf with books"),
        ("table", "a {title} with flowers on a dining table"),
    ],
    "lamp": [
        ("bedside", "a {title} on a bedside table at night"),
        ("studio", "a {title} in a bright photo studio"),
    ],
    "sneaker": [
        ("street", "a {title} on a city street, {morning|evening} light"),
        ("studio", "a {title} on a white studio floor"),
    ],
}
SPEC = """\
# Every product of feed.csv in two scene templates of its category, two seeds each.
seed: 7
seeds: 2
pools:
  products:
    table: feed.csv
    columns: {{key: sku, image: image, mask: mask}}
    attributes: [title, category, color]
    concept_prompt: "a {{color}} {{category}}"
compositions:
  product:
    slots: {{product: products}}
templates:
{templates}"""


def draw(
    category: str, color: tuple[int, int, int], size: int = 96
) -> tuple[Image.Image, Image.Image | None]:
    """A product picture: an RGBA cut-out (mug, lamp) or a photo and its mask (vase, sneaker)."""
    mask = Image.new("L", (size, size), 0)
    m = ImageDraw.Draw(mask)
    if category == "mug":
        m.rectangle((28, 28, 64, 76), fill=255)
        m.ellipse((58, 40, 80, 64), outline=255, width=6)
    elif category == "lamp":
        m.polygon([(30, 20), (66, 20), (76, 50), (20, 50)], fill=255)
        m.rectangle((44, 50, 52, 78), fill=255)
        m.rectangle((30, 78, 66, 84), fill=255)
    elif category == "vase":
        m.ellipse((26, 36, 70, 86), fill=255)
        m.rectangle((40, 14, 56, 40), fill=255)
    else:
        m.polygon([(10, 70), (14, 44), (46, 44), (86, 62), (86, 76), (10, 76)], fill=255)
    fill = Image.new("RGB", (size, size), color)
    if category in ("mug", "lamp"):
        cut = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        cut.paste(fill, mask=mask)
        return cut, None
    photo = Image.new("RGB", (size, size), (235, 232, 225))
    photo.paste(fill, mask=mask)
    return photo, mask


def write_catalog(folder: Path) -> Path:
    """The feed, its images and the spec in ``folder``; returns the spec's path."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(COLORS)
    for n in range(20):
        category = CATEGORIES[n % 4]
        color = names[(n // 4) % len(names)]
        sku = f"SKU-{n:04d}"
        image, mask = draw(category, COLORS[color])
        image_name = f"images/{sku}.png"
        image.save(folder / image_name)
        mask_name = ""
        if mask is not None:
            mask_name = f"images/{sku}_mask.png"
            mask.save(folder / mask_name)
        rows.append(
            {
                "sku": sku,
                "title": f"{color} {category} model {n}",
                "category": category,
                "color": color,
                "image": image_name,
                "mask": mask_name,
            }
        )
    with open(folder / "feed.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    templates = "".join(
        f'  - name: {category}_{name}\n    prompt: "{prompt}"\n    when: {{category: {category}}}\n'
        for category in CATEGORIES
        for name, prompt in SCENES[category]
    )
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.format(templates=templates), encoding="utf-8")
    return spec


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python manifests/examples/catalog.py DIR")
    print(write_catalog(Path(sys.argv[1])))
