"""Attention maps (generate(..., attention_maps=True)) on the tiny SD1.5-topology model.

Checked: shape and range, equality with an explicit softmax recomputed from one layer's inputs,
more mass for a concept of higher weight, the images unchanged by asking for maps, the CLI's
``customize --save-attention`` file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from freecustom_core import MRSAConfig
from freecustom_core.attention_maps import maps_image
from freecustom_core.layers import token_grid
from pipeline.cli import app
from tests.conftest import draw_concept

STEPS = 3
SIZE = dict(height=64, width=48)  # a non-square latent grid (8 x 6): rows and columns cannot be swapped
PROMPTS, SEEDS = ["a red cube wearing a blue hat", "a cube on grass"], [11, 12]


@pytest.mark.slow
def test_maps_shape_range_and_images_unchanged(generator, concepts):
    kv = generator.prepare_references(concepts, num_inference_steps=STEPS, reference_seed=7, **SIZE)
    common = dict(num_inference_steps=STEPS, output_type="np", **SIZE)
    plain = generator.generate(PROMPTS, SEEDS, kv, **common)
    images, maps = generator.generate(PROMPTS, SEEDS, kv, attention_maps=True, **common)
    assert np.array_equal(plain, images)  # bit for bit: asking for maps does not touch the images
    assert maps.shape == (2, 3, 8, 6) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert (maps.sum(dim=1) <= 1 + 1e-6).all()  # the image's own keys take the rest
    assert maps.std() > 1e-4  # a map, not a constant
    # the inline path (references computed inside the loop) gives the same maps
    _, inline = generator.generate(
        PROMPTS, SEEDS, concepts, reference_seed=7, attention_maps=True, **common
    )
    assert torch.allclose(maps, inline, atol=1e-5)
    # batching does not change a target's map
    _, alone = generator.generate(PROMPTS[1:], SEEDS[1:], kv, attention_maps=True, **common)
    assert torch.allclose(maps[1:], alone, atol=1e-5)


def test_maps_refused_without_references(generator):
    with pytest.raises(ValueError, match="attention_maps"):
        generator.generate("x", 1, None, num_inference_steps=2, attention_maps=True, **SIZE)


def _explicit_mass(attn, hidden, k_ref, bias, counts, latent_hw):
    """The mass per concept from an explicit softmax over [own keys, reference keys]: (B, N, h, w)."""
    heads = attn.heads
    q, k = attn.to_q(hidden), attn.to_k(hidden)  # (B, L, C)
    b, length, c = q.shape
    q = q.view(b, length, heads, c // heads).transpose(1, 2)  # (B, heads, L, d)
    k = k.view(b, length, heads, c // heads).transpose(1, 2)
    keys = torch.cat([k, k_ref.expand(b, -1, -1, -1)], dim=2)  # (B, heads, L + Lr, d)
    logits = q @ keys.transpose(-1, -2) / (c // heads) ** 0.5
    logits[..., length:] += bias
    weights = torch.softmax(logits, dim=-1)
    edges = np.cumsum([length, *counts])
    mass = torch.stack([weights[..., a:z].sum(-1).mean(1) for a, z in zip(edges[:-1], edges[1:], strict=True)], dim=1)
    gh, gw = token_grid(length, latent_hw)
    grid = mass.view(b, len(counts), gh, gw)
    return F.interpolate(grid, size=latent_hw, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("layer_index", [0, -1])  # a half-resolution layer (resized) and a full-resolution one
def test_mass_equals_an_explicit_softmax_on_one_layer(generator, concepts, layer_index):
    layer = generator.layer_names()[layer_index]
    step = 1
    mrsa = MRSAConfig(layers=(layer,), start_step=step, end_step=step + 1)  # one layer, one step
    kv = generator.prepare_references(
        concepts[:2], num_inference_steps=STEPS, reference_seed=3, mrsa=mrsa, **SIZE
    )
    attn = generator.unet.get_submodule(layer)
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _, maps = generator.generate(
            PROMPTS, SEEDS, kv, num_inference_steps=STEPS, attention_maps=True, output_type="latent", **SIZE
        )
    finally:
        handle.remove()
    assert len(seen) == STEPS
    hidden = seen[step][2:]  # the batch is [uncond (2), cond (2)]: the conditional branch
    layer_kv = kv.at_step(step)[layer]
    with torch.inference_mode():
        expected = _explicit_mass(attn, hidden, layer_kv.k, layer_kv.bias, kv.meta["tokens"][layer], (8, 6))
    assert torch.allclose(maps, expected, atol=1e-5), (maps - expected).abs().max()


@pytest.mark.slow
def test_higher_weight_receives_more_mass(generator):
    # the same image and mask twice, weights 3.0 and 0.3: only the bias differs
    heavy = draw_concept("red", (6, 6, 30, 30), "a red cube", weight=3.0)
    light = draw_concept("red", (6, 6, 30, 30), "a red cube", weight=0.3)
    common = dict(num_inference_steps=STEPS, output_type="latent", attention_maps=True, **SIZE)
    _, maps = generator.generate(PROMPTS, SEEDS, [heavy, light], **common)
    per_concept = maps.mean(dim=(2, 3))  # (targets, concepts)
    assert (per_concept[:, 0] > 5 * per_concept[:, 1]).all(), per_concept  # exp(2.7) ~ 15x per token
    _, swapped = generator.generate(PROMPTS, SEEDS, [light, heavy], **common)
    assert (swapped.mean(dim=(2, 3))[:, 1] > 5 * swapped.mean(dim=(2, 3))[:, 0]).all()


def test_maps_image_panels_side_by_side():
    maps = torch.zeros(2, 8, 6)
    maps[0, 0, 0] = 1.0  # concept 0: top-left white
    maps[1] = 0.5  # concept 1: orange-ish everywhere
    sheet = maps_image(maps, (48, 64))
    assert sheet.size == (2 * 48 + 4, 64)
    px = np.asarray(sheet)
    assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[-1, 0]) == (0, 0, 0)
    assert tuple(px[10, 48 + 1]) == (255, 255, 255)  # the gap
    assert tuple(px[10, 52 + 10]) == (255, 128, 0)  # 0.5: red full, green half


def test_customize_save_attention(tmp_path, tiny_model_dir, samples_dir):
    out = tmp_path / "out"
    case = str(samples_dir / "cat_necklace")
    args = ["customize", case, "-o", str(out), "--model", str(tiny_model_dir), "--seed", "5"]
    result = CliRunner().invoke(app, [*args, "--steps", "2", "--size", "64", "--save-attention"])
    assert result.exit_code == 0, result.output
    attn = Image.open(out / "seed5.attn.png")
    assert attn.size == (2 * 64 + 4, 64)  # cat_necklace: two concepts, one panel each
    assert Image.open(out / "seed5.png").size == (64, 64)
