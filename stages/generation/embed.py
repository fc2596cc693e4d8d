"""References inside each sample (``run --embed-references``): a training example in one WebDataset entry.

Per concept ``i`` (concept order) a sample gets two further fields (``stages.output.layout.extra_fields``):

    <key>.ref{i}.png        the reference exactly as the engine encoded it: the concept set's final
                            reference (after composite) resized to the sample's width x height with
                            Lanczos, as ``FreeCustomGenerator.encode_images`` does (RGB PNG)
    <key>.ref{i}.mask.png   its mask at the same size, nearest-neighbour resized, 0 / 255 ("L" PNG),
                            as the engine resizes masks (``ConceptRef``: a pixel is inside when >= 50 %)

and its JSON ``embedded_references``: ``{"images": [...], "masks": [...], "size": [width, height]}``
naming those fields. The pixels come from ``references/<concept-set-id>/`` of the output (the
previews every run writes: the final reference and mask of each concept), so a reused sample
(``--reuse``) or a resumed shard gets the same bytes as a fresh one: PNGs are encoded
deterministically.
"""

from __future__ import annotations

import io
import re
from collections import OrderedDict

import numpy as np
from PIL import Image

from ..inputs.concepts import image_to_png, mask_to_png
from ..output.folder import OutputFolder
from ..output.layout import EMBEDDED, REFERENCES, reference_field, reference_mask_field

_REFERENCE = re.compile(r"^(\d{2})_reference\.png$")
CACHE = 64  # concept sets (at one size) whose fields an actor keeps


def load_references(folder: OutputFolder, concept_set_id: str) -> list[tuple[Image.Image, Image.Image]]:
    """A concept set's ``(reference, mask)`` pairs from ``references/<concept-set-id>/``, in concept order."""
    base = OutputFolder.references(concept_set_id)
    numbers = sorted(m.group(1) for name in folder.list(base, ".png") if (m := _REFERENCE.match(name)))
    if not numbers:
        raise ValueError(
            f"concept set {concept_set_id}: no reference images in {REFERENCES}/{concept_set_id}/"
        )
    pairs = []
    for n in numbers:
        image = Image.open(io.BytesIO(folder.read(f"{base}/{n}_reference.png"))).convert("RGB")
        mask = Image.open(io.BytesIO(folder.read(f"{base}/{n}_mask.png"))).convert("L")
        pairs.append((image, mask))
    return pairs


def engine_input(
    image: Image.Image, mask: Image.Image, size: tuple[int, int]
) -> tuple[Image.Image, np.ndarray]:
    """A reference and its mask as the engine takes them at generation ``size`` (width, height): the
    image Lanczos-resized (``encode_images``), the mask nearest-resized and thresholded at 50 %."""
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return image, np.asarray(mask.convert("L")) >= 128  # (H, W) bool


def reference_members(
    pairs: list[tuple[Image.Image, Image.Image]], size: tuple[int, int]
) -> dict[str, bytes]:
    """Field name -> PNG bytes of a concept set's references and masks at ``size``."""
    members = {}
    for i, (image, mask) in enumerate(pairs):
        image, inside = engine_input(image, mask, size)
        members[reference_field(i)] = image_to_png(image)
        members[reference_mask_field(i)] = mask_to_png(inside)
    return members


class ReferenceEmbedder:
    """Adds the embedded reference fields to samples, reading each concept set's references from
    ``out_dir`` once (the last ``CACHE`` sets and sizes are kept)."""

    def __init__(self, out_dir: str):
        self.folder = OutputFolder(out_dir)
        self._cache: OrderedDict[tuple, dict[str, bytes]] = OrderedDict()

    def members(self, concept_set_id: str, size: tuple[int, int]) -> dict[str, bytes]:
        key = (concept_set_id, tuple(size))
        if key not in self._cache:
            while len(self._cache) >= CACHE:
                self._cache.popitem(last=False)
            self._cache[key] = reference_members(load_references(self.folder, concept_set_id), tuple(size))
        self._cache.move_to_end(key)
        return self._cache[key]

    def embed(self, meta: dict, extras: dict[str, bytes]) -> dict:
        """``meta`` with ``embedded_references``; the fields go into ``extras`` (member name -> bytes)."""
        size = (int(meta["width"]), int(meta["height"]))
        members = self.members(meta["concept_set_id"], size)
        n = len(members) // 2
        for name, data in members.items():
            extras[f"{meta['key']}.{name}"] = data
        entry = {
            "images": [reference_field(i) for i in range(n)],
            "masks": [reference_mask_field(i) for i in range(n)],
            "size": list(size),
        }
        return dict(meta, **{EMBEDDED: entry})
