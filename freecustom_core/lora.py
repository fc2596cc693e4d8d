"""LoRA adapters: exactly a given set active, loaded through diffusers' own API (PEFT backend), safetensors only.

A pipeline renders rows with different adapter sets one after another. Switching sets unloads every
adapter and loads the new set under fixed names (``lora0``, ``lora1``, ...): the weights, and so
``weights.weights_fingerprint``, are then a function of the base model and the set alone, never of
which sets the process loaded before (an inactive adapter would still sit in the state dict).
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class LoRAError(ValueError):
    """A LoRA that cannot be loaded; ``index`` is its place in the set (``loras[index].path``)."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def _load_args(path: str) -> tuple[str, dict]:
    """``load_lora_weights`` arguments: a ``.safetensors`` file is its folder plus ``weight_name``."""
    if path.lower().endswith(".safetensors"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such LoRA file: {path}")
        return os.path.dirname(os.path.abspath(path)), {"weight_name": os.path.basename(path)}
    return path, {}


def use_loras(pipe, loras: Sequence[tuple[str, float]]) -> None:
    """Make exactly ``loras`` (``(path or hub id, scale)`` pairs) the pipeline's active adapters.

    Nothing happens when that set is already active. Raises ``LoRAError`` naming the adapter that
    failed; the pipeline is then left with no adapter at all.
    """
    wanted = tuple((str(p), float(s)) for p, s in loras)
    if getattr(pipe, "_freecustom_loras", ()) == wanted:
        return
    if getattr(pipe, "_freecustom_loras", ()):
        pipe.unload_lora_weights()
    pipe._freecustom_loras = ()
    if not wanted:
        return
    names = []
    for i, (path, _scale) in enumerate(wanted):
        name = f"lora{i}"
        try:
            source, kwargs = _load_args(path)
            pipe.load_lora_weights(source, adapter_name=name, use_safetensors=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - any loader failure names the adapter
            if names:
                pipe.unload_lora_weights()
            raise LoRAError(i, f"{path!r} could not be loaded as a LoRA: {type(e).__name__}: {e}") from e
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[scale for _path, scale in wanted])
    pipe._freecustom_loras = wanted


def active_loras(pipe) -> tuple[tuple[str, float], ...]:
    """The set ``use_loras`` made active (empty: none)."""
    return getattr(pipe, "_freecustom_loras", ())
