"""Few-step fast path: LCM-LoRA and TCD, i.e. a LoRA plus ``LCMScheduler`` / ``TCDScheduler`` at 4-8 steps.

MRSA acts on every one of the few steps (K/V stored for each, and dropping the last step's MRSA
changes the image); cached == inline == the in-batch algorithm of tests/oracle.py with the LoRA
loaded; guidance 1 (no classifier-free guidance), as these models are run.
"""

from __future__ import annotations

import json

import pytest
import torch

from freecustom_core import DEFAULT_NEGATIVE_PROMPT, FreeCustomGenerator, MRSAConfig
from freecustom_core.lora import use_loras
from freecustom_core.schedulers import build_scheduler
from tests.model_variants import write_random_lora
from tests.oracle import release_generate

STEPS = 4
COMMON = dict(num_inference_steps=STEPS, height=64, width=64, guidance_scale=1.0, output_type="latent")


@pytest.fixture(scope="module")
def gen(tiny_model_dir, tmp_path_factory):
    gen = FreeCustomGenerator.from_pretrained(str(tiny_model_dir), device="cpu")
    lora = write_random_lora(tiny_model_dir, tmp_path_factory.mktemp("distilled"), seed=5, std=0.3)
    use_loras(gen.pipe, [(str(lora), 1.0)])  # stands in for LCM-LoRA / TCD-LoRA (random weights)
    return gen


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["LCMScheduler", "TCDScheduler"])
def test_few_step_path_is_exact_with_mrsa_on_every_step(gen, tiny_model_dir, concepts, spec):
    checkpoint = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    gen.pipe.scheduler = build_scheduler(spec, checkpoint)
    refs = concepts[:1]
    kv = gen.prepare_references(refs, num_inference_steps=STEPS, height=64, width=64, reference_seed=2)
    assert all(kv.k[layer].shape[0] == STEPS for layer in kv.layers)  # K/V for each of the 4 steps
    cached = gen.generate(["a cube"], [9], kv, **COMMON)
    inline = gen.generate(["a cube"], [9], refs, reference_seed=2, **COMMON)
    torch.testing.assert_close(cached, inline, atol=1e-5, rtol=1e-5)
    release = release_generate(gen.pipe, gen.layer_names(), refs, "a cube", 9, num_inference_steps=STEPS,
                               height=64, width=64, guidance_scale=1.0, negative_prompt=DEFAULT_NEGATIVE_PROMPT,
                               reference_seed=2)
    torch.testing.assert_close(cached, release, atol=1e-5, rtol=1e-5)
    # the last of the few steps is customized too: without MRSA there, another latent
    three = gen.generate(["a cube"], [9], refs, reference_seed=2, mrsa=MRSAConfig(end_step=STEPS - 1), **COMMON)
    assert (three - inline).abs().max() > 1e-4
