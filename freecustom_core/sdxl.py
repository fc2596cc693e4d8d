"""SDXL for FreeCustom: telling an SDXL checkpoint apart and loading it (real diffusers loading, safetensors only).

Everything else is shared with SD1.5: the text conditioning (``conditioning.encode_text``) adds the
pooled embedding and ``add_time_ids``; MRSA runs on the UNet's ``attn1`` layers by name; the default
layers follow the same principle as SD1.5's (``layers.default_blocks``).
"""

from __future__ import annotations

import torch

from .schedulers import build_scheduler, check_exact
from .topology import SDXL_SIZE

SDXL_DEFAULT_SIZE = SDXL_SIZE


def is_sdxl_checkpoint(id_or_folder: str, *, revision: str | None = None) -> bool:
    """Whether ``model_index.json`` names an SDXL pipeline class (reads that file only). A single file or
    a folder without it is not recognised here (False): the SD1.5 loader then reports what it is."""
    from diffusers import DiffusionPipeline

    if str(id_or_folder).endswith((".safetensors", ".ckpt", ".bin")):
        return False
    try:
        config = DiffusionPipeline.load_config(str(id_or_folder), revision=revision)
    except (OSError, ValueError):
        return False
    return "XL" in str(config.get("_class_name", ""))


def load_sdxl_pipeline(
    id_or_folder: str,
    *,
    torch_dtype: torch.dtype | None = None,
    scheduler=None,
    revision: str | None = None,
    **kwargs,
):
    """A diffusers ``StableDiffusionXLPipeline`` with the sampler FreeCustom runs (see ``loading.load_pipeline``).

    The VAE stays in float32 when its config says ``force_upcast`` (SDXL's VAE overflows in float16;
    diffusers' pipeline upcasts it for every decode, here it is upcast once).
    """
    from diffusers import StableDiffusionXLPipeline
    from diffusers.pipelines import pipeline_utils

    kwargs.setdefault("use_safetensors", True)
    kwargs.setdefault("add_watermarker", False)
    dtype_key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    kwargs[dtype_key] = torch_dtype or torch.float32
    if scheduler is not None and not isinstance(scheduler, str):
        check_exact(scheduler)
    pipe = StableDiffusionXLPipeline.from_pretrained(id_or_folder, revision=revision, **kwargs)
    if scheduler is None or isinstance(scheduler, str):
        scheduler = build_scheduler(scheduler, pipe.scheduler.config)
    pipe.scheduler = scheduler
    if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)
    return pipe
