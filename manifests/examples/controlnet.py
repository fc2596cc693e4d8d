"""Build the ControlNet example: one product placed by layouts (``run --controlnet``).

    python manifests/examples/controlnet.py [OUT_DIR]     # default: this folder
    freecustom-pipeline run OUT_DIR/controlnet.parquet -o OUT --controlnet lllyasviel/sd-controlnet-canny

One concept (a teapot cut out by its mask) and two layouts drawn here with PIL:

- ``layouts/table.png``: a flat picture of a table and a box; with type ``canny`` the pipeline computes its
  edge map (``--canny-low`` / ``--canny-high``), and the box's faint edge is where the thresholds matter;
- ``layouts/scribble.png``: white strokes on black, already a condition (type ``none``).

Rows ``teapot_table`` and ``teapot_scribble`` use the default (references without ControlNet: one
reference K/V computation for both layouts); ``teapot_table_release`` and ``teapot_scribble_release`` set
``control_references`` (the authors' release: K/V per layout). Writes ``OUT_DIR/controlnet.parquet``
with paths relative to it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from PIL import Image, ImageDraw

try:
    from pipeline.manifest import MANIFEST_SCHEMA
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from pipeline.manifest import MANIFEST_SCHEMA

LAYOUT_SCALE = 0.7


def _teapot(size: int) -> tuple[Image.Image, Image.Image]:
    """A red teapot on a dark, slightly textured background, and its mask."""
    image = Image.new("RGB", (size, size), (40, 36, 30))
    draw = ImageDraw.Draw(image)
    for y in range(0, size, 4):
        draw.line((0, y, size, y), fill=(48, 42, 36))
    mask = Image.new("L", (size, size), 0)
    shape = ImageDraw.Draw(mask)
    s = size / 64
    shape.ellipse((14 * s, 18 * s, 50 * s, 54 * s), fill=255)  # body
    shape.rectangle((28 * s, 10 * s, 36 * s, 20 * s), fill=255)  # lid knob
    shape.polygon([(48 * s, 30 * s), (60 * s, 22 * s), (58 * s, 28 * s), (50 * s, 38 * s)], fill=255)  # spout
    image.paste((200, 60, 40), (0, 0), mask)
    return image, mask


def _table(size: int) -> Image.Image:
    """A table top and a box: strong edges, and the box's faint one (its canny edge depends on thresholds)."""
    image = Image.new("RGB", (size, size), (30, 30, 30))
    draw = ImageDraw.Draw(image)
    s = size / 64
    draw.rectangle((8 * s, 20 * s, 40 * s, 56 * s), fill=(220, 200, 180))
    draw.rectangle((44 * s, 6 * s, 60 * s, 30 * s), fill=(55, 55, 55))
    return image


def _scribble(size: int) -> Image.Image:
    """A scribble condition: white strokes on black (a pose-like line)."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    s = size / 64
    ImageDraw.Draw(image).line((32 * s, 6 * s, 32 * s, 40 * s, 12 * s, 60 * s), fill=(255, 255, 255),
                               width=max(1, round(3 * s)))
    return image


def controlnet_rows() -> list[dict]:
    """The example's rows (paths relative to the manifest's folder)."""
    concept = {"image": "images/teapot.png", "mask": "masks/teapot.png", "prompt": "a red teapot", "weight": 3.0}

    def control(image: str, kind: str) -> dict:
        return {"image": image, "type": kind, "scale": LAYOUT_SCALE, "start": None, "end": None}

    table, scribble = control("layouts/table.png", "canny"), control("layouts/scribble.png", "none")
    return [
        {"id": "teapot_table", "prompt": "a red teapot on a wooden table", "seeds": [3], "concepts": [concept],
         "control": table, "control_references": None},
        {"id": "teapot_scribble", "prompt": "a red teapot on a shelf", "seeds": [4], "concepts": [concept],
         "control": scribble, "control_references": None},
        {"id": "teapot_table_release", "prompt": "a red teapot in a garden", "seeds": [5], "concepts": [concept],
         "control": table, "control_references": True},
        {"id": "teapot_scribble_release", "prompt": "a red teapot on the sand", "seeds": [6],
         "concepts": [concept], "control": scribble, "control_references": True},
    ]


def build_controlnet_example(out_dir: str | os.PathLike[str], *, size: int = 512) -> Path:
    """Draw the concept and the layouts (``size`` pixels), write ``controlnet.parquet`` in ``out_dir``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    for folder in ("images", "masks", "layouts"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    image, mask = _teapot(size)
    image.save(out / "images" / "teapot.png")
    mask.save(out / "masks" / "teapot.png")
    _table(size).save(out / "layouts" / "table.png")
    _scribble(size).save(out / "layouts" / "scribble.png")
    path = out / "controlnet.parquet"
    pq.write_table(pa.Table.from_pylist(controlnet_rows(), schema=MANIFEST_SCHEMA), path)
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    print(build_controlnet_example(target))
