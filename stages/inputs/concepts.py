"""What a concept is before and after reference preparation, and how each crosses processes.

``ConceptSpec`` is a manifest concept as validated (paths and recipes, nothing loaded).
``ResolvedConcept`` is what reference preparation produces: a decoded RGB image, a binary
mask at the image's size with its source, digests, and the composite recipe that made it.
``ResolvedConcept.to_concept_ref()`` hands it to the core engine. Each has one ``to_row`` /
``from_row`` pair: the form it has in a Ray batch, a reference request file and a work unit.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..params import DEFAULT_WEIGHT

ANCHORS = ("top", "upper", "center", "lower", "left", "right")
MASK_SOURCES = ("file", "alpha", "sam_box", "sam_points", "detector", "whole_image", "composite")


@dataclass(frozen=True)
class ContextSpec:
    """Copy-paste recipe: paste this concept onto a carrier.

    ``onto``: index of another concept of the same row, or an image path (a carrier).
    ``anchor``: one of ANCHORS, or an explicit relative box (x0, y0, x1, y1) in [0, 1]
    of the carrier's mask box. ``scale``: object size relative to the carrier box.
    """

    onto: int | str
    anchor: str | tuple[float, float, float, float] = "center"
    scale: float = 0.5
    soft_edge: int = 0


@dataclass(frozen=True)
class ConceptSpec:
    image: str  # path as written in the manifest
    prompt: str
    image_path: str = ""  # resolved path or URI ("" until resolved)
    mask: str | None = None
    mask_path: str | None = None
    weight: float = DEFAULT_WEIGHT
    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] | None = None
    label: str | None = None
    context: ContextSpec | None = None

    def to_row(self) -> dict:
        """Plain values (tuples stay tuples; Arrow and JSON take them as lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, data: Mapping) -> ConceptSpec:
        """The inverse of ``to_row``, from plain values or as a Ray batch hands them over (numpy
        arrays for lists, numpy scalars, NaN for null); a context in the manifest's form (``box``
        for an explicit anchor box) is accepted too."""
        d = {k: _plain(v) for k, v in dict(data).items()}
        box, points, context = d.get("box"), d.get("points"), d.get("context")
        return cls(
            image=str(d.get("image") or ""),
            prompt=str(d.get("prompt") or ""),
            image_path=str(d.get("image_path") or ""),
            mask=d.get("mask"),
            mask_path=d.get("mask_path"),
            weight=DEFAULT_WEIGHT if d.get("weight") is None else float(d["weight"]),
            box=None if box is None else tuple(float(v) for v in box),
            points=None if points is None else tuple((float(p[0]), float(p[1])) for p in points),
            label=d.get("label"),
            context=_context_from_row(context) if isinstance(context, Mapping) else None,
        )


@dataclass
class ResolvedConcept:
    image: Any  # PIL.Image.Image, RGB
    mask: np.ndarray  # bool (H, W) at the image's size
    prompt: str
    weight: float
    mask_source: str
    image_digest: str
    mask_digest: str
    image_path: str = ""
    composite: dict | None = None  # the recipe that built this reference, if any
    extra: dict = field(default_factory=dict)

    def to_row(self, *, image_png: bytes | None = None, mask_png: bytes | None = None) -> dict:
        """A flat dict of bytes / str / float (PNG-encoded image and mask) that crosses processes.
        ``image_png`` / ``mask_png``: this concept's image / mask as PNG when the caller holds them already
        (the row it was read from, a scene another concept shares): not encoded again."""
        return {
            "image_png": image_to_png(self.image, level=FAST_PNG_LEVEL) if image_png is None else bytes(image_png),
            "mask_png": mask_to_png(self.mask, level=FAST_PNG_LEVEL) if mask_png is None else bytes(mask_png),
            "prompt": self.prompt,
            "weight": float(self.weight),
            "mask_source": self.mask_source,
            "image_digest": self.image_digest,
            "mask_digest": self.mask_digest,
            "image_path": self.image_path,
            "composite_json": None if self.composite is None else json.dumps(self.composite, sort_keys=True),
            "extra_json": json.dumps(self.extra, sort_keys=True, default=_json_default),
        }

    @classmethod
    def from_row(cls, data: Mapping) -> ResolvedConcept:
        composite = data.get("composite_json")
        return cls(
            image=image_from_png(data["image_png"]),
            mask=mask_from_png(data["mask_png"]),
            prompt=str(data["prompt"]),
            weight=float(data["weight"]),
            mask_source=str(data["mask_source"]),
            image_digest=str(data["image_digest"]),
            mask_digest=str(data["mask_digest"]),
            image_path=str(data.get("image_path") or ""),
            composite=json.loads(composite) if composite else None,
            extra=json.loads(data.get("extra_json") or "{}"),
        )

    @staticmethod
    def row_metadata(row: Mapping) -> dict:
        """What a sample's metadata says of this concept, read from its row (no image decoded)."""
        return {"image": row.get("image_path"), "image_digest": row.get("image_digest"), "prompt": row.get("prompt"),
                "weight": row.get("weight"), "mask_source": row.get("mask_source"),
                "mask_digest": row.get("mask_digest"),
                "composite": json.loads(row["composite_json"]) if row.get("composite_json") else None}

    def to_concept_ref(self):
        from freecustom_core import ConceptRef

        return ConceptRef(
            image=self.image,
            mask=Image.fromarray(self.mask.astype(np.uint8) * 255, mode="L"),
            prompt=self.prompt,
            weight=self.weight,
        )


# ---- rows: the form concepts take between processes ------------------------------------------------


# zlib level of the PNGs that only cross processes or go into the reference previews: 1 encodes a 1280x1280
# photo 3.6x faster than 6 (0.09 s against 0.33 s) for 4 % more bytes, and encoding was most of the CPU
# time of the actors that resolve concept groups. The bytes inside samples (--embed-references,
# --annotate) keep level 6: a shard's bytes do not change from one version to the next.
FAST_PNG_LEVEL = 1


def image_to_png(image: Image.Image, *, level: int = 6) -> bytes:
    """PNG bytes of an RGB image, deterministic (no metadata, zlib ``level``)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def image_from_png(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def mask_to_png(mask: np.ndarray, *, level: int = 6) -> bytes:
    """PNG bytes ("L", 0 / 255) of a bool (H, W) mask, zlib ``level``."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def mask_from_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L")) >= 128  # (H, W) bool


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _plain(value):
    """numpy scalars / arrays (as Ray hands them over) to Python values; NaN (Ray's null) to None."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _context_from_row(data: Mapping) -> ContextSpec:
    c = {k: _plain(v) for k, v in data.items()}
    anchor = c.get("anchor")
    if c.get("box") is not None and not anchor:  # the manifest's form: an explicit anchor box
        anchor = c["box"]
    if isinstance(anchor, list):
        anchor = tuple(float(v) for v in anchor)
    kwargs: dict[str, Any] = {"onto": c.get("onto")}  # an int (concept index) or a str (carrier path)
    if anchor is not None:
        kwargs["anchor"] = anchor
    if c.get("scale") is not None:
        kwargs["scale"] = float(c["scale"])
    if c.get("soft_edge") is not None:
        kwargs["soft_edge"] = int(c["soft_edge"])
    return ContextSpec(**kwargs)
