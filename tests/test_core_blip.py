"""BLIP-Diffusion with MRSA: plain == diffusers' BlipDiffusionPipeline; cached == inline == the release's
in-batch BLIP pipeline (tests/oracle_blip.py) within 1e-4, with the release's defaults (the checkpoint's
scheduler, empty negative prompt, references with the empty source prompt and the subject) and with the
project's alternatives (the SD script's DDIM and negative prompt, concept prompts without the subject)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from freecustom_core import DEFAULT_NEGATIVE_PROMPT, MRSAConfig, ReferenceKVError
from freecustom_core.blip_diffusion import BlipDiffusionFreeCustom, load_blip_diffusion_pipeline
from tests.blip_tiny import build_tiny_blip_diffusion
from tests.conftest import draw_concept
from tests.oracle_blip import release_blip_generate

STEPS = 3
ATOL = 1e-4
NEGATIVE = "ugly, blurry"  # short: diffusers' BLIP pipeline tokenizes the negative prompt without truncation


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    return build_tiny_blip_diffusion(tmp_path_factory.mktemp("tiny-blip") / "blip", seed=0)


@pytest.fixture(scope="module")
def blip(blip_folder):
    return BlipDiffusionFreeCustom.from_pretrained(str(blip_folder), torch_dtype=torch.float32, device="cpu")


def subject(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((40, 36, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def blip_concepts():
    return [
        draw_concept("red", (6, 6, 30, 30), "a red cube"),
        draw_concept("blue", (20, 4, 44, 20), "a blue hat", ellipse=True, weight=2.0),
    ]


def diffusers_blip(gen: BlipDiffusionFreeCustom):
    """diffusers' own BlipDiffusionPipeline over the same components (its own scheduler copy)."""
    from diffusers import BlipDiffusionPipeline

    components = dict(gen.pipe.components, scheduler=copy.deepcopy(gen.pipe.scheduler))
    cfg = gen.pipe.config
    return BlipDiffusionPipeline(**components, ctx_begin_pos=cfg.ctx_begin_pos, mean=cfg.mean, std=cfg.std)


def test_plain_equals_diffusers_blip_diffusion(blip):
    common = dict(num_inference_steps=STEPS, height=64, width=48, negative_prompt=NEGATIVE)
    ours = blip.generate(
        "on the grass", [3], subject_image=subject(0), subject_category="dog", output_type="np", **common
    )
    latents = torch.randn((1, 4, 8, 6), generator=torch.Generator("cpu").manual_seed(3))
    theirs = diffusers_blip(blip)(
        "on the grass",
        subject(0),
        "dog",
        "dog",
        latents=latents,
        num_inference_steps=STEPS,
        height=64,
        width=48,
        neg_prompt=NEGATIVE,
        output_type="np",
    ).images
    assert np.abs(ours - theirs).max() < ATOL


def test_defaults_are_the_release_blip_pipelines(blip, blip_folder):
    """The release's BlipDiffusionFreeCustomPipeline.__call__: self.scheduler (the checkpoint's), neg_prompt="",
    source_prompt="" with the subject; the old defaults stay reachable by options."""
    import inspect

    from diffusers import DDIMScheduler, PNDMScheduler

    shipped = PNDMScheduler.from_pretrained(blip_folder, subfolder="scheduler")
    assert type(blip.pipe.scheduler) is PNDMScheduler
    assert dict(blip.pipe.scheduler.config) == dict(shipped.config)
    assert blip.pipe.scheduler.config.steps_offset == 1 and blip.pipe.scheduler.config.skip_prk_steps is True
    for method in (blip.generate, blip.prepare_references):
        assert inspect.signature(method).parameters["negative_prompt"].default == ""
    assert (
        inspect.signature(blip.generate).parameters["subject_references"].default is None
    )  # True with references
    assert blip.default_mrsa().null_ref_prompts is True
    assert blip.default_mrsa().blocks == (5, 6)
    assert blip.default_mrsa(null_ref_prompts=False, style_fidelity=0.3).null_ref_prompts is False
    release_ddim = load_blip_diffusion_pipeline(str(blip_folder), scheduler="release").scheduler
    assert type(release_ddim) is DDIMScheduler and release_ddim.config.steps_offset == 1  # the SD script's, as its pipeline holds it


def test_plain_defaults_equal_diffusers_defaults(blip):
    """No negative prompt and no scheduler given: both sides sample as the checkpoint ships (PNDM, neg "")."""
    ours = blip.generate(
        "on the grass",
        [5],
        subject_image=subject(1),
        subject_category="dog",
        output_type="np",
        num_inference_steps=STEPS,
        height=48,
        width=64,
    )
    latents = torch.randn((1, 4, 6, 8), generator=torch.Generator("cpu").manual_seed(5))
    theirs = diffusers_blip(blip)(
        "on the grass",
        subject(1),
        "dog",
        "dog",
        latents=latents,
        num_inference_steps=STEPS,
        height=48,
        width=64,
        output_type="np",
    ).images
    assert np.abs(ours - theirs).max() < ATOL
    with_sd_negative = blip.generate(
        "on the grass",
        [5],
        subject_image=subject(1),
        subject_category="dog",
        output_type="np",
        num_inference_steps=STEPS,
        height=48,
        width=64,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
    )
    assert np.abs(with_sd_negative - ours).max() > 1e-3, "the default negative prompt is not the empty one"


def test_defaults_equal_the_release_blip_pipeline(blip, blip_concepts):
    """generate() with nothing but the subject and references: cached == inline == the release, all defaults."""
    size = dict(height=64, width=48, num_inference_steps=STEPS)
    who = dict(subject_image=subject(4), subject_category="dog")
    kv = blip.prepare_references(blip_concepts, reference_seed=3, **who, **size)
    assert kv.meta["mrsa"]["null_ref_prompts"] is True and kv.meta["blip_subject"]["category"] == "dog"
    assert kv.meta["scheduler"]["class"] == "PNDMScheduler"
    cached = blip.generate(
        ["wearing a hat", "on a red cube"], [21, 22], kv, output_type="latent", **who, **size
    )
    inline = blip.generate(
        ["wearing a hat", "on a red cube"],
        [21, 22],
        blip_concepts,
        reference_seed=3,
        output_type="latent",
        **who,
        **size,
    )
    release = release_blip_generate(
        blip.pipe,
        blip.layer_names(),
        blip_concepts,
        "on a red cube",
        22,
        subject_image=who["subject_image"],
        category="dog",
        reference_seed=3,
        **size,
    )
    assert torch.allclose(cached, inline, atol=ATOL), (cached - inline).abs().max()
    assert torch.allclose(cached[1:], release, atol=ATOL), (cached[1:] - release).abs().max()
    concept_prompts = release_blip_generate(
        blip.pipe,
        blip.layer_names(),
        blip_concepts,
        "on a red cube",
        22,
        subject_image=who["subject_image"],
        category="dog",
        reference_seed=3,
        source_prompt=None,
        **size,
    )
    assert (concept_prompts - release).abs().max() > 1e-3, "the references' prompts would go unnoticed"


def test_subject_image_and_category_reach_the_prompt(blip):
    """Another subject image or category gives other query embeddings and another latent."""
    from freecustom_core.blip_diffusion import BlipSubject

    q = blip.query_embeddings(BlipSubject(subject(0), "dog"))
    assert q.shape == (
        1,
        blip.pipe.qformer.config.num_query_tokens,
        blip.pipe.text_encoder.config.hidden_size,
    )
    assert (blip.query_embeddings(BlipSubject(subject(1), "dog")) - q).abs().max() > 1e-3
    assert (blip.query_embeddings(BlipSubject(subject(0), "cat")) - q).abs().max() > 1e-3
    common = dict(num_inference_steps=2, height=32, width=32, negative_prompt=NEGATIVE, output_type="latent")
    base = blip.generate("on the grass", [3], subject_image=subject(0), subject_category="dog", **common)
    other = blip.generate("on the grass", [3], subject_image=subject(1), subject_category="dog", **common)
    assert (other - base).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("subject_references", [False, True])
def test_cached_inline_and_release_blip_agree(blip, blip_folder, blip_concepts, subject_references):
    """The project's alternatives to the release's defaults: the SD script's DDIM, concept prompts."""
    blip = BlipDiffusionFreeCustom.from_pretrained(str(blip_folder), scheduler="release", device="cpu")
    mrsa = MRSAConfig(style_fidelity=0.3)  # < 1: the unconditional branch's references are checked too
    size = dict(height=64, width=64)
    who = dict(subject_image=subject(2), subject_category="dog")
    kv = blip.prepare_references(
        blip_concepts,
        num_inference_steps=STEPS,
        reference_seed=7,
        mrsa=mrsa,
        negative_prompt=NEGATIVE,
        **(who if subject_references else {}),
        **size,
    )
    common = dict(
        num_inference_steps=STEPS,
        output_type="latent",
        negative_prompt=NEGATIVE,
        subject_references=subject_references,
        **who,
        **size,
    )
    prompts, seeds = ["wearing a hat", "on a red cube"], [11, 12]
    cached = blip.generate(prompts, seeds, kv, **common)
    inline = blip.generate(prompts, seeds, blip_concepts, reference_seed=7, mrsa=mrsa, **common)
    plain = blip.generate(prompts, seeds, None, **dict(common, subject_references=False))
    assert torch.allclose(cached, inline, atol=ATOL), (cached - inline).abs().max()
    assert (cached - plain).abs().max() > 1e-3, "MRSA had no effect: the test would not detect a no-op"
    release = release_blip_generate(
        blip.pipe,
        blip.layer_names(mrsa),
        blip_concepts,
        prompts[1],
        seeds[1],
        subject_image=who["subject_image"],
        category="dog",
        subject_references=subject_references,
        source_prompt=None,
        num_inference_steps=STEPS,
        negative_prompt=NEGATIVE,
        reference_seed=7,
        style_fidelity=0.3,
        **size,
    )
    assert torch.allclose(cached[1:], release, atol=ATOL), (cached[1:] - release).abs().max()


def test_reference_kv_remember_their_subject(blip, blip_concepts):
    """K/V computed with the subject serve only subject_references calls with that subject, and vice versa."""
    size = dict(height=32, width=32, num_inference_steps=2)
    with_subject = blip.prepare_references(
        blip_concepts[:1],
        subject_image=subject(2),
        subject_category="dog",
        mrsa=MRSAConfig(end_step=1),
        **size,
    )
    assert with_subject.meta["blip_subject"]["category"] == "dog"
    run = dict(subject_category="dog", output_type="latent", **size)
    with pytest.raises(ReferenceKVError, match="blip_subject"):
        blip.generate("a toy", [1], with_subject, subject_image=subject(2), subject_references=False, **run)
    with pytest.raises(ReferenceKVError, match="blip_subject"):
        blip.generate("a toy", [1], with_subject, subject_image=subject(3), subject_references=True, **run)
    without = blip.prepare_references(blip_concepts[:1], mrsa=MRSAConfig(end_step=1), **size)
    assert without.meta["blip_subject"] is None
    with pytest.raises(ReferenceKVError, match="blip_subject"):
        blip.generate("a toy", [1], without, subject_image=subject(2), **run)  # the default: with the subject


def test_bad_inputs_are_named(blip, tiny_model_dir):
    run = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
    with pytest.raises(ValueError, match="subject_category"):
        blip.generate("a toy", [1], subject_image=subject(0), subject_category=" ", **run)
    with pytest.raises(TypeError, match="subject_image"):
        blip.generate("a toy", [1], subject_image="dog.png", subject_category="dog", **run)
    with pytest.raises(ValueError, match="subject_references"):
        blip.generate(
            "a toy", [1], subject_image=subject(0), subject_category="dog", subject_references=True, **run
        )
    with pytest.raises(ValueError, match="both subject_image and subject_category"):
        blip.prepare_references(
            [draw_concept("red", (6, 6, 30, 30), "a cube")], subject_image=subject(0), **run
        )
    with pytest.raises(ValueError, match="BlipDiffusionPipeline"):
        BlipDiffusionFreeCustom.from_pretrained(str(tiny_model_dir), device="cpu")
