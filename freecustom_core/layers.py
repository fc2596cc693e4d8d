"""Which self-attention layers become MRSA: selection by module name, for any UNet topology."""

from __future__ import annotations

import math

from .config import MRSAConfig


def _self_attention_names(unet, prefix: str) -> list[str]:
    """``attn1`` self-attention layers under ``prefix``, in registration (= execution) order."""
    from diffusers.models.attention_processor import Attention

    names = []
    for name, module in unet.named_modules():
        if not name.startswith(prefix) or not name.endswith(".attn1"):
            continue
        if isinstance(module, Attention) and not module.is_cross_attention:
            names.append(name)
    return names


def attention_blocks(unet) -> list[list[str]]:
    """The paper's blocks: attention-bearing down blocks, then the mid block, then attention-bearing up blocks.

    Each entry lists that block's self-attention layer names in execution order. For SD1.5 that is
    7 blocks: ``down_blocks.0-2`` (0-2), ``mid_block`` (3), ``up_blocks.1-3`` (4-6).
    """
    blocks: list[list[str]] = []
    for i, _ in enumerate(unet.down_blocks):
        names = _self_attention_names(unet, f"down_blocks.{i}.")
        if names:
            blocks.append(names)
    if getattr(unet, "mid_block", None) is not None:
        names = _self_attention_names(unet, "mid_block.")
        if names:
            blocks.append(names)
    for i, _ in enumerate(unet.up_blocks):
        names = _self_attention_names(unet, f"up_blocks.{i}.")
        if names:
            blocks.append(names)
    return blocks


def default_blocks(unet) -> tuple[int, ...]:
    """The decoder's two highest-resolution attention blocks: the last two attention-bearing up blocks.

    The paper's choice for SD1.5, (5, 6) = ``up_blocks.2`` and ``up_blocks.3`` (token grids 32² and
    64² at 512²), stated as a principle so that it carries to other topologies: for SDXL it is
    (3, 4) = ``up_blocks.0`` and ``up_blocks.1`` (32² and 64² at 1024²).
    """
    blocks = attention_blocks(unet)
    up = [i for i, names in enumerate(blocks) if names[0].startswith("up_blocks.")]
    if not up:
        raise ValueError("this UNet has no attention-bearing up block: give MRSAConfig.layers explicitly")
    return tuple(up[-2:])


def execution_order(unet) -> list[str]:
    """Every self-attention layer name in the order a forward pass calls them."""
    return [name for block in attention_blocks(unet) for name in block]


def select_layers(unet, mrsa: MRSAConfig) -> tuple[str, ...]:
    """Resolve ``mrsa.layers`` or ``mrsa.blocks`` to layer names, in execution order."""
    order = execution_order(unet)
    if mrsa.layers is not None:
        unknown = [name for name in mrsa.layers if name not in order]
        if unknown:
            raise ValueError(
                f"MRSAConfig.layers: {unknown} are not self-attention (attn1) layers of this UNet; "
                f"valid names look like {order[-1]!r}"
            )
        chosen = set(mrsa.layers)
    else:
        blocks = attention_blocks(unet)
        bad = [b for b in mrsa.blocks if b >= len(blocks)]
        if bad:
            raise ValueError(
                f"MRSAConfig.blocks={mrsa.blocks}: this UNet has {len(blocks)} attention-bearing blocks "
                f"(0..{len(blocks) - 1}); its default, the decoder's two highest-resolution attention "
                f"blocks, is {default_blocks(unet)}"
            )
        chosen = {name for b in mrsa.blocks for name in blocks[b]}
    return tuple(name for name in order if name in chosen)


def token_grid(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) token grid of a layer with ``n_tokens`` tokens, for a latent of ``latent_hw``.

    Each UNet down-sampling (3x3 conv, stride 2, padding 1) maps a side s to ceil(s / 2), and the
    up blocks return to the same sizes, so every layer's grid is one of these.
    """
    h, w = latent_hw
    for _ in range(16):
        if h * w == n_tokens:
            return h, w
        if h == 1 and w == 1:
            break
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(f"no token grid of {n_tokens} tokens for a latent of {latent_hw}")
