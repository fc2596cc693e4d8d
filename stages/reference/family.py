"""Model families: which kind of checkpoint ``--model`` is, its run defaults and its row rules.

Known on the driver before any worker loads weights: the family comes from the checkpoint's
``model_index.json`` (a folder's file, or that one small file of a hub id), the default MRSA blocks
from its UNet's or transformer's ``config.json``. Torch-free.

| family | ``_class_name`` | size | steps | guidance | scheduler | negative prompt | reference prompts | MRSA blocks |
|---|---|---|---|---|---|---|---|---|
| ``sd`` | ``StableDiffusionPipeline`` (SD1.x/2.x) | 512² | 50 | 7.5 | the release's DDIM | the SD script's | the concepts' | (5, 6) |
| ``sdxl`` | ``StableDiffusionXLPipeline`` | 1024² | 50 | 7.5 | the release's DDIM | the SD script's | the concepts' | the UNet's last two attention up blocks: (3, 4) |
| ``blip`` | ``BlipDiffusionPipeline`` | 512² | 50 | 7.5 | the checkpoint's (PNDM) | none (``""``) | ``""`` with the subject | as SD1.5 |
| ``flux`` | ``FluxPipeline`` | 1024² | 28 | 3.5 | its flow-matching Euler | none (no CFG branch) | the concepts' | FreeCus's vital layers |

``blip`` is the release's BLIP pipeline (``pipelines/pipeline_blip_diffusion_freecustom.py``: ``self.scheduler``,
``neg_prompt=""``, ``source_prompt=""`` encoded with the subject), not its SD script.
``sd`` keeps ``GenParams``' own defaults, so SD1.5 outputs keep their identities.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from freecustom_core.families import (
    FAMILIES,
    FAMILY_OF_CLASS,
    LABELS,
    checkpoint_family,
    load_refusals,
    read_model_json,
)
from freecustom_core.topology import (
    FLUX_GUIDANCE,
    FLUX_SIZE,
    FLUX_STEPS,
    SDXL_SIZE,
    flux_default_blocks,
    unet_default_blocks,
)

from ..params import GenParams

BLIP_NEGATIVE_PROMPT = ""  # freecustom_core.blip_diffusion's (not imported: it loads torch)
CHECKPOINT_SCHEDULER = "checkpoint"  # freecustom_core.schedulers' spec names (not imported: torch)
DEFAULT_SCHEDULER = "release"

__all__ = ["FAMILIES", "FAMILY_OF_CLASS", "ModelFamily", "model_family", "read_model_json"]

@dataclass(frozen=True)
class ModelFamily:
    """A model family: its name, its run defaults (``GenParams`` overrides) and rules rows must follow."""

    name: str = "sd"
    class_name: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def defaults(self, **given: Any) -> GenParams:
        """The run's ``GenParams``: this family's defaults with the non-None ``given`` values applied."""
        return GenParams().with_overrides({**self.overrides, **{k: v for k, v in given.items() if v is not None}})

    def problems(self, values: Mapping[str, Any], defaults: GenParams) -> list[tuple[str, str]]:
        """A parameter set's (field, reason) problems on this family (``values``: GenParams' fields)."""
        if self.name != "flux":
            return []
        problems = []
        if values["negative_prompt"]:
            problems.append(("negative_prompt", "FLUX.1 has no negative prompt (no unconditional branch); "
                                                "leave it null or empty"))
        if values["style_fidelity"] != 1:
            problems.append(("style_fidelity", f"style_fidelity {values['style_fidelity']} < 1 mixes in an "
                                               "unconditional branch, which FLUX.1 does not have; use 1.0"))
        if values["mask_mode"] != "bias":
            problems.append(("mask_mode", f"mask_mode {values['mask_mode']!r}: FLUX runs the weighted bias only"))
        if values["guidance_scale"] != defaults.guidance_scale:
            problems.append(("guidance_scale", f"guidance_scale {values['guidance_scale']}: on FLUX the references "
                                               "run with the embedded guidance, so it is set per run "
                                               f"(--guidance-scale, now {defaults.guidance_scale}), not per row"))
        return problems

    def load_refusals(self, *, scheduler: str | None = None, channels_last: bool = False, compile: bool = False,
                      controlnet=()) -> list[str]:
        """Why loading options cannot go with this family (empty: they can): the stages' model loader
        (``stages.reference.models.load_generator``, also ``customize``'s) refuses them, ``run`` before it starts."""
        refused = load_refusals(self.name, scheduler=scheduler, channels_last=channels_last, compile=compile,
                                controlnet=controlnet)
        return [f"--{option.replace('_', '-')}: {reason}" for option, reason in refused]

    def refusals(self, *, control_references: bool = False, save_attention: bool = False, annotate: bool = False,
                 blip_subject: str | None = None, **load) -> list[str]:
        """``load_refusals`` (``load``: its options) and why a run's other options cannot go with this family."""
        name, out = self.name, self.load_refusals(**load)
        if name == "flux" and save_attention:
            out.append("--save-attention: attention maps are not available for FLUX.1 models yet")
        if name == "flux" and annotate:
            out.append("--annotate: annotations are drawn from MRSA attention maps, which FLUX.1 models do not give "
                       "yet (the joint attention's reference-token mass is not computed)")
        if name == "flux" and control_references:
            out.append("--control-references: not available with a FLUX.1 model (its control latent is a sample "
                       "drawn from each target's seed, so references through ControlNet would need K/V per seed)")
        if name != "blip" and blip_subject is not None:
            out.append(f"--blip-subject: the model is no BLIP-Diffusion checkpoint "
                       f"({self.class_name or 'StableDiffusionPipeline'})")
        return out

    @property
    def default_scheduler(self) -> str:
        """``run --scheduler``'s default: the checkpoint's own for BLIP-Diffusion, else the release's DDIM."""
        return CHECKPOINT_SCHEDULER if self.name == "blip" else DEFAULT_SCHEDULER

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def model_identity(self, defaults: GenParams) -> str:
        """What the concept-set id gains from this family besides the model (FLUX: the run's guidance)."""
        return f"|guidance={defaults.guidance_scale}" if self.name == "flux" else ""


def model_family(model: str, model_config: str | None = None) -> ModelFamily:
    """The family of ``--model`` (hub id, diffusers folder, or single file with its ``--model-config``)."""
    name, class_name = checkpoint_family(model, model_config)
    overrides: dict[str, Any] = {}
    if name in ("sdxl", "blip"):
        unet = read_model_json(model, "unet/config.json", model_config=model_config)
        if unet is not None:
            overrides["mrsa_blocks"] = unet_default_blocks(unet)
        if name == "sdxl":
            overrides.update(height=SDXL_SIZE, width=SDXL_SIZE)
        if name == "blip":  # the release BLIP pipeline's neg_prompt="" and source_prompt=""
            overrides.update(negative_prompt=BLIP_NEGATIVE_PROMPT, null_ref_prompts=True)
    elif name == "flux":
        overrides.update(num_inference_steps=FLUX_STEPS, guidance_scale=FLUX_GUIDANCE, height=FLUX_SIZE, width=FLUX_SIZE,
                         negative_prompt="")
        transformer = read_model_json(model, "transformer/config.json", model_config=model_config)
        if transformer is not None:
            overrides["mrsa_blocks"] = flux_default_blocks(transformer)
    return ModelFamily(name, class_name, overrides)
