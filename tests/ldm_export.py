"""Test helper: a diffusers Stable Diffusion pipeline written as one original-layout (LDM) checkpoint.

What users bring as ``model.safetensors``: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
(VAE), ``cond_stage_model.transformer.*`` (SD1 CLIP text encoder). The key layout is derived from the
diffusers module names (the UNet's with SD's two layers per block), so the tiny test models export
like full-size ones; diffusers' own ``from_single_file`` converts them back.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_key(key: str) -> str:
    for hf, sd in _UNET_TOP.items():
        if key.startswith(hf + "."):
            return sd + key[len(hf) :]
    m = re.match(r"(down|up)_blocks\.(\d)\.(resnets|attentions|downsamplers|upsamplers)\.(\d)\.(.*)", key)
    if m:
        kind, block, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if part == "resnets":
            rest = _resnet_rest(rest)
        if kind == "down":
            if part == "downsamplers":  # "conv.weight" -> "op.weight"
                return f"input_blocks.{3 * (block + 1)}.0.op.{rest.removeprefix('conv.')}"
            return f"input_blocks.{3 * block + j + 1}.{0 if part == 'resnets' else 1}.{rest}"
        if part == "upsamplers":
            return f"output_blocks.{3 * block + 2}.{1 if block == 0 else 2}.{rest}"
        return f"output_blocks.{3 * block + j}.{0 if part == 'resnets' else 1}.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.*)", key)
    if m:
        part, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{_resnet_rest(rest)}"
    raise KeyError(f"no LDM name for UNet key {key}")


def _resnet_rest(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET.get(name, name)}.{tail}"


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key(key: str, n_blocks: int) -> str:
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.*)", key)
    if m:
        side, part, j, rest = m.groups()
        if part == "resnets":
            return f"{side}.mid.block_{int(j) + 1}.{rest}"
        for hf, sd in _VAE_ATTN.items():
            if rest.startswith(hf + "."):
                return f"{side}.mid.attn_1.{sd}{rest[len(hf) :]}"
        raise KeyError(key)
    m = re.match(r"encoder\.down_blocks\.(\d)\.(resnets\.(\d)|downsamplers\.0)\.(.*)", key)
    if m:
        i, j, rest = m.group(1), m.group(3), m.group(4)
        return (
            f"encoder.down.{i}.block.{j}.{rest}" if j is not None else f"encoder.down.{i}.downsample.{rest}"
        )
    m = re.match(r"decoder\.up_blocks\.(\d)\.(resnets\.(\d)|upsamplers\.0)\.(.*)", key)
    if m:
        i, j, rest = n_blocks - 1 - int(m.group(1)), m.group(3), m.group(4)
        return f"decoder.up.{i}.block.{j}.{rest}" if j is not None else f"decoder.up.{i}.upsample.{rest}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv


def export_single_file(pipe, path: str | Path) -> Path:
    """Write ``pipe``'s UNet, VAE and (SD1, CLIP) text encoder as one LDM-layout safetensors file."""
    state = {}
    for key, value in pipe.unet.state_dict().items():
        state[f"model.diffusion_model.{_unet_key(key)}"] = value
    n_blocks = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        sd_key = _vae_key(key, n_blocks)
        if ".mid.attn_1." in sd_key and sd_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        state[f"first_stage_model.{sd_key}"] = value
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"  # transformers 5 drops the prefix
        state[f"cond_stage_model.transformer.{key}"] = value
    path = Path(path)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


def tensors_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
