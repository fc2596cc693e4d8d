"""Default MRSA layers from a model's config alone (torch-free): what the driver of a run needs to fill in
a model family's defaults before any worker loads the weights. Also whether a single file is SDXL, from
its safetensors header alone.

The same principle as the loaded-model functions (``layers.default_blocks`` for a UNet,
``flux_attention.default_blocks`` for a FLUX transformer), read from ``config.json`` instead of modules;
tests check that both give the same blocks.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

# FreeCus (Zhang et al., ICCV 2025; github.com/Monalissaa/FreeCus, infer.py): the "vital" attention
# layers of FLUX.1-dev into which it prepends a reference's foreground K/V, indices into the 57
# attention layers in execution order (19 double-stream, then 38 single-stream):
# transformer_blocks.0, 1, 2, 17, 18 and single_transformer_blocks.6, 9, 34, 35, 37. "Vital layers"
# are Stable Flow's (Avrahami et al., CVPR 2025): bypassing one of them changes FLUX's output most
# (DINOv2 similarity), and injecting a reference's image K/V there carries its appearance.
FREECUS_VITAL_LAYERS = (0, 1, 2, 17, 18, 25, 28, 53, 54, 56)
FLUX1_DOUBLE, FLUX1_SINGLE = 19, 38

# FLUX.1's defaults (diffusers' FluxPipeline for [dev]: 28 steps, embedded guidance 3.5, 1024², T5 512 tokens)
FLUX_STEPS, FLUX_SIZE, FLUX_GUIDANCE, FLUX_MAX_SEQUENCE_LENGTH = 28, 1024, 3.5, 512
SDXL_SIZE = 1024  # SDXL's default image side

_MID_DEFAULT = "UNetMidBlock2DCrossAttn"  # UNet2DConditionModel's default mid block
SDXL_KEY_PREFIX = "conditioner.embedders.1."  # SGM layout: SDXL's second (OpenCLIP ViT-bigG) text encoder


def vital_blocks(d: int, s: int) -> tuple[int, ...]:
    """FreeCus's vital layers for a transformer with ``d`` double-stream and ``s`` single-stream blocks.

    FLUX.1's own depth (19, 38) gives ``FREECUS_VITAL_LAYERS``; for other depths (tiny test models) the
    layers at the same relative depth: a double-stream index i of 19 maps to ``round(i * (d - 1) / 18)``,
    a single-stream index j of 38 to ``d + round(j * (s - 1) / 37)``; duplicates collapse.
    """
    if (d, s) == (FLUX1_DOUBLE, FLUX1_SINGLE):
        return FREECUS_VITAL_LAYERS
    chosen = set()
    for index in FREECUS_VITAL_LAYERS:
        if index < FLUX1_DOUBLE:
            if d:
                chosen.add(round(index * (d - 1) / (FLUX1_DOUBLE - 1)))
        elif s:
            chosen.add(d + round((index - FLUX1_DOUBLE) * (s - 1) / (FLUX1_SINGLE - 1)))
    return tuple(sorted(chosen))


def flux_default_blocks(transformer_config: Mapping) -> tuple[int, ...]:
    """``vital_blocks`` of a ``FluxTransformer2DModel`` config (``num_layers``, ``num_single_layers``)."""
    return vital_blocks(int(transformer_config["num_layers"]), int(transformer_config["num_single_layers"]))


def unet_default_blocks(unet_config: Mapping) -> tuple[int, ...]:
    """The decoder's two highest-resolution attention blocks of a ``UNet2DConditionModel`` config.

    Blocks are numbered as ``layers.attention_blocks`` numbers them: attention-bearing down blocks, the
    mid block (when it has attention), attention-bearing up blocks. SD1.5 gives (5, 6), SDXL (3, 4).
    """
    down = [t for t in unet_config.get("down_block_types", ()) if "Attn" in t]
    mid = unet_config.get("mid_block_type", _MID_DEFAULT)
    base = len(down) + (1 if mid and "Attn" in mid else 0)
    up = [base + k for k, t in enumerate(t for t in unet_config.get("up_block_types", ()) if "Attn" in t)]
    if not up:
        raise ValueError("this UNet has no attention-bearing up block: give mrsa_layers explicitly")
    return tuple(up[-2:])


def safetensors_keys(path: str) -> list[str]:
    """The tensor names of a ``.safetensors`` file, from its header (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        body = f.read(size) if 0 < size <= 100_000_000 else b""
    try:
        header = json.loads(body)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"model={path!r}: not a safetensors file (no readable header)")
    return [key for key in header if key != "__metadata__"]


def has_sdxl_keys(path: str) -> bool:
    """Whether a single file holds SDXL's second text encoder (``conditioner.embedders.1.*``, SGM layout)."""
    return any(key.startswith(SDXL_KEY_PREFIX) for key in safetensors_keys(path))
