"""Loading the diffusion model: the one place stages do it (real diffusers loading, safetensors only)."""

from __future__ import annotations


def load_generator(model: str, *, dtype: str = "auto", device: str = "auto", scheduler: str | None = None,
                   channels_last: bool = False, compile: bool = False):
    """A ``FreeCustomGenerator`` for ``model`` (hub id or folder). ``device="auto"``: CUDA when there
    is one; ``dtype="auto"``: float16 on CUDA, float32 on the CPU."""
    import torch

    from freecustom_core import FreeCustomGenerator

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if str(device).startswith("cuda") else "float32"
    return FreeCustomGenerator.from_pretrained(model, torch_dtype=getattr(torch, dtype), device=device,
                                               scheduler=scheduler, channels_last=channels_last, compile=compile)
