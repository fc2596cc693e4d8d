"""Copy-paste context composites: show an isolated object (a hat, a product) *in context*.

The paper's finding: a hat alone is a poor reference, a hat pasted onto a head is a good one,
and plain copy-paste is enough. ``make_composite`` cuts an object out with its mask and pastes
it onto a *carrier* (another concept of the set, or an image given by path) at an anchor
relative to the carrier's mask box. Same inputs, same bytes: fixed resampling, integer
blending, no randomness.

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

Concept sets (``resolve_concept_set``): every concept with a ``context`` is pasted onto its
carrier; all objects with the same carrier are pasted in concept order into one *scene*
(later pastes cover earlier ones) anchored on the carrier's original mask box. Each object's
reference becomes the scene, with its mask the part of it still visible. When the carrier is
a concept of the set, its reference becomes the scene too, with its mask minus what the
objects now cover: every reference of the scene is then the same picture with disjoint masks,
and MRSA sees the carrier and the objects in one consistent arrangement. (Updating the
carrier's mask on its *original* image instead would drop visible, unoccluded carrier pixels
for nothing, and leaving the carrier's reference untouched is the paper's manual practice but
wastes the context.) A carrier given by path is only a backdrop: its mask anchors the paste.
Chains (pasting onto a concept that is itself pasted) are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.concepts import ANCHORS, ConceptSpec, ResolvedConcept
from stages.errors import RowError

if TYPE_CHECKING:
    from PIL import Image

    from stages.inputs import InputSettings

__all__ = [
    "ANCHOR_POINTS",
    "CompositeConfig",
    "CompositeStage",
    "image_digest",
    "make_composite",
    "mask_bbox",
    "resolve_concept_set",
    "write_previews",
]

STAGE = "composite"
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

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_OVERLAY_COLOURS = (
    (255, 64, 64),
    (64, 160, 255),
    (64, 220, 96),
    (255, 200, 0),
    (200, 96, 255),
    (0, 220, 220),
)


# --------------------------------------------------------------------------- geometry


def _round(x: float) -> int:
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
        tw, th = max(1, _round(ow * f)), max(1, _round(oh * f))
        (ax, ay), (ox, oy) = ANCHOR_POINTS[anchor]
        return _round(bx0 + ax * bw - ox * tw), _round(by0 + ay * bh - oy * th), tw, th
    rx0, ry0, rx1, ry1 = anchor
    tx0, ty0, tx1, ty1 = bx0 + rx0 * bw, by0 + ry0 * bh, bx0 + rx1 * bw, by0 + ry1 * bh
    f = min((tx1 - tx0) / ow, (ty1 - ty0) / oh)
    tw, th = max(1, _round(ow * f)), max(1, _round(oh * f))
    return _round((tx0 + tx1) / 2 - tw / 2), _round((ty0 + ty1) / 2 - th / 2), tw, th


def _object_layer(
    obj_image: Image.Image,
    obj_mask: np.ndarray,
    crop: tuple[int, int, int, int],
    size: tuple[int, int],
    soft_edge: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The object cropped to ``crop`` and resized to ``size``: RGB (th, tw, 3) uint8 and alpha
    (th, tw) uint8, hard (0 / 255) or inward-feathered."""
    from PIL import Image, ImageFilter

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
    from PIL import Image

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


# --------------------------------------------------------------------------- concept sets


def image_digest(image: Image.Image, alpha: np.ndarray | None = None) -> str:
    """sha256 of decoded pixels: the same recipe as ``stages.inputs.load_image``'s digest."""
    rgb = image.convert("RGB")
    h = hashlib.sha256()
    h.update(f"rgb:{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    if alpha is not None:
        h.update(b"alpha:")
        h.update(np.asarray(alpha, dtype=np.uint8).tobytes())
    return h.hexdigest()


def resolve_concept_set(
    resolved: Sequence[ResolvedConcept],
    specs: Sequence[ConceptSpec],
    *,
    load_carrier: Callable[[str, int], ResolvedConcept] | None = None,
) -> list[ResolvedConcept]:
    """The references of a concept set after copy-paste context (see the module docstring).

    ``resolved[i]`` is concept i with its own image and mask; ``specs[i].context`` says where
    to paste it. ``load_carrier(path, i)`` loads a carrier given by path (image and mask) for
    concept i. Concepts without context and not used as carriers are returned unchanged.
    Raises ``RowError`` with ``concepts[i]...`` fields.
    """
    from stages.inputs import mask_digest

    n = len(specs)
    if len(resolved) != n:
        raise ValueError(f"resolve_concept_set: {len(resolved)} resolved concepts for {n} specs")

    # 1. group the objects by carrier, refusing bad references
    scenes: dict[tuple[str, int | str], list[int]] = {}
    for i, spec in enumerate(specs):
        if spec.context is None:
            continue
        onto = spec.context.onto
        where = f"concepts[{i}].context.onto"
        if isinstance(onto, (int, np.integer)) and not isinstance(onto, bool):
            onto = int(onto)
            if not 0 <= onto < n:
                raise RowError(where, f"concept index {onto} is out of range (the set has {n} concepts)")
            if onto == i:
                raise RowError(where, "a concept cannot be pasted onto itself")
            if specs[onto].context is not None:
                raise RowError(
                    where,
                    f"concept {onto} is itself pasted onto another carrier; chains are not supported "
                    "(paste both onto the same carrier)",
                )
            key: tuple[str, int | str] = ("concept", onto)
        elif isinstance(onto, str) and onto.strip():
            key = ("image", onto)
        else:
            raise RowError(where, f"expected a concept index or an image path, got {onto!r}")
        scenes.setdefault(key, []).append(i)

    # 2. one scene per carrier
    final = list(resolved)
    for (kind, ref), objects in scenes.items():
        if kind == "concept":
            carrier = resolved[ref]
            carrier_ref: dict[str, Any] = {"concept": ref}
        else:
            if load_carrier is None:
                raise RowError(
                    f"concepts[{objects[0]}].context.onto", "carrier images given by path need a loader"
                )
            carrier = load_carrier(ref, objects[0])
            carrier_ref = {"concept": None}
        carrier_ref |= {
            "image_digest": carrier.image_digest,
            "mask_digest": carrier.mask_digest,
            "mask_source": carrier.mask_source,
        }

        scene = carrier.image
        visible: dict[int, np.ndarray] = {}  # object index -> its still visible pasted region
        recipes = []
        for i in objects:
            ctx, obj = specs[i].context, resolved[i]
            try:
                scene, pasted, _, recipe = make_composite(
                    obj.image,
                    obj.mask,
                    scene,
                    carrier.mask,
                    anchor=ctx.anchor,
                    scale=ctx.scale,
                    soft_edge=ctx.soft_edge,
                )
            except RowError as err:
                raise err.with_prefix(f"concepts[{i}]") from None
            for k in visible:
                visible[k] &= ~pasted  # later pastes cover earlier ones
            visible[i] = pasted
            recipes.append({"concept": i, "object_image_digest": obj.image_digest, **recipe})

        scene_recipe = {"version": RECIPE_VERSION, "carrier": carrier_ref, "objects": recipes}
        scene_digest = image_digest(scene)
        for i in objects:
            if not visible[i].any():
                later = [k for k in objects if k > i]
                raise RowError(
                    f"concepts[{i}].mask", f"fully covered by the object(s) pasted after it: {later}"
                )
            obj = resolved[i]
            extra = {
                **obj.extra,
                "source_image_digest": obj.image_digest,
                "source_mask_source": obj.mask_source,
            }
            if kind == "image":
                extra["carrier_path"] = carrier.image_path or ref
            final[i] = ResolvedConcept(
                image=scene,
                mask=visible[i],
                prompt=obj.prompt,
                weight=obj.weight,
                mask_source="composite",
                image_digest=scene_digest,
                mask_digest=mask_digest(visible[i]),
                image_path=obj.image_path,
                composite={"role": "object", "concept": i, **scene_recipe},
                extra=extra,
            )
        if kind == "concept":
            covered = np.logical_or.reduce([visible[i] for i in objects])
            carrier_mask = carrier.mask & ~covered
            if not carrier_mask.any():
                raise RowError(
                    f"concepts[{ref}].mask", f"the carrier is fully covered by the objects {objects}"
                )
            final[ref] = ResolvedConcept(
                image=scene,
                mask=carrier_mask,
                prompt=carrier.prompt,
                weight=carrier.weight,
                mask_source="composite",
                image_digest=scene_digest,
                mask_digest=mask_digest(carrier_mask),
                image_path=carrier.image_path,
                composite={"role": "carrier", "concept": ref, **scene_recipe},
                extra={
                    **carrier.extra,
                    "source_image_digest": carrier.image_digest,
                    "source_mask_source": carrier.mask_source,
                },
            )
    return final


# --------------------------------------------------------------------------- previews


def _overlay(image: Image.Image, mask: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    """The image with the mask tinted 50 % in ``colour`` (integer arithmetic)."""
    from PIL import Image

    rgb = np.array(image.convert("RGB"), dtype=np.uint16)  # (H, W, 3)
    tint = (rgb + np.asarray(colour, dtype=np.uint16)) // 2
    out = np.where(np.asarray(mask, dtype=bool)[..., None], tint, rgb).astype(np.uint8)
    return Image.fromarray(out)


def _tile(image: Image.Image | None, caption: str, size: int) -> Image.Image:
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (size, size + 16), (40, 40, 40))
    if image is not None:
        thumb = image.convert("RGB")
        scale = min(size / thumb.width, size / thumb.height)
        thumb = thumb.resize(
            (max(1, _round(thumb.width * scale)), max(1, _round(thumb.height * scale))),
            Image.Resampling.LANCZOS,
        )
        tile.paste(thumb, ((size - thumb.width) // 2, 16 + (size - thumb.height) // 2))
    ImageDraw.Draw(tile).text((3, 2), caption[: size // 6], fill=(235, 235, 235))
    return tile


def _contact_sheet(resolved: Sequence[ResolvedConcept], original: Sequence[ResolvedConcept], size: int):
    """Rows: concepts. Columns: original reference, mask overlay on the final reference,
    composite (the final reference when it is a composite, else empty)."""
    from PIL import Image

    tiles = []
    for i, (final, orig) in enumerate(zip(resolved, original, strict=True)):
        colour = _OVERLAY_COLOURS[i % len(_OVERLAY_COLOURS)]
        is_composite = final.composite is not None
        tiles.append(
            [
                _tile(orig.image, f"{i} reference: {orig.prompt}", size),
                _tile(_overlay(final.image, final.mask, colour), f"{i} mask ({final.mask_source})", size),
                _tile(final.image if is_composite else None, f"{i} composite" if is_composite else "-", size),
            ]
        )
    tile_w, tile_h = tiles[0][0].size
    sheet = Image.new("RGB", (3 * tile_w + 4 * 4, len(tiles) * tile_h + (len(tiles) + 1) * 4), (20, 20, 20))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            sheet.paste(tile, (4 + c * (tile_w + 4), 4 + r * (tile_h + 4)))
    return sheet


def write_previews(
    out_dir: str | os.PathLike,
    concept_set_id: str,
    resolved: Sequence[ResolvedConcept],
    original: Sequence[ResolvedConcept],
    *,
    tile_size: int = 256,
) -> Path:
    """Write ``out_dir/references/<concept_set_id>/`` and return it.

    Files: ``{i:02d}_reference.png`` (the final reference), ``{i:02d}_mask.png`` (0 / 255),
    ``{i:02d}_overlay.png`` (the mask tinted on the reference) per concept, and
    ``contact_sheet.png`` (per concept: original reference, mask overlay, composite). The folder
    is written under a temporary name and renamed, so it is complete or absent; an existing
    folder (same id = same content) is kept as it is.
    """
    from stages.segment import mask_to_png

    if not _SAFE_ID.match(concept_set_id):
        raise ValueError(f"concept_set_id={concept_set_id!r}: expected [A-Za-z0-9_-]{{1,128}}")
    if len(resolved) != len(original) or not resolved:
        raise ValueError(f"write_previews: {len(resolved)} resolved vs {len(original)} original concepts")
    parent = Path(out_dir) / "references"
    final_dir = parent / concept_set_id
    if final_dir.is_dir():
        return final_dir
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{concept_set_id}.tmp-", dir=parent))
    try:
        for i, concept in enumerate(resolved):
            colour = _OVERLAY_COLOURS[i % len(_OVERLAY_COLOURS)]
            concept.image.convert("RGB").save(tmp / f"{i:02d}_reference.png", format="PNG", compress_level=6)
            (tmp / f"{i:02d}_mask.png").write_bytes(mask_to_png(concept.mask))
            _overlay(concept.image, concept.mask, colour).save(
                tmp / f"{i:02d}_overlay.png", format="PNG", compress_level=6
            )
        _contact_sheet(resolved, original, tile_size).save(
            tmp / "contact_sheet.png", format="PNG", compress_level=6
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, final_dir)
        except OSError:
            if not final_dir.is_dir():  # not a concurrent writer of the same set: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final_dir


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class CompositeConfig:
    """carrier_mask_policy: the mask of a carrier image given by path, when it has no alpha
    channel: ``whole_image`` (default: the whole picture is the carrier) or ``fail``.
    tile_size: pixels per contact-sheet tile."""

    carrier_mask_policy: str = "whole_image"
    tile_size: int = 256

    def __post_init__(self):
        from stages.segment import MASK_POLICIES

        if self.carrier_mask_policy not in MASK_POLICIES:
            raise ValueError(
                f"CompositeConfig.carrier_mask_policy={self.carrier_mask_policy!r}: expected one of {MASK_POLICIES}"
            )
        if not (isinstance(self.tile_size, int) and 32 <= self.tile_size <= 2048):
            raise ValueError(f"CompositeConfig.tile_size={self.tile_size!r}: must be an int in [32, 2048]")


IDENTITY_KEYS = ("model_id", "height", "width", "num_inference_steps", "reference_seed", "mrsa")


class CompositeStage:
    """Ray-free batch stage after ``SegmentStage``: context composites, identity, previews.

    Input: ``SegmentStage``'s output (``concepts``, ``resolved``, ``base_dir``, error columns),
    and optionally ``params`` and/or ``identity`` columns (dicts or JSON strings with the row's
    generation settings: ``IDENTITY_KEYS``, optional ``negative_prompt`` and ``extra``), merged
    in that order over ``identity_defaults`` (e.g. ``{"model_id": ...}``) to compute the
    concept-set id. Output: ``resolved`` replaced by the final
    references (same encoding), ``concept_set_id`` (None when no identity is known) and
    ``preview_dir`` (None without ``out_dir`` or id); errors as in ``SegmentStage``.
    """

    def __init__(
        self,
        config: CompositeConfig = CompositeConfig(),
        *,
        out_dir: str | os.PathLike | None = None,
        identity_defaults: Mapping[str, Any] | None = None,
        input_settings: InputSettings | None = None,
    ):
        from stages.inputs import InputSettings
        from stages.segment import SegmentConfig, Segmenter

        self.config = config
        self.out_dir = out_dir
        self.identity_defaults = dict(identity_defaults or {})
        self.input_settings = input_settings or InputSettings()
        # no SAM, no detector: carriers by path get alpha, else carrier_mask_policy
        self.segmenter = Segmenter(SegmentConfig(mask_policy=config.carrier_mask_policy))

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        from stages.segment import batch_len, has_error, passthrough, set_error, to_column

        n = batch_len(batch)
        out = passthrough(batch)
        out["resolved"] = [list(v) if v is not None else [] for v in out.get("resolved", [[]] * n)]
        out["concept_set_id"] = [None] * n
        out["preview_dir"] = [None] * n
        for row in range(n):
            if has_error(batch, row):
                continue
            try:
                self._row(batch, row, out)
            except RowError as err:
                set_error(out, row, err, STAGE)
                out["resolved"][row] = []
            except Exception as exc:  # noqa: BLE001 - a bug or odd input costs one row
                set_error(out, row, RowError("concepts", f"{type(exc).__name__}: {exc}"), STAGE)
                out["resolved"][row] = []
        return {name: to_column(values) for name, values in out.items()}

    def _row(self, batch, row: int, out: dict) -> None:
        from stages.identity import concept_set_id
        from stages.segment import concept_spec_from_dict, decode_resolved, encode_resolved

        specs = [concept_spec_from_dict(d) for d in batch["concepts"][row]]
        original = [decode_resolved(d) for d in batch["resolved"][row]]
        base_dir = batch["base_dir"][row] if "base_dir" in batch else None
        final = resolve_concept_set(
            original, specs, load_carrier=lambda path, i: self._load_carrier(path, i, base_dir)
        )
        out["resolved"][row] = [encode_resolved(c) for c in final]

        identity = self._identity(batch, row)
        if identity is None:
            return
        extra = dict(identity.get("extra") or {})
        if identity.get("negative_prompt") is not None:  # it shapes the unconditional reference K/V
            extra["negative_prompt"] = identity["negative_prompt"]
        set_id = concept_set_id(final, **{k: identity[k] for k in IDENTITY_KEYS}, extra=extra or None)
        out["concept_set_id"][row] = set_id
        if self.out_dir is not None:
            folder = write_previews(self.out_dir, set_id, final, original, tile_size=self.config.tile_size)
            out["preview_dir"][row] = str(folder)

    def _identity(self, batch, row: int) -> dict | None:
        """``identity_defaults`` updated by the row's ``params`` then ``identity`` (dicts or JSON)."""
        identity = dict(self.identity_defaults)
        for column in ("params", "identity"):
            value = batch[column][row] if column in batch else None
            if value is None or (isinstance(value, str) and not value):
                continue
            if isinstance(value, (str, bytes)):
                value = json.loads(value)
            identity.update({k: v for k, v in dict(value).items() if v is not None})
        if not identity:
            return None
        missing = [k for k in IDENTITY_KEYS if k not in identity]
        if missing:
            raise RowError("params", f"missing {missing} to compute the concept-set id")
        return identity

    def _load_carrier(self, path: str, i: int, base_dir) -> ResolvedConcept:
        from stages.inputs import load_image, mask_digest
        from stages.segment import MaskItem

        where = f"concepts[{i}].context.onto"
        loaded = load_image(
            path, base_dir=str(base_dir) if base_dir else None, settings=self.input_settings, field=where
        )
        item = MaskItem(image=loaded.image, field=where, alpha=loaded.alpha)
        result = self.segmenter.resolve_masks([item])[0]
        if isinstance(result, RowError):
            raise result
        return ResolvedConcept(
            image=loaded.image,
            mask=result.mask,
            prompt="",
            weight=0.0,
            mask_source=result.source,
            image_digest=loaded.digest,
            mask_digest=mask_digest(result.mask),
            image_path=loaded.path,
        )
