"""FreeCustom (CVPR 2024) for diffusers: multi-reference self-attention, references cached per concept set.

No Ray, no Parquet, no WebDataset here: this package is the algorithm, importable and testable alone.
Names load lazily, so ``from freecustom_core import DEFAULT_NEGATIVE_PROMPT`` does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DEFAULT_NEGATIVE_PROMPT": "config",
    "MASK_MODES": "config",
    "MRSAConfig": "config",
    "ConceptRef": "concept",
    "ConceptTooSmallError": "concept",
    "FreeCustomGenerator": "generator",
    "BlipDiffusionFreeCustom": "blip_diffusion",
    "BlipSubject": "blip_diffusion",
    "FluxFreeCustomGenerator": "flux",
    "canny": "controlnet",
    "LayerKV": "attention",
    "MRSAProcessor": "attention",
    "MRSAState": "attention",
    "mrsa_installed": "attention",
    "ReferenceKV": "kv",
    "ReferenceKVError": "kv",
    "attention_blocks": "layers",
    "select_layers": "layers",
    "DEFAULT_SCHEDULER": "schedulers",
    "EXACT_SCHEDULERS": "schedulers",
    "UnsupportedSchedulerError": "schedulers",
    "build_scheduler": "schedulers",
    "weights_fingerprint": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'freecustom_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
