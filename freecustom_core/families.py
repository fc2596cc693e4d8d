"""Model families: which kind of checkpoint a model is, which generator class serves it, and which
loading options it takes. Read from the checkpoint's ``model_index.json`` only (no weights, no torch).

| family | ``_class_name`` | generator |
|---|---|---|
| ``sd`` | ``StableDiffusionPipeline`` (SD1.x/2.x; also anything unrecognised) | ``FreeCustomGenerator`` |
| ``sdxl`` | ``StableDiffusionXLPipeline`` | ``FreeCustomGenerator`` |
| ``blip`` | ``BlipDiffusionPipeline`` | ``blip_diffusion.BlipDiffusionFreeCustom`` |
| ``flux`` | ``FluxPipeline`` | ``flux.FluxFreeCustomGenerator`` |

``FreeCustomGenerator.from_pretrained`` and the pipeline's ``run`` (``stages.reference.family``) both read the
family here, so a model is the same family to the engine and to a run.
"""

from __future__ import annotations

import importlib
import json
import os

from .hub import hub_file

FAMILY_OF_CLASS = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLControlNetPipeline": "sdxl",
    "FluxPipeline": "flux",
    "FluxControlNetPipeline": "flux",
    "BlipDiffusionPipeline": "blip",
}
FAMILIES = ("sd", "sdxl", "blip", "flux")
LABELS = {"sd": "Stable Diffusion", "sdxl": "SDXL", "blip": "BLIP-Diffusion", "flux": "FLUX.1"}
# family -> (module of this package, generator class)
GENERATORS = {
    "sd": ("generator", "FreeCustomGenerator"),
    "sdxl": ("generator", "FreeCustomGenerator"),
    "blip": ("blip_diffusion", "BlipDiffusionFreeCustom"),
    "flux": ("flux", "FluxFreeCustomGenerator"),
}


def read_model_json(
    model: str, name: str, *, model_config: str | None = None, revision: str | None = None
) -> dict | None:
    """A JSON file of a checkpoint (``model_index.json``, ``unet/config.json``...): from the folder, from
    ``model_config`` for a single file, or that one file of a hub id (the Hugging Face cache, honouring
    ``HF_HUB_OFFLINE``; the hub asked once, ``hub.hub_file``). None where there is no such file or it cannot be read."""
    model = os.fspath(model)
    folder = model_config if os.path.isfile(model) else model
    if folder is None:
        return None
    folder = os.fspath(folder)
    if os.path.isdir(folder):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    try:
        with open(hub_file(folder, name, revision=revision), encoding="utf-8") as f:
            return json.load(f)
    except Exception:  # noqa: BLE001 - offline, unknown repo, no such file: the loader reports it later
        return None


def checkpoint_family(
    model: str, model_config: str | None = None, *, revision: str | None = None
) -> tuple[str, str | None]:
    """``(family, _class_name)`` of a hub id, diffusers folder, or single file (with its config folder)."""
    index = read_model_json(model, "model_index.json", model_config=model_config, revision=revision)
    class_name = (index or {}).get("_class_name")
    return FAMILY_OF_CLASS.get(class_name, "sd"), class_name


def generator_class(family: str):
    """The generator class that serves ``family``."""
    module, name = GENERATORS[family]
    return getattr(importlib.import_module(f".{module}", __package__), name)


def load_refusals(
    family: str,
    *,
    scheduler=None,
    channels_last: bool = False,
    compile=False,
    controlnet=(),
    config=None,
) -> list[tuple[str, str]]:
    """``(option, reason)`` for each loading option that does not apply to ``family`` (empty: all do)."""
    label, out = LABELS[family], []
    if family in ("flux", "blip"):
        out += [
            (option, f"not supported with a {label} model")
            for option, on in (("channels_last", channels_last), ("compile", compile))
            if on
        ]
    if family == "flux" and scheduler not in (None, "release"):
        out.append(("scheduler", "FLUX.1 samples with its own flow-matching Euler scheduler"))
    if family == "blip" and controlnet:
        out.append(("controlnet", f"not supported with a {label} model"))
    if family == "blip" and config is not None:
        out.append(("config", f"a {label} model loads from a diffusers folder or hub id, not a single file"))
    return out
