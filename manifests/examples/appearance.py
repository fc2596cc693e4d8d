"""Build the appearance-transfer example: one reference, a prompt naming an object of another kind.

    python manifests/examples/appearance.py [OUT_DIR]     # default: this folder

FreeCustom's other application (the paper's appearance transfer): the reference gives its appearance
and material (colours, pattern, texture), the target prompt names another kind of object, and MRSA
carries the reference's look onto it. Two rows, both with a single concept:

- ``striped_vase_to_teapot``: a masked reference (a striped vase and its mask), "a teapot" made of it;
- ``knit_swatch_to_armchair``: a whole-image reference (a knitted swatch; an all-white mask, i.e. the
  whole image is the concept), "an armchair" covered in it.

Writes ``OUT_DIR/appearance.parquet`` with relative paths into ``OUT_DIR/images`` and ``OUT_DIR/masks``.
Every picture is drawn here with PIL.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

try:
    from pipeline.manifest import MANIFEST_SCHEMA
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from pipeline.manifest import MANIFEST_SCHEMA


def _striped_vase(size: int = 256) -> tuple[Image.Image, Image.Image]:
    """A vase with blue and white stripes on a grey table, and its mask."""
    image = Image.new("RGB", (size, size), (200, 200, 196))
    body = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(body)
    draw.ellipse((60, 90, 196, 236), fill=255)  # belly
    draw.rectangle((100, 30, 156, 120), fill=255)  # neck
    stripes = Image.new("RGB", (size, size), (245, 245, 240))
    stripe_draw = ImageDraw.Draw(stripes)
    for y in range(0, size, 24):
        stripe_draw.rectangle((0, y, size, y + 11), fill=(30, 70, 170))
    image.paste(stripes, (0, 0), body)
    return image, body


def _knit_swatch(size: int = 256) -> tuple[Image.Image, Image.Image]:
    """A red and cream knitted swatch filling the frame (whole-image reference: its mask is all white)."""
    image = Image.new("RGB", (size, size), (180, 30, 40))
    draw = ImageDraw.Draw(image)
    for y in range(0, size, 16):
        for x in range(0, size, 16):
            colour = (235, 225, 200) if (x // 16 + y // 32) % 4 == 0 else (180, 30, 40)
            draw.polygon([(x, y), (x + 8, y + 12), (x + 16, y), (x + 8, y + 16)], fill=colour)
    return image, Image.new("L", (size, size), 255)


def appearance_rows() -> list[dict]:
    """The example's rows (paths relative to the manifest's folder)."""
    return [
        {
            "id": "striped_vase_to_teapot",
            "prompt": "a teapot with blue and white stripes on a kitchen counter",
            "seeds": [0, 1],
            "concepts": [{"image": "images/vase.png", "mask": "masks/vase.png",
                          "prompt": "a vase with blue and white stripes"}],
        },
        {
            "id": "knit_swatch_to_armchair",
            "prompt": "an armchair covered in red and cream knitted wool, studio photo",
            "seeds": [0, 1],
            "concepts": [{"image": "images/knit.png", "mask": "masks/knit.png",
                          "prompt": "red and cream knitted wool", "weight": 2.0}],
        },
    ]


def build_appearance_example(out_dir: str | os.PathLike[str]) -> Path:
    """Draw the references, write ``appearance.parquet`` (atomically) in ``out_dir``; return its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for name, (image, mask) in {"vase": _striped_vase(), "knit": _knit_swatch()}.items():
        image.save(out / "images" / f"{name}.png")
        mask.save(out / "masks" / f"{name}.png")
    table = pa.Table.from_pylist(appearance_rows(), schema=MANIFEST_SCHEMA)
    path = out / "appearance.parquet"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".appearance.", suffix=".parquet.tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    print(build_appearance_example(target))
