"""stages.masks.segment: mask sources and their precedence, SAM and detector on tiny random weights
(built here, saved, and loaded back through the real loading code), post-processing, errors.

Quality cannot be tested with random weights. The tiny models are made *predictable* where a
test needs it by setting a few output layers: SAM's last upscaling layer and hypernetwork
heads to constants gives constant mask logits (positive: SAM says "everything", negative:
"nothing"); OWLv2's logit shift/scale give every box a high (or low) score and its box head a
large box around each patch.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.errors import RowError
from stages.inputs.concepts import ConceptSpec, ContextSpec, ResolvedConcept
from stages.masks.morphology import (
    box_region,
    dilate,
    fill_small_holes,
    keep_main_components,
    label_components,
)
from stages.masks.segment import MaskItem, SamPrompt, SegmentConfig, Segmenter
from stages.masks.segment_models import SAM_ARCHS, SamArch, build_sam, load_state_dict_safely, run_batched
from stages.masks.segment_stage import SegmentStage

TINY_SAM = dict(
    encoder_embed_dim=16,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    image_size=64,  # SamPredictor resizes to this: small keeps CPU tests fast
    patch_size=16,
    window_size=2,
    prompt_embed_dim=16,
    mask_in_chans=4,
    decoder_depth=1,
    decoder_mlp_dim=32,
    decoder_num_heads=2,
    iou_head_depth=2,
    iou_head_hidden_dim=16,
)


# --------------------------------------------------------------------------- tiny models


def _save_sam(sam, folder: Path, name: str) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in sam.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / f"{name}.safetensors")
    torch.save(state, folder / f"{name}.pth")
    return {"safetensors": folder / f"{name}.safetensors", "pth": folder / f"{name}.pth"}


def _tiny_sam(seed: int = 0, *, constant_logit: float | None = None):
    """A random tiny SAM; with ``constant_logit`` its mask logits are that sign everywhere."""
    import torch

    torch.manual_seed(seed)
    sam = build_sam(SamArch(**TINY_SAM))
    if constant_logit is not None:
        with torch.no_grad():
            upscale = sam.mask_decoder.output_upscaling[3]  # last ConvTranspose2d
            upscale.weight.zero_()
            upscale.bias.fill_(constant_logit)  # GELU(+1) > 0, GELU(-1) < 0
            for mlp in sam.mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.zero_()
                mlp.layers[-1].bias.fill_(1.0)
    return sam


@pytest.fixture(scope="module")
def sam_files(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("sam")
    return {
        "random": _save_sam(_tiny_sam(0), root, "random"),
        "positive": _save_sam(_tiny_sam(1, constant_logit=1.0), root, "positive"),
        "negative": _save_sam(_tiny_sam(2, constant_logit=-1.0), root, "negative"),
    }


def _sam_config(path: Path, **kw) -> SegmentConfig:
    return SegmentConfig(
        sam_checkpoint=str(path), sam_model_type="custom", sam_arch=TINY_SAM, device="cpu", **kw
    )


def _build_detector(folder: Path, *, logit_shift: float) -> Path:
    """A tiny OWLv2 (random weights, every box scored by ``logit_shift``) saved with
    ``save_pretrained`` in safetensors, with its processor and a tokenizer written here."""
    import torch
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    from pipeline.tiny_model import write_tiny_tokenizer

    vocab_size = write_tiny_tokenizer(folder / "tokenizer-src")
    tokenizer = CLIPTokenizer(
        str(folder / "tokenizer-src" / "vocab.json"),
        str(folder / "tokenizer-src" / "merges.txt"),
        model_max_length=16,
        pad_token="<|endoftext|>",
    )
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    config = Owlv2Config(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():
        head = model.class_head  # logits = (cosine + shift) * (elu(scale) + 1)
        head.logit_shift.weight.zero_()
        head.logit_shift.bias.fill_(logit_shift)
        head.logit_scale.weight.zero_()
        head.logit_scale.bias.zero_()
        model.box_head.dense2.weight.zero_()  # boxes: each patch's centre, about 0.7 of the image
        model.box_head.dense2.bias.copy_(torch.tensor([0.0, 0.0, 2.0, 2.0]))
    out = folder / "detector"
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def detectors(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("owlv2")
    return {
        "finds": _build_detector(root / "finds", logit_shift=6.0),
        "blind": _build_detector(root / "blind", logit_shift=-20.0),
    }


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- post-processing


def _flood_fill_labels(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """The reference: breadth-first flood fill in raster order."""
    height, width = mask.shape
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    labels = np.zeros(mask.shape, dtype=np.int32)
    n = 0
    for y in range(height):
        for x in range(width):
            if mask[y, x] and not labels[y, x]:
                n += 1
                labels[y, x] = n
                queue = deque([(y, x)])
                while queue:
                    cy, cx = queue.popleft()
                    for dy, dx in steps:
                        yy, xx = cy + dy, cx + dx
                        if 0 <= yy < height and 0 <= xx < width and mask[yy, xx] and not labels[yy, xx]:
                            labels[yy, xx] = n
                            queue.append((yy, xx))
    return labels, n


@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_components_equals_flood_fill(connectivity):
    rng = np.random.default_rng(connectivity)
    for _ in range(150):
        height, width = rng.integers(1, 24, size=2)
        mask = rng.random((height, width)) < rng.random()
        labels, n = label_components(mask, connectivity=connectivity)
        expected, n_expected = _flood_fill_labels(mask, connectivity)
        assert labels.dtype == np.int32 and labels.shape == mask.shape
        assert n == n_expected
        np.testing.assert_array_equal(labels, expected)  # same numbering: raster order


def test_label_components_diagonal_touch():
    mask = np.array([[1, 0], [0, 1]], dtype=bool)
    assert label_components(mask, connectivity=8)[1] == 1
    assert label_components(mask, connectivity=4)[1] == 2
    assert label_components(np.zeros((3, 3), bool))[1] == 0


def test_dilate_is_a_euclidean_disk():
    mask = np.zeros((21, 21), dtype=bool)
    mask[10, 10] = True
    out = dilate(mask, 4)
    yy, xx = np.mgrid[:21, :21]
    np.testing.assert_array_equal(out, (yy - 10) ** 2 + (xx - 10) ** 2 <= 16)
    np.testing.assert_array_equal(dilate(mask, 0), mask)
    # near the border, and a radius larger than the image
    corner = np.zeros((3, 5), dtype=bool)
    corner[0, 0] = True
    assert dilate(corner, 10).all()


def test_fill_small_holes_keeps_big_holes_and_border_background():
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:35, 5:35] = True
    mask[10:12, 10:12] = False  # small hole: 4 px
    mask[20:30, 20:30] = False  # big hole: 100 px (> 2 % of 800)
    out = fill_small_holes(mask, max_area_frac=0.02)
    assert out[10:12, 10:12].all()
    assert not out[20:30, 20:30].any()
    assert not out[0].any()  # background touching the border is never a hole
    np.testing.assert_array_equal(fill_small_holes(mask, max_area_frac=0.0), mask)


def test_keep_main_components_by_box_and_by_points():
    mask = np.zeros((50, 50), dtype=bool)
    mask[10:30, 10:30] = True  # the object, 400 px inside the box
    mask[12:14, 35:37] = True  # a speck inside the box, 4 px
    mask[45:49, 45:49] = True  # a speck outside the box
    box = np.array([5.0, 5.0, 40.0, 40.0])
    kept = keep_main_components(mask, box=box, coverage=0.9)
    assert kept[10:30, 10:30].all() and not kept[12:14, 35:37].any() and not kept[45:49, 45:49].any()
    # coverage 1.0 keeps every component with area inside the box
    kept_all = keep_main_components(mask, box=box, coverage=1.0)
    assert kept_all[12:14, 35:37].all() and not kept_all[45:49, 45:49].any()
    # points: every component holding a point
    by_points = keep_main_components(mask, points=np.array([[46.0, 46.0], [20.0, 20.0]]))
    assert (
        by_points[45:49, 45:49].all() and by_points[10:30, 10:30].all() and not by_points[12:14, 35:37].any()
    )


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask_policy="guess"), "mask_policy"),
        (dict(sam_model_type="vit_x"), "sam_model_type"),
        (dict(sam_model_type="custom"), "needs sam_arch"),
        (dict(sam_arch=TINY_SAM), "only used with sam_model_type='custom'"),
        (dict(score_threshold=1.5), "score_threshold"),
        (dict(score_threshold=float("nan")), "score_threshold"),
        (dict(dilate_px=-1), "dilate_px"),
        (dict(sam_batch_size=0), "sam_batch_size"),
        (dict(detector=""), "detector"),
    ],
)
def test_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SegmentConfig(**kwargs)


def test_config_is_frozen_and_serialisable():
    config = SegmentConfig(sam_model_type="custom", sam_arch=TINY_SAM)
    assert isinstance(config.sam_arch, SamArch) and config.arch.image_size == 64
    assert config.to_dict()["sam_arch"]["encoder_embed_dim"] == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mask_policy = "whole_image"
    with pytest.raises(ValueError, match="out of range"):
        SamArch(16, 2, 2, (5,))


# --------------------------------------------------------------------------- SAM loading


def test_build_sam_presets_equal_upstream_registry():
    """Our builder with the vit_b/l/h presets makes exactly upstream's architecture."""
    import torch
    from segment_anything import sam_model_registry

    for name, arch in SAM_ARCHS.items():
        with torch.device("meta"):  # shapes only, no memory, no time
            ours, theirs = build_sam(arch), sam_model_registry[name]()
        ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert ours_shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}, name


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "file-url"])
def test_sam_checkpoint_round_trip(sam_files, tmp_path, fmt):
    import torch

    path = sam_files["random"]["pth" if fmt == "file-url" else fmt]
    source = path.as_uri() if fmt == "file-url" else str(path)
    config = _sam_config(Path("unused"), cache_dir=str(tmp_path / "cache"))
    config = dataclasses.replace(config, sam_checkpoint=source)
    segmenter = Segmenter(config)
    assert segmenter.detector is None and segmenter.device.type == "cpu"
    expected = _tiny_sam(0).state_dict()
    loaded = segmenter.sam.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    if fmt == "file-url":
        assert len(os.listdir(tmp_path / "cache")) == 1  # downloaded once into the cache


class _Payload:
    """A pickled object that is not a tensor: ``weights_only=True`` must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (Path.touch, (Path(self.marker),))


def test_pickled_non_tensor_checkpoint_is_refused(tmp_path):
    import torch

    marker = tmp_path / "code-ran"
    bad = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "payload": _Payload(str(marker))}, bad)
    with pytest.raises(ValueError, match="refused: not a plain tensor checkpoint"):
        load_state_dict_safely(str(bad))
    with pytest.raises(ValueError, match="refused"):
        Segmenter(_sam_config(bad))
    assert not marker.exists()

    plain = tmp_path / "plain.pkl"  # a plain pickle, not even torch.save
    plain.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    with pytest.raises(ValueError, match="refused"):
        load_state_dict_safely(str(plain))
    assert not marker.exists()

    not_tensors = tmp_path / "numbers.pth"
    torch.save({"a": 1}, not_tensors)
    with pytest.raises(ValueError, match="expected a dict of name -> tensor"):
        load_state_dict_safely(str(not_tensors))
    with pytest.raises(ValueError, match="no such file"):
        load_state_dict_safely(str(tmp_path / "missing.pth"))


def test_a_checkpoint_url_is_downloaded_once_and_a_server_that_never_answers_fails_the_load(
    sam_files, tmp_path, monkeypatch
):
    """``--sam-checkpoint http://...`` from a server on 127.0.0.1: downloaded once, then read from the
    cache; a server that accepts and never answers is an error after the download timeout, not a hang."""
    import functools
    import http.server
    import socket
    import threading
    import time

    import torch

    import stages.masks.segment_models as models

    folder = sam_files["random"]["safetensors"].parent
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/random.safetensors"
        loaded = load_state_dict_safely(url, cache_dir=str(tmp_path / "cache"))
        cached = [p.name for p in (tmp_path / "cache").iterdir()]
        assert len(cached) == 1 and cached[0].endswith("-random.safetensors")  # no temporary left
    finally:
        server.shutdown()
        server.server_close()
    expected = {k: v.contiguous() for k, v in _tiny_sam(0).state_dict().items()}
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert load_state_dict_safely(url, cache_dir=str(tmp_path / "cache")).keys() == expected.keys()  # the cache

    monkeypatch.setattr(models, "DOWNLOAD_TIMEOUT_S", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts (by the kernel) and never answers
        start = time.monotonic()
        with pytest.raises(ValueError, match="download failed: .*timed out"):
            load_state_dict_safely(f"http://127.0.0.1:{silent.getsockname()[1]}/sam.pth", cache_dir=str(tmp_path / "c2"))
        assert time.monotonic() - start < 10
    assert not list((tmp_path / "c2").iterdir())


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    other = SamArch(**{**TINY_SAM, "encoder_embed_dim": 32})
    files = _save_sam(build_sam(other), tmp_path, "other")
    with pytest.raises(ValueError, match="does not fit sam_model_type='custom'"):
        Segmenter(_sam_config(files["safetensors"]))


# --------------------------------------------------------------------------- SAM masks


def test_batched_sam_equals_sam_predictor(sam_files):
    """Our batched path computes what ``SamPredictor.set_image`` + ``predict`` compute."""
    from segment_anything import SamPredictor

    segmenter = Segmenter(_sam_config(sam_files["random"]["safetensors"]))
    images = [_noise(80, 48, 0), _noise(30, 60, 1), _noise(64, 64, 2)]
    jobs = [
        SamPrompt(0, "sam_box", box=np.array([10.0, 5.0, 50.0, 40.0])),
        SamPrompt(1, "sam_points", points=np.array([[12.0, 30.0]])),  # one point: best of three
        SamPrompt(2, "sam_points", points=np.array([[10.0, 10.0], [40.0, 50.0]])),
    ]
    batched = segmenter.sam_logits(images, jobs)
    predictor = SamPredictor(segmenter.sam)
    for image, job, (logits, iou) in zip(images, jobs, batched, strict=True):
        assert logits.shape == (image.height, image.width) and logits.dtype == np.float32
        predictor.set_image(np.asarray(image))
        if job.box is not None:
            masks, scores, _ = predictor.predict(box=job.box, multimask_output=False, return_logits=True)
        else:
            labels = np.ones(len(job.points), dtype=int)
            multimask = len(job.points) == 1
            masks, scores, _ = predictor.predict(
                point_coords=job.points, point_labels=labels, multimask_output=multimask, return_logits=True
            )
        best = int(np.argmax(scores))
        np.testing.assert_allclose(logits, masks[best], rtol=1e-5, atol=1e-5)
        assert iou == pytest.approx(float(scores[best]), abs=1e-6)


def test_box_prompt_mask_is_clipped_to_the_box(sam_files):
    segmenter = Segmenter(_sam_config(sam_files["positive"]["safetensors"]))
    image = _noise(80, 48)
    box = (20.0, 10.0, 60.0, 30.0)
    (result,) = segmenter.resolve_masks([MaskItem(image, box=box)])
    assert result.source == "sam_box"
    assert result.mask.dtype == bool and result.mask.shape == (48, 80)
    # SAM says "everything"; the clip keeps the box grown by 10 % of its size per side
    expected = box_region(np.array(box), (48, 80), margin=0.1)
    np.testing.assert_array_equal(result.mask, expected)
    assert result.details["box"] == list(box) and 0 <= result.details["sam_iou"]

    dilated = Segmenter(_sam_config(sam_files["positive"]["safetensors"], dilate_px=2))
    (grown,) = dilated.resolve_masks([MaskItem(image, box=box)])
    np.testing.assert_array_equal(grown.mask, dilate(expected, 2))


def test_sam_quality_checks(sam_files):
    image = _noise(80, 48)
    negative = Segmenter(_sam_config(sam_files["negative"]["safetensors"]))
    (empty,) = negative.resolve_masks([MaskItem(image, field="concepts[3]", box=(20, 10, 60, 30))])
    assert isinstance(empty, RowError)
    assert empty.field == "concepts[3].mask" and "empty mask" in empty.reason

    positive = Segmenter(_sam_config(sam_files["positive"]["safetensors"]))
    (everything,) = positive.resolve_masks([MaskItem(image, points=((40, 20),))])
    assert isinstance(everything, RowError)
    assert "100.0% of the image" in everything.reason and "max_mask_coverage=98%" in everything.reason

    bad_box, outside = positive.resolve_masks(
        [MaskItem(image, box=(30, 10, 20, 30)), MaskItem(image, field="concepts[1]", points=((100, 5),))]
    )
    assert bad_box.field == "concepts[0].box" and "inverted" in bad_box.reason
    assert outside.field == "concepts[1].points" and "outside the 80x48 image" in outside.reason


def test_run_batched_isolates_the_failing_item():
    calls = []

    def fn(chunk):
        calls.append(list(chunk))
        if "bad" in chunk:
            raise RuntimeError("CUDA out of memory (pretend)")
        return [f"ok:{x}" for x in chunk]

    items = ["a", "b", "bad", "c", "d"]
    out = run_batched(fn, items, 4, lambda item, exc: RowError(f"item.{item}", str(exc)))
    assert out[:2] == ["ok:a", "ok:b"] and out[3:] == ["ok:c", "ok:d"]
    assert isinstance(out[2], RowError) and out[2].field == "item.bad" and "out of memory" in out[2].reason
    assert calls[0] == ["a", "b", "bad", "c"]  # the whole chunk first, then halves


# --------------------------------------------------------------------------- precedence


def test_precedence_without_models():
    segmenter = Segmenter(SegmentConfig(device="cpu"))
    image = _noise(40, 30)
    file_mask = np.zeros((30, 40), dtype=bool)
    file_mask[5:10, 5:10] = True
    alpha = np.zeros((30, 40), dtype=np.uint8)
    alpha[10:20, 10:30] = 200
    alpha[0, 0] = 127  # below 50 %: outside
    opaque = np.full((30, 40), 255, dtype=np.uint8)
    items = [
        MaskItem(image, file_mask=file_mask, alpha=alpha, box=(0, 0, 10, 10)),  # file wins
        MaskItem(image, alpha=alpha, box=(0, 0, 10, 10)),  # alpha next
        MaskItem(image, alpha=opaque),  # a fully opaque alpha carries nothing
        MaskItem(image, field="concepts[4]", box=(0, 0, 10, 10), text="a hat"),  # no SAM configured
        MaskItem(image, alpha=np.zeros((30, 40), np.uint8)),  # fully transparent
        MaskItem(image, mask_policy="whole_image"),
    ]
    file_res, alpha_res, opaque_res, box_res, clear_res, whole_res = segmenter.resolve_masks(items)
    assert file_res.source == "file"
    np.testing.assert_array_equal(file_res.mask, file_mask)
    assert alpha_res.source == "alpha"
    np.testing.assert_array_equal(alpha_res.mask, alpha >= 128)
    assert isinstance(opaque_res, RowError) and "alpha channel (fully opaque)" in opaque_res.reason
    assert isinstance(box_res, RowError) and box_res.field == "concepts[4].mask"
    assert box_res.stage == "segment"
    for tried in (
        "no mask source applies (mask_policy='fail')",
        "mask file (none given)",
        "alpha channel (image has none)",
        "SAM box/points (given, but no sam_checkpoint configured)",
        "detector (not configured)",
    ):
        assert tried in box_res.reason
    assert isinstance(clear_res, RowError) and "fully transparent" in clear_res.reason
    assert whole_res.source == "whole_image" and whole_res.mask.all() and whole_res.mask.shape == (30, 40)

    whole = Segmenter(SegmentConfig(mask_policy="whole_image", device="cpu"))
    (res,) = whole.resolve_masks([MaskItem(image)])
    assert res.source == "whole_image" and res.mask.dtype == bool


def test_box_beats_detector_and_detector_needs_sam(sam_files, detectors):
    both = Segmenter(_sam_config(sam_files["positive"]["safetensors"], detector=str(detectors["finds"])))
    (res,) = both.resolve_masks([MaskItem(_noise(80, 48), box=(20, 10, 60, 30), text="a hat")])
    assert res.source == "sam_box"
    no_sam = Segmenter(SegmentConfig(detector=str(detectors["finds"]), device="cpu"))
    (err,) = no_sam.resolve_masks([MaskItem(_noise(80, 48), text="a hat")])
    assert "detector (no sam_checkpoint configured to segment its box)" in err.reason


# --------------------------------------------------------------------------- detector


def test_detector_box_then_sam_batched(sam_files, detectors):
    config = _sam_config(
        sam_files["positive"]["safetensors"], detector=str(detectors["finds"]), detector_batch_size=2
    )
    segmenter = Segmenter(config)
    assert type(segmenter.detector).__name__ == "Owlv2ForObjectDetection"
    images = [_noise(80, 48, 0), _noise(30, 60, 1), _noise(50, 50, 2)]
    texts = ["a red hat", "a very long prompt that is longer than the text encoder's limit " * 3, "dog"]
    results = segmenter.resolve_masks(
        [
            MaskItem(im, field=f"concepts[{i}]", text=t)
            for i, (im, t) in enumerate(zip(images, texts, strict=True))
        ]
    )
    for image, result in zip(images, results, strict=True):
        assert not isinstance(result, RowError), result
        assert result.source == "detector"
        assert result.mask.shape == (image.height, image.width) and result.mask.dtype == bool
        x0, y0, x1, y1 = result.details["box"]
        assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
        assert result.details["score"] > config.score_threshold
        # SAM (constant "everything") inside the detector's box, clipped to the grown box
        expected = box_region(np.array(result.details["box"]), result.mask.shape, margin=0.1)
        np.testing.assert_array_equal(result.mask, expected)


def test_detector_found_nothing_above_threshold(sam_files, detectors):
    segmenter = Segmenter(_sam_config(sam_files["positive"]["safetensors"], detector=str(detectors["blind"])))
    (err,) = segmenter.resolve_masks([MaskItem(_noise(60, 40), field="concepts[2]", text="a unicorn")])
    assert isinstance(err, RowError)
    assert err.field == "concepts[2].label" and err.stage == "segment"
    assert "detector found no 'a unicorn' above score_threshold=0.1" in err.reason
    # a concept without a label is looked for by its prompt: the error names that field
    spec = ConceptSpec(image="x.png", prompt="a unicorn")
    (err,) = segmenter.resolve_masks([MaskItem.from_spec(spec, _noise(60, 40), index=1)])
    assert isinstance(err, RowError) and err.field == "concepts[1].prompt", err
    (err,) = segmenter.resolve_masks(
        [MaskItem.from_spec(dataclasses.replace(spec, label="unicorn"), _noise(60, 40), index=1)]
    )
    assert isinstance(err, RowError) and err.field == "concepts[1].label", err


def test_detector_of_unsupported_type_is_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a 'bert' model; supported"):
        Segmenter(SegmentConfig(detector=str(tmp_path), device="cpu"))


# --------------------------------------------------------------------------- the stage


def _row(key: str, concepts: list[ConceptSpec], base_dir: str = "") -> dict:
    return {"key": key, "concepts": [c.to_row() for c in concepts], "base_dir": base_dir}


def _batch(rows: list[dict]) -> dict:
    batch = {}
    for name in rows[0]:
        column = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):
            column[i] = row[name]
        batch[name] = column
    return batch


def test_concept_spec_from_ray_style_dict():
    spec = ConceptSpec(
        image="a.png",
        prompt="a hat",
        box=(1.0, 2.0, 3.0, 4.0),
        points=((1.0, 2.0),),
        context=ContextSpec(onto=0, anchor=(0.1, 0.2, 0.3, 0.4), scale=0.4, soft_edge=2),
    )
    raw = spec.to_row()
    raw["box"] = np.array(raw["box"])  # Ray hands lists over as numpy arrays
    raw["points"] = np.array(raw["points"])
    raw["context"]["onto"] = np.int64(0)
    raw["context"]["anchor"] = np.array(raw["context"]["anchor"])
    assert ConceptSpec.from_row(raw) == spec
    manifest_style = {
        "image": "b.png",
        "prompt": "p",
        "context": {"onto": "carrier.png", "box": [0, 0, 1, 1]},
    }
    assert ConceptSpec.from_row(manifest_style).context.anchor == (0.0, 0.0, 1.0, 1.0)


def test_segment_stage_rows_fail_alone(tmp_path, sam_files):
    cutout = np.zeros((40, 50, 4), dtype=np.uint8)
    cutout[..., :3] = 120
    cutout[10:30, 15:35, 3] = 255
    Image.fromarray(cutout).save(tmp_path / "cutout.png")
    _noise(80, 48).save(tmp_path / "photo.png")

    stage = SegmentStage(_sam_config(sam_files["positive"]["safetensors"]))
    rows = [
        _row("alpha", [ConceptSpec(image="cutout.png", prompt="a mug")], str(tmp_path)),
        _row(
            "missing",
            [ConceptSpec(image="cutout.png", prompt="x"), ConceptSpec(image="nope.png", prompt="y")],
            str(tmp_path),
        ),
        _row("box", [ConceptSpec(image="photo.png", prompt="a hat", box=(20, 10, 60, 30))], str(tmp_path)),
        _row("nothing", [ConceptSpec(image="photo.png", prompt="a hat")], str(tmp_path)),
        _row("earlier", [ConceptSpec(image="photo.png", prompt="a hat")], str(tmp_path)),
    ]
    batch = _batch(rows)
    batch["error_stage"] = np.array(["", "", "", "", "validate"], dtype=object)
    batch["error_field"] = np.array(["", "", "", "", "seeds"], dtype=object)
    batch["error_reason"] = np.array(["", "", "", "", "empty"], dtype=object)
    out = stage(batch)

    assert set(out) >= {
        "key",
        "concepts",
        "base_dir",
        "resolved",
        "error_stage",
        "error_field",
        "error_reason",
    }
    assert all(isinstance(v, np.ndarray) and v.shape == (5,) for v in out.values())
    alpha, missing, box, nothing, earlier = ({name: out[name][i] for name in out} for i in range(5))
    assert alpha["error_reason"] == ""
    (mug,) = [ResolvedConcept.from_row(d) for d in alpha["resolved"]]
    assert mug.mask_source == "alpha" and mug.mask.shape == (40, 50)
    np.testing.assert_array_equal(mug.mask, cutout[..., 3] >= 128)
    assert mug.image.mode == "RGB" and mug.image.size == (50, 40) and mug.prompt == "a mug"

    assert missing["error_stage"] == "segment" and missing["error_field"] == "concepts[1].image"
    assert "file not found" in missing["error_reason"] and len(missing["resolved"]) == 0

    (hat,) = [ResolvedConcept.from_row(d) for d in box["resolved"]]
    assert hat.mask_source == "sam_box" and hat.extra["mask"]["box"] == [20.0, 10.0, 60.0, 30.0]

    assert (
        nothing["error_field"] == "concepts[0].mask" and "no mask source applies" in nothing["error_reason"]
    )
    assert (earlier["error_stage"], earlier["error_field"], earlier["error_reason"]) == (
        "validate",
        "seeds",
        "empty",
    )
    assert len(earlier["resolved"]) == 0


def test_segment_stage_upstream_jpeg_masks(samples_dir):
    """The release's masks (JPEG, another size) thresholded at 50 % and resized (nearest)."""
    case = samples_dir / "dog_hat_sunglasses_0"
    names = ("dog", "hat", "sunglasses")
    concepts = [ConceptSpec(image=f"image/{n}.jpg", prompt=f"a {n}", mask=f"mask/{n}.jpg") for n in names]
    out = SegmentStage(SegmentConfig(device="cpu"))(_batch([_row("case", concepts, str(case))]))
    assert out["error_reason"][0] == ""
    resolved = [ResolvedConcept.from_row(d) for d in out["resolved"][0]]
    for name, concept in zip(names, resolved, strict=True):
        image = Image.open(case / "image" / f"{name}.jpg")
        level = (
            Image.open(case / "mask" / f"{name}.jpg")
            .convert("L")
            .resize(image.size, Image.Resampling.NEAREST)
        )
        assert concept.mask_source == "file"
        np.testing.assert_array_equal(concept.mask, np.asarray(level) >= 128)
        assert concept.image.size == image.size and len(concept.image_digest) == 64


def test_masks_and_composites_without_models_never_import_torch(samples_dir, tmp_path):
    """The CPU actors that resolve concept groups as shards come up (``pipeline.shard_units``) run these
    two stages on masks from files: no model, so no torch (1.5 s and about 300 MB per actor)."""
    import subprocess
    import sys

    code = f"""
import sys
from stages.base import to_column
from stages.inputs.concepts import ConceptSpec
from stages.masks.composite import CompositeStage
from stages.masks.segment import SegmentConfig
from stages.masks.segment_stage import SegmentStage
names = ("dog", "hat")
row = {{"key": "case", "base_dir": {str(samples_dir / "dog_hat_sunglasses_0")!r},
       "concepts": [ConceptSpec(image=f"image/{{n}}.jpg", prompt=f"a {{n}}", mask=f"mask/{{n}}.jpg").to_row()
                    for n in names]}}
batch = {{k: to_column([v]) for k, v in row.items()}}
identity = dict(model_id="tiny", height=64, width=64, num_inference_steps=2, reference_seed=0, mrsa={{"blocks": [5, 6]}})
out = CompositeStage(out_dir={str(tmp_path)!r}, identity_defaults=identity)(SegmentStage(SegmentConfig())(batch))
assert out["error_reason"][0] == "" and out["concept_set_id"][0], out
assert "torch" not in sys.modules, "torch imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
