"""Schedulers: the authors' default, ``NAME:key=value`` specs, and the loop's state for the reference path.

The reference path re-noises the reference latents with ``add_noise`` and scales them with
``scale_model_input`` at every denoising step. For several schedulers both read state that the
denoising loop builds by stepping (Euler's and LMS's step index, Heun's and KDPM2's first/second
order phase), so the reference path must see the scheduler exactly as the loop sees it at that
step: inline it uses the loop's own scheduler; ``prepare_references`` drives a scheduler through
the loop's calls on a placeholder latent (``step_without_target``). That is exact because those
states never depend on the latent's values, which the tests check scheduler by scheduler against
an independent in-batch implementation (``tests/oracle.py``). Schedulers not checked are refused.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The authors' release (freecustom_stable_diffusion.py) builds ``DDIMScheduler(beta_start=0.00085,
# beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)`` and hands it
# to ``StableDiffusionFreeCustomPipeline.from_pretrained(..., scheduler=scheduler)``: a subclass of
# diffusers' StableDiffusionPipeline, whose ``__init__`` rewrites ``steps_offset != 1`` to 1 (the
# "steps_offset!=1" deprecation, in the release's pinned diffusers 0.28.2 as in later ones; the other
# entry it rewrites, ``clip_sample=True``, is already False). So the release samples with steps_offset 1:
# timesteps 981, 961, ..., 1 at 50 steps, eta 0. This is that scheduler's whole config as the pipeline
# leaves it (DDIM's defaults of 0.28.2 spelled out, so a later diffusers default cannot change it);
# ``prediction_type`` comes from the checkpoint (``v_prediction`` for SD2.x 768).
# The release's ControlNet script (freecustom_controlnet.py) passes the same DDIM to
# StableDiffusionControlNetPipeline, whose ``__init__`` has no such rewrite: it samples at 980 ... 0.
# "release" is the SD script's sampler for every family (``release:steps_offset=0`` is the ControlNet
# script's): one sampler, so a ControlNet run differs from a plain one by ControlNet alone.
# Its spec name, the default: "release" (overrides as for any name: "release:steps_offset=0").
DEFAULT_SCHEDULER = "release"
RELEASE_DDIM = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}
# What "release" changed since its first meaning (steps_offset 0): identities spell it out
# (``spec_identity``), so outputs and K/V made under the old meaning are never taken for the new.
RELEASE_CHANGES = {"steps_offset": 1}

# Spec name of the checkpoint's own scheduler (its class and config as shipped): BLIP-Diffusion's default,
# as the release's BLIP pipeline samples (``self.scheduler``: PNDM for Salesforce/blipdiffusion).
CHECKPOINT_SCHEDULER = "checkpoint"

# Every scheduler diffusers ships for Stable Diffusion whose cached reference K/V equal the inline
# ones and the in-batch algorithm's (tests/test_core_schedulers.py), with the package it needs.
EXACT_SCHEDULERS = {
    "DDIMScheduler": None,
    "DDPMScheduler": None,
    "PNDMScheduler": None,
    "LMSDiscreteScheduler": "scipy",
    "EulerDiscreteScheduler": None,
    "EulerAncestralDiscreteScheduler": None,
    "HeunDiscreteScheduler": None,
    "KDPM2DiscreteScheduler": None,
    "KDPM2AncestralDiscreteScheduler": None,
    "DPMSolverMultistepScheduler": None,  # DPM++ 2M, and DPM++ 2M SDE with algorithm_type=sde-dpmsolver++
    "DPMSolverSinglestepScheduler": None,
    "UniPCMultistepScheduler": None,
    "DEISMultistepScheduler": None,
    "LCMScheduler": None,
    "TCDScheduler": None,
}

# Schedulers refused for a reason of their own rather than for not being checked.
REFUSED_SCHEDULERS = {
    "DPMSolverSDEScheduler": (
        "its noise comes from one Brownian tree over the whole batch, seeded from its config (or the "
        "global RNG when noise_sampler_seed is unset), so a target's image would depend on the other "
        "targets in its batch; use DPMSolverMultistepScheduler:algorithm_type=sde-dpmsolver++ "
        "(DPM++ 2M SDE), whose noise follows each target's seed"
    ),
}


class UnsupportedSchedulerError(ValueError):
    """A scheduler with which FreeCustom's reference path cannot be made exact."""


def _release_config(base_config=None):
    """The release's ``DDIMScheduler`` config; ``prediction_type`` comes from ``base_config`` (the checkpoint's)."""
    return dict(RELEASE_DDIM, prediction_type=dict(base_config or {}).get("prediction_type", "epsilon"))


def _parse_value(text: str):
    """``0`` -> 0, ``0.5`` -> 0.5, ``-inf`` -> -inf, ``true``/``True`` -> True, ``none``/``null`` -> None, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if lowered.lstrip("+-") in ("inf", "infinity", "nan"):
        return float(lowered)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.strip()


def parse_scheduler_spec(spec: str) -> tuple[str, dict]:
    """``"NAME"`` or ``"NAME:key=value,key=value"`` -> (NAME, {key: value}); values parsed as JSON where they parse."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"scheduler={spec!r}: expected NAME or NAME:key=value,... (e.g. 'EulerDiscreteScheduler')"
        )
    name, colon, rest = spec.partition(":")
    name = name.strip()
    overrides: dict = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"scheduler={spec!r}: {part!r} is not key=value")
        overrides[key.strip()] = _parse_value(value)
    if colon and not overrides:
        raise ValueError(f"scheduler={spec!r}: nothing after ':'; give key=value pairs or drop the ':'")
    return name, overrides


def spec_identity(spec: str | None) -> str:
    """A spec as output and concept-set identities record it: ``release`` with ``RELEASE_CHANGES`` spelled
    out under the overrides given (``release`` -> ``release:steps_offset=1``), any other spec as given.

    Folders and K/V made when ``release`` meant steps_offset 0 recorded ``release``: they then differ
    from today's default and are refused or recomputed, while a spec that meant the same images then
    (``release:steps_offset=1``) still matches.
    """
    spec = DEFAULT_SCHEDULER if spec is None else spec
    if spec.partition(":")[0].strip() != DEFAULT_SCHEDULER:
        return spec
    _, overrides = parse_scheduler_spec(spec)
    merged = {**RELEASE_CHANGES, **overrides}
    return f"{DEFAULT_SCHEDULER}:" + ",".join(f"{key}={_format_value(merged[key])}" for key in sorted(merged))


def _format_value(value) -> str:
    """The inverse of ``_parse_value``."""
    return value if isinstance(value, str) else json.dumps(value)


def _config_keys(cls) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")}


def build_scheduler(spec: str | None = None, base_config=None):
    """A scheduler from a spec; ``None`` is ``"release"``, the release's DDIM (``RELEASE_DDIM``).

    ``NAME`` is a diffusers scheduler class built from ``base_config`` (the checkpoint's scheduler
    config, as ``from_config`` does); ``NAME:key=value,...`` overrides config entries, e.g.
    ``DDIMScheduler:timestep_spacing=trailing`` or ``DPMSolverMultistepScheduler:use_karras_sigmas=true``.
    ``release`` is ``DDIMScheduler`` with the release's config as its pipeline leaves it
    (``RELEASE_DDIM``: steps_offset 1) and only ``prediction_type`` taken from ``base_config``. Only schedulers in ``EXACT_SCHEDULERS`` are built (``check_exact``).
    """
    import diffusers

    name, overrides = parse_scheduler_spec(DEFAULT_SCHEDULER if spec is None else spec)
    if name == DEFAULT_SCHEDULER:
        name, base_config = "DDIMScheduler", _release_config(base_config)
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and hasattr(cls, "from_config") and name.endswith("Scheduler")):
        raise ValueError(
            f"scheduler={spec!r}: {name!r} is not a diffusers scheduler class; one of "
            f"{[DEFAULT_SCHEDULER, *sorted(EXACT_SCHEDULERS)]}"
        )
    check_exact(cls)
    unknown = sorted(set(overrides) - _config_keys(cls))
    if unknown:
        raise ValueError(
            f"scheduler={spec!r}: {name} has no config key {', '.join(unknown)}; its keys: {sorted(_config_keys(cls))}"
        )
    try:
        return cls.from_config(dict(base_config or {}), **overrides)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise ValueError(f"scheduler={spec!r}: {name} refused this config: {e}") from e


def resolve_scheduler(spec, shipped):
    """The scheduler a loader installs: ``shipped`` (the checkpoint's, loaded with the pipeline) for
    ``"checkpoint"``, an instance ``spec`` as is, else ``build_scheduler(spec, shipped.config)``; checked exact."""
    if spec == CHECKPOINT_SCHEDULER:
        check_exact(shipped)
        return shipped
    if spec is not None and not isinstance(spec, str):
        check_exact(spec)
        return spec
    return build_scheduler(spec, shipped.config)


def check_exact(scheduler) -> None:
    """Refuse a scheduler (class or instance) whose reference path is not known to be exact."""
    cls = scheduler if isinstance(scheduler, type) else type(scheduler)
    name = cls.__name__
    if name in REFUSED_SCHEDULERS:
        raise UnsupportedSchedulerError(f"scheduler {name} is not supported: {REFUSED_SCHEDULERS[name]}")
    if name not in EXACT_SCHEDULERS:
        raise UnsupportedSchedulerError(
            f"scheduler {name} is not supported: the reference path is checked exact only with {sorted(EXACT_SCHEDULERS)}"
        )
    package = EXACT_SCHEDULERS[name]
    if package is not None and importlib.util.find_spec(package) is None:
        raise UnsupportedSchedulerError(
            f"scheduler {name} needs the {package} package, which is not installed (pip install {package})"
        )


def step_params(scheduler) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)


def step_without_target(scheduler, t: torch.Tensor, sample: torch.Tensor) -> None:
    """The denoising loop's calls at one step (``scale_model_input``, then ``step``) on a placeholder latent.

    Afterwards the scheduler is in the state the loop leaves it in: step index, order phase and
    history lengths, which are all ``add_noise`` and ``scale_model_input`` read. The values the
    placeholder produces are thrown away.
    """
    import torch  # lazily: the specs and the release's config above are read by torch-free code (pipeline.settings)

    params = step_params(scheduler)
    kwargs = {"generator": torch.Generator("cpu").manual_seed(0)} if "generator" in params else {}
    x = scheduler.scale_model_input(sample, t)
    scheduler.step(torch.zeros_like(x), t, sample, **kwargs, return_dict=False)


def scheduler_identity(scheduler) -> dict:
    """Class and config; without diffusers' bookkeeping keys (``_use_default_values`` is a list in
    set order, which changes between processes and would make K/V computed elsewhere never fit)."""
    from .weights import config_json

    config = json.loads(config_json(scheduler.config))
    return {
        "class": type(scheduler).__name__,
        "config": {k: v for k, v in config.items() if not k.startswith("_")},
    }
