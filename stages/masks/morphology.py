"""Binary masks (bool (H, W) arrays) and prompt boxes and points in pixels; numpy only.

A mask made by a model (SAM, the detector + SAM) is cleaned by ``clean_model_mask``, in this
order:

- clip (box prompts only): pixels farther than ``box_margin`` x the box size outside the
  prompt box are dropped (SAM occasionally leaks into the background);
- components: connected components (8-connectivity) are ranked by their area inside the
  prompt box (box prompts) or by the number of prompt points they contain (point prompts);
  the smallest set of top-ranked components that together hold ``coverage`` of the mask's
  area inside the box is kept (point prompts: every component holding a point);
- holes: background components (4-connectivity) that do not touch the image border and are
  at most ``hole_area_frac`` x the mask's area are filled;
- dilation by ``dilate_px`` pixels (a Euclidean disk).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import RowError

__all__ = [
    "box_region",
    "check_box",
    "check_points",
    "clean_model_mask",
    "dilate",
    "fill_small_holes",
    "keep_main_components",
    "label_components",
]


# --------------------------------------------------------------------------- prompt boxes and points


def check_box(box, width: int, height: int, field_name: str) -> np.ndarray:
    """A prompt box as (4,) float64 pixels, clipped to the image; RowError if unusable."""
    arr = np.asarray(box, dtype=np.float64).reshape(-1)
    if arr.shape != (4,) or not np.isfinite(arr).all():
        raise RowError(
            field_name, f"expected [x0, y0, x1, y1] in pixels, got {list(np.asarray(box).ravel())}"
        )
    x0, y0, x1, y1 = arr
    if not (x1 > x0 and y1 > y0):
        raise RowError(field_name, f"box {arr.tolist()} is empty or inverted (need x1 > x0 and y1 > y0)")
    clipped = np.clip(arr, 0.0, [width, height, width, height])
    if clipped[2] - clipped[0] < 1.0 or clipped[3] - clipped[1] < 1.0:
        raise RowError(field_name, f"box {arr.tolist()} lies outside the {width}x{height} image")
    return clipped


def check_points(points, width: int, height: int, field_name: str) -> np.ndarray:
    """Prompt points as (N, 2) float64 pixels inside the image; RowError if unusable."""
    try:
        arr = np.asarray([[float(x), float(y)] for x, y in points], dtype=np.float64)  # (N, 2)
    except (TypeError, ValueError) as exc:
        raise RowError(field_name, f"expected [[x, y], ...] in pixels: {exc}") from exc
    if arr.size == 0:
        raise RowError(field_name, "no points given")
    inside = (arr[:, 0] >= 0) & (arr[:, 0] < width) & (arr[:, 1] >= 0) & (arr[:, 1] < height)
    if not np.isfinite(arr).all() or not inside.all():
        raise RowError(field_name, f"points {arr[~inside].tolist()} lie outside the {width}x{height} image")
    return arr


def box_region(box: np.ndarray, shape: tuple[int, int], *, margin: float = 0.0) -> np.ndarray:
    """bool (H, W): pixels whose centres lie in ``box`` grown by ``margin`` x its size per side."""
    height, width = shape
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    xs = np.arange(width) + 0.5  # pixel centres
    ys = np.arange(height) + 0.5
    in_x = (xs >= x0 - dx) & (xs <= x1 + dx)  # (W,)
    in_y = (ys >= y0 - dy) & (ys <= y1 + dy)  # (H,)
    return in_y[:, None] & in_x[None, :]


# --------------------------------------------------------------------------- cleaning a model's mask


def clean_model_mask(
    mask: np.ndarray,
    *,
    box: np.ndarray | None,
    points: np.ndarray | None,
    box_margin: float,
    coverage: float,
    hole_area_frac: float,
    dilate_px: int,
) -> np.ndarray:
    """Clip to the prompt box, keep the main components, fill small holes, dilate (see above)."""
    if box is not None:
        mask = mask & box_region(box, mask.shape, margin=box_margin)
    mask = keep_main_components(mask, box=box, points=points, coverage=coverage)
    mask = fill_small_holes(mask, max_area_frac=hole_area_frac)
    return dilate(mask, dilate_px) if dilate_px else mask


def label_components(mask: np.ndarray, *, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a bool (H, W) mask: int32 labels (0 = background, 1..n), n.

    Run-length union-find, vectorised: each row's runs of True are found with ``np.diff``;
    runs in adjacent rows that touch (overlap, or also touch diagonally with 8-connectivity)
    are joined by repeated root hooking and pointer jumping. Labels are numbered in raster
    order of each component's first pixel.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity={connectivity}: expected 4 or 8")
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    labels = np.zeros((height, width), dtype=np.int32)
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # (H, W+1): +1 where a run starts, -1 one past where it ends
    rows, starts = np.nonzero(edges == 1)  # (R,), (R,) in raster order
    _, ends = np.nonzero(edges == -1)  # (R,) exclusive ends, same order
    n_runs = len(rows)
    if n_runs == 0:
        return labels, 0

    # Pairs (a, b) of runs, b in the row below a, that touch: b.start < a.end + k, b.end > a.start - k.
    k = 1 if connectivity == 8 else 0
    stride = width + 2  # > any column index, so row * stride + column is increasing in raster order
    start_keys = rows * stride + starts
    end_keys = rows * stride + ends
    below = (rows + 1) * stride
    lo = np.searchsorted(end_keys, below + starts - k, side="right")  # first b with b.end > a.start - k
    hi = np.searchsorted(start_keys, below + ends + k, side="left")  # first b with b.start >= a.end + k
    counts = np.maximum(hi - lo, 0)  # (R,)
    a_idx = np.repeat(np.arange(n_runs), counts)  # (P,)
    offsets = np.repeat(np.cumsum(counts) - counts, counts)  # (P,)
    b_idx = np.repeat(lo, counts) + (np.arange(len(a_idx)) - offsets)  # (P,)

    # Union-find on runs: hook the larger root under the smaller, then compress fully.
    parent = np.arange(n_runs)
    while len(a_idx):
        root_a, root_b = parent[a_idx], parent[b_idx]
        differ = root_a != root_b
        if not differ.any():
            break
        low, high = np.minimum(root_a, root_b)[differ], np.maximum(root_a, root_b)[differ]
        np.minimum.at(parent, high, low)
        while True:  # pointer jumping until every run points at its root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped

    _, run_label = np.unique(parent, return_inverse=True)  # roots are first runs: raster order kept
    lengths = ends - starts  # (R,)
    flat = np.repeat(rows * width + starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    labels.reshape(-1)[flat] = np.repeat(run_label.astype(np.int32) + 1, lengths)
    return labels, int(run_label.max()) + 1


def keep_main_components(
    mask: np.ndarray,
    *,
    box: np.ndarray | None = None,
    points: np.ndarray | None = None,
    coverage: float = 0.9,
) -> np.ndarray:
    """Keep the components that make up the object and drop stray specks.

    With ``points``: every component holding a prompt point (none holds one: the largest).
    Otherwise components are ranked by their area inside ``box`` (the whole image without a
    box) and the smallest top-ranked set holding ``coverage`` of that area is kept.
    """
    labels, n = label_components(mask)
    if n <= 1:
        return np.asarray(mask, dtype=bool)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # (n,)
    if points is not None:
        cols = np.clip(points[:, 0].astype(int), 0, mask.shape[1] - 1)
        rows = np.clip(points[:, 1].astype(int), 0, mask.shape[0] - 1)
        hit = np.unique(labels[rows, cols])
        keep = hit[hit > 0]
        if len(keep) == 0:
            keep = np.array([int(np.argmax(areas)) + 1])
        return np.isin(labels, keep)
    region = labels if box is None else np.where(box_region(box, mask.shape), labels, 0)
    inside = np.bincount(region.ravel(), minlength=n + 1)[1:]  # (n,) area inside the box
    if inside.sum() == 0:  # nothing inside the box: the largest component
        return labels == int(np.argmax(areas)) + 1
    order = np.argsort(-inside, kind="stable")  # largest inside area first
    cumulative = np.cumsum(inside[order])
    n_keep = int(np.searchsorted(cumulative, coverage * cumulative[-1] - 1e-9)) + 1
    return np.isin(labels, order[:n_keep] + 1)


def fill_small_holes(mask: np.ndarray, *, max_area_frac: float) -> np.ndarray:
    """Fill background components (4-connectivity) that do not touch the image border and
    whose area is at most ``max_area_frac`` x the mask's area."""
    mask = np.asarray(mask, dtype=bool)
    if max_area_frac <= 0 or not mask.any():
        return mask
    holes, n = label_components(~mask, connectivity=4)
    if n == 0:
        return mask
    areas = np.bincount(holes.ravel(), minlength=n + 1)  # (n+1,), index 0 = the mask itself
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    small = areas <= max_area_frac * mask.sum()
    small[0] = False
    small[border] = False
    return mask | small[holes]


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a Euclidean disk of ``radius`` pixels (dx^2 + dy^2 <= r^2).

    The disk is a stack of horizontal segments of half-width ``isqrt(r^2 - dy^2)``; each
    horizontal dilation is a window sum over a row prefix sum, then shifted by ``dy``.
    """
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return mask
    height, width = mask.shape
    prefix = np.zeros((height, width + 1), dtype=np.int32)
    np.cumsum(mask, axis=1, out=prefix[:, 1:])  # (H, W+1): True pixels left of each column
    cols = np.arange(width)
    horizontal: dict[int, np.ndarray] = {}
    out = np.zeros_like(mask)
    for dy in range(-min(radius, height - 1), min(radius, height - 1) + 1):
        half = math.isqrt(radius * radius - dy * dy)
        if half not in horizontal:
            lo, hi = np.clip(cols - half, 0, width), np.clip(cols + half + 1, 0, width)
            horizontal[half] = prefix[:, hi] > prefix[:, lo]  # (H, W): a True pixel within +-half
        rows = horizontal[half]
        # out[y] |= rows[y + dy]
        if dy >= 0:
            out[: height - dy] |= rows[dy:]
        else:
            out[-dy:] |= rows[: height + dy]
    return out
