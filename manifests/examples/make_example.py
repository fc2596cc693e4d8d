"""Build a small example manifest, and the images it points to, drawn here with PIL.

    python manifests/examples/make_example.py [OUT_DIR]     # default: this folder

writes ``OUT_DIR/example.parquet`` with relative paths into ``OUT_DIR/images`` and
``OUT_DIR/masks``, so the folder can be moved as a whole. Then:

    freecustom-pipeline validate OUT_DIR/example.parquet
    freecustom-pipeline run OUT_DIR/example.parquet -o out/

Four rows show the main features: concepts with mask files (one mask at twice its image's
size), an RGBA cut-out whose alpha is its mask, a copy-paste composite onto another concept
and onto a carrier image, per-row overrides, and pass-through columns (``sku``, ``split``).
Nothing here is read from outside the script: every picture is drawn from code.
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


def _ball(size: int = 256) -> tuple[Image.Image, Image.Image]:
    """A red ball with a highlight on a pale floor, and its mask."""
    image = Image.new("RGB", (size, size), (236, 232, 220))
    draw = ImageDraw.Draw(image)
    box = (48, 56, 208, 216)
    draw.ellipse(box, fill=(200, 30, 40))
    draw.ellipse((92, 92, 132, 124), fill=(245, 150, 150))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return image, mask


def _hat(size: int = 256) -> Image.Image:
    """A blue hat on a transparent background (an RGBA cut-out: the alpha is the mask)."""
    hat = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(hat)
    draw.ellipse((28, 150, 228, 200), fill=(30, 60, 170, 255))  # brim
    draw.rounded_rectangle((78, 60, 178, 175), radius=24, fill=(40, 80, 200, 255))  # crown
    draw.rectangle((78, 140, 178, 158), fill=(230, 200, 40, 255))  # band
    return hat


def _sofa() -> tuple[Image.Image, Image.Image]:
    """A green sofa (320x240) and its mask drawn at 640x480: same aspect, resized on load."""
    image = Image.new("RGB", (320, 240), (250, 246, 238))
    draw = ImageDraw.Draw(image)
    shapes = [(40, 90, 280, 190), (30, 70, 70, 200), (250, 70, 290, 200)]
    for shape in shapes:
        draw.rounded_rectangle(shape, radius=12, fill=(40, 130, 80))
    mask = Image.new("L", (640, 480), 0)
    mask_draw = ImageDraw.Draw(mask)
    for x0, y0, x1, y1 in shapes:
        mask_draw.rounded_rectangle((2 * x0, 2 * y0, 2 * x1, 2 * y1), radius=24, fill=255)
    return image, mask


def _table(size: int = 256) -> Image.Image:
    """A wooden table: a carrier image that other concepts are pasted onto."""
    image = Image.new("RGB", (size, size), (225, 225, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 120, 236, 140), fill=(140, 90, 40))
    draw.rectangle((40, 140, 56, 240), fill=(120, 75, 35))
    draw.rectangle((200, 140, 216, 240), fill=(120, 75, 35))
    return image


def _concept(image: str, prompt: str, **extra: object) -> dict:
    return {"image": image, "prompt": prompt, **extra}


def example_rows() -> list[dict]:
    """The example's rows (paths relative to the manifest's folder)."""
    return [
        {
            "id": "ball_on_sofa",
            "prompt": "a red ball on a green sofa in a bright living room",
            "seeds": [0, 1, 2],
            "concepts": [
                _concept("images/ball.png", "a red ball", mask="masks/ball.png"),
                _concept("images/sofa.jpg", "a green sofa", mask="masks/sofa.png", weight=2.5),
            ],
            "sku": "BALL-01",
            "split": "train",
        },
        {
            "id": "hat_from_alpha",
            "prompt": "a blue hat on a wooden shelf",
            "seeds": [7],
            "concepts": [_concept("images/hat.png", "a blue hat")],  # no mask: the alpha is the mask
            "num_inference_steps": 30,
            "end_step": 25,
            "guidance_scale": 6.0,
            "sku": "HAT-02",
            "split": "val",
        },
        {
            "id": "hat_on_ball",
            "prompt": "a red ball wearing a blue hat",
            "seeds": [3, 4],
            "concepts": [
                _concept("images/ball.png", "a red ball", mask="masks/ball.png"),
                _concept(
                    "images/hat.png", "a blue hat", context={"onto": "0", "anchor": "top", "scale": 0.6}
                ),
            ],
            "style_fidelity": 0.8,
            "width": 640,
            "sku": "BALL-01",
            "split": "train",
        },
        {
            "id": "hat_on_table",
            "prompt": "a blue hat on a wooden table",
            "seeds": [11],
            "concepts": [
                _concept(
                    "images/hat.png",
                    "a blue hat",
                    context={"onto": "images/table.png", "box": [0.3, 0.0, 0.7, 0.4], "soft_edge": 2},
                ),
            ],
            "sku": "HAT-02",
            "split": "train",
        },
    ]


def build_example(out_dir: str | os.PathLike[str]) -> Path:
    """Draw the images, write ``example.parquet`` (atomically) in ``out_dir``; return its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    ball, ball_mask = _ball()
    ball.save(out / "images" / "ball.png")
    ball_mask.save(out / "masks" / "ball.png")
    _hat().save(out / "images" / "hat.png")
    sofa, sofa_mask = _sofa()
    sofa.save(out / "images" / "sofa.jpg", quality=92)
    sofa_mask.save(out / "masks" / "sofa.png")
    _table().save(out / "images" / "table.png")

    rows = example_rows()
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    for extra in ("sku", "split"):  # pass-through columns: copied into each sample's metadata
        table = table.append_column(extra, pa.array([r.get(extra) for r in rows], pa.string()))
    path = out / "example.parquet"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".example.", suffix=".parquet.tmp")
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
    print(build_example(target))
