"""Quality scores per sample: identity (DINOv2, CLIP-I) per concept and prompt alignment (CLIP-T),
as the paper measures them, without the authors' evaluation scripts' bugs.

    dino         per concept: cosine of the mean-pooled DINOv2 features of the concept's reference
                 image (the whole image, unmasked, as the paper) and of the generated image, in [-1, 1]
    dino_paper   per concept: the same rescaled (s + 1) / 2, in [0, 1] (the paper's number for one
                 sample and concept; its script also sums over concepts and divides by a hard-coded
                 130, which is left out)
    dino_masked  per concept: as ``dino``, with the reference cropped to its mask's bounding box and
                 every pixel outside the mask filled with ``MASK_FILL`` (the ImageNet mean colour,
                 which DINOv2's normalisation maps to 0): "does the product look right", without its
                 background
    clip_i       per concept: cosine of the normalised CLIP image embeddings (ViT-B/16) of reference
                 and generated image; every concept counted (the authors' multi-concept script adds
                 only the last concept's)
    clip_t       CLIPScore of the generated image and the row's prompt: 100 x max(cos, 0) with
                 ViT-L/14, as torchmetrics' ``CLIPScore`` computes it for one image (prompts longer
                 than 77 tokens are truncated by the tokenizer, its end token kept)

A per-concept score is a list, one value per concept in the concept set's order; where one number
is needed (filters, sorting, summaries) it is the minimum over concepts (``sample_value``): a
sample is as good as its worst concept. Reference features are computed once per concept set.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from .score_models import ScoreModels, ScoreModelSet

SCORE_NAMES = ("dino", "dino_paper", "dino_masked", "clip_i", "clip_t")
# run --annotate's signals (stages.generation.annotate), in the sample's JSON beside the scores: --min-score takes them too
SIGNAL_NAMES = ("presence", "overlap")
PER_CONCEPT = ("dino", "dino_paper", "dino_masked", "clip_i", "presence")
UPPER = "<"  # --min-score NAME<VALUE: an upper bound, kept in thresholds as "NAME<" -> VALUE
MASK_FILL = (124, 116, 104)  # RGB of the ImageNet mean (0.485, 0.456, 0.406) x 255
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

# A score's column in a Parquet table: per-concept scores as lists, clip_t as a number.
SCORE_COLUMNS: dict[str, pa.DataType] = {
    name: (pa.list_(pa.float64()) if name in PER_CONCEPT else pa.float64()) for name in SCORE_NAMES
}


def masked_reference(image: Image.Image, mask: np.ndarray | Image.Image) -> Image.Image:
    """The reference for ``dino_masked``: cropped to the mask's bounding box, outside filled with
    ``MASK_FILL``. ``mask``: a boolean array or an ``L`` image (>= 128 is inside), the image's size."""
    inside = np.asarray(mask) >= 128 if isinstance(mask, Image.Image) else np.asarray(mask, dtype=bool)
    rgb = np.asarray(image.convert("RGB"))  # (H, W, 3)
    if inside.shape != rgb.shape[:2]:
        raise ValueError(f"mask of size {inside.shape[::-1]} for an image of size {rgb.shape[1::-1]}")
    ys, xs = np.nonzero(inside)
    if not len(ys):
        raise ValueError("empty mask: nothing to crop")
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    filled = np.where(inside[..., None], rgb, np.asarray(MASK_FILL, dtype=np.uint8))
    return Image.fromarray(filled[top:bottom, left:right].astype(np.uint8))


@dataclass(frozen=True)
class ReferenceFeatures:
    """A concept set's normalised reference features, one row per concept: (N, D) tensors."""

    dino: Any
    dino_masked: Any
    clip_i: Any

    @property
    def concepts(self) -> int:
        return int(self.dino.shape[0])


class Scorer:
    """Scores generated images against their concept sets and prompts. Loads the models once; keeps
    the reference features of the last ``cache_size`` concept sets."""

    def __init__(
        self, models: ScoreModels | ScoreModelSet, device: str | None = None, *, cache_size: int = 256
    ):
        self.models = models if isinstance(models, ScoreModelSet) else ScoreModelSet(models, device)
        self._cache: OrderedDict[str, ReferenceFeatures] = OrderedDict()
        self._cache_size = cache_size

    def reference_features(self, concepts: Sequence[tuple[Image.Image, Any]]) -> ReferenceFeatures:
        """Features of a concept set's ``(reference image, mask)`` pairs."""
        images = [image.convert("RGB") for image, _ in concepts]
        masked = []
        for i, (image, mask) in enumerate(concepts):
            try:
                masked.append(masked_reference(image, mask))
            except ValueError as e:
                raise ValueError(f"concepts[{i}].mask: {e}") from None
        m = self.models
        return ReferenceFeatures(
            m.dino_features(images), m.dino_features(masked), m.clip_image_features(images)
        )

    def references(
        self, concept_set_id: str, load: Callable[[], Sequence[tuple[Image.Image, Any]]]
    ) -> ReferenceFeatures:
        """A concept set's features, computed (from ``load()``) only the first time it is asked for."""
        if concept_set_id in self._cache:
            self._cache.move_to_end(concept_set_id)
            return self._cache[concept_set_id]
        features = self.reference_features(load())
        self._cache[concept_set_id] = features
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return features

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[ReferenceFeatures]
    ) -> list[dict]:
        """One dict of ``SCORE_NAMES`` per image (batched model calls over all of them)."""
        if not (len(images) == len(prompts) == len(references)):
            raise ValueError(f"{len(images)} images, {len(prompts)} prompts, {len(references)} concept sets")
        if not images:
            return []
        m = self.models
        rgb = [image.convert("RGB") for image in images]
        dino, clip_i, clip_t_image = (
            m.dino_features(rgb),
            m.clip_image_features(rgb),
            m.clip_t_image_features(rgb),
        )
        unique = list(dict.fromkeys(prompts))
        text = m.clip_t_text_features(unique)  # (P, E)
        row_of = {p: i for i, p in enumerate(unique)}
        results = []
        for i, ref in enumerate(references):
            d = (ref.dino @ dino[i]).tolist()  # (N, D) @ (D,) -> (N,)
            results.append(
                {
                    "dino": d,
                    "dino_paper": [(s + 1) / 2 for s in d],
                    "dino_masked": (ref.dino_masked @ dino[i]).tolist(),
                    "clip_i": (ref.clip_i @ clip_i[i]).tolist(),
                    "clip_t": 100 * max(float(text[row_of[prompts[i]]] @ clip_t_image[i]), 0.0),
                }
            )
        return results


def sample_value(scores: Mapping[str, Any], name: str) -> float | None:
    """One number for a score: a per-concept score's minimum over concepts; None when absent."""
    value = scores.get(name)
    if value is None:
        return None
    if name in PER_CONCEPT:
        return min(value) if value else None
    return float(value)


def parse_min_score(spec: str) -> tuple[str, float]:
    """``NAME=VALUE`` (a lower bound: the sample's value must be >= VALUE) or ``NAME<VALUE`` (an upper
    bound: it must be < VALUE; returned as ``("NAME<", VALUE)``) of ``--min-score``, or ``ValueError``
    naming what is wrong. Names: ``SCORE_NAMES`` and ``SIGNAL_NAMES``."""
    upper = UPPER in spec and ("=" not in spec or spec.index(UPPER) < spec.index("="))
    name, sep, value = spec.partition(UPPER if upper else "=")
    name = name.strip()
    if not sep:
        raise ValueError(f"--min-score {spec!r}: expected NAME=VALUE (a minimum, e.g. clip_t=20) or NAME<VALUE "
                         "(an upper bound, e.g. overlap<0.5)")
    if name not in SCORE_NAMES + SIGNAL_NAMES:
        raise ValueError(f"--min-score {spec!r}: unknown score {name!r}; one of "
                         f"{', '.join(SCORE_NAMES + SIGNAL_NAMES)}")
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"--min-score {spec!r}: {value!r} is not a number") from None
    if not math.isfinite(threshold):
        raise ValueError(f"--min-score {spec!r}: the threshold must be finite")
    return name + (UPPER if upper else ""), threshold


def threshold_name(key: str) -> str:
    """The score or signal a threshold key (``clip_t``, ``overlap<``) is about."""
    return key.removesuffix(UPPER)


def failed_thresholds(scores: Mapping[str, Any], thresholds: Mapping[str, float]) -> list[str]:
    """The thresholds a sample fails, as ``NAME<VALUE`` (below a minimum) or ``NAME>=VALUE`` (at or above
    an upper bound ``NAME<``); empty: it passes. A per-concept value counts by its minimum over concepts
    for a minimum (every concept must reach it) and by its maximum for an upper bound."""
    failed = []
    for key, limit in thresholds.items():
        name = threshold_name(key)
        if key.endswith(UPPER):
            value = scores.get(name)
            value = (max(value) if value else None) if isinstance(value, list) else value
            if value is not None and value >= limit:
                failed.append(f"{name}>={limit:g}")
        elif (v := sample_value(scores, name)) is not None and v < limit:
            failed.append(f"{name}<{limit:g}")
    return failed


def distribution(values: Iterable[float]) -> dict[str, float | int | None]:
    """``n``, ``mean``, ``min``, quantiles ``p05`` ... ``p95`` (linear) and ``max`` of the values."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not arr.size:
        return {"n": 0, "mean": None}
    out: dict[str, float | int | None] = {
        "n": int(arr.size),
        "mean": float(arr.mean()),
        "min": float(arr.min()),
    }
    for q, v in zip(QUANTILES, np.quantile(arr, QUANTILES), strict=True):
        out[f"p{round(q * 100):02d}"] = float(v)
    out["max"] = float(arr.max())
    return out


def summarize(samples: Iterable[tuple[str, Mapping[str, Any]]]) -> dict:
    """Score distributions of ``(concept_set_id, scores)`` pairs, overall and per concept set. A
    per-concept score is summarised by its per-sample minimum, plus its mean per concept."""
    by_set: dict[str, list[Mapping[str, Any]]] = {}
    for concept_set_id, scores in samples:
        by_set.setdefault(concept_set_id, []).append(scores)

    def summary(rows: list[Mapping[str, Any]], per_concept: bool) -> dict:
        out: dict[str, Any] = {"samples": len(rows)}
        for name in SCORE_NAMES:
            out[name] = distribution(sample_value(r, name) for r in rows)
            if per_concept and name in PER_CONCEPT:
                lists = [r[name] for r in rows if r.get(name)]
                if lists and len({len(v) for v in lists}) == 1:
                    out[name]["mean_per_concept"] = [float(x) for x in np.mean(np.asarray(lists), axis=0)]
        return out

    everything = [r for rows in by_set.values() for r in rows]
    return {
        "all": summary(everything, False),
        "concept_sets": {cs: summary(rows, True) for cs, rows in sorted(by_set.items())},
    }


def score_arrays(scores: Sequence[Mapping[str, Any] | None]) -> dict[str, pa.Array]:
    """``SCORE_COLUMNS`` as Arrow arrays (a sample without scores: nulls)."""
    return {
        name: pa.array([None if s is None else s.get(name) for s in scores], dtype)
        for name, dtype in SCORE_COLUMNS.items()
    }
