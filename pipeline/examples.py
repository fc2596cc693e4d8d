"""The built-in example: concept images drawn here (no downloads, nothing read from outside) and a manifest.

Three concept kinds a catalog job meets: a product cut-out with transparency (the alpha is the
mask), a photo with a mask file, and an accessory pasted in context onto another concept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

from pipeline.manifest import MANIFEST_SCHEMA


def _texture(size: int, seed: int, base: tuple[int, int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 18, (size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    grad = np.stack([xx * 40, yy * 40, (1 - xx) * 30], axis=-1)
    arr = np.clip(np.array(base, dtype=np.float64) + noise + grad, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.GaussianBlur(1.2))


def draw_example_images(folder: Path) -> dict[str, Path]:
    """Write the example's images and masks; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    size = 128
    paths = {}
    # 1. a dog-like animal photo with a mask file (the carrier)
    dog = _texture(size, 1, (90, 140, 90))
    d = ImageDraw.Draw(dog)
    d.ellipse((30, 50, 100, 118), fill=(170, 120, 70))  # body
    d.ellipse((44, 18, 88, 62), fill=(185, 135, 80))  # head
    d.ellipse((56, 34, 62, 40), fill=(20, 20, 20))
    d.ellipse((70, 34, 76, 40), fill=(20, 20, 20))
    mask = Image.new("L", (size * 2, size * 2), 0)  # a mask file of another size, same aspect ratio
    m = ImageDraw.Draw(mask)
    m.ellipse((60, 100, 200, 236), fill=255)
    m.ellipse((88, 36, 176, 124), fill=255)
    paths["dog"] = folder / "dog.jpg"
    dog.save(paths["dog"], quality=92)
    paths["dog_mask"] = folder / "dog_mask.png"
    mask.save(paths["dog_mask"])
    # 2. a product cut-out with transparency: a red hat
    hat = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    h = ImageDraw.Draw(hat)
    h.rectangle((20, 70, 108, 84), fill=(200, 30, 40, 255))  # brim
    h.rounded_rectangle((38, 30, 90, 74), radius=10, fill=(220, 40, 50, 255))  # crown
    h.rectangle((38, 60, 90, 68), fill=(30, 30, 30, 255))  # band
    paths["hat"] = folder / "hat.png"
    hat.save(paths["hat"])
    # 3. a product photo with a mask file: a blue mug
    mug = _texture(size, 3, (225, 225, 215))
    g = ImageDraw.Draw(mug)
    g.rectangle((40, 40, 88, 100), fill=(40, 70, 200))
    g.ellipse((84, 55, 108, 85), outline=(40, 70, 200), width=7)
    mug_mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mug_mask).rectangle((40, 40, 88, 100), fill=255)
    ImageDraw.Draw(mug_mask).ellipse((84, 55, 108, 85), outline=255, width=7)
    paths["mug"] = folder / "mug.jpg"
    mug.save(paths["mug"], quality=92)
    paths["mug_mask"] = folder / "mug_mask.png"
    mug_mask.save(paths["mug_mask"])
    return paths


def write_example_manifest(folder: Path, *, seeds_per_row: int = 2) -> Path:
    """Images plus ``manifest.parquet`` (relative paths) in ``folder``; returns the manifest path."""
    paths = draw_example_images(folder / "images")

    def rel(name: str) -> str:
        return str(paths[name].relative_to(folder))

    def concept(image, prompt, mask=None, weight=3.0, context=None):
        return {"image": rel(image), "prompt": prompt, "mask": rel(mask) if mask else None, "weight": weight,
                "box": None, "points": None, "label": None, "context": context}

    dog = concept("dog", "a dog", "dog_mask")
    hat_on_dog = concept("hat", "a dog wearing a red hat", context={"onto": "0", "anchor": "top", "box": None,
                                                                      "scale": 0.9, "soft_edge": 0})
    rows = [
        {"id": "dog_hat_park", "prompt": "a dog wearing a red hat in a park", "concepts": [dog, hat_on_dog],
         "sku": "HAT-001", "split": "train"},
        {"id": "dog_hat_beach", "prompt": "a dog wearing a red hat on the beach", "concepts": [dog, hat_on_dog],
         "sku": "HAT-001", "split": "train"},
        {"id": "mug_kitchen", "prompt": "a blue mug on a kitchen table", "concepts": [concept("mug", "a blue mug", "mug_mask")],
         "sku": "MUG-042", "split": "val"},
        {"id": "hat_product", "prompt": "a red hat on a white background", "concepts": [concept("hat", "a red hat")],
         "sku": "HAT-001", "split": "val"},
    ]
    for i, row in enumerate(rows):
        row["seeds"] = [1000 * i + k for k in range(seeds_per_row)]
    schema = pa.schema([MANIFEST_SCHEMA.field("id"), MANIFEST_SCHEMA.field("prompt"), MANIFEST_SCHEMA.field("seeds"),
                        MANIFEST_SCHEMA.field("concepts"), pa.field("sku", pa.string()), pa.field("split", pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    path = folder / "manifest.parquet"
    pq.write_table(table, path)
    return path
