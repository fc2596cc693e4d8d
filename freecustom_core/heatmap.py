"""Attention maps drawn as heat-map panels (``maps_image``): numpy and PIL only, no torch, so the
pipeline's stages and the CLI import it without loading the engine. The maps themselves are
computed in ``attention_maps``."""

from __future__ import annotations

import numpy as np
from PIL import Image

GAP = 4  # white pixels between two panels


def _hot(x: np.ndarray) -> np.ndarray:
    """A black-red-yellow-white colour map of values in [0, 1]: (..., 3) uint8."""
    r = np.clip(3 * x, 0, 1)
    g = np.clip(3 * x - 1, 0, 1)
    b = np.clip(3 * x - 2, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).round().astype(np.uint8)


def maps_image(maps, size: tuple[int, int], gap: int = GAP) -> Image.Image:
    """One target's maps (N, h, w) (a tensor or an array) as one image: a panel per concept, left to
    right in concept order, each ``size`` (width, height) (nearest upsampling), separated by ``gap``
    white pixels: ``N * width + (N - 1) * gap`` wide, ``height`` high.

    Fixed colour scale: 0 black, 0.33 red, 0.67 yellow, 1 white, the same in every panel and sample.
    """
    maps = np.asarray(maps, dtype=np.float32)
    width, height = size
    panels = [
        Image.fromarray(_hot(np.clip(m, 0.0, 1.0))).resize((width, height), Image.Resampling.NEAREST)
        for m in maps
    ]
    sheet = Image.new("RGB", (len(panels) * width + (len(panels) - 1) * gap, height), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (width + gap), 0))
    return sheet
