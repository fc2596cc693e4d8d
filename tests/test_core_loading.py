"""The base models users bring: a diffusers folder, a single .safetensors checkpoint (offline), SD2.x v-prediction.

Each model is a tiny random one the test builds and loads back through diffusers' real loaders
(``from_pretrained`` / ``from_single_file``); single files are read with ``HF_HUB_OFFLINE=1`` and any
socket connection fails the test (the ``offline`` fixture, conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from freecustom_core import DEFAULT_NEGATIVE_PROMPT, FreeCustomGenerator
from freecustom_core.loading import SD15_CONFIG, load_pipeline
from freecustom_core.schedulers import RELEASE_DDIM
from stages.reference.models import BUILTIN_CONFIG, load_generator, model_source
from tests.ldm_export import export_single_file, tensors_equal
from tests.model_variants import build_full_size_sd15_single_file, build_tiny_sd2
from tests.oracle import release_generate

COMMON = dict(num_inference_steps=2, height=64, width=64, output_type="latent")


@pytest.fixture(scope="module")
def single_file(tiny_model_dir, tmp_path_factory):
    """The tiny SD1.5 model as one original-layout (LDM) .safetensors file."""
    pipe = load_pipeline(str(tiny_model_dir))
    return export_single_file(pipe, tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors")


def test_single_file_with_a_local_config_is_the_folder_model(
    offline, single_file, tiny_model_dir, generator, concepts
):
    gen = FreeCustomGenerator.from_pretrained(str(single_file), config=str(tiny_model_dir), device="cpu")
    for part in ("unet", "vae", "text_encoder"):
        assert tensors_equal(getattr(gen.pipe, part), getattr(generator.pipe, part)), part
    assert gen.pipe.tokenizer("a red cube").input_ids == generator.pipe.tokenizer("a red cube").input_ids
    assert gen.model_fingerprint == generator.model_fingerprint  # same weights, same identity
    assert gen.scheduler_identity() == generator.scheduler_identity()  # the release's DDIM either way
    # Both loaders leave the weights in memory-mapped files at offsets of their own; with one thread (as
    # under pytest-xdist on 2 cores) the CPU kernels then sum in another order for differently aligned
    # operands (5e-6 apart after two steps). Fresh copies of the same weights compute bit for bit alike.
    folder = FreeCustomGenerator.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32, device="cpu")
    for model in (gen, folder):
        _copy_weights(model.pipe)
    kv = folder.prepare_references(concepts[:2], num_inference_steps=2, height=64, width=64)
    torch.testing.assert_close(
        gen.generate("a cube", [5], kv, **COMMON),
        folder.generate("a cube", [5], kv, **COMMON),
        atol=0,
        rtol=0,
    )  # the folder's K/V fit the single file's model


def _copy_weights(pipe) -> None:
    """Every weight of the pipeline's models moved into freshly allocated (aligned) memory."""
    with torch.no_grad():
        for part in ("unet", "vae", "text_encoder"):
            for tensor in (*getattr(pipe, part).parameters(), *getattr(pipe, part).buffers()):
                tensor.data = tensor.data.clone()


def test_single_file_through_the_stage_loader_records_its_source(offline, single_file, tiny_model_dir):
    gen = load_generator(str(single_file), model_config=str(tiny_model_dir), device="cpu")
    assert type(gen.pipe.unet).__name__ == "UNet2DConditionModel"
    assert model_source(str(single_file), str(tiny_model_dir)) == {
        "kind": "single_file",
        "name": str(single_file),
        "config": str(tiny_model_dir),
    }
    assert model_source(str(single_file))["config"] == BUILTIN_CONFIG
    assert model_source(str(tiny_model_dir)) == {"kind": "folder", "name": str(tiny_model_dir)}
    assert model_source("stable-diffusion-v1-5/stable-diffusion-v1-5")["kind"] == "hub"


def test_single_file_refusals(offline, single_file, tiny_model_dir, tmp_path):
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"must be \.safetensors"):
        load_pipeline(str(pickled))
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_pipeline(str(junk))
    with pytest.raises(ValueError, match="not a diffusers config folder"):
        load_pipeline(str(single_file), config=str(tmp_path))
    with pytest.raises(ValueError, match="for single-file checkpoints"):
        load_pipeline(str(tiny_model_dir), config=str(tiny_model_dir))


def test_shipped_sd15_config_is_sd15():
    """The configs the package ships give SD1.5's parameter counts, and its tokenizer is CLIP's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(SD15_CONFIG, subfolder="unet")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG, subfolder="text_encoder"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    tokenizer = CLIPTokenizer.from_pretrained(SD15_CONFIG, subfolder="tokenizer")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert not any(p.suffix in (".safetensors", ".bin", ".ckpt") for p in SD15_CONFIG.rglob("*"))


@pytest.mark.slow
def test_full_size_single_file_loads_with_the_shipped_config(offline, tmp_path):
    """No --model-config: SD1.5's own configs (shipped) read a full-size SD1.5 file, offline."""
    path = build_full_size_sd15_single_file(tmp_path / "sd15.safetensors")
    gen = FreeCustomGenerator.from_pretrained(str(path), device="cpu", torch_dtype=torch.float16)
    assert gen.pipe.unet.config.cross_attention_dim == 768 and gen.pipe.tokenizer.vocab_size == 49408
    out = gen.generate(
        "a cat", [1], None, num_inference_steps=1, height=64, width=64, guidance_scale=0, output_type="latent"
    )
    assert torch.isfinite(out).all()


# ---- SD2.x: v-prediction at 768 pixels


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory):
    return build_tiny_sd2(tmp_path_factory.mktemp("tiny-sd2"), seed=0)


@pytest.fixture(scope="module")
def sd2(sd2_dir):
    return FreeCustomGenerator.from_pretrained(str(sd2_dir), device="cpu")


def test_sd2_release_ddim_keeps_v_prediction(sd2):
    config = sd2.pipe.scheduler.config
    assert type(sd2.pipe.scheduler).__name__ == "DDIMScheduler"
    assert config.prediction_type == "v_prediction" and {k: config[k] for k in RELEASE_DDIM} == RELEASE_DDIM
    assert sd2.scheduler_identity()["config"]["prediction_type"] == "v_prediction"
    assert sd2.unet.config.upcast_attention and sd2.unet.config.use_linear_projection


def test_sd2_cached_equals_inline_equals_release(sd2, concepts):
    refs = concepts[:2]
    kv = sd2.prepare_references(refs, num_inference_steps=2, height=64, width=64, reference_seed=4)
    cached = sd2.generate(["a cube", "a hat"], [7, 8], kv, **COMMON)
    inline = sd2.generate(["a cube", "a hat"], [7, 8], refs, reference_seed=4, **COMMON)
    torch.testing.assert_close(cached, inline, atol=1e-5, rtol=1e-5)
    release = release_generate(
        sd2.pipe,
        sd2.layer_names(),
        refs,
        "a hat",
        8,
        num_inference_steps=2,
        height=64,
        width=64,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
        reference_seed=4,
    )
    torch.testing.assert_close(cached[1:], release, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sd2_generates_at_768(sd2, concepts):
    kv = sd2.prepare_references(concepts[:1], num_inference_steps=1, height=768, width=768)
    image = sd2.generate("a cube", [1], kv, num_inference_steps=1, height=768, width=768, output_type="pil")[
        0
    ]
    assert image.size == (768, 768)


def test_sd2_prediction_type_changes_the_image(sd2, sd2_dir, concepts):
    """v_prediction is used, not ignored: the same weights read as epsilon give another latent."""
    eps = FreeCustomGenerator.from_pretrained(
        str(sd2_dir), device="cpu", scheduler="release:prediction_type=epsilon"
    )
    kv_v = sd2.prepare_references(concepts[:1], num_inference_steps=2, height=64, width=64)
    kv_e = eps.prepare_references(concepts[:1], num_inference_steps=2, height=64, width=64)
    a, b = sd2.generate("a cube", [1], kv_v, **COMMON), eps.generate("a cube", [1], kv_e, **COMMON)
    assert (a - b).abs().max() > 1e-2
