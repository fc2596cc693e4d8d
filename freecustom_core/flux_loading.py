"""Loading FLUX.1 for FreeCustom: the pipeline (safetensors only), its weights' identity, its exact schedule."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import torch

from .weights import _adapter_state, _sample, config_json

FLUX_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
EXACT_FLUX_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def flux_fingerprint(pipe) -> str:
    """Identity of the transformer, VAE and both text encoders as they are now (as ``weights.weights_fingerprint``)."""
    h = hashlib.sha256()
    for part in FLUX_PARTS:
        module = getattr(pipe, part)
        h.update(f"{part}:{type(module).__name__}:{config_json(module.config)}".encode())
        samples = [_sample(t) for t in module.state_dict().values()]
        for name, tensor in module.state_dict().items():
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(torch.cat([s.to(samples[0].device) for s in samples]).float().cpu().numpy().tobytes())
        h.update(f"adapters:{_adapter_state(module)}".encode())
    return h.hexdigest()[:32]


def check_flux_scheduler(scheduler) -> None:
    """Refuse a scheduler whose reference path is not known to be exact (or whose noise is per batch)."""
    name = type(scheduler).__name__
    if name not in EXACT_FLUX_SCHEDULERS:
        raise ValueError(f"scheduler {name} is not supported on FLUX: one of {list(EXACT_FLUX_SCHEDULERS)}")
    if scheduler.config.get("stochastic_sampling"):
        raise ValueError(
            "FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) draws its noise for the whole batch from "
            "the global RNG: a target's image would depend on its batch; use stochastic_sampling=False"
        )


def pipeline_class_name(id_or_folder: str, *, revision: str | None = None) -> str | None:
    """The ``_class_name`` of a diffusers checkpoint's ``model_index.json`` ("FluxPipeline" for FLUX.1), read
    without loading weights (a hub id fetches only that file); None for a single file or no such index."""
    from diffusers import DiffusionPipeline

    if str(id_or_folder).endswith((".safetensors", ".ckpt")):
        return None
    try:
        return DiffusionPipeline.load_config(str(id_or_folder), revision=revision).get("_class_name")
    except (OSError, ValueError):
        return None


def load_flux_pipeline(id_or_folder: str, *, torch_dtype: torch.dtype | None = None, revision=None, **kwargs):
    """A diffusers ``FluxPipeline`` from a hub id or folder in the ``FLUX.1-dev`` layout, safetensors only.

    A single ``.safetensors`` file goes through ``FluxTransformer2DModel.from_single_file`` with the
    other components from ``kwargs["config"]`` (a hub id or folder of the diffusers layout).
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusers.pipelines import pipeline_utils

    dtype = torch_dtype or torch.float32
    kwargs.setdefault("use_safetensors", True)
    # diffusers renamed torch_dtype to dtype (the old name warns); pass whichever it takes
    dtype_key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    if str(id_or_folder).endswith(".safetensors"):
        config = kwargs.pop("config", None)
        if config is None:
            raise ValueError(
                f"{id_or_folder}: a single-file transformer needs config=<FLUX.1 hub id or folder>"
            )
        transformer = FluxTransformer2DModel.from_single_file(
            str(id_or_folder), config=config, subfolder="transformer", torch_dtype=dtype
        )
        pipe = FluxPipeline.from_pretrained(config, transformer=transformer, **{dtype_key: dtype}, **kwargs)
    else:
        pipe = FluxPipeline.from_pretrained(id_or_folder, revision=revision, **{dtype_key: dtype}, **kwargs)
    return pipe


def flux_timesteps(scheduler, num_inference_steps: int, image_tokens: int, device):
    """FluxPipeline's schedule on a private scheduler copy: sigmas 1..1/n, dynamic shift mu from the token count.

    ``set_begin_index(0)`` as FluxPipeline does: ``scale_noise`` then reads the loop's step index.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    scheduler = copy.deepcopy(scheduler)
    config = scheduler.config
    mu = calculate_shift(
        image_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    sigmas = (
        None
        if config.get("use_flow_sigmas")
        else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    )
    timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler, timesteps
