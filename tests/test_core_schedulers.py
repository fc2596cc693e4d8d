"""Schedulers: the release's DDIM by default, ``NAME:key=value`` specs, and every SD scheduler exact.

For each scheduler diffusers ships for Stable Diffusion, cached K/V == inline == the in-batch
algorithm of tests/oracle.py within 1e-4 (multistep solvers included: their history is the loop's own,
so they need no looser tolerance), the oracle on a pipeline loaded as a user loads it
(``from_pretrained(..., scheduler=...)``, with the pipeline's own rewrites) and stepping one live
scheduler with the references in the target's batch. Two steps are enough to reach the states that matter: KDPM2's interpolated step, Heun's
second-order step, the multistep solvers' second step (PNDM's Runge-Kutta warm-up needs four).
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from freecustom_core import (
    DEFAULT_NEGATIVE_PROMPT,
    FreeCustomGenerator,
    ReferenceKV,
    ReferenceKVError,
    UnsupportedSchedulerError,
)
from freecustom_core.schedulers import DEFAULT_SCHEDULER, build_scheduler, parse_scheduler_spec, spec_identity
from tests.oracle import release_generate, release_pipeline

# diffusers' sigma schedules hand tensors to NumPy: NumPy deprecation warnings on every call
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

STEPS = 2
PROMPTS, SEEDS = ["a red cube wearing a hat", "a cube on grass"], [21, 22]

SPECS = [
    "release",  # the default
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",  # with Runge-Kutta warm-up steps: 4 steps at least (13 UNet calls)
    "PNDMScheduler:skip_prk_steps=true",  # SD1.5's own
    "LMSDiscreteScheduler",  # needs scipy, a dependency
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",  # DPM++ 2M
    "DPMSolverMultistepScheduler:algorithm_type=sde-dpmsolver++",  # DPM++ 2M SDE
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "LCMScheduler",
    "TCDScheduler",
]


@pytest.fixture(scope="module")
def checkpoint_scheduler_config(tiny_model_dir) -> dict:
    """The scheduler config the checkpoint ships (a DDIM with steps_offset 1, like SD1.5's PNDM)."""
    return json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    """A generator of this module's own, whose scheduler each test replaces."""
    return FreeCustomGenerator.from_pretrained(str(tiny_model_dir), device="cpu")


def users_pipe(model_dir, spec: str, checkpoint_config: dict):
    """The model loaded as a diffusers user loads it with this scheduler: ``StableDiffusionPipeline.from_pretrained(
    model, scheduler=NAME.from_config(<the checkpoint's scheduler config>, **overrides))``, whose ``__init__``
    applies its rewrites; ``release`` the way the release loads it."""
    import diffusers

    name, overrides = parse_scheduler_spec(spec)
    if name == "release":
        return release_pipeline(model_dir)
    scheduler = getattr(diffusers, name).from_config(checkpoint_config, **overrides)
    return diffusers.StableDiffusionPipeline.from_pretrained(
        str(model_dir), scheduler=scheduler, safety_checker=None, requires_safety_checker=False
    )


@pytest.mark.parametrize("spec", SPECS)
def test_cached_equals_inline_equals_release(
    gen, tiny_model_dir, checkpoint_scheduler_config, concepts, spec
):
    gen.pipe.scheduler = build_scheduler(spec, checkpoint_scheduler_config)
    oracle_pipe = users_pipe(tiny_model_dir, spec, checkpoint_scheduler_config)
    steps = 4 if spec == "PNDMScheduler" else STEPS
    refs = concepts[:2]
    common = dict(num_inference_steps=steps, height=64, width=64, output_type="latent")
    kv = gen.prepare_references(refs, num_inference_steps=steps, height=64, width=64, reference_seed=3)
    cached = gen.generate(PROMPTS, SEEDS, kv, **common)
    inline = gen.generate(PROMPTS, SEEDS, refs, reference_seed=3, **common)
    torch.testing.assert_close(cached, inline, atol=1e-4, rtol=1e-4)
    # the second target: its noise (initial and ancestral) comes from its own seed, not its place in the batch
    release = release_generate(
        oracle_pipe,
        gen.layer_names(),
        refs,
        PROMPTS[1],
        SEEDS[1],
        num_inference_steps=steps,
        height=64,
        width=64,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
        reference_seed=3,
    )
    torch.testing.assert_close(cached[1:], release, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(cached).all()


def test_lms_without_scipy_is_refused(checkpoint_scheduler_config, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real_find_spec(name, *a)
    )
    with pytest.raises(UnsupportedSchedulerError, match="needs the scipy package"):
        build_scheduler("LMSDiscreteScheduler", checkpoint_scheduler_config)


def test_default_is_the_release_ddim_literally(generator, release_pipe, tiny_model_dir):
    """The default sampler against literal values and against the release's own construction
    (``StableDiffusionPipeline.from_pretrained(model, scheduler=DDIMScheduler(<literals>))``)."""
    scheduler = generator.pipe.scheduler
    assert type(scheduler).__name__ == "DDIMScheduler" and DEFAULT_SCHEDULER == "release"
    config = scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert config.set_alpha_to_one is False and config.clip_sample is False
    assert (
        config.steps_offset == 1
        and config.prediction_type == "epsilon"
        and config.num_train_timesteps == 1000
    )
    # scaled_linear: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2
    assert scheduler.betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert scheduler.betas[-1].item() == pytest.approx(0.012, rel=1e-6)
    step = (0.012**0.5 - 0.00085**0.5) / 999
    assert scheduler.betas[500].item() == pytest.approx((0.00085**0.5 + 500 * step) ** 2, rel=1e-6)
    # set_alpha_to_one False: the last step's "previous" alpha is alphas_cumprod[0] = 1 - 0.00085
    assert scheduler.final_alpha_cumprod.item() == scheduler.alphas_cumprod[0].item()
    assert scheduler.final_alpha_cumprod.item() == pytest.approx(1 - 0.00085, rel=1e-6)
    fresh = copy.deepcopy(scheduler)
    fresh.set_timesteps(50)
    assert fresh.timesteps.tolist() == list(range(981, 0, -20))  # 981, 961, ..., 21, 1
    fresh.set_timesteps(4)
    assert fresh.timesteps.tolist() == [751, 501, 251, 1]
    # the release's scheduler, as its pipeline's __init__ leaves it: the same config and timesteps
    release = release_pipe.scheduler
    assert release.config.steps_offset == 1  # diffusers rewrote the DDIM's default 0
    identity = generator.scheduler_identity()  # what K/V and samples record
    assert identity == {
        "class": "DDIMScheduler",
        "config": {k: v for k, v in release.config.items() if k[0] != "_"},
    }
    assert not [
        key for key in identity["config"] if key.startswith("_")
    ]  # bookkeeping in set order: no identity
    release.set_timesteps(50)
    assert release.timesteps.tolist() == list(range(981, 0, -20))
    # the checkpoint's own DDIM is one spec away, and recorded as such
    checkpoint = FreeCustomGenerator.from_pretrained(
        str(tiny_model_dir), device="cpu", scheduler="DDIMScheduler"
    )
    assert checkpoint.scheduler_identity()["class"] == "DDIMScheduler"


def test_default_equals_the_release_end_to_end(generator, release_pipe, tiny_model_dir, concepts):
    """64 px, 4 steps, N = 1: the default equals the oracle run with the release's own scheduler; the
    old default (steps_offset 0: timesteps 750 ... 0 instead of 751 ... 1) is measurably off it."""
    common = dict(num_inference_steps=4, height=64, width=64, output_type="latent")
    refs = concepts[:1]
    ours = generator.generate("a red cube wearing a hat", [21], refs, reference_seed=3, **common)
    release = release_generate(
        release_pipe,
        generator.layer_names(),
        refs,
        "a red cube wearing a hat",
        21,
        num_inference_steps=4,
        height=64,
        width=64,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
        reference_seed=3,
    )
    torch.testing.assert_close(ours, release, atol=1e-4, rtol=1e-4)
    old = FreeCustomGenerator.from_pretrained(
        str(tiny_model_dir), device="cpu", scheduler="release:steps_offset=0"
    )
    before = old.generate("a red cube wearing a hat", [21], refs, reference_seed=3, **common)
    assert (before - release).abs().max() > 1e-2, "the old default would pass this test too"


def test_kv_made_with_the_old_default_are_refused_under_the_new(
    gen, generator, tiny_model_dir, concepts, tmp_path
):
    """K/V (a saved file, as in --kv-cache) made when the default was steps_offset 0 are not served as
    the new default's: generate refuses them and the K/V store recomputes them."""
    from stages.reference.reference_kv import KVFile, load_valid_kv

    gen.pipe.scheduler = build_scheduler("release:steps_offset=0")  # the old default
    size = dict(num_inference_steps=2, height=64, width=64)
    gen.prepare_references(concepts[:1], reference_seed=3, **size).save(tmp_path / "old.safetensors")
    old = ReferenceKV.load(tmp_path / "old.safetensors", device="cpu")
    assert old.meta["scheduler"]["config"]["steps_offset"] == 0
    with pytest.raises(ReferenceKVError, match="scheduler"):
        generator.generate("a cube", [1], old, output_type="latent", **size)
    assert load_valid_kv(KVFile(tmp_path / "old.safetensors"), generator.kv_identity(**size)) is None
    assert load_valid_kv(KVFile(tmp_path / "old.safetensors"), gen.kv_identity(**size)) is not None


def test_release_ddim_by_name_with_overrides_and_the_checkpoints_prediction_type():
    v = build_scheduler(None, {"prediction_type": "v_prediction", "steps_offset": 0, "beta_end": 0.02})
    assert (
        v.config.prediction_type == "v_prediction"
        and v.config.steps_offset == 1
        and v.config.beta_end == 0.012
    )
    assert dict(build_scheduler("release").config) == dict(build_scheduler(None).config)
    assert (
        build_scheduler("release:steps_offset=0").config.steps_offset == 0
    )  # the release's ControlNet script


def test_spec_identity_tells_the_old_default_from_the_new():
    # "release" meant steps_offset 0 until it followed the release's pipeline: the recorded spec changes
    assert spec_identity(None) == spec_identity("release") == "release:steps_offset=1"
    assert spec_identity("release") != "release"
    # specs that meant the same images before keep their identity
    assert spec_identity("release:steps_offset=0") == "release:steps_offset=0"
    assert spec_identity("release:steps_offset=1") == "release:steps_offset=1"
    assert (
        spec_identity("release:timestep_spacing=trailing")
        == "release:steps_offset=1,timestep_spacing=trailing"
    )
    assert spec_identity("EulerDiscreteScheduler") == "EulerDiscreteScheduler"


def test_spec_with_overrides(checkpoint_scheduler_config):
    assert parse_scheduler_spec("EulerDiscreteScheduler") == ("EulerDiscreteScheduler", {})
    name, overrides = parse_scheduler_spec(
        "DPMSolverMultistepScheduler:use_karras_sigmas=true,solver_order=3,algorithm_type=sde-dpmsolver++,"
        "beta_end=0.012,lambda_min_clipped=-inf,variance_type=none"
    )
    assert name == "DPMSolverMultistepScheduler"
    assert overrides == {
        "use_karras_sigmas": True,
        "solver_order": 3,
        "algorithm_type": "sde-dpmsolver++",
        "beta_end": 0.012,
        "lambda_min_clipped": float("-inf"),
        "variance_type": None,
    }
    s = build_scheduler(
        "DDIMScheduler:steps_offset=0, timestep_spacing=trailing", checkpoint_scheduler_config
    )
    assert s.config.steps_offset == 0 and s.config.timestep_spacing == "trailing"
    assert (
        s.config.beta_schedule == checkpoint_scheduler_config["beta_schedule"]
    )  # the rest from the checkpoint


@pytest.mark.parametrize(
    "spec,match",
    [
        ("", "expected NAME"),
        ("NoSuchScheduler", "'NoSuchScheduler' is not a diffusers scheduler"),
        ("StableDiffusionPipeline", "not a diffusers scheduler"),
        ("DDIMScheduler:steps_offset", "'steps_offset' is not key=value"),
        ("DDIMScheduler:steps_offset=", "'steps_offset=' is not key=value"),
        ("DDIMScheduler:", "nothing after ':'"),
        ("DDIMScheduler:bogus=1", "has no config key bogus"),
        ("DDIMScheduler:beta_schedule=sideways", "refused this config"),
        ("DPMSolverSDEScheduler", "whole batch"),
        ("FlowMatchEulerDiscreteScheduler", "checked exact only with"),
    ],
)
def test_bad_specs_are_refused_naming_the_part(checkpoint_scheduler_config, spec, match):
    with pytest.raises(ValueError, match=match):
        build_scheduler(spec, checkpoint_scheduler_config)


def test_unsupported_scheduler_on_the_pipe_is_refused_with_references(gen, concepts):
    from diffusers import FlowMatchEulerDiscreteScheduler

    gen.pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(UnsupportedSchedulerError, match="FlowMatchEulerDiscreteScheduler"):
        gen.prepare_references(concepts[:1], num_inference_steps=2, height=64, width=64)
    with pytest.raises(UnsupportedSchedulerError, match="FlowMatchEulerDiscreteScheduler"):
        gen.generate("x", [1], concepts[:1], num_inference_steps=2, height=64, width=64)
    with pytest.raises(UnsupportedSchedulerError, match="FlowMatchEulerDiscreteScheduler"):  # before loading
        FreeCustomGenerator.from_pretrained("/nonexistent", scheduler=FlowMatchEulerDiscreteScheduler())
