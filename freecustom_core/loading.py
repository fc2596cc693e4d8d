"""Loading a Stable Diffusion pipeline for FreeCustom: real diffusers loading, safetensors only.

Three sources: a hub id or a diffusers folder (``from_pretrained``), or a single ``.safetensors``
checkpoint in the original layout (LDM's for SD1.x/2.x, SGM's for SDXL; ``from_single_file``). A
single file is read strictly offline: its components' configs come from a local diffusers config
folder (``config=``), by default the SD1.5 one this package ships (``SD15_CONFIG``: configs and the
CLIP tokenizer, no weights), never from the Hub. An SDXL file needs ``config=`` an SDXL folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .schedulers import check_exact, resolve_scheduler
from .topology import SDXL_KEY_PREFIX, has_sdxl_keys

# SD1.5's diffusers configs (UNet, VAE, CLIP text encoder, tokenizer, its PNDM scheduler), no weights
SD15_CONFIG = Path(__file__).parent / "configs" / "stable-diffusion-v1-5"
SINGLE_FILE_SUFFIX = ".safetensors"
UNSAFE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def is_single_file(id_or_folder) -> bool:
    """A local checkpoint file (not a folder, not a hub id)."""
    return os.path.isfile(os.fspath(id_or_folder))


def check_single_file(path: str, config, *, sdxl: bool = False) -> str:
    """The config folder of a single-file checkpoint, after checking that the file is safetensors, the folder
    a diffusers one (default ``SD15_CONFIG``), and both of one family (``sdxl``: the folder is SDXL's)."""
    if path.lower().endswith(UNSAFE_SUFFIXES) or not path.lower().endswith(SINGLE_FILE_SUFFIX):
        raise ValueError(
            f"model={path!r}: a single-file checkpoint must be {SINGLE_FILE_SUFFIX} (pickled .ckpt/.bin files "
            "can run code when loaded); convert it, e.g. with safetensors' convert script"
        )
    file_is_sdxl = has_sdxl_keys(path)
    if file_is_sdxl and config is None:
        raise ValueError(
            f"model={path!r} is an SDXL checkpoint ({SDXL_KEY_PREFIX}* keys) and only SD1.5's configs ship with "
            "this package: give config= (run --model-config) a local SDXL diffusers folder (its model_index.json, "
            "configs and tokenizers are enough, no weights)"
        )
    folder = Path(os.fspath(config)) if config is not None else SD15_CONFIG
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"config={os.fspath(folder)!r}: not a diffusers config folder (no model_index.json); give the "
            "folder of a diffusers pipeline of the checkpoint's family (configs are enough, no weights)"
        )
    if file_is_sdxl != sdxl:
        raise ValueError(
            f"config={os.fspath(folder)!r} is {'an' if sdxl else 'not an'} SDXL pipeline's folder but "
            f"model={path!r} is {'an' if file_is_sdxl else 'not an'} SDXL checkpoint ({SDXL_KEY_PREFIX}* keys); "
            "give the config folder of the checkpoint's family"
        )
    return os.fspath(folder)


def from_source(pipeline_class, id_or_folder, *, config=None, revision: str | None = None, **kwargs):
    """``pipeline_class`` (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``) from a hub id or
    folder (``from_pretrained``, safetensors only) or from a single file (``from_single_file``, offline,
    its configs from the local folder ``config``)."""
    path = os.fspath(id_or_folder)
    if is_single_file(path):
        folder = check_single_file(path, config, sdxl="XL" in pipeline_class.__name__)
        return pipeline_class.from_single_file(path, config=folder, local_files_only=True, **kwargs)
    if config is not None:
        raise ValueError(f"config={os.fspath(config)!r} is for single-file checkpoints; {path!r} is not one")
    kwargs.setdefault("use_safetensors", True)
    return pipeline_class.from_pretrained(path, revision=revision, **kwargs)


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
    scheduler: None or ``"release"``, ``"checkpoint"`` (its own), a spec ``"NAME[:key=value,...]"`` or an
    instance (checked exact);
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
    pipe = from_source(StableDiffusionPipeline, id_or_folder, config=config, revision=revision, **kwargs)
    pipe.scheduler = resolve_scheduler(scheduler, pipe.scheduler)
    return pipe
