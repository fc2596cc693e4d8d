"""SDXL in the engine: a tiny SDXL-topology pipeline (two text encoders, ``text_time`` embedding) built,
saved and loaded back through ``from_pretrained``; cached == inline == the in-batch oracle, plain ==
diffusers' ``StableDiffusionXLPipeline``; with a ControlNet, the release's ControlNet structure; as one
original-layout (SGM) ``.safetensors`` file read back offline by ``from_single_file``, the folder's model."""

from __future__ import annotations

import pytest
import torch

from freecustom_core import DEFAULT_NEGATIVE_PROMPT, FreeCustomGenerator, MRSAConfig
from freecustom_core.layers import attention_blocks
from freecustom_core.sdxl import load_sdxl_pipeline
from pipeline.tiny_model import build_tiny_controlnet, build_tiny_sdxl
from stages.reference.family import model_family
from stages.reference.models import load_generator
from tests.ldm_export import export_single_file
from tests.oracle import release_generate, release_pipeline
from tests.test_core_controlnet import control_picture

STEPS = 2
ATOL = 1e-4
SIZE = dict(height=64, width=64)
COMMON = dict(num_inference_steps=STEPS, output_type="latent", **SIZE)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"), seed=0)


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return FreeCustomGenerator.from_pretrained(str(sdxl_dir), torch_dtype=torch.float32, device="cpu")


def release(gen, refs, prompt, seed, *, scheduler, mrsa=None, **kw):
    """The oracle on ``gen``'s components, stepping ``scheduler`` (the release's, ``release_pipe.scheduler``)."""
    return release_generate(
        gen.pipe,
        gen.layer_names(mrsa),
        refs,
        prompt,
        seed,
        num_inference_steps=STEPS,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
        scheduler=scheduler,
        **SIZE,
        **kw,
    )


def test_sdxl_loads_with_its_defaults_and_layers(sdxl):
    from diffusers import StableDiffusionXLPipeline

    assert isinstance(sdxl.pipe, StableDiffusionXLPipeline) and sdxl.is_sdxl
    assert sdxl.default_size == 1024
    # SDXL's attention-bearing blocks: down 1 (2 x 2 layers), down 2 (2 x 10), mid (10), up 0 (3 x 10), up 1 (3 x 2)
    blocks = attention_blocks(sdxl.unet)
    assert [len(b) for b in blocks] == [4, 20, 10, 30, 6]
    # the decoder's two highest-resolution attention blocks, as SD1.5's (5, 6)
    assert sdxl.default_mrsa().blocks == (3, 4)
    layers = sdxl.layer_names()
    assert len(layers) == 36 and layers == tuple(blocks[3] + blocks[4])
    assert layers[0] == "up_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert layers[-1] == "up_blocks.1.attentions.2.transformer_blocks.1.attn1"
    with pytest.raises(
        ValueError, match=r"blocks=\(5, 6\): this UNet has 5 attention-bearing blocks \(0..4\).*\(3, 4\)"
    ):
        sdxl.layer_names(MRSAConfig())
    assert sdxl.layer_names(MRSAConfig(blocks=(4,))) == tuple(blocks[4])
    assert sdxl.layer_names(MRSAConfig(layers=[layers[-1]])) == (layers[-1],)


def test_sdxl_plain_equals_diffusers(sdxl):
    ours = sdxl.generate(["a cube", "a hat"], [3, 4], None, **COMMON)
    theirs = sdxl.pipe(
        ["a cube", "a hat"],
        negative_prompt=[DEFAULT_NEGATIVE_PROMPT] * 2,
        guidance_scale=7.5,  # the engine's default (the paper's); diffusers' SDXL default is 5
        num_inference_steps=STEPS,
        generator=[torch.Generator("cpu").manual_seed(s) for s in (3, 4)],
        output_type="latent",
        **SIZE,
    ).images
    assert torch.allclose(ours, theirs, atol=ATOL), (ours - theirs).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("n,sf,null_ref", [(1, 1.0, False), (2, 0.3, True)])
def test_sdxl_cached_inline_and_release_agree(sdxl, release_pipe, concepts, n, sf, null_ref):
    refs = concepts[:n]
    mrsa = MRSAConfig(blocks=(3, 4), style_fidelity=sf, null_ref_prompts=null_ref)
    kv = sdxl.prepare_references(refs, num_inference_steps=STEPS, reference_seed=2, mrsa=mrsa, **SIZE)
    assert kv.meta["layers"] == list(sdxl.layer_names())
    prompts, seeds = ["a red cube wearing a hat", "a cube"], [5, 6]
    cached = sdxl.generate(prompts, seeds, kv, **COMMON)
    inline = sdxl.generate(prompts, seeds, refs, reference_seed=2, mrsa=mrsa, **COMMON)
    plain = sdxl.generate(prompts, seeds, None, **COMMON)
    assert torch.allclose(cached, inline, atol=ATOL), (cached - inline).abs().max()
    assert (cached - plain).abs().max() > 1e-3, "MRSA had no effect"
    expected = release(
        sdxl,
        refs,
        prompts[0],
        seeds[0],
        mrsa=mrsa,
        scheduler=release_pipe.scheduler,
        reference_seed=2,
        style_fidelity=sf,
        null_ref_prompts=null_ref,
    )
    assert torch.allclose(cached[:1], expected, atol=ATOL), (cached[:1] - expected).abs().max()


def test_sdxl_with_its_own_scheduler_loaded_as_users_load_it(sdxl_dir, concepts):
    """A named scheduler (the checkpoint's Euler) against the oracle on ``StableDiffusionXLPipeline.from_pretrained``
    as a user loads it, with the scheduler that load gives; and the release's DDIM handed to that pipeline
    keeps steps_offset 0 (SDXL's ``__init__`` has no rewrite; the default is the SD script's sampler)."""
    from diffusers import StableDiffusionXLPipeline

    users = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))
    assert type(users.scheduler).__name__ == "EulerDiscreteScheduler"
    gen = FreeCustomGenerator.from_pretrained(str(sdxl_dir), device="cpu", scheduler="EulerDiscreteScheduler")
    refs = concepts[:2]
    kv = gen.prepare_references(refs, num_inference_steps=STEPS, reference_seed=4, **SIZE)
    cached = gen.generate("a cube", [6], kv, **COMMON)
    expected = release_generate(
        users,
        gen.layer_names(),
        refs,
        "a cube",
        6,
        num_inference_steps=STEPS,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
        reference_seed=4,
        **SIZE,
    )
    assert torch.allclose(cached, expected, atol=ATOL), (cached - expected).abs().max()
    assert release_pipeline(sdxl_dir, StableDiffusionXLPipeline).scheduler.config.steps_offset == 0


def test_sdxl_kv_are_identified_by_size(sdxl, concepts):
    from freecustom_core import ReferenceKVError

    kv = sdxl.prepare_references(concepts[:1], num_inference_steps=STEPS, **SIZE)
    with pytest.raises(ReferenceKVError, match="height"):
        sdxl.generate("x", [1], kv, num_inference_steps=STEPS, height=48, width=64, output_type="latent")


@pytest.mark.slow
def test_sdxl_controlnet_matches_the_release(sdxl_dir, release_pipe, tmp_path, concepts):
    from diffusers import StableDiffusionXLControlNetPipeline

    cn_dir = build_tiny_controlnet(sdxl_dir, tmp_path / "cn", seed=3)
    gen = FreeCustomGenerator.from_pretrained(str(sdxl_dir), controlnet=str(cn_dir), device="cpu")
    assert isinstance(gen.pipe, StableDiffusionXLControlNetPipeline)
    refs, control = concepts[:1], control_picture(0)
    cn = dict(control_image=control, controlnet_conditioning_scale=0.7)
    plain = gen.generate("a cube", [8], None, **cn, **COMMON)
    theirs = gen.pipe(
        "a cube",
        image=control,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
        guidance_scale=7.5,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(8),
        controlnet_conditioning_scale=0.7,
        output_type="latent",
        **SIZE,
    ).images
    assert torch.allclose(plain, theirs, atol=ATOL), (plain - theirs).abs().max()
    for control_references in (False, True):
        prepare = dict(cn) if control_references else {}
        kv = gen.prepare_references(refs, num_inference_steps=STEPS, **SIZE, **prepare)
        cached = gen.generate("a cube", [8], kv, control_references=control_references, **cn, **COMMON)
        inline = gen.generate("a cube", [8], refs, control_references=control_references, **cn, **COMMON)
        assert torch.allclose(cached, inline, atol=ATOL), (cached - inline).abs().max()
        assert (cached - plain).abs().max() > 1e-3
        expected = release(
            gen,
            refs,
            "a cube",
            8,
            control_references=control_references,
            scheduler=release_pipe.scheduler,
            **cn,
        )
        assert torch.allclose(cached, expected, atol=ATOL), (cached - expected).abs().max()


def test_fingerprint_covers_the_second_text_encoder(sdxl):
    before = sdxl.model_fingerprint
    weight = next(sdxl.pipe.text_encoder_2.parameters())
    original = weight.detach().clone()
    with torch.no_grad():
        weight.view(-1)[0] += 0.25  # the first value is one of the fingerprint's samples
        changed = sdxl.model_fingerprint
        weight.copy_(original)
    assert changed != before and sdxl.model_fingerprint == before


# ---- a single .safetensors file in the original (SGM) layout


@pytest.fixture(scope="module")
def sdxl_file(sdxl, tmp_path_factory):
    """The tiny SDXL as one SGM-layout file (the CLIP ViT-L and OpenCLIP ViT-bigG text encoders' names)."""
    return export_single_file(sdxl.pipe, tmp_path_factory.mktemp("sdxl-file") / "tiny-sdxl.safetensors")


def test_sdxl_single_file_with_its_config_is_the_folder_model(offline, sdxl, sdxl_dir, sdxl_file, concepts):
    from diffusers import StableDiffusionXLPipeline

    gen = FreeCustomGenerator.from_pretrained(str(sdxl_file), config=str(sdxl_dir), device="cpu")
    assert isinstance(gen.pipe, StableDiffusionXLPipeline) and gen.default_size == 1024
    assert gen.model_fingerprint == sdxl.model_fingerprint  # all four parts, text_encoder_2 included
    assert gen.scheduler_identity() == sdxl.scheduler_identity()  # the release's DDIM either way
    kv = sdxl.prepare_references(concepts[:1], num_inference_steps=STEPS, reference_seed=3, **SIZE)
    image = dict(num_inference_steps=STEPS, output_type="np", **SIZE)
    ours, theirs = (g.generate("a red cube", [5], kv, **image) for g in (gen, sdxl))
    assert ours.shape == (1, 64, 64, 3) and (ours == theirs).all()  # the folder's K/V fit the file's model
    # what `run --model FILE --model-config DIR` reads on the driver and loads in its workers
    assert model_family(str(sdxl_file), str(sdxl_dir)).name == "sdxl"
    worker = load_generator(str(sdxl_file), model_config=str(sdxl_dir), device="cpu")
    assert worker.model_fingerprint == sdxl.model_fingerprint and worker.family == "sdxl"


def test_sdxl_single_file_keeps_the_vae_upcast(offline, sdxl_dir, sdxl_file):
    pipe = load_sdxl_pipeline(str(sdxl_file), config=str(sdxl_dir), torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32  # force_upcast
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_sdxl_single_file_refusals(offline, sdxl_dir, sdxl_file, tiny_model_dir, generator, tmp_path):
    with pytest.raises(ValueError, match=r"is an SDXL checkpoint .*give config= \(run --model-config\) a local SDXL"):
        FreeCustomGenerator.from_pretrained(str(sdxl_file), device="cpu")  # SD1.5's shipped configs would not fit
    with pytest.raises(ValueError, match=r"is not an SDXL pipeline's folder but .* is an SDXL checkpoint"):
        FreeCustomGenerator.from_pretrained(str(sdxl_file), config=str(tiny_model_dir), device="cpu")
    sd15_file = export_single_file(generator.pipe, tmp_path / "sd15.safetensors")
    with pytest.raises(ValueError, match=r"is an SDXL pipeline's folder but .* is not an SDXL checkpoint"):
        FreeCustomGenerator.from_pretrained(str(sd15_file), config=str(sdxl_dir), device="cpu")
    with pytest.raises(ValueError, match="for single-file checkpoints"):
        load_sdxl_pipeline(str(sdxl_dir), config=str(sdxl_dir))
