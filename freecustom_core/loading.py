"""Loading a Stable Diffusion pipeline for FreeCustom: real diffusers loading, safetensors only."""

from __future__ import annotations

import torch

from .schedulers import build_scheduler, check_exact


def load_pipeline(
    id_or_folder: str,
    *,
    torch_dtype: torch.dtype | None = None,
    scheduler=None,
    revision: str | None = None,
    **kwargs,
):
    """A diffusers ``StableDiffusionPipeline`` (hub id or local folder) with the sampler FreeCustom runs.

    scheduler: None or ``"release"``, a spec ``"NAME[:key=value,...]"`` or an instance (checked exact);
    see ``FreeCustomGenerator.from_pretrained``.
    """
    from diffusers import StableDiffusionPipeline

    kwargs.setdefault("safety_checker", None)
    kwargs.setdefault("requires_safety_checker", False)
    kwargs.setdefault("use_safetensors", True)
    from diffusers.pipelines import pipeline_utils

    # diffusers renamed torch_dtype to dtype (the old name warns); pass whichever it takes
    dtype_key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    kwargs[dtype_key] = torch_dtype or torch.float32
    if scheduler is not None and not isinstance(scheduler, str):
        check_exact(scheduler)
    pipe = StableDiffusionPipeline.from_pretrained(id_or_folder, revision=revision, **kwargs)
    if scheduler is None or isinstance(scheduler, str):
        scheduler = build_scheduler(scheduler, pipe.scheduler.config)
    pipe.scheduler = scheduler
    return pipe
