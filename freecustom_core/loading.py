"""Loading a Stable Diffusion pipeline for FreeCustom: real diffusers loading, safetensors only.

Three sources: a hub id or a diffusers folder (``from_pretrained``), or a single ``.safetensors``
checkpoint in the original (LDM) layout (``from_single_file``). A single file is read strictly
offline: its components' configs come from a local diffusers config folder (``config=``), by
default the SD1.5 one this package ships (``SD15_CONFIG``: configs and the CLIP tokenizer, no
weights), never from the Hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .schedulers import build_scheduler, check_exact

# SD1.5's diffusers configs (UNet, VAE, CLIP text encoder, tokenizer, its PNDM scheduler), no weights
SD15_CONFIG = Path(__file__).parent / "configs" / "stable-diffusion-v1-5"
SINGLE_FILE_SUFFIX = ".safetensors"
UNSAFE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def is_single_file(id_or_folder) -> bool:
    """A local checkpoint file (not a folder, not a hub id)."""
    return os.path.isfile(os.fspath(id_or_folder))


def _check_single_file(path: str, config) -> str:
    if path.lower().endswith(UNSAFE_SUFFIXES) or not path.lower().endswith(SINGLE_FILE_SUFFIX):
        raise ValueError(
            f"model={path!r}: a single-file checkpoint must be {SINGLE_FILE_SUFFIX} (pickled .ckpt/.bin files "
            "can run code when loaded); convert it, e.g. with safetensors' convert script"
        )
    folder = Path(os.fspath(config)) if config is not None else SD15_CONFIG
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"config={os.fspath(folder)!r}: not a diffusers config folder (no model_index.json); give the "
            "folder of a diffusers pipeline of the checkpoint's family (configs are enough, no weights)"
        )
    return os.fspath(folder)


def load_pipeline(
    id_or_folder: str,
    *,
    torch_dtype: torch.dtype | None = None,
    scheduler=None,
    revision: str | None = None,
    config: str | os.PathLike | None = None,
    **kwargs,
):
    """A diffusers ``StableDiffusionPipeline`` with the sampler FreeCustom runs.

    id_or_folder: hub id, diffusers folder, or a single ``.safetensors`` checkpoint (LDM layout), read
    offline with ``config`` (a local diffusers config folder; default ``SD15_CONFIG``).
    scheduler: None or ``"release"``, a spec ``"NAME[:key=value,...]"`` or an instance (checked exact);
    see ``FreeCustomGenerator.from_pretrained``. The release's DDIM keeps the checkpoint's
    ``prediction_type`` (``v_prediction`` for SD2.x 768).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines import pipeline_utils

    kwargs.setdefault("safety_checker", None)
    kwargs.setdefault("requires_safety_checker", False)
    # diffusers renamed torch_dtype to dtype (the old name warns); pass whichever it takes
    dtype_key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    kwargs[dtype_key] = torch_dtype or torch.float32
    if scheduler is not None and not isinstance(scheduler, str):
        check_exact(scheduler)
    path = os.fspath(id_or_folder)
    if is_single_file(path):
        config_folder = _check_single_file(path, config)
        pipe = StableDiffusionPipeline.from_single_file(
            path, config=config_folder, local_files_only=True, **kwargs
        )
    else:
        if config is not None:
            raise ValueError(
                f"config={os.fspath(config)!r} is for single-file checkpoints; {path!r} is not one"
            )
        kwargs.setdefault("use_safetensors", True)
        pipe = StableDiffusionPipeline.from_pretrained(path, revision=revision, **kwargs)
    if scheduler is None or isinstance(scheduler, str):
        scheduler = build_scheduler(scheduler, pipe.scheduler.config)
    pipe.scheduler = scheduler
    return pipe
