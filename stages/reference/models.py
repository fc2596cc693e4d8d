"""Loading the diffusion model: the one place stages do it (real diffusers loading, safetensors only),
and switching a loaded model's LoRA adapters to a parameter set's (``apply_loras``)."""

from __future__ import annotations

import os

from ..errors import RowError
from .family import model_family

# what a single file's components are read with when no --model-config is given (freecustom_core.loading.SD15_CONFIG)
BUILTIN_CONFIG = "builtin:stable-diffusion-v1-5"


def load_generator(model: str, *, dtype: str = "auto", device: str = "auto", scheduler: str | None = None,
                   channels_last: bool = False, compile: bool = False, model_config: str | None = None,
                   controlnet: list[str] | None = None):
    """A ``FreeCustomGenerator`` for ``model`` (hub id, diffusers folder or single ``.safetensors`` file;
    ``model_config``: the local diffusers config folder of a single file). ``device="auto"``: CUDA when
    there is one; ``dtype="auto"``: float16 on CUDA, float32 on the CPU. ``controlnet``: ControlNet ids
    or folders (``run --controlnet``), loaded with the model."""
    import torch

    from freecustom_core import FreeCustomGenerator

    family = model_family(model, model_config)
    refused = family.load_refusals(scheduler=scheduler, channels_last=channels_last, compile=compile,
                                   controlnet=controlnet or ())
    if refused:
        raise ValueError(f"{model}: " + "; ".join(refused))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":  # FLUX.1 ships in bfloat16 (its T5 overflows in float16)
        dtype = ("bfloat16" if family.name == "flux" else "float16") if str(device).startswith("cuda") else "float32"
    extra = {"config": model_config} if model_config else {}
    if controlnet:
        extra["controlnet"] = controlnet[0] if len(controlnet) == 1 else list(controlnet)
    if family.name != "flux":  # FLUX.1 samples with its own scheduler (load_refusals lets only "release" through)
        extra["scheduler"] = scheduler
    # the one entry point: the family's generator class, as the family was read above
    return FreeCustomGenerator.from_pretrained(model, torch_dtype=getattr(torch, dtype), device=device,
                                               channels_last=channels_last, compile=compile, **extra)


def apply_loras(generator, loras) -> None:
    """Make ``loras`` (a ``GenParams.loras``) the generator's active adapters; a LoRA that does not load
    is a ``RowError`` on ``loras[i].path``."""
    from freecustom_core.lora import LoRAError, use_loras

    try:
        use_loras(generator.pipe, loras)
    except LoRAError as e:
        raise RowError(f"loras[{e.index}].path", str(e)) from e



def model_source(model: str, model_config: str | None = None) -> dict:
    """What ``--model`` named, for sample metadata: ``{"kind", "name"[, "config"]}`` with kind
    ``single_file`` (and the config folder its components were read with), ``folder`` or ``hub``."""
    if os.path.isfile(model):
        return {"kind": "single_file", "name": model, "config": model_config or BUILTIN_CONFIG}
    return {"kind": "folder" if os.path.isdir(model) else "hub", "name": model}
