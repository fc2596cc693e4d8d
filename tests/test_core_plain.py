"""Without references the generator is exactly diffusers' StableDiffusionPipeline."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from freecustom_core import DEFAULT_NEGATIVE_PROMPT


def _diffusers(generator, prompts, seeds, **kw):
    return generator.pipe(
        prompts,
        negative_prompt=[DEFAULT_NEGATIVE_PROMPT] * len(prompts),
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        **kw,
    ).images


def test_plain_equals_stable_diffusion_pipeline(generator):
    prompts, seeds = ["a dog", "a cat in the snow"], [0, 123456789]
    kw = dict(num_inference_steps=3, height=64, width=48)
    ours = generator.generate(prompts, seeds, None, output_type="latent", **kw)
    theirs = _diffusers(generator, prompts, seeds, output_type="latent", **kw)
    assert torch.allclose(ours, theirs, atol=1e-5)
    ours_np = generator.generate(prompts, seeds, None, output_type="np", **kw)
    theirs_np = _diffusers(generator, prompts, seeds, output_type="np", **kw)
    assert ours_np.shape == (2, 64, 48, 3)
    assert np.abs(ours_np - theirs_np).max() < 1e-4


def test_minus_infinity_bias_everywhere_equals_plain(generator, concepts):
    """Reference tokens that can never be attended to leave plain Stable Diffusion untouched."""
    kv = generator.prepare_references(concepts[:2], num_inference_steps=3, height=64, width=64)
    for layer in kv.layers:
        kv.bias[layer] = torch.full_like(kv.bias[layer], float("-inf"))
    common = dict(num_inference_steps=3, height=64, width=64, output_type="latent")
    blocked = generator.generate("a dog", [9], kv, **common)
    plain = generator.generate("a dog", [9], None, **common)
    assert torch.allclose(blocked, plain, atol=1e-5)


def test_output_types(generator):
    kw = dict(num_inference_steps=2, height=64, width=64)
    pil = generator.generate("a", [1, 2], None, **kw)
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (64, 64) for im in pil)
    lat = generator.generate("a", [1], None, output_type="latent", **kw)
    assert lat.shape == (1, 4, 8, 8)
