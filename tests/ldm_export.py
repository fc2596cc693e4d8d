"""Test helper: a diffusers Stable Diffusion or SDXL pipeline written as one original-layout checkpoint.

What users bring as ``model.safetensors``: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
(VAE) and the text encoders: SD1's CLIP as ``cond_stage_model.transformer.*`` (LDM layout); SDXL's
(SGM layout) as ``conditioner.embedders.0.transformer.*`` (CLIP ViT-L, Hugging Face names) and
``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG names: fused ``in_proj`` attention,
``resblocks``, ``text_projection`` as a matrix applied from the right). The key layout is derived
from the diffusers module names (the UNet's with SD's two layers per block), so the tiny test models
export like full-size ones; diffusers' own ``from_single_file`` converts them back.
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
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time embedding
    "add_embedding.linear_2": "label_emb.0.2",
}


def _unet_key(key: str, attention_up_blocks: frozenset[int]) -> str:
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
        if part == "upsamplers":  # after the block's attention, where it has one
            return f"output_blocks.{3 * block + 2}.{2 if block in attention_up_blocks else 1}.{rest}"
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


def _hf_clip_state(text_encoder) -> dict:
    """A CLIP text encoder's state under ``text_model.*`` (transformers 5 drops that prefix on ``CLIPTextModel``)."""
    return {
        key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}": value
        for key, value in text_encoder.state_dict().items()
    }


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _open_clip_state(text_encoder) -> dict:
    """A ``CLIPTextModelWithProjection`` in OpenCLIP's names (the inverse of diffusers'
    ``convert_open_clip_checkpoint``): q/k/v fused into ``attn.in_proj_*``, the projection transposed."""
    hf = _hf_clip_state(text_encoder)
    state = {
        "positional_embedding": hf.pop("text_model.embeddings.position_embedding.weight"),
        "token_embedding.weight": hf.pop("text_model.embeddings.token_embedding.weight"),
        "ln_final.weight": hf.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": hf.pop("text_model.final_layer_norm.bias"),
        "text_projection": hf.pop("text_projection.weight").T,  # (hidden, projection): x @ text_projection
    }
    for i in range(text_encoder.config.num_hidden_layers):
        hf_layer, layer = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [hf.pop(f"{hf_layer}self_attn.{p}_proj.{kind}") for p in "qkv"]
            state[f"{layer}attn.in_proj_{kind}"] = torch.cat(qkv)  # (3 * hidden, ...)
            for hf_name, name in _OPEN_CLIP_LAYER.items():
                state[f"{layer}{name}.{kind}"] = hf.pop(f"{hf_layer}{hf_name}.{kind}")
    if hf:
        raise KeyError(f"no OpenCLIP name for text encoder keys {sorted(hf)}")
    return state


def export_single_file(pipe, path: str | Path) -> Path:
    """Write ``pipe``'s UNet, VAE and text encoder(s) as one original-layout safetensors file: LDM's
    for SD1.x (a CLIP text encoder), SGM's for SDXL (also ``text_encoder_2``, in OpenCLIP names)."""
    state = {}
    attention_up_blocks = frozenset(i for i, b in enumerate(pipe.unet.up_blocks) if hasattr(b, "attentions"))
    for key, value in pipe.unet.state_dict().items():
        state[f"model.diffusion_model.{_unet_key(key, attention_up_blocks)}"] = value
    n_blocks = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        sd_key = _vae_key(key, n_blocks)
        if ".mid.attn_1." in sd_key and sd_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        state[f"first_stage_model.{sd_key}"] = value
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    clip_prefix = "cond_stage_model.transformer." if text_encoder_2 is None else "conditioner.embedders.0.transformer."
    for key, value in _hf_clip_state(pipe.text_encoder).items():
        state[clip_prefix + key] = value
    if text_encoder_2 is not None:
        for key, value in _open_clip_state(text_encoder_2).items():
            state[f"conditioner.embedders.1.model.{key}"] = value
    path = Path(path)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


def tensors_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
