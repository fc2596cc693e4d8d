"""FreeCustom on FLUX.1 (issue 16): cached == inline == the in-batch definition (tests/oracle_flux.py), within 1e-4.

A tiny random FLUX.1-topology pipeline (tests/flux_tiny.py: double- and single-stream blocks, CLIP
and T5 encoders, an 8x VAE with shift and scale, flow matching with dynamic shift) is saved and
loaded back through ``FluxPipeline.from_pretrained``. 128x128 images: an 8x8 image-token grid.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from freecustom_core import ConceptTooSmallError, MRSAConfig, ReferenceKV, ReferenceKVError
from freecustom_core.flux import FluxFreeCustomGenerator
from freecustom_core.flux_attention import attention_layers, default_blocks
from freecustom_core.flux_reference import image_ids
from freecustom_core.topology import FREECUS_VITAL_LAYERS
from tests.conftest import draw_concept
from tests.flux_tiny import build_tiny_flux
from tests.oracle_flux import in_batch_generate

STEPS = 3
ATOL = 1e-4
SEQ = 32  # T5 tokens: FLUX.1's 512 would only make the tiny test slower
SIZE = dict(height=128, width=128)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"), seed=0)


@pytest.fixture(scope="module")
def flux(flux_dir):
    return FluxFreeCustomGenerator.from_pretrained(str(flux_dir), torch_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def flux_concepts():
    return [
        draw_concept("red", (6, 6, 30, 30), "a red cube"),
        draw_concept("blue", (20, 4, 44, 20), "a blue hat", ellipse=True, weight=2.0),
        draw_concept("green", (0, 30, 47, 47), "green grass", weight=3.5),
    ]


def _common(**overrides):
    return dict(num_inference_steps=STEPS, max_sequence_length=SEQ, **SIZE) | overrides


def test_plain_equals_flux_pipeline(flux):
    """references=None is FluxPipeline with one CPU generator per seed, bit for bit."""
    from diffusers import FluxPipeline

    prompts, seeds = ["a dog on the grass", "a hat"], [3, 4]
    ours = flux.generate(prompts, seeds, None, output_type="latent", guidance_scale=2.5, **_common())
    theirs = flux.pipe(
        prompts,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="latent",
        guidance_scale=2.5,
        **_common(),
    ).images
    assert torch.equal(ours, FluxPipeline._unpack_latents(theirs, 128, 128, 8))
    images = flux.generate(prompts[0], [3], None, **_common(num_inference_steps=1))
    assert images[0].size == (128, 128)


CASES = [
    # (n_concepts, layers (None: the default), null_ref_prompts, (height, width), start_step, end_step)
    (1, None, False, (128, 128), 0, None),
    (2, ("transformer_blocks.1.attn", "single_transformer_blocks.2.attn"), False, (128, 128), 0, None),
    (3, None, True, (128, 128), 1, None),
    (2, ("single_transformer_blocks.0.attn",), False, (96, 128), 0, 2),
]


@pytest.mark.slow
@pytest.mark.parametrize("n,layers,null_ref,size,start,end", CASES)
def test_cached_inline_and_in_batch_agree(flux, flux_concepts, n, layers, null_ref, size, start, end):
    height, width = size
    refs = flux_concepts[:n]
    mrsa = flux.default_mrsa(null_ref_prompts=null_ref, start_step=start, end_step=end)
    if layers is not None:
        mrsa = MRSAConfig(layers=layers, null_ref_prompts=null_ref, start_step=start, end_step=end)
    common = _common(height=height, width=width, output_type="latent", guidance_scale=3.0)
    prompts, seeds = ["a red cube wearing a blue hat", "a cube on grass"], [11, 12]

    kv = flux.prepare_references(
        refs,
        reference_seed=7,
        mrsa=mrsa,
        num_inference_steps=STEPS,
        height=height,
        width=width,
        guidance_scale=3.0,
        max_sequence_length=SEQ,
    )
    cached = flux.generate(prompts, seeds, kv, **common)
    inline = flux.generate(prompts, seeds, refs, reference_seed=7, mrsa=mrsa, **common)
    plain = flux.generate(prompts, seeds, None, **common)
    assert torch.allclose(cached, inline, atol=ATOL), (cached - inline).abs().max()
    assert (cached - plain).abs().max() > 1e-3, "MRSA had no effect: the test would not detect a no-op"
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        oracle = in_batch_generate(
            flux.pipe,
            flux.layer_names(mrsa),
            refs,
            prompt,
            seed,
            num_inference_steps=STEPS,
            height=height,
            width=width,
            guidance_scale=3.0,
            max_sequence_length=SEQ,
            reference_seed=7,
            null_ref_prompts=null_ref,
            start_step=start,
            end_step=end,
        )
        assert torch.allclose(cached[i : i + 1], oracle, atol=ATOL), (cached[i : i + 1] - oracle).abs().max()


def test_cache_file_round_trip_and_fits(flux, flux_concepts, tmp_path):
    """The SD file format and header; reused across prompts and seeds; another setting is refused."""
    kv = flux.prepare_references(flux_concepts[:2], reference_seed=5, **_common())
    kv.save(tmp_path / "set.safetensors")
    loaded = ReferenceKV.load(tmp_path / "set.safetensors")
    assert loaded.meta["family"] == "flux" and loaded.meta["reference_positions"] == "same"
    assert loaded.layers == flux.layer_names() and loaded.reference_seed == 5
    # pruning: only in-mask image tokens are kept
    assert 0 < loaded.nbytes < 0.6 * loaded.dense_nbytes
    a = flux.generate(["a cube", "a hat"], [1, 2], kv, output_type="latent", **_common())
    b = flux.generate(["a hat", "a cube"], [2, 1], loaded, output_type="latent", **_common())
    assert torch.equal(a, b.flip(0))
    with pytest.raises(ReferenceKVError, match="guidance_scale"):
        flux.generate("a cube", [1], loaded, guidance_scale=5.0, **_common())
    with pytest.raises(ReferenceKVError, match="max_sequence_length"):
        flux.generate("a cube", [1], loaded, **_common(max_sequence_length=16))
    with pytest.raises(ReferenceKVError, match="reference_seed"):
        flux.generate("a cube", [1], loaded, reference_seed=6, **_common())
    with pytest.raises(ReferenceKVError, match="reference_positions"):
        flux.generate("a cube", [1], loaded, reference_positions="shifted", **_common())


def test_target_is_independent_of_its_batch(flux, flux_concepts):
    kv = flux.prepare_references(flux_concepts[:2], **_common())
    prompts, seeds = ["a red cube", "a blue hat on a table", "grass"], [3, 4, 5]
    together = flux.generate(prompts, seeds, kv, output_type="latent", **_common())
    alone = torch.cat(
        [
            flux.generate(p, [s], kv, output_type="latent", **_common())
            for p, s in zip(prompts, seeds, strict=True)
        ]
    )
    assert torch.allclose(together, alone, atol=ATOL)
    split = flux.generate(prompts, seeds, kv, output_type="latent", batch_size=2, **_common())
    assert torch.allclose(together, split, atol=ATOL)
    assert (together[0] - together[1]).abs().max() > 1e-2


@pytest.mark.parametrize("positions", ["same", "shifted"])
def test_reference_rope_positions(flux, flux_concepts, positions):
    """The captured keys are the references' image-token keys rotated by RoPE at the chosen grid positions."""
    from diffusers.models.embeddings import apply_rotary_emb

    layer = "single_transformer_blocks.1.attn"
    mrsa = MRSAConfig(layers=("transformer_blocks.0.attn", layer), end_step=1)
    refs = flux_concepts[:2]
    seen = {}

    def record(
        module, args, kwargs
    ):  # the reference pass's input to the layer (computed apart from the engine)
        seen["hidden"] = kwargs["hidden_states"]
        seen["rope"] = kwargs["image_rotary_emb"]

    attn = flux.transformer.get_submodule(layer)
    handle = attn.register_forward_pre_hook(record, with_kwargs=True)
    try:
        kv = flux.prepare_references(refs, mrsa=mrsa, reference_positions=positions, **_common())
    finally:
        handle.remove()
    gh, gw = 8, 8
    torch.set_grad_enabled(False)  # inference tensors from the reference pass go through the layer again
    ids = torch.zeros(gh, gw, 3)
    ids[..., 1] = torch.arange(gh)[:, None]
    ids[..., 2] = torch.arange(gw)[None, :] + (gw if positions == "shifted" else 0)
    ids = ids.reshape(-1, 3)
    assert torch.equal(image_ids((gh, gw), shifted=positions == "shifted"), ids)
    cos, sin = flux.transformer.pos_embed(ids)
    n_img = gh * gw
    assert torch.allclose(seen["rope"][0][-n_img:], cos) and torch.allclose(seen["rope"][1][-n_img:], sin)
    # keys of the image tokens, before RoPE, from the layer's own weights; then rotated at the expected ids
    key = attn.norm_k(attn.to_k(seen["hidden"]).unflatten(-1, (-1, attn.head_dim)))[
        :, -n_img:
    ]  # (N, L, h, d)
    key = apply_rotary_emb(key, (cos, sin), sequence_dim=1).transpose(1, 2)  # (N, heads, L, d)
    masks = [c.mask_array() for c in refs]
    inside = torch.cat(
        [
            torch.nn.functional.interpolate(
                torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(128, 128)),
                size=(gh, gw),
            ).reshape(-1)
            >= 0.5
            for m in masks
        ]
    )
    expected = key.transpose(0, 1).reshape(key.shape[1], -1, key.shape[-1])[:, inside]  # (heads, Lr, d)
    torch.set_grad_enabled(True)
    assert torch.allclose(kv.k[layer][0], expected, atol=1e-5)
    # positions matter: the other choice gives other keys, and cached == inline holds for it too
    other = flux.prepare_references(
        refs, mrsa=mrsa, reference_positions="same" if positions == "shifted" else "shifted", **_common()
    )
    assert (other.k[layer][0] - kv.k[layer][0]).abs().max() > 1e-3
    cached = flux.generate("a cube", [2], kv, output_type="latent", **_common())
    inline = flux.generate(
        "a cube", [2], refs, mrsa=mrsa, reference_positions=positions, output_type="latent", **_common()
    )
    assert torch.allclose(cached, inline, atol=ATOL)


def test_default_layers_are_freecus_vital_layers(flux):
    flux1 = SimpleNamespace(transformer_blocks=[None] * 19, single_transformer_blocks=[None] * 38)
    names = [attention_layers(flux1)[i] for i in default_blocks(flux1)]
    assert names == [
        "transformer_blocks.0.attn",
        "transformer_blocks.1.attn",
        "transformer_blocks.2.attn",
        "transformer_blocks.17.attn",
        "transformer_blocks.18.attn",
        "single_transformer_blocks.6.attn",
        "single_transformer_blocks.9.attn",
        "single_transformer_blocks.34.attn",
        "single_transformer_blocks.35.attn",
        "single_transformer_blocks.37.attn",
    ]
    assert default_blocks(flux1) == FREECUS_VITAL_LAYERS
    # the tiny model (2 double, 4 single): the same relative depths
    assert flux.layer_names() == (
        "transformer_blocks.0.attn",
        "transformer_blocks.1.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
        "single_transformer_blocks.3.attn",
    )
    assert flux.layer_names(MRSAConfig(blocks=(1, 5))) == (
        "transformer_blocks.1.attn",
        "single_transformer_blocks.3.attn",
    )


def test_bad_input_is_refused_clearly(flux, flux_concepts):
    refs = flux_concepts[:1]
    with pytest.raises(ValueError, match="style_fidelity=0.3"):
        flux.prepare_references(refs, mrsa=flux.default_mrsa(style_fidelity=0.3), **_common())
    with pytest.raises(ValueError, match="mask_mode"):
        flux.generate("a", [1], refs, mrsa=flux.default_mrsa(mask_mode="scale"), **_common())
    with pytest.raises(ValueError, match="not attention layers"):
        flux.layer_names(MRSAConfig(layers=("transformer_blocks.0.attn1",)))
    with pytest.raises(ValueError, match=r"blocks=\(9,\).*6 attention layers"):
        flux.layer_names(MRSAConfig(blocks=(9,)))
    with pytest.raises(ValueError, match="negative_prompt"):
        flux.generate("a", [1], None, negative_prompt="blurry", **_common())
    with pytest.raises(ValueError, match="multiples of 16"):
        flux.generate("a", [1], None, **_common(height=120))
    with pytest.raises(ValueError, match="reference_positions"):
        flux.prepare_references(refs, reference_positions="left", **_common())
    tiny = draw_concept("red", (1, 1, 4, 4), "a speck")  # between the pixels the 8x8 token grid samples
    with pytest.raises(ConceptTooSmallError, match=r"concepts\[1\].*8x8"):
        flux.prepare_references([refs[0], tiny], **_common())


@pytest.mark.slow
def test_schnell_layout_without_guidance(tmp_path_factory, flux_concepts):
    """FLUX.1 [schnell]'s layout (no guidance embedding): plain is FluxPipeline; guidance is not in the K/V identity."""
    from diffusers import FluxPipeline

    folder = build_tiny_flux(tmp_path_factory.mktemp("tiny-flux-schnell"), seed=1, guidance_embeds=False)
    gen = FluxFreeCustomGenerator.from_pretrained(str(folder), torch_dtype=torch.float32, device="cpu")
    plain = gen.generate("a dog", [1], None, output_type="latent", **_common())
    theirs = gen.pipe(
        "a dog", generator=[torch.Generator("cpu").manual_seed(1)], output_type="latent", **_common()
    ).images
    assert torch.equal(plain, FluxPipeline._unpack_latents(theirs, 128, 128, 8))
    kv = gen.prepare_references(flux_concepts[:2], **_common())
    assert kv.meta["guidance_scale"] is None
    cached = gen.generate("a dog", [1], kv, guidance_scale=0.0, output_type="latent", **_common())
    oracle = in_batch_generate(
        gen.pipe, gen.layer_names(), flux_concepts[:2], "a dog", 1, num_inference_steps=STEPS, **SIZE
    )
    assert torch.allclose(cached, oracle, atol=ATOL)


def test_checkpoint_family_from_model_index(flux_dir, tiny_model_dir):
    """What the pipeline dispatches ``--model`` on: the checkpoint's pipeline class, read without weights."""
    from freecustom_core.flux_loading import pipeline_class_name

    assert pipeline_class_name(str(flux_dir)) == "FluxPipeline"
    assert pipeline_class_name(str(tiny_model_dir)) == "StableDiffusionPipeline"
    assert pipeline_class_name("flux1-dev.safetensors") is None
