"""A synthetic-data team's concept pools and the build spec that combines them.

    python manifests/examples/pools.py DIR
    freecustom-pipeline manifest build DIR/spec.yaml --dry-run
    freecustom-pipeline manifest build DIR/spec.yaml -o DIR/manifest

writes, drawn with PIL (nothing downloaded):

* ``DIR/pets/``: 3 pets, photos with a mask file beside each (``cat.png`` and ``cat_mask.png``);
* ``DIR/accessories/``: 4 accessories, RGBA cut-outs (the alpha is the mask);
* ``DIR/scenes.txt``: a wildcard file of scenes;
* ``DIR/spec.yaml``: one pet with one accessory (6 of the 12 pairs, balanced: each pet twice), one pet
  with two accessories (3 sets), each accessory pasted onto the pet (copy-paste ``context``), in a scene
  drawn per row from ``__scene__``; two accessories go to two anchors
  (``anchor: [top, lower]``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

PETS = {"cat": (150, 110, 70), "dog": (190, 150, 90), "rabbit": (220, 220, 215)}
ACCESSORIES = {"hat": (200, 40, 40), "scarf": (40, 90, 200), "bowtie": (40, 150, 80), "collar": (30, 30, 30)}
SCENES = ["in a sunny park", "in a cozy living room", "in a snowy garden", "on a beach at sunset"]
SPEC = """\
# Pets x accessories x scenes: balanced, capped, deterministic samples of the combinations.
seed: 3
seeds: 1
mode: random
samples: 1
lists:
  scene: scenes.txt
pools:
  pets:
    folder: pets
    concept_prompt: "a {name}"
  accessories:
    folder: accessories
    concept_prompt: "a {name}"
compositions:
  pet_accessory:
    slots: {pet: pets, accessory: accessories}
    cap: 6
    context:
      - {slot: accessory, onto: pet, anchor: top, scale: 0.5}
  pet_two_accessories:
    slots:
      pet: pets
      accessory: {pool: accessories, count: 2}
    cap: 3
    context:
      - {slot: accessory, onto: pet, anchor: [top, lower], scale: 0.4}
templates:
  - name: scene
    prompt: "a photo of {pet.prompt} wearing {accessory.prompt} __scene__"
"""


def _pet(color: tuple[int, int, int], size: int = 96) -> tuple[Image.Image, Image.Image]:
    image = Image.new("RGB", (size, size), (120, 170, 120))
    mask = Image.new("L", (size, size), 0)
    for canvas, fill in ((ImageDraw.Draw(image), color), (ImageDraw.Draw(mask), 255)):
        canvas.ellipse((22, 40, 78, 90), fill=fill)  # body
        canvas.ellipse((32, 10, 66, 46), fill=fill)  # head
    return image, mask


def _accessory(color: tuple[int, int, int], size: int = 64) -> Image.Image:
    cut = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(cut).rounded_rectangle((10, 18, 54, 46), radius=8, fill=(*color, 255))
    return cut


def write_pools(folder: Path) -> Path:
    """The pools, the wildcard file and the spec in ``folder``; returns the spec's path."""
    (folder / "pets").mkdir(parents=True, exist_ok=True)
    (folder / "accessories").mkdir(parents=True, exist_ok=True)
    for name, color in PETS.items():
        image, mask = _pet(color)
        image.save(folder / "pets" / f"{name}.png")
        mask.save(folder / "pets" / f"{name}_mask.png")
    for name, color in ACCESSORIES.items():
        _accessory(color).save(folder / "accessories" / f"{name}.png")
    (folder / "scenes.txt").write_text("\n".join(SCENES) + "\n", encoding="utf-8")
    spec = folder / "spec.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    return spec


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python manifests/examples/pools.py DIR")
    print(write_pools(Path(sys.argv[1])))
