"""Concept-set identity: one stable content hash per concept set.

Rows whose concept sets hash the same share one reference K/V computation and one preview
folder (``OutputFolder.references(concept_set_id)``). The hash covers everything that changes the
reference K/V and nothing else:

- per concept, in order (order matters: masks, weights and composite recipes refer to
  positions): the decoded image digest, the final mask digest, the prompt, the weight and the
  composite recipe (``ResolvedConcept.image_digest`` / ``mask_digest`` / ``prompt`` /
  ``weight`` / ``composite``);
- the model identity, height, width, number of inference steps, reference seed, MRSA config
  (a dict or anything with ``to_dict()``), and ``extra`` (e.g. a model revision).

It is independent of dict key order and of file names and paths: images and masks enter by
their decoded content digests, and keys naming paths (``path``, ``*_path``) are dropped from
recipes and ``extra``. Numbers are canonical (``3`` and ``3.0`` hash the same; NaN and
infinities are refused). The id is the first 16 hex digits (64 bits) of the sha256 of the
canonical JSON: collisions are negligible below billions of sets, and the name stays short.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..inputs.concepts import ResolvedConcept

__all__ = ["IDENTITY_VERSION", "concept_set_id", "concept_set_payload"]

IDENTITY_VERSION = "freecustom-concept-set/1"
ID_HEX_CHARS = 16


def _is_path_key(key: str) -> bool:
    return key == "path" or key.endswith("_path")


def _canonical(value: Any, where: str) -> Any:
    """A JSON value with canonical numbers, string keys, lists for tuples, no path keys."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        value = value.to_dict()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"concept_set_id: {where} is {value}; NaN and infinities have no identity")
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{where}.{k}") for k, v in value.items() if not _is_path_key(str(k))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v, where) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    raise TypeError(f"concept_set_id: {where} has a {type(value).__name__}, which has no canonical form")


def concept_set_payload(
    concepts: Sequence[ResolvedConcept],
    *,
    model_id: str,
    height: int,
    width: int,
    num_inference_steps: int,
    reference_seed: int,
    mrsa: Mapping | Any,
    extra: Mapping | None = None,
) -> dict:
    """The canonical dict that ``concept_set_id`` hashes (useful to see why two ids differ)."""
    if not concepts:
        raise ValueError("concept_set_id: a concept set needs at least one concept")
    return _canonical(
        {
            "version": IDENTITY_VERSION,
            "model_id": str(model_id),
            "height": int(height),
            "width": int(width),
            "num_inference_steps": int(num_inference_steps),
            "reference_seed": int(reference_seed),
            "mrsa": mrsa,
            "extra": extra or {},
            "concepts": [
                {
                    "image_digest": c.image_digest,
                    "mask_digest": c.mask_digest,
                    "prompt": c.prompt,
                    "weight": float(c.weight),
                    "composite": c.composite,
                }
                for c in concepts
            ],
        },
        "concept set",
    )


def concept_set_id(
    concepts: Sequence[ResolvedConcept],
    *,
    model_id: str,
    height: int,
    width: int,
    num_inference_steps: int,
    reference_seed: int,
    mrsa: Mapping | Any,
    extra: Mapping | None = None,
) -> str:
    """16 hex digits of sha256 over ``concept_set_payload(...)`` as canonical JSON."""
    payload = concept_set_payload(
        concepts,
        model_id=model_id,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        reference_seed=reference_seed,
        mrsa=mrsa,
        extra=extra,
    )
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]
