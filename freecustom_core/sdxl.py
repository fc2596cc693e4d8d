"""SDXL for FreeCustom: telling an SDXL checkpoint apart and loading it (real diffusers loading, safetensors only:
a hub id, a folder, or a single file with a local SDXL config folder).

Everything else is shared with SD1.5: the text conditioning (``conditioning.encode_text``) adds the
pooled embedding and ``add_time_ids``; MRSA runs on the UNet's ``attn1`` layers by name; the default
layers follow the same principle as SD1.5's (``layers.default_blocks``).
"""

from __future__ import annotations

import os

import torch

from .loading import from_source, is_single_file
from .schedulers import check_exact, resolve_scheduler
from .topology import SDXL_SIZE

SDXL_DEFAULT_SIZE = SDXL_SIZE


def is_sdxl_checkpoint(id_or_folder: str, *, revision: str | None = None, config=None) -> bool:
    """Whether ``model_index.json`` names an SDXL pipeline class (reads that file only): the checkpoint's, or
    for a single file its config folder's (``config``). A single file without ``config``, or a folder without
    that file, is not recognised here (False): the SD1.5 loader then reports what it is (an SDXL single
    file: that it needs ``config``)."""
    from diffusers import DiffusionPipeline

    if is_single_file(id_or_folder):
        if config is None:
            return False
        id_or_folder, revision = config, None
    elif str(id_or_folder).endswith((".safetensors", ".ckpt", ".bin")):
        return False
    try:
        index = DiffusionPipeline.load_config(os.fspath(id_or_folder), revision=revision)
    except (OSError, ValueError):
        return False
    return "XL" in str(index.get("_class_name", ""))


def load_sdxl_pipeline(
    id_or_folder: str,
    *,
    torch_dtype: torch.dtype | None = None,
    scheduler=None,
    revision: str | None = None,
    config=None,
    **kwargs,
):
    """A diffusers ``StableDiffusionXLPipeline`` with the sampler FreeCustom runs (see ``loading.load_pipeline``).

    id_or_folder: hub id, diffusers folder, or a single ``.safetensors`` checkpoint in the original (SGM)
    layout, read offline with ``config`` (a local SDXL diffusers config folder; see ``loading.from_source``).
    The VAE stays in float32 when its config says ``force_upcast`` (SDXL's VAE overflows in float16;
    diffusers' pipeline upcasts it for every decode, here it is upcast once).
    """
    from diffusers import StableDiffusionXLPipeline
    from diffusers.pipelines import pipeline_utils

    kwargs.setdefault("add_watermarker", False)
    dtype_key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    kwargs[dtype_key] = torch_dtype or torch.float32
    if scheduler is not None and not isinstance(scheduler, str):
        check_exact(scheduler)
    pipe = from_source(StableDiffusionXLPipeline, id_or_folder, config=config, revision=revision, **kwargs)
    pipe.scheduler = resolve_scheduler(scheduler, pipe.scheduler)
    if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)
    return pipe
