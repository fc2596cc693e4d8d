"""Where each concept landed in a generated image (``run --annotate``, ``score --annotate``).

The rule (``attention_region``), per sample and concept, on the concept's MRSA attention-mass map
(``freecustom_core.attention_maps``: the share of the image's attention that goes to the concept's
reference tokens, averaged over heads, MRSA layers and steps, values in [0, 1]) at the generated
image's size:

1. the map is the one drawn into ``<key>.attn.png`` (``freecustom_core.heatmap.maps_image``: the
   latent-grid map, nearest-upsampled to the image, colour-coded with a fixed scale) read back
   (``decode_panels``: value = (R + G + B) / 765, steps of 1/765), so an annotation made during the run
   and one made later from the saved file are the same;
2. pixels at or above ``THRESHOLD`` (0.5) of the map's maximum are kept;
3. the largest 4-connected component of them is the concept's mask (ties: the one with more mass,
   then the first in raster order);
4. the box is the mask's bounding box ``[x0, y0, x1, y1]`` in pixel edges (x1, y1 exclusive);
5. ``confidence`` = the map's mass inside the mask / its mass over the whole image;
6. ``presence`` = the mean attention mass inside the mask (a concept the image does not attend to
   has a low presence wherever its relative maximum is);
7. ``overlap`` (per sample) = the largest IoU of two concepts' masks (0 with one concept): two
   concepts on the same pixels merged.

A map that is zero everywhere gives an empty mask, box ``[0, 0, 0, 0]``, confidence and presence 0.
Refinement (``refine``): with SAM, the box prompts SAM and SAM's mask (cleaned as reference masks are)
replaces the attention mask (source ``sam``); with the detector, its best box for the concept's prompt
replaces the attention box (source ``detector``; with SAM as well, SAM segments that box:
``detector+sam``). Where a refinement finds nothing, the attention annotation stays (source
``attention``). Confidence and presence are always read from the attention map inside the final mask.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from freecustom_core.heatmap import GAP

from ..inputs.concepts import mask_to_png
from ..masks.segment import MaskItem
from ..masks.segment_models import detect_best
from ..output.layout import ATTENTION_FILE, annotation_mask_field

THRESHOLD = 0.5  # a pixel is in the concept's region at >= THRESHOLD x the map's maximum
SOURCES = ("attention", "sam", "detector", "detector+sam")
_FOUR = ndimage.generate_binary_structure(2, 1)  # 4-connectivity


@dataclass
class Region:
    """One concept's annotation: mask (H, W) bool, box [x0, y0, x1, y1] pixel edges, confidence, presence."""

    mask: np.ndarray
    box: list[int]
    confidence: float
    presence: float
    source: str = "attention"


def decode_panels(data: bytes, panels: int, size: tuple[int, int], gap: int = GAP) -> np.ndarray:
    """The attention maps drawn in ``<key>.attn.png`` (``maps_image``), read back: (N, H, W) float32 in [0, 1]."""
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)  # (H, N*W + gaps, 3)
    width, height = size
    if rgb.shape[:2] != (height, panels * width + (panels - 1) * gap):
        raise ValueError(
            f"{ATTENTION_FILE}: {rgb.shape[1]}x{rgb.shape[0]} is not {panels} panels of {width}x{height}"
        )
    heat = rgb.sum(axis=-1) / 765.0  # the colour map's inverse: R + G + B = 3 x value x 255
    return np.stack([heat[:, i * (width + gap) : i * (width + gap) + width] for i in range(panels)])


def bounding_box(mask: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] of a mask's pixels, pixel edges (x1, y1 exclusive); [0, 0, 0, 0] when empty."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def measure(heat: np.ndarray, mask: np.ndarray, source: str) -> Region:
    """A region's confidence and presence read from the map ``heat`` (H, W) inside ``mask``."""
    total = float(heat.sum())
    inside = heat[mask]
    return Region(
        mask=mask,
        box=bounding_box(mask),
        confidence=float(inside.sum()) / total if total > 0 else 0.0,
        presence=float(inside.mean()) if inside.size else 0.0,
        source=source,
    )


def attention_region(heat: np.ndarray, threshold: float = THRESHOLD) -> Region:
    """The rule (see the module's docstring) on one concept's map ``heat`` (H, W)."""
    peak = float(heat.max())
    if peak <= 0:
        return measure(heat, np.zeros(heat.shape, dtype=bool), "attention")
    labels, count = ndimage.label(heat >= threshold * peak, structure=_FOUR)  # (H, W) int, 1..count
    ids = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(heat), labels, ids)
    masses = ndimage.sum_labels(heat, labels, ids)
    best = max(range(count), key=lambda j: (areas[j], masses[j], -j))  # largest, then heaviest, then first
    return measure(heat, labels == best + 1, "attention")


def overlap(masks: list[np.ndarray]) -> float:
    """The largest IoU of two masks (0 with fewer than two, or when every pair is disjoint)."""
    best = 0.0
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            union = np.logical_or(masks[i], masks[j]).sum()
            if union:
                best = max(best, float(np.logical_and(masks[i], masks[j]).sum() / union))
    return best


def refine(
    regions: list[Region], heats: np.ndarray, image: Image.Image, prompts: list[str], segmenter
) -> list[Region]:
    """The attention regions refined with ``segmenter``'s SAM and/or detector (``stages.masks.segment.Segmenter``)."""
    out = list(regions)
    if segmenter.detector is not None:
        boxes = _detector_boxes(segmenter, image, prompts)
        for i, box in enumerate(boxes):
            if box is None:
                continue
            mask = np.zeros(heats[i].shape, dtype=bool)
            x0, y0, x1, y1 = (
                int(np.floor(box[0])),
                int(np.floor(box[1])),
                int(np.ceil(box[2])),
                int(np.ceil(box[3])),
            )
            mask[y0:y1, x0:x1] = True
            out[i] = measure(heats[i], mask, "detector")
    if segmenter.sam is not None:
        todo = [i for i, r in enumerate(out) if r.mask.any()]
        items = [
            MaskItem(image=image, field=f"annotations[{i}]", box=tuple(float(v) for v in out[i].box))
            for i in todo
        ]
        for i, result in zip(todo, segmenter.resolve_masks(items), strict=True):
            if hasattr(result, "mask"):  # a RowError (SAM found nothing usable): the region stays
                source = "detector+sam" if out[i].source == "detector" else "sam"
                out[i] = measure(heats[i], np.asarray(result.mask, dtype=bool), source)
    return out


def _detector_boxes(segmenter, image: Image.Image, prompts: list[str]) -> list:
    """The detector's best box per concept prompt ((4,) pixels), None where it finds none."""
    found = detect_best(
        segmenter.detector,
        segmenter.processor,
        [image] * len(prompts),
        prompts,
        score_threshold=segmenter.config.score_threshold,
        device=segmenter.device,
    )
    return [None if isinstance(f, str) else f[0] for f in found]


def annotate(
    heats: np.ndarray, image: Image.Image | None = None, prompts: list[str] | None = None, segmenter=None
) -> tuple[list[Region], float]:
    """Every concept's region (concept order) from the maps ``heats`` (N, H, W), and the sample's overlap."""
    regions = [attention_region(h) for h in heats]
    if segmenter is not None and (segmenter.sam is not None or segmenter.detector is not None):
        regions = refine(regions, heats, image, prompts or [""] * len(regions), segmenter)
    return regions, overlap([r.mask for r in regions])


def annotation_meta(regions: list[Region], overlap_value: float) -> dict:
    """The sample JSON's ``annotations`` (``{box, mask, confidence, source}`` per concept), ``presence``
    and ``overlap``."""
    return {
        "annotations": [
            {
                "box": r.box,
                "mask": annotation_mask_field(i),
                "confidence": round(r.confidence, 6),
                "source": r.source,
            }
            for i, r in enumerate(regions)
        ],
        "presence": [round(r.presence, 6) for r in regions],
        "overlap": round(overlap_value, 6),
    }


def annotation_members(regions: list[Region]) -> dict[str, bytes]:
    """Field name -> PNG bytes ("L", 0 / 255) of each concept's mask."""
    return {annotation_mask_field(i): mask_to_png(r.mask) for i, r in enumerate(regions)}


def annotate_sample(
    meta: dict, attention_png: bytes, image: Image.Image | None = None, segmenter=None
) -> tuple[dict, dict[str, bytes]]:
    """A sample's annotation metadata and mask fields, from its ``<key>.attn.png`` bytes and ``attention`` entry."""
    entry = meta["attention"]
    heats = decode_panels(
        attention_png, int(entry["panels"]), tuple(entry["panel_size"]), int(entry.get("gap", GAP))
    )
    prompts = [c.get("prompt") or "" for c in meta.get("concepts") or []]
    regions, value = annotate(heats, image, prompts, segmenter)
    return annotation_meta(regions, value), annotation_members(regions)
