"""Schedulers: the release's DDIM by default, ``NAME:key=value`` specs, and every SD scheduler exact.

For each scheduler diffusers ships for Stable Diffusion, cached K/V == inline == the in-batch
algorithm of tests/oracle.py, which steps one live scheduler with the references in the target's
batch. Two steps are enough to reach the states that matter: KDPM2's interpolated step, Heun's
second-order step, the multistep solvers' second step (PNDM's Runge-Kutta warm-up needs four).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from freecustom_core import DEFAULT_NEGATIVE_PROMPT, FreeCustomGenerator, UnsupportedSchedulerError
from freecustom_core.schedulers import DEFAULT_SCHEDULER, RELEASE_DDIM, build_scheduler, parse_scheduler_spec
from tests.oracle import release_generate

# diffusers' sigma schedules hand tensors to NumPy: NumPy deprecation warnings on every call
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

STEPS = 2
PROMPTS, SEEDS = ["a red cube wearing a hat", "a cube on grass"], [21, 22]

SPECS = [
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


@pytest.mark.parametrize("spec", SPECS)
def test_cached_equals_inline_equals_release(gen, checkpoint_scheduler_config, concepts, spec):
    gen.pipe.scheduler = build_scheduler(spec, checkpoint_scheduler_config)
    steps = 4 if spec == "PNDMScheduler" else STEPS
    refs = concepts[:2]
    common = dict(num_inference_steps=steps, height=64, width=64, output_type="latent")
    kv = gen.prepare_references(refs, num_inference_steps=steps, height=64, width=64, reference_seed=3)
    cached = gen.generate(PROMPTS, SEEDS, kv, **common)
    inline = gen.generate(PROMPTS, SEEDS, refs, reference_seed=3, **common)
    torch.testing.assert_close(cached, inline, atol=1e-4, rtol=1e-4)
    # the second target: its noise (initial and ancestral) comes from its own seed, not its place in the batch
    release = release_generate(
        gen.pipe,
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


def test_default_is_the_release_ddim(generator, tiny_model_dir):
    scheduler = generator.pipe.scheduler
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert {k: scheduler.config[k] for k in RELEASE_DDIM} == RELEASE_DDIM
    assert scheduler.config.steps_offset == 0 and scheduler.config.prediction_type == "epsilon"
    identity = generator.scheduler_identity()  # what K/V and samples record
    assert identity["config"]["steps_offset"] == 0
    assert not [
        key for key in identity["config"] if key.startswith("_")
    ]  # bookkeeping in set order: no identity
    assert DEFAULT_SCHEDULER == "release"
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[0] == 980 and scheduler.timesteps[-1] == 0
    # the checkpoint's own DDIM (steps_offset 1) is one spec away, and recorded as such
    checkpoint = FreeCustomGenerator.from_pretrained(
        str(tiny_model_dir), device="cpu", scheduler="DDIMScheduler"
    )
    assert checkpoint.scheduler_identity()["config"]["steps_offset"] == 1


def test_release_ddim_by_name_with_overrides_and_the_checkpoints_prediction_type():
    v = build_scheduler(None, {"prediction_type": "v_prediction", "steps_offset": 1, "beta_end": 0.02})
    assert (
        v.config.prediction_type == "v_prediction"
        and v.config.steps_offset == 0
        and v.config.beta_end == 0.012
    )
    assert dict(build_scheduler("release").config) == dict(build_scheduler(None).config)
    assert build_scheduler("release:steps_offset=1").config.steps_offset == 1


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
