"""The engine alone, no Ray (``freecustom-pipeline customize``): concepts from a case folder in the
authors' layout or from ``IMAGE:MASK:PROMPT[:WEIGHT]`` specs, rendered for one prompt and some seeds."""

from __future__ import annotations

from pathlib import Path

import yaml
from PIL import Image

from freecustom_core.heatmap import maps_image
from stages.inputs.control import CONTROL_TYPES
from stages.params import DEFAULT_WEIGHT


def case_concepts(case: Path) -> tuple[list, str, list[int]]:
    """``(concepts, target prompt, seeds)`` of a case folder: ``image/``, ``mask/`` and
    ``config_stable_diffusion.yaml`` (the authors' layout)."""
    from freecustom_core import ConceptRef

    config = yaml.safe_load((case / "config_stable_diffusion.yaml").read_text())
    weights = list(config.get("mask_weights") or [])
    refs = []
    for i, (path, concept_prompt) in enumerate(config["ref_image_infos"].items()):
        name = Path(path).name
        weight = float(weights[i]) if i < len(weights) else DEFAULT_WEIGHT
        refs.append(
            ConceptRef(
                Image.open(case / "image" / name), Image.open(case / "mask" / name), concept_prompt, weight
            )
        )
    return refs, config["target_prompt"], [int(s) for s in config.get("seeds", [0])]


def parse_concept(spec: str):
    """``IMAGE:MASK:PROMPT[:WEIGHT]`` as a ``ConceptRef``; an empty MASK uses the image's alpha."""
    from freecustom_core import ConceptRef

    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"--concept {spec!r}: expected IMAGE:MASK:PROMPT[:WEIGHT]")
    image = Image.open(parts[0])
    weight = float(parts[3]) if len(parts) == 4 else DEFAULT_WEIGHT
    if not parts[1]:
        return ConceptRef.from_rgba(image, parts[2], weight)
    return ConceptRef(image, Image.open(parts[1]), parts[2], weight)


def tiny_model(folder: Path) -> str:
    """A tiny random-weight SD1.5-topology model in ``folder`` (built once)."""
    from pipeline.tiny_model import build_tiny_sd15

    if not (folder / "model_index.json").exists():
        build_tiny_sd15(folder)
    return str(folder)


def tiny_controlnet(folder: Path, model: str) -> str:
    """A tiny random-weight ControlNet for the tiny ``model`` in ``folder`` (built once)."""
    from pipeline.tiny_model import build_tiny_controlnet

    if not (folder / "config.json").exists():
        build_tiny_controlnet(model, folder)
    return str(folder)


def control_condition(path: Path, control_type: str, *, canny_low: float, canny_high: float):
    """The ControlNet condition from ``--control-image``: its canny map (``canny``) or the image as is (``none``)."""
    from freecustom_core.controlnet import canny

    if control_type not in CONTROL_TYPES:
        raise ValueError(f"--control-type {control_type!r}: expected one of {CONTROL_TYPES}")
    image = Image.open(path).convert("RGB")
    return canny(image, canny_low, canny_high) if control_type == "canny" else image


def render_concepts(
    model: str,
    refs: list,
    target: str,
    seeds: list[int],
    *,
    steps: int,
    size: int,
    controlnet: list[str] | None = None,
    control_images: list | None = None,
    control_references: bool = False,
    attention_maps: bool = False,
    subject: dict | None = None,
):
    """``(images, reference K/V)``: the references prepared once, then every seed; with
    ``attention_maps``, ``(images, reference K/V, maps)`` (maps: (seeds, concepts, h, w), see
    ``freecustom_core.attention_maps``).

    controlnet: ControlNet ids or folders; control_images: one condition per ControlNet (PIL images,
    see ``control_condition``); control_references: the release's references through ControlNet.
    The model is loaded as ``run`` loads it (``stages.reference.models.load_generator``: SD1.5, SDXL, BLIP-Diffusion
    or FLUX.1 by its ``model_index.json``); subject: a BLIP-Diffusion model's ``generate`` subject
    arguments (``subject_image``, ``subject_category``, ``target_subject_category``).
    """
    from stages.reference.models import load_generator

    if bool(controlnet) != bool(control_images) or (controlnet and len(controlnet) != len(control_images)):
        raise ValueError("--controlnet and --control-image go together, one control image per ControlNet")
    gen = load_generator(model, controlnet=list(controlnet) if controlnet else None)
    if (gen.family == "blip") != (subject is not None):
        raise ValueError("--blip-subject and --blip-category: required by a BLIP-Diffusion --model, "
                         "and only taken by one")
    control = None
    if controlnet:
        control = control_images[0] if len(control_images) == 1 else list(control_images)
    prepare = {"control_image": control} if control_references else {}
    if subject is not None:  # the release's BLIP references get the subject too (K/V tied to it)
        prepare.update(subject_image=subject["subject_image"], subject_category=subject["subject_category"])
    kv = gen.prepare_references(refs, num_inference_steps=steps, height=size, width=size, **prepare)
    result = gen.generate(
        [target] * len(seeds),
        seeds,
        kv,
        num_inference_steps=steps,
        height=size,
        width=size,
        control_image=control,
        control_references=control_references,
        **({"attention_maps": True} if attention_maps else {}),
        **(subject or {}),
    )
    if attention_maps:
        images, maps = result
        return images, kv, maps
    return result, kv


def write_attention_maps(out: Path, seeds: list[int], maps, size: tuple[int, int]) -> None:
    """``seed{S}.attn.png`` per seed: one heat-map panel per concept, side by side in concept order."""
    for s, target_maps in zip(seeds, maps, strict=True):
        maps_image(target_maps, size).save(out / f"seed{s}.attn.png")
