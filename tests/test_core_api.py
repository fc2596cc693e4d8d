"""ConceptRef, MRSAConfig, layer selection, ReferenceKV files and processor hygiene."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from freecustom_core import (
    ConceptRef,
    ConceptTooSmallError,
    FreeCustomGenerator,
    MRSAConfig,
    ReferenceKV,
    ReferenceKVError,
)
from freecustom_core.attention import MRSAProcessor
from freecustom_core.layers import attention_blocks, token_grid

# ---- configuration and inputs -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mask_mode="soft"), "mask_mode"),
        (dict(style_fidelity=1.5), "style_fidelity"),
        (dict(style_fidelity=float("nan")), "style_fidelity"),
        (dict(start_step=5, end_step=5), "end_step"),
        (dict(start_step=-1), "start_step"),
        (dict(blocks=()), "blocks"),
        (dict(layers=()), "layers"),
    ],
)
def test_mrsa_config_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MRSAConfig(**kwargs)


def test_mrsa_config_roundtrip():
    cfg = MRSAConfig(blocks=[4, 5], start_step=2, end_step=9, style_fidelity=0.3, mask_mode="scale")
    assert MRSAConfig.from_dict(cfg.to_dict()) == cfg


def test_concept_ref_refuses_bad_input():
    img = Image.new("RGB", (32, 32), "red")
    with pytest.raises(ValueError, match="empty"):
        ConceptRef(img, Image.new("L", (32, 32), 100), "x")  # grey below 50 % everywhere
    with pytest.raises(ValueError, match="finite"):
        ConceptRef(img, Image.new("L", (32, 32), 255), "x", weight=math.nan)
    with pytest.raises(ValueError, match="finite"):
        ConceptRef(img, Image.new("L", (32, 32), 255), "x", weight=math.inf)
    for weight in (
        0,
        0.0,
        -1.5,
    ):  # the release drops a weight-0 concept; here it is refused, never kept at bias 0
        with pytest.raises(ValueError, match=r"weight=.*must be > 0"):
            ConceptRef(img, Image.new("L", (32, 32), 255), "x", weight=weight)
    with pytest.raises(ValueError, match="aspect ratio"):
        ConceptRef(img, Image.new("L", (64, 32), 255), "x")
    with pytest.raises(TypeError, match="PIL"):
        ConceptRef(np.zeros((4, 4, 3)), Image.new("L", (4, 4), 255), "x")


def test_concept_ref_modes():
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((10, 10, 29, 29), fill=(200, 0, 0, 255))
    c = ConceptRef.from_rgba(rgba, "a red square")
    assert c.image.mode == "RGB"
    m = c.mask_array()
    assert m[20, 20] == 1.0 and m[0, 0] == 0.0 and (m >= 0.5).sum() == 400
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert np.asarray(ConceptRef(deep, Image.new("1", (8, 8), 1), "x").image)[0, 0, 0] == 255
    cmyk = ConceptRef(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), Image.new("L", (8, 8), 255), "x")
    assert cmyk.image.mode == "RGB" and np.asarray(cmyk.image)[0, 0, 0] > 200


def test_sd15_blocks_select_the_last_six_self_attention_layers(generator):
    blocks = attention_blocks(generator.unet)
    assert [len(b) for b in blocks] == [2, 2, 2, 1, 3, 3, 3]
    names = generator.layer_names(MRSAConfig())
    assert names == tuple(
        f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1" for b in (2, 3) for a in range(3)
    )
    explicit = generator.layer_names(
        MRSAConfig(layers=["up_blocks.3.attentions.2.transformer_blocks.0.attn1.processor"])
    )
    assert explicit == ("up_blocks.3.attentions.2.transformer_blocks.0.attn1",)
    with pytest.raises(ValueError, match="not self-attention"):
        generator.layer_names(MRSAConfig(layers=["up_blocks.3.attentions.2.transformer_blocks.0.attn2"]))
    with pytest.raises(ValueError, match="7 attention-bearing blocks"):
        generator.layer_names(MRSAConfig(blocks=(7,)))


def test_token_grid():
    assert token_grid(48, (8, 6)) == (8, 6)
    assert token_grid(12, (8, 6)) == (4, 3)
    assert token_grid(4, (8, 6)) == (2, 2)
    with pytest.raises(ValueError):
        token_grid(7, (8, 6))


# ---- masks and pruning ----------------------------------------------------------------------------


def _expected_inside(concept: ConceptRef, grid, size=(64, 64)):
    m = torch.from_numpy(concept.mask_array())[None, None]
    m = F.interpolate(m, size=size, mode="nearest")
    return (F.interpolate(m, size=grid, mode="nearest") >= 0.5).view(-1)


def test_pruning_keeps_exactly_the_in_mask_tokens(generator, concepts):
    refs = concepts[:2]
    kv = generator.prepare_references(refs, num_inference_steps=2, height=64, width=64)
    dense = generator.prepare_references(
        refs, num_inference_steps=2, height=64, width=64, mrsa=MRSAConfig(mask_mode="scale")
    )
    for layer in kv.layers:
        length = dense.v[layer].shape[2] // 2  # tokens per concept
        grid = token_grid(length, (8, 8))
        inside = torch.cat([_expected_inside(c, grid) for c in refs])  # (2 L,)
        assert kv.meta["tokens"][layer] == [int(_expected_inside(c, grid).sum()) for c in refs]
        # the pruned values are the dense values at exactly the in-mask positions
        assert torch.equal(kv.v[layer], dense.v[layer][:, :, inside])
        assert (
            kv.bias[layer].tolist()
            == [refs[0].weight] * kv.meta["tokens"][layer][0] + [refs[1].weight] * kv.meta["tokens"][layer][1]
        )
    assert kv.nbytes < kv.dense_nbytes


def test_mask_threshold_is_half_on_grey_levels(generator):
    """Grey levels between 50 % and 99 % are inside, below 50 % outside, on a grid that samples each band."""
    grey = np.zeros((64, 64), dtype=np.uint8)
    for col, level in ((0, 128), (8, 140), (16, 191), (24, 250), (32, 127), (40, 60), (48, 255)):
        grey[:, col : col + 8] = level  # one 8-pixel band per token column of the 8x8 grid
    c = ConceptRef(Image.new("RGB", (64, 64), "red"), Image.fromarray(grey), "a red square")
    kv = generator.prepare_references([c], num_inference_steps=1, height=64, width=64)
    inside = (grey / 255.0 >= 0.5)[::8, ::8]  # what the 8x8 layers sample (nearest: the band's first pixel)
    assert int(inside.sum()) == 8 * 5 and int((grey / 255.0 >= 0.99)[::8, ::8].sum()) == 8  # 128..250 and 255
    assert kv.meta["tokens"][kv.layers[-1]] == [int(inside.sum())]


def test_concept_with_no_token_in_any_layer_is_refused(generator, concepts):
    """A few mask pixels that no token grid samples: refused, naming the concept and the finest grid."""
    speck = np.zeros((48, 48), dtype=np.uint8)
    speck[1, 1] = 255  # at 64x64 only pixel (2, 2), which neither the 8x8 nor the 4x4 grid samples
    small = ConceptRef(concepts[1].image, Image.fromarray(speck), "a speck")
    common = dict(num_inference_steps=2, height=64, width=64)
    message = r"concepts\[1\] \('a speck'\): its mask covers no token .* 8x8 grid of up_blocks\.3\."
    with pytest.raises(ConceptTooSmallError, match=message) as refused:
        generator.prepare_references([concepts[0], small], **common)
    assert refused.value.index == 1
    with pytest.raises(ConceptTooSmallError, match=message):
        generator.generate("x", [1], [concepts[0], small], output_type="latent", **common)
    assert issubclass(ConceptTooSmallError, ValueError)


def test_concept_missing_from_the_coarse_layers_only_still_acts(generator, concepts):
    """Seen by the 8x8 layers but not the 4x4 ones: kept, like the release (its counts say so)."""
    dot = np.zeros((64, 64), dtype=np.uint8)
    dot[6:11, 6:11] = 255  # holds pixel (8, 8): token (1, 1) of the 8x8 grid; the 4x4 grid samples 0, 16, ...
    c = ConceptRef(concepts[0].image, Image.fromarray(dot), "a dot")
    common = dict(num_inference_steps=2, height=64, width=64)
    kv = generator.prepare_references([c], **common)
    assert [kv.meta["tokens"][layer] for layer in kv.layers] == [[0]] * 3 + [[1]] * 3
    with_dot = generator.generate("x", [1], kv, output_type="latent", **common)
    plain = generator.generate("x", [1], None, output_type="latent", **common)
    assert (with_dot - plain).abs().max() > 1e-4


def test_upstream_jpeg_masks_of_another_size(generator, samples_dir):
    case = samples_dir / "dog_hat_sunglasses_0"
    refs = []
    for name, prompt in (("dog", "a dog"), ("hat", "a hat")):
        image = Image.open(case / "image" / f"{name}.jpg")
        mask = Image.open(case / "mask" / f"{name}.jpg")
        refs.append(ConceptRef(image.resize((128, 128)), mask, prompt))
    kv = generator.prepare_references(refs, num_inference_steps=2, height=64, width=64)
    layer = kv.layers[-1]
    for i, c in enumerate(refs):
        expected = _expected_inside(c, (8, 8))
        assert kv.meta["tokens"][layer][i] == int(expected.sum()) > 0
    out = generator.generate(
        "a dog in a hat", [1], kv, num_inference_steps=2, height=64, width=64, output_type="np"
    )
    assert np.isfinite(out).all()


# ---- ReferenceKV files ---------------------------------------------------------------------------


def test_reference_kv_roundtrip_and_reuse(generator, concepts, tmp_path):
    kv = generator.prepare_references(
        concepts[:2], num_inference_steps=3, height=64, width=64, reference_seed=3
    )
    path = tmp_path / "kv.safetensors"
    kv.save(path)
    loaded = ReferenceKV.load(path)
    assert loaded.steps == kv.steps and loaded.layers == kv.layers and loaded.nbytes == kv.nbytes
    assert loaded.meta["concepts"] == kv.meta["concepts"] and loaded.reference_seed == 3
    for layer in kv.layers:
        assert torch.equal(loaded.k[layer], kv.k[layer]) and torch.equal(loaded.bias[layer], kv.bias[layer])
    common = dict(num_inference_steps=3, height=64, width=64, output_type="latent")
    assert torch.equal(
        generator.generate("x", [1], kv, **common), generator.generate("x", [1], loaded, **common)
    )
    assert not list(tmp_path.glob(".*tmp*")), "temp file left behind"


def test_cached_path_streams_one_step_at_a_time(generator, concepts, monkeypatch):
    """generate() never moves the whole K/V: it asks for each active step once, on its own device."""
    kv = generator.prepare_references(
        concepts[:2], num_inference_steps=4, height=64, width=64, mrsa=MRSAConfig(start_step=1, end_step=3)
    )
    assert kv.steps == (1, 2) and kv.device.type == "cpu"
    common = dict(num_inference_steps=4, height=64, width=64, output_type="latent")
    expected = generator.generate("x", [5, 6], kv, **common)
    calls = []
    real_at_step = ReferenceKV.at_step

    def spy(self, step, device=None, dtype=None, **kw):
        calls.append((step, device, dtype))
        return real_at_step(self, step, device, dtype, **kw)

    def whole(*a, **k):
        raise AssertionError("generate() moved every step of the K/V")

    monkeypatch.setattr(ReferenceKV, "at_step", spy)
    monkeypatch.setattr(ReferenceKV, "to", whole)
    got = generator.generate("x", [5, 6], kv, **common)
    assert torch.equal(got, expected)
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    assert all(c[1] == generator.device and c[2] == generator.dtype for c in calls)


def test_at_step_moves_one_step_and_keeps_the_bias(generator, concepts):
    kv = generator.prepare_references(concepts[:2], num_inference_steps=3, height=64, width=64)
    layer = kv.layers[0]
    a = kv.at_step(1, "cpu", torch.float64)
    assert a[layer].k.dtype == torch.float64 and a[layer].k.shape == kv.k[layer][1].shape
    assert torch.equal(a[layer].v, kv.v[layer][1].double())
    assert kv.at_step(2, "cpu", torch.float64)[layer].bias is a[layer].bias  # moved once, reused
    assert kv.at_step(7) is None
    assert kv.pin_memory().nbytes == kv.nbytes


def test_prepare_references_storage_on_the_model_device(generator, concepts):
    common = dict(num_inference_steps=2, height=64, width=64)
    a = generator.prepare_references(concepts[:2], **common)
    b = generator.prepare_references(concepts[:2], storage=generator.device, **common)
    c = generator.prepare_references(concepts[:2], pin_memory=False, **common)
    assert b.device == generator.device
    for layer in a.layers:
        assert torch.equal(a.k[layer], b.k[layer]) and torch.equal(a.v[layer], b.v[layer])
        assert torch.equal(a.k[layer], c.k[layer]) and not c.k[layer].is_pinned()


def test_reference_images_encoded_one_at_a_time_match_one_batch(generator, concepts):
    images = [c.image for c in concepts[:3]]
    one_by_one = generator.encode_images(images, 64, 64)
    vae = generator.pipe.vae
    x = torch.stack(
        [
            torch.from_numpy(
                np.asarray(i.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS), dtype=np.float32)
                / 127.5
                - 1.0
            ).permute(2, 0, 1)
            for i in images
        ]
    )
    batch = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(one_by_one, batch, atol=1e-5, rtol=1e-4)


def test_reference_kv_corrupt_files_are_refused(generator, concepts, tmp_path):
    kv = generator.prepare_references(concepts[:1], num_inference_steps=2, height=64, width=64)
    path = tmp_path / "kv.safetensors"
    kv.save(path)
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReferenceKVError, match="not a readable"):
        ReferenceKV.load(tmp_path / "truncated.safetensors")
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ReferenceKVError, match="corrupt"):
        ReferenceKV.load(tmp_path / "flipped.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ReferenceKVError):
        ReferenceKV.load(tmp_path / "junk.safetensors")


def test_reference_kv_mismatch_is_refused(generator, other_model_dir, concepts):
    kv = generator.prepare_references(concepts[:1], num_inference_steps=3, height=64, width=64)
    common = dict(height=64, width=64, output_type="latent")
    with pytest.raises(ReferenceKVError, match="num_inference_steps"):
        generator.generate("x", [1], kv, num_inference_steps=4, **common)
    with pytest.raises(ReferenceKVError, match="height"):
        generator.generate("x", [1], kv, num_inference_steps=3, height=72, width=64, output_type="latent")
    with pytest.raises(ReferenceKVError, match="mrsa"):
        generator.generate("x", [1], kv, num_inference_steps=3, mrsa=MRSAConfig(style_fidelity=0.2), **common)
    with pytest.raises(ReferenceKVError, match=r"reference_seed=1 differs .* \(0\)"):
        generator.generate("x", [1], kv, num_inference_steps=3, reference_seed=1, **common)
    same_seed = generator.generate("x", [1], kv, num_inference_steps=3, reference_seed=0, **common)
    assert torch.equal(same_seed, generator.generate("x", [1], kv, num_inference_steps=3, **common))
    other = FreeCustomGenerator.from_pretrained(str(other_model_dir), device="cpu")
    with pytest.raises(ReferenceKVError, match="model"):
        other.generate("x", [1], kv, num_inference_steps=3, **common)


def test_scheduler_mismatch_is_refused(tiny_model_dir, generator, concepts):
    kv = generator.prepare_references(concepts[:1], num_inference_steps=2, height=64, width=64)
    euler = FreeCustomGenerator.from_pretrained(
        str(tiny_model_dir), device="cpu", scheduler="EulerDiscreteScheduler"
    )
    with pytest.raises(ReferenceKVError, match="scheduler"):
        euler.generate("x", [1], kv, num_inference_steps=2, height=64, width=64)


# ---- processors are always restored ------------------------------------------------------------------


def test_processors_restored_after_success_and_exception(generator, concepts, monkeypatch):
    before = generator.unet.attn_processors
    generator.generate(
        "x", [1], concepts[:1], num_inference_steps=2, height=64, width=64, output_type="latent"
    )
    after = generator.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure in the denoising loop")

    scheduler_cls = type(generator.pipe.scheduler)
    monkeypatch.setattr(scheduler_cls, "step", boom)
    with pytest.raises(RuntimeError, match="injected"):
        generator.generate("x", [1], concepts[:1], num_inference_steps=2, height=64, width=64)
    after = generator.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert not any(isinstance(p, MRSAProcessor) for p in after.values())


def test_argument_errors_name_the_argument(generator, concepts):
    common = dict(num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="multiples of 8"):
        generator.generate("x", [1], None, height=60, width=64, **common)
    with pytest.raises(ValueError, match="equal length"):
        generator.generate(["a", "b"], [1, 2, 3], None, height=64, width=64, **common)
    with pytest.raises(ValueError, match="seeds"):
        generator.generate("a", [-1], None, height=64, width=64, **common)
    with pytest.raises(ValueError, match="empty list"):
        generator.generate("a", [1], [], height=64, width=64, **common)
    with pytest.raises(ValueError, match="start_step"):
        generator.generate(
            "a", [1], concepts[:1], height=64, width=64, mrsa=MRSAConfig(start_step=5), **common
        )
    with pytest.raises(ValueError, match="output_type"):
        generator.generate("a", [1], None, height=64, width=64, num_inference_steps=2, output_type="tensor")


def test_jpeg_roundtrip_mask_and_safetensors_only_loading(tiny_model_dir):
    """The model folder holds safetensors only, and loading refuses pickled weights."""
    assert list(tiny_model_dir.glob("unet/*.safetensors")) and not list(tiny_model_dir.glob("**/*.bin"))
    buf = io.BytesIO()
    Image.new("L", (16, 16), 255).save(buf, format="JPEG")
    mask = Image.open(io.BytesIO(buf.getvalue()))
    assert ConceptRef(Image.new("RGB", (8, 8)), mask, "x").mask_array().min() > 0.9


def test_from_pipe_shares_weights(generator, concepts):
    wrapped = FreeCustomGenerator.from_pipe(generator.pipe)
    assert wrapped.unet is generator.unet and wrapped.model_fingerprint == generator.model_fingerprint
    common = dict(num_inference_steps=2, height=64, width=64, output_type="latent")
    assert torch.equal(
        wrapped.generate("x", [4], concepts[:1], **common),
        generator.generate("x", [4], concepts[:1], **common),
    )


def test_core_imports_no_ray_pyarrow_or_webdataset():
    import subprocess
    import sys

    code = (
        "import sys, freecustom_core as fc\n"
        "for name in fc.__all__: getattr(fc, name)\n"
        "bad = [m for m in ('ray', 'pyarrow', 'webdataset') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- channels-last fast path ----------------------------------------------------------------------


def test_channels_last_matches_the_default_layout_and_keeps_its_own_kv(tiny_model_dir, generator, concepts):
    fast = FreeCustomGenerator.from_pretrained(str(tiny_model_dir), device="cpu", channels_last=True)
    assert fast.memory_format == "channels_last" and generator.memory_format == "contiguous"
    assert fast.model_fingerprint == generator.model_fingerprint  # the same weights
    common = dict(num_inference_steps=2, height=64, width=64)
    kv = generator.prepare_references(concepts[:2], **common)
    kv_fast = fast.prepare_references(concepts[:2], **common)
    assert kv_fast.meta["memory_format"] == "channels_last"
    for layer in kv.layers:
        torch.testing.assert_close(kv_fast.k[layer], kv.k[layer], atol=1e-4, rtol=1e-4)
    a = generator.generate("x", [3], kv, output_type="latent", **common)
    b = fast.generate("x", [3], kv_fast, output_type="latent", **common)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    with pytest.raises(ReferenceKVError, match="memory_format"):
        fast.generate("x", [3], kv, output_type="latent", **common)


def test_kv_files_from_before_the_layout_was_recorded_still_fit(generator, concepts, tmp_path):
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import save_file

    kv = generator.prepare_references(concepts[:1], num_inference_steps=2, height=64, width=64)
    path = tmp_path / "kv.safetensors"
    kv.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = _json.loads(meta["freecustom_kv"])
    del header["memory_format"]
    save_file(tensors, str(path), metadata={"freecustom_kv": _json.dumps(header)})
    old = ReferenceKV.load(path)
    common = dict(num_inference_steps=2, height=64, width=64, output_type="latent")
    assert torch.equal(
        generator.generate("x", [1], old, **common), generator.generate("x", [1], kv, **common)
    )


# ---- torch.compile fast path ------------------------------------------------------------------------


def test_compiled_unet_keeps_the_kv_and_the_images(tiny_model_dir, generator, concepts):
    """Dynamo traces the real processors (backend "eager": the tracing path without a C++ build)."""
    import torch._dynamo.utils as dynamo_utils

    from freecustom_core.attention import OFF

    torch._dynamo.reset()
    compiled = FreeCustomGenerator.from_pretrained(
        str(tiny_model_dir), device="cpu", compile={"backend": "eager"}
    )
    assert compiled.compiled and not generator.compiled
    common = dict(num_inference_steps=2, height=64, width=64)
    for refs in (concepts[:1], concepts[:3]):  # two reference-token counts
        kv = generator.prepare_references(refs, **common)
        kv_c = compiled.prepare_references(refs, **common)  # the reference pass stays eager: the same K/V
        assert all(
            torch.equal(kv.k[layer], kv_c.k[layer]) and torch.equal(kv.v[layer], kv_c.v[layer])
            for layer in kv.layers
        )
        a = generator.generate(["x", "y"], [1, 2], kv, output_type="latent", **common)
        b = compiled.generate(["x", "y"], [1, 2], kv_c, output_type="latent", **common)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        compiled.generate("x", [4], None, output_type="latent", **common),
        generator.generate("x", [4], None, output_type="latent", **common),
        atol=1e-5,
        rtol=1e-5,
    )
    assert (
        dynamo_utils.counters["stats"]["unique_graphs"] >= 1
    )  # the denoising UNet really went through dynamo
    # processors stay installed (a swap would recompile), and plain outside a call
    procs = compiled.unet.attn_processors
    assert all(isinstance(p, MRSAProcessor) for k, p in procs.items() if k.endswith("attn1.processor"))
    assert compiled.unet._freecustom_slot.current is OFF
