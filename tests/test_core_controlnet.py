"""ControlNet in the engine: cached == inline == the release's in-batch ControlNet structure (tests/oracle.py).

A tiny random ControlNet (``ControlNetModel.from_unet`` of the tiny UNet, zero convolutions re-drawn)
is saved and loaded back through ``from_pretrained``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from freecustom_core import DEFAULT_NEGATIVE_PROMPT, FreeCustomGenerator, MRSAConfig, ReferenceKVError
from freecustom_core.controlnet import canny, image_digest
from pipeline.tiny_model import build_tiny_controlnet
from tests.oracle import release_generate, release_pipeline

STEPS = 3
ATOL = 1e-4
SIZE = dict(height=64, width=64)
COMMON = dict(num_inference_steps=STEPS, output_type="latent", **SIZE)


def control_picture(seed: int) -> Image.Image:
    """A canny map of a random rectangle: the kind of condition a layout gives."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (64, 64), (30, 30, 30))
    x0, y0 = rng.integers(4, 24, size=2)
    ImageDraw.Draw(image).rectangle((int(x0), int(y0), int(x0) + 28, int(y0) + 30), fill=(220, 200, 180))
    return canny(image)


@pytest.fixture(scope="module")
def controlnet_dirs(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny-controlnet")
    return [build_tiny_controlnet(tiny_model_dir, base / f"cn{i}", seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def cn_generator(tiny_model_dir, controlnet_dirs):
    return FreeCustomGenerator.from_pretrained(
        str(tiny_model_dir), controlnet=str(controlnet_dirs[0]), torch_dtype=torch.float32, device="cpu"
    )


def release(gen, refs, prompt, seed, control, *, scheduler, mrsa=None, **kw):
    """The oracle on ``gen``'s components, stepping ``scheduler`` (the release's, ``release_pipe.scheduler``)."""
    return release_generate(
        gen.pipe,
        gen.layer_names(mrsa),
        refs,
        prompt,
        seed,
        num_inference_steps=STEPS,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
        control_image=control,
        scheduler=scheduler,
        **SIZE,
        **kw,
    )


@pytest.mark.parametrize(
    "control_references,scale,start,end,sf",
    [
        (False, 0.7, 0.0, 1.0, 1.0),
        (True, 0.7, 0.0, 1.0, 1.0),
        (False, 1.3, 0.3, 1.0, 0.3),  # ControlNet off at step 0 only
        (True, 0.6, 0.0, 0.67, 0.3),  # off at the last step; unconditional references through ControlNet too
    ],
)
def test_cached_inline_and_release_agree(
    cn_generator, release_pipe, concepts, control_references, scale, start, end, sf
):
    gen, refs = cn_generator, concepts[:2]
    mrsa = MRSAConfig(style_fidelity=sf)
    control = control_picture(0)
    cn = dict(controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end)
    prepare = dict(control_image=control, **cn) if control_references else {}
    kv = gen.prepare_references(
        refs, num_inference_steps=STEPS, reference_seed=3, mrsa=mrsa, **SIZE, **prepare
    )
    prompts, seeds = ["a red cube on a box", "a hat"], [11, 12]
    call = dict(control_image=control, control_references=control_references, **cn, **COMMON)
    cached = gen.generate(prompts, seeds, kv, **call)
    inline = gen.generate(prompts, seeds, refs, reference_seed=3, mrsa=mrsa, **call)
    assert torch.allclose(cached, inline, atol=ATOL), (cached - inline).abs().max()
    no_control = gen.generate(prompts, seeds, refs, reference_seed=3, mrsa=mrsa, **COMMON)
    assert (cached - no_control).abs().max() > 1e-2, "ControlNet had no effect"
    other = gen.generate(
        prompts,
        seeds,
        refs,
        reference_seed=3,
        mrsa=mrsa,
        **dict(call, control_references=not control_references),
    )
    assert (cached - other).abs().max() > 1e-3, (
        "control_references made no difference: the test would not see it"
    )
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        expected = release(
            gen,
            refs,
            prompt,
            seed,
            control,
            mrsa=mrsa,
            scheduler=release_pipe.scheduler,
            reference_seed=3,
            style_fidelity=sf,
            control_references=control_references,
            **cn,
        )
        assert torch.allclose(cached[i : i + 1], expected, atol=ATOL), (
            (cached[i : i + 1] - expected).abs().max()
        )


def test_one_control_image_per_prompt_and_kv_reused_across_them(cn_generator, release_pipe, concepts):
    gen, refs = cn_generator, concepts[:2]
    kv = gen.prepare_references(refs, num_inference_steps=STEPS, **SIZE)
    a, b = control_picture(1), ImageOps.invert(control_picture(2))
    both = gen.generate(["a cube", "a hat"], [4, 5], kv, control_image=[a, b], batch_size=2, **COMMON)
    alone_a = gen.generate("a cube", [4], kv, control_image=a, **COMMON)
    alone_b = gen.generate("a hat", [5], kv, control_image=b, **COMMON)
    assert torch.allclose(both[:1], alone_a, atol=ATOL) and torch.allclose(both[1:], alone_b, atol=ATOL)
    swapped = gen.generate(["a cube", "a hat"], [4, 5], kv, control_image=[b, a], **COMMON)
    # the tiny random ControlNet moves 3-step latents by about 1e-3: well above the ATOL the equalities hold at
    assert (swapped - both).abs().max() > 5 * ATOL, "each prompt's own control image must matter"
    assert torch.allclose(
        both[1:],
        release(gen, refs, "a hat", 5, b, control_references=False, scheduler=release_pipe.scheduler),
        atol=ATOL,
    )
    one_for_all = gen.generate(["a cube", "a hat"], [4, 5], kv, control_image=a, **COMMON)
    assert torch.allclose(one_for_all[:1], alone_a, atol=ATOL)


def test_kv_through_controlnet_are_identified_by_control_image(cn_generator, concepts):
    gen, refs = cn_generator, concepts[:1]
    a, b = control_picture(1), control_picture(2)
    kv_a = gen.prepare_references(refs, num_inference_steps=STEPS, control_image=a, **SIZE)
    assert kv_a.meta["control"]["image_digests"] == [image_digest(a)]
    assert kv_a.meta["control"]["controlnet"] == gen.controlnet_ids
    gen.generate("x", [1], kv_a, control_image=a, control_references=True, **COMMON)  # fits
    with pytest.raises(ReferenceKVError, match="control"):
        gen.generate("x", [1], kv_a, control_image=b, control_references=True, **COMMON)
    with pytest.raises(ReferenceKVError, match="control"):
        gen.generate(
            "x",
            [1],
            kv_a,
            control_image=a,
            control_references=True,
            controlnet_conditioning_scale=0.5,
            **COMMON,
        )
    with pytest.raises(ReferenceKVError, match="control_references=True"):
        gen.generate("x", [1], kv_a, control_image=a, **COMMON)
    plain_kv = gen.prepare_references(refs, num_inference_steps=STEPS, **SIZE)
    assert "control" not in plain_kv.meta
    with pytest.raises(ReferenceKVError, match="control"):
        gen.generate("x", [1], plain_kv, control_image=a, control_references=True, **COMMON)
    with pytest.raises(ValueError, match="one control image for the whole call"):
        gen.generate(["x", "y"], [1, 2], refs, control_image=[a, b], control_references=True, **COMMON)


def test_multi_controlnet_matches_the_release(tiny_model_dir, controlnet_dirs, release_pipe, concepts):
    gen = FreeCustomGenerator.from_pretrained(
        str(tiny_model_dir), controlnet=[str(d) for d in controlnet_dirs], device="cpu"
    )
    assert type(gen.controlnet).__name__ == "MultiControlNetModel"
    assert gen.controlnet_ids == [str(d) for d in controlnet_dirs]
    refs = concepts[:2]
    controls = [control_picture(3), control_picture(4)]
    cn = dict(controlnet_conditioning_scale=[0.6, 0.3], control_guidance_end=[1.0, 0.67])
    kv = gen.prepare_references(refs, num_inference_steps=STEPS, **SIZE)
    cached = gen.generate("a cube", [7], kv, control_image=controls, **cn, **COMMON)
    expected = release(
        gen, refs, "a cube", 7, controls, control_references=False, scheduler=release_pipe.scheduler, **cn
    )
    assert torch.allclose(cached, expected, atol=ATOL), (cached - expected).abs().max()
    first_only = gen.generate(
        "a cube", [7], kv, control_image=controls, controlnet_conditioning_scale=[0.6, 0.0], **COMMON
    )
    assert (cached - first_only).abs().max() > 1e-3, "the second ControlNet had no effect"
    with pytest.raises(ValueError, match="2 ControlNets need a list of 2"):
        gen.generate("a cube", [7], kv, control_image=controls[0], **COMMON)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale"):
        gen.generate("a cube", [7], kv, control_image=controls, controlnet_conditioning_scale=[1.0], **COMMON)


def test_the_release_controlnet_script_and_its_sampler(
    tiny_model_dir, controlnet_dirs, cn_generator, concepts
):
    """The release's ControlNet script loads ``StableDiffusionControlNetPipeline.from_pretrained(model,
    controlnet=..., scheduler=DDIMScheduler(<literals>))``: that pipeline does not rewrite steps_offset,
    so it samples at 980 ... 0 (not the SD script's 981 ... 1, the default). ``release:steps_offset=0``
    reproduces it: cached == the oracle on that very pipeline (its own scheduler)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    script = release_pipeline(
        tiny_model_dir,
        StableDiffusionControlNetPipeline,
        controlnet=ControlNetModel.from_pretrained(str(controlnet_dirs[0])),
        safety_checker=None,
        requires_safety_checker=False,
    )
    assert script.scheduler.config.steps_offset == 0
    script.scheduler.set_timesteps(50)
    assert script.scheduler.timesteps.tolist() == list(range(980, -1, -20))
    gen = FreeCustomGenerator.from_pretrained(
        str(tiny_model_dir),
        controlnet=str(controlnet_dirs[0]),
        device="cpu",
        scheduler="release:steps_offset=0",
    )
    refs, control = concepts[:2], control_picture(6)
    kv = gen.prepare_references(refs, num_inference_steps=STEPS, reference_seed=3, **SIZE)
    cached = gen.generate(
        "a cube", [9], kv, control_image=control, controlnet_conditioning_scale=0.7, **COMMON
    )
    expected = release_generate(
        script,
        gen.layer_names(),
        refs,
        "a cube",
        9,
        num_inference_steps=STEPS,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
        control_image=control,
        controlnet_conditioning_scale=0.7,
        control_references=False,
        reference_seed=3,
        **SIZE,
    )
    assert torch.allclose(cached, expected, atol=ATOL), (cached - expected).abs().max()
    default = cn_generator.generate(
        "a cube",
        [9],
        refs,
        reference_seed=3,
        control_image=control,
        controlnet_conditioning_scale=0.7,
        **COMMON,
    )
    assert (default - expected).abs().max() > 1e-2  # the default is the SD script's sampler


def test_from_pipe_of_a_controlnet_pipeline(cn_generator, concepts):
    from diffusers import StableDiffusionControlNetPipeline

    assert isinstance(cn_generator.pipe, StableDiffusionControlNetPipeline)
    wrapped = FreeCustomGenerator.from_pipe(cn_generator.pipe, model_id="m", controlnet_id="my/canny")
    assert wrapped.controlnet is cn_generator.controlnet and wrapped.controlnet_ids == ["my/canny"]
    control = control_picture(5)
    a = wrapped.generate("a cube", [3], concepts[:1], control_image=control, **COMMON)
    b = cn_generator.generate("a cube", [3], concepts[:1], control_image=control, **COMMON)
    assert torch.equal(a, b)
    record = wrapped.control_record(wrapped.control_input(control, 1, controlnet_conditioning_scale=0.8))
    assert record["controlnet"] == ["my/canny"] and record["image_digests"] == [[image_digest(control)]]
    assert record["scale"] == [0.8] and record["control_references"] is False


def test_control_arguments_are_checked(generator, cn_generator, concepts):
    control = control_picture(0)
    with pytest.raises(ValueError, match="no ControlNet"):
        generator.generate("x", [1], None, control_image=control, **COMMON)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        cn_generator.generate(["x", "y"], [1, 2], None, control_image=[control] * 3, **COMMON)
    with pytest.raises(ValueError, match="start < end"):
        cn_generator.generate(
            "x",
            [1],
            None,
            control_image=control,
            control_guidance_start=0.5,
            control_guidance_end=0.5,
            **COMMON,
        )
    with pytest.raises(TypeError, match=r"control_image\[0\]: expected a PIL image"):
        cn_generator.generate("x", [1], None, control_image=[np.zeros((64, 64, 3))], **COMMON)
    with pytest.raises(ValueError, match="control_references=True: needs a control_image"):
        cn_generator.generate("x", [1], concepts[:1], control_references=True, **COMMON)


def test_plain_controlnet_equals_diffusers(cn_generator):
    """No references: the engine's loop is diffusers' StableDiffusionControlNetPipeline."""
    control = control_picture(6)
    ours = cn_generator.generate(
        "a cube", [9], None, control_image=control, controlnet_conditioning_scale=0.8, **COMMON
    )
    theirs = cn_generator.pipe(
        "a cube",
        image=control,
        num_inference_steps=STEPS,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
        generator=torch.Generator("cpu").manual_seed(9),
        controlnet_conditioning_scale=0.8,
        output_type="latent",
        **SIZE,
    ).images
    assert torch.allclose(ours, theirs, atol=ATOL), (ours - theirs).abs().max()


# ---- canny ------------------------------------------------------------------------------------
def step_image(left: int, right: int) -> Image.Image:
    a = np.full((32, 32), left, dtype=np.uint8)
    a[:, 16:] = right
    return Image.fromarray(a)


def test_canny_finds_a_step_edge_by_its_thresholds():
    # a vertical step of 60 grey levels: Sobel |gx| = 4 * 60 = 240 on the two columns beside it
    edges = np.asarray(canny(step_image(50, 110)))[..., 0] > 0
    assert canny(step_image(50, 110)).mode == "RGB"
    cols = np.nonzero(edges.any(axis=0))[0]
    assert 1 <= len(cols) <= 2 and set(cols) <= {15, 16}, cols  # thin: non-maximum suppression
    assert edges[:, cols[0]].all()
    assert not np.asarray(canny(step_image(50, 110), 100, 250)).any()  # 240 is below high=250
    assert np.asarray(canny(step_image(50, 110), 100, 230)).any()
    with pytest.raises(ValueError, match="low=200, high=100"):
        canny(step_image(0, 255), 200, 100)


def test_canny_hysteresis_keeps_weak_edges_connected_to_strong_ones():
    a = np.full((32, 48), 50, dtype=np.uint8)
    a[:, 24:] = 80  # a weak step: gradient 4 * 30 = 120, between low=100 and high=200
    a[:16, 24:] = 120  # its upper half is strong: 4 * 70 = 280
    weak_connected = np.asarray(canny(Image.fromarray(a)))[..., 0] > 0
    assert weak_connected[28, 23:25].any(), "the weak half touching a strong edge is kept"
    b = np.full((32, 48), 50, dtype=np.uint8)
    b[:, 24:] = 80  # the same weak step alone
    assert not np.asarray(canny(Image.fromarray(b))).any(), "an isolated weak edge is dropped"


def test_customize_with_a_controlnet(tiny_model_dir, controlnet_dirs, concepts, tmp_path):
    from pipeline.customize import control_condition, render_concepts

    layout = Image.new("RGB", (64, 64), (20, 20, 20))
    ImageDraw.Draw(layout).rectangle((10, 12, 40, 50), fill=(230, 230, 230))
    layout.save(tmp_path / "layout.png")
    edges = control_condition(tmp_path / "layout.png", "canny", canny_low=100, canny_high=200)
    assert np.array_equal(np.asarray(edges), np.asarray(canny(layout)))
    assert np.array_equal(
        np.asarray(control_condition(tmp_path / "layout.png", "none", canny_low=1, canny_high=2)),
        np.asarray(layout),
    )
    with pytest.raises(ValueError, match="--control-type 'depth'"):
        control_condition(tmp_path / "layout.png", "depth", canny_low=100, canny_high=200)
    images, kv = render_concepts(
        str(tiny_model_dir),
        concepts[:1],
        "a cube",
        [1],
        steps=2,
        size=64,
        controlnet=[str(controlnet_dirs[0])],
        control_images=[edges],
    )
    assert len(images) == 1 and images[0].size == (64, 64) and "control" not in kv.meta
    with pytest.raises(ValueError, match="one control image per ControlNet"):
        render_concepts(
            str(tiny_model_dir),
            concepts[:1],
            "a cube",
            [1],
            steps=2,
            size=64,
            controlnet=[str(controlnet_dirs[0])],
            control_images=[],
        )
