"""One copy-paste: an object, cut out with its mask, pasted onto a carrier image at an anchor.

``make_composite`` is a pure function of pixels (no paths, no concept sets): same inputs, same
bytes, by fixed resampling, integer blending and no randomness. ``stages.masks.composite`` decides
which object goes onto which carrier.

Geometry (all boxes are ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive):

- ``O``: the object's mask bounding box in its own image; the object is cropped to it first,
  ``ow x oh`` pixels. ``B``: the carrier's mask bounding box, ``bw x bh``.
- Size, named anchors: the object keeps its aspect ratio and fits (touching on its limiting
  side) inside ``scale * bw`` x ``scale * bh``: ``f = scale * min(bw / ow, bh / oh)``, pasted
  size ``tw = max(1, round(ow * f))``, ``th = max(1, round(oh * f))``.
- Position, named anchors: a point of ``B`` and a point of the pasted object coincide, each
  given as fractions (x, y) of its box (``ANCHOR_POINTS``):

  =========  ==================  ================  =======================================
  anchor     point of B          point of object   meaning
  =========  ==================  ================  =======================================
  top        (0.5, 0.0)          (0.5, 0.75)       centred; the object's lower 25 % overlaps
                                                   the top of B (a hat on a head)
  upper      (0.5, 0.3)          (0.5, 0.5)        centred at 30 % of B's height (glasses)
  center     (0.5, 0.5)          (0.5, 0.5)        centred on B
  lower      (0.5, 0.75)         (0.5, 0.5)        centred at 75 % of B's height (necklace)
  left       (0.0, 0.5)          (0.75, 0.5)       vertically centred; the object's right
                                                   25 % overlaps B's left edge
  right      (1.0, 0.5)          (0.25, 0.5)       mirror of left
  =========  ==================  ================  =======================================

  ``x0 = round(B.x0 + bx * bw - ox * tw)``, ``y0 = round(B.y0 + by * bh - oy * th)``
  (round half up).
- Explicit anchor box ``(rx0, ry0, rx1, ry1)`` in [0, 1] of ``B``: the target box is
  ``T = (B.x0 + rx0 * bw, B.y0 + ry0 * bh, B.x0 + rx1 * bw, B.y0 + ry1 * bh)``; the object is
  fitted inside ``T`` (``f = min(T.w / ow, T.h / oh)``, ``scale`` unused) and centred in it.
- The paste may extend beyond the carrier image; it is clipped. The object is resized with
  LANCZOS on premultiplied RGBA (no background halo), its alpha thresholded at 50 % (hard
  edge); ``soft_edge > 0`` feathers the edge *inward* only (``min(alpha, blur(alpha))``,
  Gaussian radius ``soft_edge``), so no pixel of the object's own background shows.
- ``object_mask`` is exactly where the pasted alpha is >= 50 %; ``updated_carrier_mask`` is
  the carrier mask minus ``object_mask``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

from ..errors import RowError
from ..inputs.concepts import ANCHORS

__all__ = ["ANCHOR_POINTS", "RECIPE_VERSION", "make_composite", "mask_bbox", "round_half_up"]

RECIPE_VERSION = 1
ALPHA_THRESHOLD = 128  # pasted alpha >= 50 % is the object
TOP_OVERLAP = 0.25  # "top": this fraction of the object's height overlaps the carrier box
SIDE_OVERLAP = 0.25  # "left" / "right": this fraction of the object's width overlaps it
MAX_SCALE = 10.0
MAX_SOFT_EDGE = 64

# anchor -> (point of the carrier box, point of the object), fractions (x, y) of each box
ANCHOR_POINTS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "top": ((0.5, 0.0), (0.5, 1.0 - TOP_OVERLAP)),
    "upper": ((0.5, 0.3), (0.5, 0.5)),
    "center": ((0.5, 0.5), (0.5, 0.5)),
    "lower": ((0.5, 0.75), (0.5, 0.5)),
    "left": ((0.0, 0.5), (1.0 - SIDE_OVERLAP, 0.5)),
    "right": ((1.0, 0.5), (SIDE_OVERLAP, 0.5)),
}
assert set(ANCHOR_POINTS) == set(ANCHORS)

# --------------------------------------------------------------------------- geometry


def round_half_up(x: float) -> int:
    """Round half up (``round`` rounds half to even, which is surprising for pixels)."""
    return int(math.floor(x + 0.5))


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of a bool (H, W) mask's True pixels, x1/y1 exclusive; None if empty."""
    rows = np.flatnonzero(np.asarray(mask).any(axis=1))
    cols = np.flatnonzero(np.asarray(mask).any(axis=0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _check_anchor(anchor) -> str | tuple[float, float, float, float]:
    if isinstance(anchor, str):
        if anchor not in ANCHOR_POINTS:
            raise RowError("context.anchor", f"unknown anchor {anchor!r}; expected one of {ANCHORS} or a box")
        return anchor
    try:
        box = tuple(float(v) for v in anchor)
    except (TypeError, ValueError) as exc:
        raise RowError(
            "context.anchor", f"expected one of {ANCHORS} or (x0, y0, x1, y1), got {anchor!r}"
        ) from exc
    if len(box) != 4 or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in box):
        raise RowError("context.anchor", f"an anchor box is 4 numbers in [0, 1], got {anchor!r}")
    if not (box[2] > box[0] and box[3] > box[1]):
        raise RowError("context.anchor", f"anchor box {box} is empty (need x1 > x0 and y1 > y0)")
    return box


def _paste_box(
    object_size: tuple[int, int], carrier_box: tuple[int, int, int, int], anchor, scale: float
) -> tuple[int, int, int, int]:
    """(x0, y0, tw, th): where the object goes and at which size (see the module docstring)."""
    ow, oh = object_size
    bx0, by0, bx1, by1 = carrier_box
    bw, bh = bx1 - bx0, by1 - by0
    if isinstance(anchor, str):
        f = scale * min(bw / ow, bh / oh)
        tw, th = max(1, round_half_up(ow * f)), max(1, round_half_up(oh * f))
        (ax, ay), (ox, oy) = ANCHOR_POINTS[anchor]
        return round_half_up(bx0 + ax * bw - ox * tw), round_half_up(by0 + ay * bh - oy * th), tw, th
    rx0, ry0, rx1, ry1 = anchor
    tx0, ty0, tx1, ty1 = bx0 + rx0 * bw, by0 + ry0 * bh, bx0 + rx1 * bw, by0 + ry1 * bh
    f = min((tx1 - tx0) / ow, (ty1 - ty0) / oh)
    tw, th = max(1, round_half_up(ow * f)), max(1, round_half_up(oh * f))
    return round_half_up((tx0 + tx1) / 2 - tw / 2), round_half_up((ty0 + ty1) / 2 - th / 2), tw, th


def _object_layer(
    obj_image: Image.Image,
    obj_mask: np.ndarray,
    crop: tuple[int, int, int, int],
    size: tuple[int, int],
    soft_edge: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The object cropped to ``crop`` and resized to ``size``: RGB (th, tw, 3) uint8 and alpha
    (th, tw) uint8, hard (0 / 255) or inward-feathered."""
    x0, y0, x1, y1 = crop
    rgb = obj_image.convert("RGB").crop(crop)
    alpha = Image.fromarray(np.asarray(obj_mask[y0:y1, x0:x1], dtype=np.uint8) * 255)
    rgba = Image.merge("RGBA", (*rgb.split(), alpha))
    resized = rgba.resize(size, Image.Resampling.LANCZOS)  # PIL premultiplies RGBA for this
    layer = np.asarray(resized)  # (th, tw, 4)
    hard = np.where(layer[..., 3] >= ALPHA_THRESHOLD, 255, 0).astype(np.uint8)  # (th, tw)
    if soft_edge > 0:
        pad = 3 * soft_edge + 2  # zeros around, so the blur sees the object's true border
        padded = Image.fromarray(np.pad(hard, pad))
        blurred = np.asarray(padded.filter(ImageFilter.GaussianBlur(soft_edge)))[pad:-pad, pad:-pad]
        alpha_arr = np.minimum(hard, blurred)  # feather inward only
    else:
        alpha_arr = hard
    return np.ascontiguousarray(layer[..., :3]), alpha_arr


def make_composite(
    obj_image: Image.Image,
    obj_mask: np.ndarray,
    carrier_image: Image.Image,
    carrier_mask: np.ndarray,
    *,
    anchor: str | Sequence[float] = "center",
    scale: float = 0.5,
    soft_edge: int = 0,
) -> tuple[Image.Image, np.ndarray, np.ndarray, dict]:
    """Paste the object (cut out by ``obj_mask``) onto the carrier; see the module docstring.

    Returns ``(composite RGB at the carrier's size, object_mask bool (H, W), updated carrier
    mask bool (H, W), recipe)``; the recipe (JSON-able, no paths) says exactly what was done.
    Errors are ``RowError`` with fields relative to the concept (``context.onto``, ``mask``...).
    """
    # 1. check the inputs
    anchor = _check_anchor(anchor)
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale) and 0 < scale <= MAX_SCALE):
        raise RowError("context.scale", f"scale={scale!r}: must be a number in (0, {MAX_SCALE}]")
    if not (isinstance(soft_edge, (int, np.integer)) and 0 <= soft_edge <= MAX_SOFT_EDGE):
        raise RowError(
            "context.soft_edge", f"soft_edge={soft_edge!r}: must be an int in [0, {MAX_SOFT_EDGE}]"
        )
    obj_mask = np.asarray(obj_mask, dtype=bool)
    carrier_mask = np.asarray(carrier_mask, dtype=bool)
    if obj_mask.shape != (obj_image.height, obj_image.width):
        raise RowError("mask", f"mask shape {obj_mask.shape} differs from the image's {obj_image.size[::-1]}")
    if carrier_mask.shape != (carrier_image.height, carrier_image.width):
        raise RowError(
            "context.onto",
            f"carrier mask shape {carrier_mask.shape} differs from the carrier image's {carrier_image.size[::-1]}",
        )
    carrier_box = mask_bbox(carrier_mask)
    if carrier_box is None:
        raise RowError(
            "context.onto", "the carrier's mask is empty: there is nothing to anchor the object to"
        )
    object_box = mask_bbox(obj_mask)
    if object_box is None:
        raise RowError("mask", "the object's mask is empty: there is nothing to paste")

    # 2. where, and at which size
    object_size = (object_box[2] - object_box[0], object_box[3] - object_box[1])
    x0, y0, tw, th = _paste_box(object_size, carrier_box, anchor, float(scale))
    layer_rgb, layer_alpha = _object_layer(obj_image, obj_mask, object_box, (tw, th), int(soft_edge))

    # 3. clip the paste to the carrier image
    width, height = carrier_image.size
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + tw, width), min(y0 + th, height)
    if cx0 >= cx1 or cy0 >= cy1:
        raise RowError(
            "context.anchor",
            f"the pasted object ({tw}x{th} at x={x0}, y={y0}) falls entirely outside the "
            f"{width}x{height} carrier image",
        )
    sub = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    alpha = layer_alpha[sub].astype(np.uint32)[..., None]  # (h, w, 1)
    obj = layer_rgb[sub].astype(np.uint32)  # (h, w, 3)

    # 4. integer alpha blending: exact and the same on every machine
    composite = np.array(carrier_image.convert("RGB"))  # (H, W, 3) uint8
    under = composite[cy0:cy1, cx0:cx1].astype(np.uint32)
    composite[cy0:cy1, cx0:cx1] = ((obj * alpha + under * (255 - alpha) + 127) // 255).astype(np.uint8)

    object_mask = np.zeros((height, width), dtype=bool)
    object_mask[cy0:cy1, cx0:cx1] = alpha[..., 0] >= ALPHA_THRESHOLD
    if not object_mask.any():
        raise RowError("context.soft_edge", f"soft_edge={soft_edge} leaves no pixel of the object at >= 50 %")
    updated_carrier_mask = carrier_mask & ~object_mask

    recipe = {
        "version": RECIPE_VERSION,
        "anchor": anchor if isinstance(anchor, str) else list(anchor),
        "scale": float(scale) if isinstance(anchor, str) else None,
        "soft_edge": int(soft_edge),
        "object_box": list(object_box),
        "carrier_box": list(carrier_box),
        "paste_box": [x0, y0, x0 + tw, y0 + th],
        "resample": "lanczos-premultiplied",
        "alpha_threshold": ALPHA_THRESHOLD,
    }
    return Image.fromarray(composite), object_mask, updated_carrier_mask, recipe
