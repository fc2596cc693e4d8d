"""How much host memory a model actor declares (``Resources.memory`` in ``pipeline.plan``), so Ray places
no more of them on a node than its RAM holds: the model, the reference K/V its LRU holds, and the
ControlNets and scorers beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.settings import RunSettings
from pipeline.validate import RowSpec
from stages.params import GenParams

# The default MRSA layers of each model family as (layers, side divisor, channels): what one concept's
# reference K/V hold per token grid (docs/models.md's tables)
MRSA_GRIDS = {
    "sd": ((3, 16, 640), (3, 8, 320)),  # up_blocks.2 / .3
    "blip": ((3, 16, 640), (3, 8, 320)),  # an SD1.5 UNet
    "sdxl": ((30, 32, 1280), (6, 16, 640)),  # up_blocks.0 / .1
    "flux": ((10, 16, 3072),),  # FreeCus's ten vital layers, 24 heads x 128, one token per 16x16 pixels
}
# a model in host memory while it loads, for a hub id (a local folder counts as its files' size)
MODEL_HOST_BYTES = {"sd": 3 * 2**30, "blip": 4 * 2**30, "sdxl": 8 * 2**30, "flux": 36 * 2**30}
CONTROLNET_HOST_BYTES = 3 * 2**30 // 2  # an SD1.5 ControlNet (fp32) beside the model with --controlnet
SCORER_HOST_BYTES = 3 * 2**30  # DINOv2-base, CLIP ViT-B/16 and ViT-L/14 (fp32) beside it with --score
PROCESS_BYTES = 2**30  # the actor's Python, torch and Ray Data themselves (measured ~0.5 GiB with a tiny model)


def kv_bytes_per_set(*, height: int, width: int, steps: int, concepts: int, dtype_bytes: int = 2,
                     family: str = "sd") -> int:
    """Host bytes one concept set's reference K/V take at most: dense (every token kept), the family's
    default MRSA layers (``MRSA_GRIDS``), keys and values, one branch. Stored K/V keep only in-mask
    tokens, so this is the worst case (a mask covering the whole reference)."""
    tokens_dims = sum(n * (height // d) * (width // d) * c for n, d, c in MRSA_GRIDS.get(family, MRSA_GRIDS["sd"]))
    return 2 * tokens_dims * steps * concepts * dtype_bytes


def actor_memory(settings: RunSettings, rows, *, device: str, kv_sets: int = 2) -> int:
    """What a model actor declares: the model, plus ``kv_sets`` concept sets' K/V in host memory (the
    generation actor's LRU holds two), the largest among ``rows`` (``RowSpec``s, one per concept
    group), both for the model's family. A local model folder counts as its files' size."""
    family = settings.family.name
    model = MODEL_HOST_BYTES.get(family, MODEL_HOST_BYTES["sd"])
    if os.path.isdir(settings.model):
        model = sum(f.stat().st_size for f in Path(settings.model).rglob("*") if f.is_file()) + 256 * 2**20
    fp32 = settings.dtype == "float32" or (settings.dtype == "auto" and device == "cpu")
    kv = max((kv_bytes_per_set(height=r.params.height, width=r.params.width, steps=r.params.num_inference_steps,
                               concepts=len(r.concepts), dtype_bytes=4 if fp32 else 2, family=family)
              for r in rows), default=0)
    return PROCESS_BYTES + model + kv_sets * kv + _scorer_bytes(settings) + _controlnet_bytes(settings)


def _controlnet_bytes(settings: RunSettings) -> int:
    """What ``--controlnet``'s ControlNets take beside the model: a local folder counts as its files."""
    return sum(sum(f.stat().st_size for f in Path(c).rglob("*") if f.is_file()) if os.path.isdir(c)
               else CONTROLNET_HOST_BYTES for c in settings.controlnet)


def _scorer_bytes(settings: RunSettings) -> int:
    """What ``--score``'s models take in the generation actor: local folders count as their files."""
    models = settings.score_models
    if models is None:
        return 0
    folders = [m for m in (models.dino, models.clip_image, models.clip_text) if os.path.isdir(m)]
    if len(folders) < 3:
        return SCORER_HOST_BYTES
    return sum(f.stat().st_size for m in folders for f in Path(m).rglob("*") if f.is_file()) + 256 * 2**20


def file_shape(settings: RunSettings, shape: dict) -> RowSpec:
    """What ``actor_memory`` reads of a new file before it is planned: its largest row the run accepts
    (``part_ids``)."""
    largest = {k: v for k, v in (("height", shape["height"]), ("width", shape["width"]),
                                   ("num_inference_steps", shape["steps"])) if v is not None}
    params = settings.defaults.with_overrides(largest) if largest else settings.defaults
    return RowSpec(index=0, id="", prompt="", seeds=(), concepts=(None,) * (shape["concepts"] or 1), params=params)


def group_shape(group: dict) -> RowSpec:
    """What ``actor_memory`` reads of a concept group: its parameters and number of concepts."""
    return RowSpec(index=0, id="", prompt="", seeds=(), concepts=tuple(group["concepts"]),
                   params=GenParams.from_row(json.loads(group["gen_params"])))
