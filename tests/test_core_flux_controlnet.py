"""FreeCustom on FLUX.1 with a FLUX ControlNet (issue 16): plain == FluxControlNetPipeline; with references,
cached == inline == the in-batch definition (tests/oracle_flux.py) with ControlNet residuals on the target row.

Tiny random FLUX.1-topology pipeline and ControlNets (tests/flux_tiny.py), saved and loaded back through
``FluxPipeline.from_pretrained`` / ``FluxControlNetModel.from_pretrained``; 128x128 images, 3 steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from freecustom_core.controlnet import image_digest
from freecustom_core.flux import FluxFreeCustomGenerator
from freecustom_core.flux_controlnet import check_flux_controlnet, load_flux_controlnet, with_flux_controlnet
from freecustom_core.flux_reference import unpack
from tests.conftest import draw_concept
from tests.flux_tiny import build_tiny_flux, build_tiny_flux_controlnet
from tests.oracle_flux import in_batch_generate

STEPS = 3
ATOL = 1e-4
SEQ = 32
COMMON = dict(num_inference_steps=STEPS, max_sequence_length=SEQ, height=128, width=128)


def control_picture(seed: int, size=(80, 112)) -> Image.Image:
    """A control image (not at the generation size: the pipeline's preprocessing resizes it)."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 60).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    x0, y0 = (int(v) for v in rng.integers(5, 30, 2))
    draw.rectangle((x0, y0, x0 + 40, y0 + 50), outline="white", width=4)
    return image


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-flux-cn")
    return {
        # 3 double-stream blocks for 2 XLabs residuals: repeated (0, 1, 0) differs from spread (0, 0, 1)
        "flux": build_tiny_flux(root / "flux", seed=0, num_layers=3),
        "instantx": build_tiny_flux_controlnet(root / "cn-a", seed=0),
        "instantx2": build_tiny_flux_controlnet(root / "cn-b", seed=1, num_single_layers=4),
        "xlabs": build_tiny_flux_controlnet(root / "cn-xlabs", seed=2, num_layers=2, xlabs=True),
    }


@pytest.fixture(scope="module")
def gen(dirs):
    """Loaded as a user does: from_pretrained(model, controlnet=folder)."""
    return FluxFreeCustomGenerator.from_pretrained(
        str(dirs["flux"]), controlnet=str(dirs["instantx"]), torch_dtype=torch.float32, device="cpu"
    )


def _with(gen, dirs, which):
    """The same base components with other ControlNet(s), through from_pipe of a FluxControlNetPipeline."""
    names = [str(dirs[w]) for w in which]
    net = load_flux_controlnet(names if len(names) > 1 else names[0], torch_dtype=torch.float32)
    return FluxFreeCustomGenerator.from_pipe(with_flux_controlnet(gen.pipe, net))


@pytest.fixture(scope="module")
def pictures():
    return [control_picture(1), control_picture(2), control_picture(3)]


@pytest.mark.parametrize("which", [("instantx",), ("instantx", "instantx2"), ("xlabs",)])
def test_plain_equals_flux_controlnet_pipeline(gen, dirs, pictures, which):
    """references=None with a control image is FluxControlNetPipeline with one CPU generator per seed."""
    g = gen if which == ("instantx",) else _with(gen, dirs, which)
    a, b, c = pictures
    if len(which) == 1:
        control, scale = [a, b], 0.7  # one image per prompt
    else:
        control, scale = [[a, b], c], [0.6, 1.3]  # per net: one per prompt, one for all
    prompts, seeds = ["a dog on the grass", "a hat"], [3, 4]
    kw = dict(
        controlnet_conditioning_scale=scale,
        control_guidance_start=0.0,
        control_guidance_end=0.7,  # the ControlNet is off at the last of 3 steps
        guidance_scale=2.5,
        output_type="latent",
        **COMMON,
    )
    ours = g.generate(prompts, seeds, None, control_image=control, **kw)
    theirs = g.pipe(
        prompts, control_image=control, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **kw
    ).images
    theirs = unpack(theirs, (16, 16))
    assert (ours - theirs).abs().max() < ATOL, (ours - theirs).abs().max()
    plain = g.generate(prompts, seeds, None, output_type="latent", guidance_scale=2.5, **COMMON)
    assert (ours - plain).abs().max() > 1e-3, (
        "the ControlNet had no effect: the test would not see its residuals"
    )
    if which == ("instantx",):
        # one image for every prompt == that image given per prompt; the window matters
        one = g.generate(prompts, seeds, None, control_image=a, **kw)
        assert torch.equal(one[0], ours[0]) and (one[1] - ours[1]).abs().max() > 1e-3
        full = g.generate(
            prompts, seeds, None, control_image=control, **(kw | dict(control_guidance_end=1.0))
        )
        assert (full - ours).abs().max() > 1e-4
        images = g.generate(prompts[0], [3], None, control_image=a, **(COMMON | dict(num_inference_steps=1)))
        assert images[0].size == (128, 128)


@pytest.mark.parametrize("which", [("instantx",), ("xlabs",)])
def test_cached_inline_and_in_batch_agree_with_controlnet(gen, dirs, pictures, which):
    """References skip ControlNet: the same K/V serve every control image; targets get the residuals."""
    g = gen if which == ("instantx",) else _with(gen, dirs, which)
    refs = [
        draw_concept("red", (6, 6, 30, 30), "a red cube"),
        draw_concept("blue", (20, 4, 44, 20), "a blue hat", ellipse=True, weight=2.0),
    ]
    a, b, _ = pictures
    prompts, seeds = ["a red cube wearing a blue hat", "a cube on grass"], [11, 12]
    control = dict(controlnet_conditioning_scale=0.8, control_guidance_start=0.3, control_guidance_end=1.0)
    common = dict(output_type="latent", guidance_scale=3.0, **COMMON)
    kv = g.prepare_references(refs, reference_seed=7, guidance_scale=3.0, **COMMON)
    cached = g.generate(prompts, seeds, kv, control_image=[a, b], **control, **common)
    inline = g.generate(prompts, seeds, refs, reference_seed=7, control_image=[a, b], **control, **common)
    assert (cached - inline).abs().max() < ATOL, (cached - inline).abs().max()
    no_refs = g.generate(prompts, seeds, None, control_image=[a, b], **control, **common)
    no_control = g.generate(prompts, seeds, kv, **common)
    assert (cached - no_refs).abs().max() > 1e-3 and (cached - no_control).abs().max() > 1e-3
    # a target alone, with its own control image, is the same as in its batch
    alone = g.generate(prompts[1], [seeds[1]], kv, control_image=b, **control, **common)
    assert (alone - cached[1:]).abs().max() < ATOL
    for i, (prompt, seed, image) in enumerate(zip(prompts, seeds, (a, b), strict=True)):
        oracle = in_batch_generate(
            g.pipe,
            g.layer_names(),
            refs,
            prompt,
            seed,
            num_inference_steps=STEPS,
            height=128,
            width=128,
            guidance_scale=3.0,
            max_sequence_length=SEQ,
            reference_seed=7,
            control=dict(controlnet=g.controlnet, image=image, scale=0.8, start=0.3, end=1.0),
        )
        assert (cached[i : i + 1] - oracle).abs().max() < ATOL, (cached[i : i + 1] - oracle).abs().max()


def test_control_record_and_refusals(gen, dirs, pictures):
    from diffusers import FluxControlNetModel, FluxMultiControlNetModel

    a, b, _ = pictures
    control = gen.control_input([a, b], 2, controlnet_conditioning_scale=0.7, control_guidance_end=0.6)
    record = gen.control_record(control)
    assert record["controlnet"] == [str(dirs["instantx"])]
    assert len(record["controlnet_fingerprint"]) == 16
    assert record["image_digests"] == [[image_digest(a), image_digest(b)]]
    assert record["scale"] == [0.7] and record["end"] == [0.6] and record["control_references"] is False
    assert gen.control_record(None) is None
    # from_pipe names the ControlNet by its folder; another ControlNet has another fingerprint
    other = _with(gen, dirs, ("instantx2",))
    assert other.controlnet_ids == [str(dirs["instantx2"])]
    other_record = other.control_record(other.control_input(a, 1))
    assert other_record["controlnet_fingerprint"] != record["controlnet_fingerprint"]
    assert gen.kv_identity(
        num_inference_steps=3, height=128, width=128, guidance_scale=3.0
    ) == other.kv_identity(num_inference_steps=3, height=128, width=128, guidance_scale=3.0), (
        "the references skip ControlNet: their K/V identity does not name it"
    )

    refs = [draw_concept("red", (6, 6, 30, 30), "a red cube")]
    with pytest.raises(ValueError, match="control_references=True: not supported on FLUX.*posterior sample"):
        gen.generate("a", [1], refs, control_image=a, control_references=True, **COMMON)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        gen.generate(["a", "b"], [1, 2], None, control_image=[a, b, a], **COMMON)
    with pytest.raises(ValueError, match="start=0.8, control_guidance_end=0.4"):
        gen.generate(
            "a", [1], None, control_image=a, control_guidance_start=0.8, control_guidance_end=0.4, **COMMON
        )
    with pytest.raises(TypeError, match=r"control_image\[0\]: expected a PIL image"):
        gen.generate("a", [1], None, control_image=np.zeros((8, 8, 3)), **COMMON)
    plain = FluxFreeCustomGenerator.from_pipe(_plain_pipe(gen))
    with pytest.raises(ValueError, match="has no ControlNet"):
        plain.generate("a", [1], None, control_image=a, **COMMON)
    union = FluxControlNetModel(
        in_channels=16,
        num_layers=1,
        num_single_layers=0,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(2, 2, 4),
        num_mode=3,
    )
    with pytest.raises(ValueError, match="ControlNet-Union"):
        check_flux_controlnet(union, ["union"])
    mixed = FluxMultiControlNetModel(
        [gen.controlnet, load_flux_controlnet(str(dirs["xlabs"]), torch_dtype=torch.float32)]
    )
    with pytest.raises(ValueError, match="cannot be mixed"):
        FluxFreeCustomGenerator.from_pipe(with_flux_controlnet(gen.pipe, mixed))


def _plain_pipe(gen):
    from diffusers import FluxPipeline

    parts = {k: v for k, v in gen.pipe.components.items() if k != "controlnet"}
    return FluxPipeline(**parts)
