"""The identity of the weights a pipeline computes with, taken again on every use.

A fingerprint computed once goes stale when the weights change afterwards: a LoRA loaded, fused,
rescaled or unloaded, a UNet swapped, a ``load_state_dict``. Signatures of module identities and
tensor versions do not see everything (diffusers' and peft's LoRA fusing write through
``.data``, which bumps no version counter, and unloading afterwards restores the module tree), so
the fingerprint reads the values themselves each time: a strided sample of 16 values per tensor,
gathered without copying any tensor whole, plus names, shapes, dtypes, configs and the state of
every LoRA adapter layer (active adapters, their scales, disabled, merged). Python work over ~1,100
tensors for SD1.5, a few milliseconds plus three host copies of ~18k values in all. Configs enter
without their bookkeeping keys: the same weights loaded from another folder or a single file have
the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json

import torch

PARTS = ("unet", "vae", "text_encoder")
# hashed only where the pipeline has them, so SD1.5 fingerprints stay: SDXL's second text encoder,
# BLIP-Diffusion's Q-Former (the subject embedding)
OPTIONAL_PARTS = ("text_encoder_2", "qformer")
SAMPLES_PER_TENSOR = 16


def config_json(config) -> str:
    """A model or scheduler config as canonical JSON (transformers' and diffusers' configs alike)."""
    if hasattr(config, "to_json_string"):  # transformers
        return config.to_json_string(use_diff=False)
    return json.dumps(dict(config), sort_keys=True, default=str)


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    """Up to 16 values at a fixed stride in logical (row-major) order, without copying the tensor."""
    n = tensor.numel()
    stride = max(1, n // SAMPLES_PER_TENSOR)
    if tensor.is_contiguous():
        return tensor.detach().view(-1)[::stride][:SAMPLES_PER_TENSOR]
    index = torch.arange(0, n, stride, device=tensor.device)[:SAMPLES_PER_TENSOR]
    return tensor.detach()[torch.unravel_index(index, tensor.shape)]  # channels-last weights: a gather


def _adapter_state(module: torch.nn.Module) -> str:
    """The LoRA (peft tuner) layers' state that no tensor holds: which adapters act, how strongly, merged or not."""
    layers = []
    for name, m in module.named_modules():
        if not (hasattr(m, "scaling") and hasattr(m, "active_adapters") and hasattr(m, "merged_adapters")):
            continue
        active = list(m.active_adapters)
        layers.append(
            [
                name,
                active,
                {a: float(m.scaling[a]) for a in active if a in m.scaling},
                bool(getattr(m, "disable_adapters", False)),
                list(m.merged_adapters),
            ]
        )
    return json.dumps(layers)


def architecture_json(config) -> str:
    """A model config without bookkeeping (``_name_or_path``, ``_diffusers_version``, ...): where and with
    which library version the weights were loaded is no part of their identity (a folder, a copy of it
    and a single file of the same weights compute alike)."""
    values = json.loads(config_json(config))
    return json.dumps(
        {k: v for k, v in values.items() if not k.startswith("_") and k != "transformers_version"},
        sort_keys=True,
    )


def weights_fingerprint(pipe) -> str:
    """Identity of the UNet, VAE and text encoder(s) as they are now (32 hex digits)."""
    h = hashlib.sha256()
    for part in PARTS + OPTIONAL_PARTS:
        module = getattr(pipe, part, None)
        if module is None and part in OPTIONAL_PARTS:
            continue
        h.update(f"{part}:{type(module).__name__}:{architecture_json(module.config)}".encode())
        samples = []
        for name, tensor in module.state_dict().items():
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            samples.append(_sample(tensor))
        device = samples[0].device
        values = torch.cat([s.to(device) for s in samples]).float()  # one host copy per part
        h.update(values.cpu().numpy().tobytes())
        adapters = _adapter_state(module)
        if adapters != "[]":  # only with adapter layers: a plain model's fingerprint stays as it was
            h.update(f"adapters:{adapters}".encode())
    return h.hexdigest()[:32]
