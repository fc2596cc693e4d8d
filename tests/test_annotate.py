"""stages.generation.annotate and stages.generation.embed without Ray: the annotation rule on hand-made attention maps, the
saved maps read back, overlap, refinement with the tiny random SAM and OWLv2 of tests/test_segment.py,
--min-score's bounds over presence and overlap, and references resized as the engine does."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from freecustom_core.heatmap import maps_image
from stages.generation.annotate import annotate, annotate_sample, attention_region, decode_panels, overlap
from stages.generation.embed import engine_input
from stages.inputs.concepts import mask_from_png
from stages.masks.morphology import box_region
from stages.masks.segment import SegmentConfig, Segmenter
from stages.scoring.score import failed_thresholds, parse_min_score
from tests.test_segment import _build_detector, _sam_config, _save_sam, _tiny_sam


def blob_map() -> np.ndarray:
    """(48, 80): a big blob (rows 10-29, cols 40-69, value 0.6, one pixel 0.8), a smaller brighter one
    (rows 2-5, cols 2-9, value 0.7), a faint haze 0.1 elsewhere, and a pixel at exactly half the peak."""
    heat = np.full((48, 80), 0.1, dtype=np.float32)
    heat[10:30, 40:70] = 0.6
    heat[15, 50] = 0.8
    heat[2:6, 2:10] = 0.7
    heat[30, 40] = 0.4  # exactly 0.5 x 0.8: kept, and 4-connected to the big blob below its corner
    heat[31, 41] = 0.6  # diagonal only: not part of the blob
    return heat


def test_rule_on_a_hand_made_map():
    heat = blob_map()
    region = attention_region(heat)
    expected = np.zeros_like(heat, dtype=bool)
    expected[10:30, 40:70] = True
    expected[30, 40] = True
    np.testing.assert_array_equal(region.mask, expected)
    assert region.box == [40, 10, 70, 31]  # pixel edges: x1, y1 exclusive
    assert region.confidence == pytest.approx(heat[expected].sum() / heat.sum())
    assert region.presence == pytest.approx(heat[expected].mean())
    assert region.source == "attention"
    # another threshold: only the peak pixel is at >= 0.9 x max
    tight = attention_region(heat, threshold=0.9)
    assert tight.box == [50, 15, 51, 16] and tight.mask.sum() == 1


def test_ties_go_to_the_heavier_component_and_an_empty_map_gives_nothing():
    heat = np.zeros((20, 20), dtype=np.float32)
    heat[1:3, 1:3] = 0.5  # 4 pixels, mass 2.0
    heat[10:12, 10:12] = 1.0  # 4 pixels, mass 4.0
    assert attention_region(heat).box == [10, 10, 12, 12]
    empty = attention_region(np.zeros((8, 8), dtype=np.float32))
    assert empty.box == [0, 0, 0, 0] and not empty.mask.any() and empty.confidence == 0 == empty.presence


def test_overlap_is_the_largest_pairwise_iou():
    a, b, c = (np.zeros((10, 10), dtype=bool) for _ in range(3))
    a[0:4, 0:5] = True  # 20 px
    b[0:4, 2:7] = True  # 20 px, 12 shared with a: IoU 12/28
    c[6:10, 6:10] = True  # disjoint
    assert overlap([a, b, c]) == pytest.approx(12 / 28)
    assert overlap([a, c]) == 0.0 and overlap([a]) == 0.0


def test_saved_panels_read_back_and_annotate_like_the_maps():
    rng = np.random.default_rng(3)
    maps = (0.45 * rng.random((2, 6, 10))).astype(np.float32)  # the latent grid of an 80 x 48 image
    maps[1, 1:3, 6:9] = 0.93
    drawn = maps_image(maps, (80, 48))
    buf = io.BytesIO()
    drawn.save(buf, format="PNG")
    heats = decode_panels(buf.getvalue(), 2, (80, 48))
    assert heats.shape == (2, 48, 80)
    upsampled = np.repeat(np.repeat(maps, 8, axis=1), 8, axis=2)  # nearest, 8 px per latent cell
    assert np.abs(heats - upsampled).max() <= 1 / 765 + 1e-6
    meta = {
        "attention": {"panels": 2, "panel_size": [80, 48], "gap": 4},
        "concepts": [{"prompt": "a"}, {"prompt": "b"}],
    }
    fields, members = annotate_sample(meta, buf.getvalue())
    assert fields["annotations"][1]["box"] == [48, 8, 72, 24]  # latent cells 6..8 x 1..2, times 8
    assert [a["mask"] for a in fields["annotations"]] == ["ann0.mask.png", "ann1.mask.png"]
    np.testing.assert_array_equal(mask_from_png(members["ann1.mask.png"]), attention_region(heats[1]).mask)
    assert fields["overlap"] == pytest.approx(overlap([attention_region(h).mask for h in heats]), abs=1e-6)


def test_panels_of_another_size_are_refused():
    drawn = maps_image(np.zeros((2, 6, 10)), (80, 48))
    buf = io.BytesIO()
    drawn.save(buf, format="PNG")
    with pytest.raises(ValueError, match="is not 3 panels of 80x48"):
        decode_panels(buf.getvalue(), 3, (80, 48))


@pytest.fixture(scope="module")
def refiners(tmp_path_factory):
    root = tmp_path_factory.mktemp("refiners")
    sam = _save_sam(_tiny_sam(1, constant_logit=1.0), root, "positive")["safetensors"]
    return {
        "sam": sam,
        "finds": _build_detector(root / "finds", logit_shift=6.0),
        "blind": _build_detector(root / "blind", logit_shift=-20.0),
    }


def test_sam_refines_the_attention_box(refiners):
    heat = blob_map()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    segmenter = Segmenter(_sam_config(refiners["sam"]))
    (region,), _ = annotate(heat[None], image, ["a dog"], segmenter)
    # SAM says "everything" (constant positive logits), clipped to the attention box grown by 10 %
    expected = box_region(np.array([40, 10, 70, 31], dtype=float), heat.shape, margin=0.1)
    np.testing.assert_array_equal(region.mask, expected)
    assert region.source == "sam"
    assert region.confidence == pytest.approx(heat[expected].sum() / heat.sum())


def test_detector_refines_and_falls_back_to_attention(refiners):
    heat = blob_map()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    finds = Segmenter(_sam_config(refiners["sam"], detector=str(refiners["finds"])))
    (region,), _ = annotate(heat[None], image, ["a dog"], finds)
    assert region.source == "detector+sam"
    x0, y0, x1, y1 = region.box
    assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 48
    alone = Segmenter(
        SegmentConfig(detector=str(refiners["finds"]), device="cpu")
    )  # no SAM: the box is the mask
    (boxed,), _ = annotate(heat[None], image, ["a dog"], alone)
    assert boxed.source == "detector" and boxed.mask.sum() == (boxed.box[2] - boxed.box[0]) * (
        boxed.box[3] - boxed.box[1]
    )
    blind = Segmenter(SegmentConfig(detector=str(refiners["blind"]), device="cpu"))
    (kept,), _ = annotate(heat[None], image, ["a unicorn"], blind)
    assert kept.source == "attention" and kept.box == attention_region(heat).box


def test_min_score_bounds_over_presence_and_overlap():
    assert parse_min_score("presence=0.1") == ("presence", 0.1)
    assert parse_min_score(" overlap < 0.5") == ("overlap<", 0.5)
    signals = {"presence": [0.3, 0.08], "overlap": 0.5}
    assert failed_thresholds(signals, {"presence": 0.1}) == ["presence<0.1"]  # every concept must reach it
    assert failed_thresholds(signals, {"presence": 0.05}) == []
    assert failed_thresholds(signals, {"overlap<": 0.5}) == ["overlap>=0.5"]  # the bound itself fails
    assert failed_thresholds(signals, {"overlap<": 0.6}) == []
    assert failed_thresholds(signals, {"presence<": 0.3}) == ["presence>=0.3"]  # an upper bound: the maximum
    with pytest.raises(ValueError, match="NAME<VALUE"):
        parse_min_score("overlap>0.5")


def test_references_resized_as_the_engine_does():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    mask = Image.new("L", (50, 30), 0)
    mask.paste(200, (10, 5, 30, 20))
    resized, inside = engine_input(image, mask, (80, 48))
    assert resized.size == (80, 48) and inside.shape == (48, 80)
    np.testing.assert_array_equal(
        np.asarray(resized), np.asarray(image.resize((80, 48), Image.Resampling.LANCZOS))
    )
    np.testing.assert_array_equal(inside, np.asarray(mask.resize((80, 48), Image.Resampling.NEAREST)) >= 128)
    same, kept = engine_input(image, mask, (50, 30))
    assert same is image and kept.sum() == 20 * 15


def test_flux_refuses_annotate_with_a_reason():
    from stages.reference.family import ModelFamily

    (reason,) = ModelFamily("flux", "FluxPipeline").refusals(annotate=True)
    assert reason.startswith("--annotate: annotations are drawn from MRSA attention maps")
    assert ModelFamily().refusals(annotate=True) == []
