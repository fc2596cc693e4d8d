"""What a concept is before and after reference preparation.

``ConceptSpec`` is a manifest concept as validated (paths and recipes, nothing loaded).
``ResolvedConcept`` is what reference preparation produces: a decoded RGB image, a binary
mask at the image's size with its source, digests, and the composite recipe that made it.
``ResolvedConcept.to_concept_ref()`` hands it to the core engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
    weight: float = 3.0
    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] | None = None
    label: str | None = None
    context: ContextSpec | None = None


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

    def to_concept_ref(self):
        from PIL import Image

        from freecustom_core import ConceptRef

        return ConceptRef(
            image=self.image,
            mask=Image.fromarray(self.mask.astype(np.uint8) * 255, mode="L"),
            prompt=self.prompt,
            weight=self.weight,
        )
