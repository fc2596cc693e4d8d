"""Cached == inline == the release's in-batch algorithm (tests/oracle.py), within 1e-4 on latents.

Every scheduler is checked the same way in test_core_schedulers.py; here the default (the release's DDIM),
against the oracle on the model loaded as the release loads it (``release_pipe``: its own scheduler).
"""

from __future__ import annotations

import pytest
import torch

from freecustom_core import DEFAULT_NEGATIVE_PROMPT, MRSAConfig
from tests.oracle import release_generate

STEPS = 3
ATOL = 1e-4

CASES = [
    # (n_concepts, style_fidelity, null_ref_prompts, (height, width), start_step, end_step)
    (1, 1.0, False, (64, 64), 0, None),
    (2, 1.0, False, (64, 64), 0, None),
    (3, 1.0, False, (64, 64), 0, None),
    (2, 0.5, False, (64, 64), 0, None),
    (2, 0.3, False, (64, 64), 0, None),  # 0.3, not 0.5: swapping the blend weights would change it
    (3, 0.5, True, (64, 64), 0, None),
    (2, 1.0, True, (64, 48), 0, None),
    (2, 0.5, False, (48, 64), 1, 2),
    (1, 0.0, False, (64, 64), 1, None),
]


@pytest.mark.parametrize("n,sf,null_ref,size,start,end", CASES)
def test_cached_inline_and_release_agree(
    generator, release_pipe, concepts, n, sf, null_ref, size, start, end
):
    height, width = size
    refs = concepts[:n]
    mrsa = MRSAConfig(style_fidelity=sf, null_ref_prompts=null_ref, start_step=start, end_step=end)
    common = dict(num_inference_steps=STEPS, height=height, width=width, output_type="latent")
    prompts, seeds = ["a red cube wearing a blue hat", "a cube on grass"], [11, 12]

    kv = generator.prepare_references(
        refs, num_inference_steps=STEPS, height=height, width=width, reference_seed=7, mrsa=mrsa
    )
    cached = generator.generate(prompts, seeds, kv, **common)
    inline = generator.generate(prompts, seeds, refs, reference_seed=7, mrsa=mrsa, **common)
    plain = generator.generate(prompts, seeds, None, **common)
    assert torch.allclose(cached, inline, atol=ATOL), (cached - inline).abs().max()
    assert (cached - plain).abs().max() > 1e-3, "MRSA had no effect: the test would not detect a no-op"

    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        release = release_generate(
            release_pipe,
            generator.layer_names(mrsa),
            refs,
            prompt,
            seed,
            num_inference_steps=STEPS,
            height=height,
            width=width,
            negative_prompt=DEFAULT_NEGATIVE_PROMPT,
            reference_seed=7,
            style_fidelity=sf,
            null_ref_prompts=null_ref,
            start_step=start,
            end_step=end,
        )
        assert torch.allclose(cached[i : i + 1], release, atol=ATOL), (
            (cached[i : i + 1] - release).abs().max()
        )


def test_scale_mode_cached_equals_inline_and_release(generator, release_pipe, concepts):
    mrsa = MRSAConfig(mask_mode="scale")
    common = dict(num_inference_steps=STEPS, height=64, width=64, output_type="latent")
    kv = generator.prepare_references(concepts[:2], num_inference_steps=STEPS, height=64, width=64, mrsa=mrsa)
    cached = generator.generate("a cube", [5], kv, **common)
    inline = generator.generate("a cube", [5], concepts[:2], mrsa=mrsa, **common)
    bias = generator.generate("a cube", [5], concepts[:2], **common)
    assert torch.allclose(cached, inline, atol=ATOL)
    assert (cached - bias).abs().max() > 1e-4
    release = release_generate(
        release_pipe,
        generator.layer_names(mrsa),
        concepts[:2],
        "a cube",
        5,
        num_inference_steps=STEPS,
        height=64,
        width=64,
        mask_mode="scale",
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
    )
    assert torch.allclose(cached, release, atol=ATOL)
    # scale mode keeps every token: K/V are dense
    assert kv.nbytes == kv.dense_nbytes


def test_target_is_independent_of_its_batch(generator, concepts):
    kv = generator.prepare_references(concepts[:2], num_inference_steps=STEPS, height=64, width=64)
    prompts = ["a red cube", "a blue hat on a table", "grass"]
    seeds = [3, 4, 5]
    common = dict(num_inference_steps=STEPS, height=64, width=64, output_type="latent")
    together = generator.generate(prompts, seeds, kv, **common)
    alone = torch.cat([generator.generate(p, [s], kv, **common) for p, s in zip(prompts, seeds, strict=True)])
    # equal up to the rounding of other batch sizes' kernels (about 1e-5 on latents of magnitude 11)
    assert torch.allclose(together, alone, atol=ATOL)
    split = generator.generate(prompts, seeds, kv, batch_size=2, **common)
    assert torch.allclose(together, split, atol=ATOL)
    # different seeds give different images
    assert (together[0] - together[1]).abs().max() > 1e-2


def test_without_guidance_mrsa_on_the_single_branch(generator, release_pipe, concepts):
    """guidance_scale <= 1: one branch, MRSA on it; the release's batch without CFG does the same."""
    refs = concepts[:2]
    common = dict(num_inference_steps=STEPS, height=64, width=64, output_type="latent", guidance_scale=1.0)
    kv = generator.prepare_references(refs, num_inference_steps=STEPS, height=64, width=64, reference_seed=5)
    cached = generator.generate(["a cube", "a hat"], [9, 10], kv, **common)
    inline = generator.generate(["a cube", "a hat"], [9, 10], refs, reference_seed=5, **common)
    plain = generator.generate(["a cube", "a hat"], [9, 10], None, **common)
    assert torch.allclose(cached, inline, atol=ATOL), (cached - inline).abs().max()
    assert (cached - plain).abs().max() > 1e-3, "references changed nothing without guidance"
    release = release_generate(
        release_pipe,
        generator.layer_names(),
        refs,
        "a hat",
        10,
        num_inference_steps=STEPS,
        height=64,
        width=64,
        guidance_scale=1.0,
        reference_seed=5,
    )
    assert torch.allclose(cached[1:], release, atol=ATOL), (cached[1:] - release).abs().max()
