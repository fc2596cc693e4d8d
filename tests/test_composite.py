"""stages.masks.paste, stages.masks.composite, stages.masks.previews: copy-paste geometry on synthetic shapes (a red
square carrier, a blue disc object), exact masks, determinism, clipping, errors, concept sets,
previews and the stage."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from stages.errors import RowError
from stages.inputs.concepts import ConceptSpec, ContextSpec, ResolvedConcept, image_to_png, mask_to_png
from stages.inputs.read import image_digest, load_image, load_mask, mask_digest
from stages.masks.composite import CompositeStage, resolve_concept_set
from stages.masks.paste import ANCHOR_POINTS, make_composite, mask_bbox
from stages.masks.previews import preview_files, write_previews
from stages.output.folder import OutputFolder

RED, BLUE, GREY = (220, 30, 30), (0, 0, 255), (90, 90, 90)
CARRIER_BOX = (50, 60, 150, 160)  # the red square: 100 x 100


def carrier(size=(200, 200), box=CARRIER_BOX):
    """A grey image with a red square; the mask is the square."""
    arr = np.full((size[1], size[0], 3), GREY, dtype=np.uint8)
    mask = np.zeros((size[1], size[0]), dtype=bool)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = RED
    mask[y0:y1, x0:x1] = True
    return Image.fromarray(arr), mask


def disc(size=100, radius=20, centre=(50, 50)):
    """A white image with a blue disc; the mask is the disc (41 x 41 pixels across)."""
    yy, xx = np.mgrid[:size, :size]
    mask = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius**2
    arr = np.full((size, size, 3), 255, dtype=np.uint8)
    arr[mask] = BLUE
    return Image.fromarray(arr), mask


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def expected_paste_box(anchor: str, scale: float, object_size=(41, 41), box=CARRIER_BOX):
    """The module docstring's geometry, written out again independently."""
    ow, oh = object_size
    bw, bh = box[2] - box[0], box[3] - box[1]
    f = scale * min(bw / ow, bh / oh)
    tw, th = round_half_up(ow * f), round_half_up(oh * f)
    carrier_point = {"top": (0.5, 0), "upper": (0.5, 0.3), "center": (0.5, 0.5), "lower": (0.5, 0.75),
                     "left": (0, 0.5), "right": (1, 0.5)}[anchor]  # fmt: skip
    object_point = {"top": (0.5, 0.75), "left": (0.75, 0.5), "right": (0.25, 0.5)}.get(anchor, (0.5, 0.5))
    x0 = round_half_up(box[0] + carrier_point[0] * bw - object_point[0] * tw)
    y0 = round_half_up(box[1] + carrier_point[1] * bh - object_point[1] * th)
    return [x0, y0, x0 + tw, y0 + th]


def assert_exact(composite, object_mask, updated, carrier_image, carrier_mask, colour=BLUE):
    """The object mask is exactly the pasted pixels; everything else is the carrier untouched."""
    comp = np.asarray(composite)
    base = np.asarray(carrier_image)
    assert composite.mode == "RGB" and composite.size == carrier_image.size
    assert object_mask.dtype == bool and object_mask.shape == carrier_mask.shape
    assert (comp[object_mask] == colour).all()
    np.testing.assert_array_equal(comp[~object_mask], base[~object_mask])
    np.testing.assert_array_equal(updated, carrier_mask & ~object_mask)


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("anchor", sorted(ANCHOR_POINTS))
def test_anchor_placement_and_scale(anchor):
    carrier_image, carrier_mask = carrier()
    obj_image, obj_mask = disc()
    composite, object_mask, updated, recipe = make_composite(
        obj_image, obj_mask, carrier_image, carrier_mask, anchor=anchor, scale=0.5
    )
    assert recipe["object_box"] == [30, 30, 71, 71] and recipe["carrier_box"] == list(CARRIER_BOX)
    assert recipe["paste_box"] == expected_paste_box(anchor, 0.5)
    x0, y0, x1, y1 = recipe["paste_box"]
    assert (x1 - x0, y1 - y0) == (50, 50)  # 0.5 x the 100 px box, aspect kept
    # the disc fills its paste box up to a pixel of anti-aliasing at the four extreme points
    bx0, by0, bx1, by1 = mask_bbox(object_mask)
    assert x0 <= bx0 <= x0 + 1 and y0 <= by0 <= y0 + 1 and x1 - 1 <= bx1 <= x1 and y1 - 1 <= by1 <= y1
    assert_exact(composite, object_mask, updated, carrier_image, carrier_mask)


def test_anchor_geometry_in_words():
    """top: centred, lower quarter over the box top; upper: centred at 30 %; left: right
    quarter over the box's left edge."""
    carrier_image, carrier_mask = carrier()
    obj_image, obj_mask = disc()
    top = make_composite(obj_image, obj_mask, carrier_image, carrier_mask, anchor="top", scale=0.4)[3]
    x0, y0, x1, y1 = top["paste_box"]  # 40 x 40
    assert (x0 + x1) / 2 == 100 and y1 - 60 == 10  # 10 px = 25 % of 40 inside the box
    upper = make_composite(obj_image, obj_mask, carrier_image, carrier_mask, anchor="upper", scale=0.4)[3]
    assert (upper["paste_box"][1] + upper["paste_box"][3]) / 2 == 60 + 30
    left = make_composite(obj_image, obj_mask, carrier_image, carrier_mask, anchor="left", scale=0.4)[3]
    assert left["paste_box"][2] - 50 == 10 and (left["paste_box"][1] + left["paste_box"][3]) / 2 == 110


def test_scale_uses_the_limiting_side():
    wide_box = (20, 80, 180, 120)  # 160 x 40: the height limits a round object
    carrier_image, carrier_mask = carrier(box=wide_box)
    obj_image, obj_mask = disc()
    for scale in (0.25, 0.5, 1.0):
        recipe = make_composite(
            obj_image, obj_mask, carrier_image, carrier_mask, anchor="center", scale=scale
        )[3]
        x0, y0, x1, y1 = recipe["paste_box"]
        assert (x1 - x0, y1 - y0) == (round_half_up(40 * scale), round_half_up(40 * scale))
    # a wide object in a square box: the width limits
    wide_obj = np.zeros((100, 100), dtype=bool)
    wide_obj[40:60, 10:90] = True  # 80 x 20
    recipe = make_composite(
        Image.new("RGB", (100, 100), BLUE), wide_obj, *carrier(), anchor="center", scale=0.5
    )[3]
    x0, y0, x1, y1 = recipe["paste_box"]
    assert (x1 - x0, y1 - y0) == (50, round_half_up(20 * 50 / 80))


def test_explicit_relative_box():
    carrier_image, carrier_mask = carrier()
    obj_image, obj_mask = disc()
    composite, object_mask, updated, recipe = make_composite(
        obj_image, obj_mask, carrier_image, carrier_mask, anchor=(0.0, 0.0, 0.5, 0.3), scale=0.9
    )
    # target (50, 60)-(100, 90): 50 x 30; the disc fits by height (30) and is centred
    assert recipe["paste_box"] == [60, 60, 90, 90]
    assert recipe["anchor"] == [0.0, 0.0, 0.5, 0.3] and recipe["scale"] is None  # the box is the size
    assert_exact(composite, object_mask, updated, carrier_image, carrier_mask)


def test_object_larger_than_the_carrier_image_is_clipped():
    carrier_image, carrier_mask = carrier(size=(120, 100), box=(10, 10, 110, 90))
    obj = np.zeros((60, 60), dtype=bool)
    obj[5:55, 5:55] = True  # a 50 x 50 blue square
    obj_image = Image.new("RGB", (60, 60), BLUE)
    composite, object_mask, updated, recipe = make_composite(
        obj_image, obj, carrier_image, carrier_mask, anchor="top", scale=3.0
    )
    x0, y0, x1, y1 = recipe["paste_box"]  # 240 x 240, far beyond the 120 x 100 image
    assert (x1 - x0, y1 - y0) == (240, 240) and x0 < 0 and y0 < 0 and x1 > 120
    expected = np.zeros((100, 120), dtype=bool)
    expected[: max(0, y1), :] = True  # the visible part of the square: every column, rows above y1
    np.testing.assert_array_equal(object_mask, expected)
    assert_exact(composite, object_mask, updated, carrier_image, carrier_mask)
    assert updated.any() and updated.sum() == carrier_mask[y1:].sum()


def test_soft_edge_feathers_inward_only():
    carrier_image, carrier_mask = carrier()
    obj_image, obj_mask = disc()
    hard = make_composite(obj_image, obj_mask, carrier_image, carrier_mask, anchor="center", scale=0.5)
    soft = make_composite(
        obj_image, obj_mask, carrier_image, carrier_mask, anchor="center", scale=0.5, soft_edge=3
    )
    assert soft[3]["soft_edge"] == 3
    assert soft[1].sum() < hard[1].sum() and not (soft[1] & ~hard[1]).any()  # the mask shrinks
    base, comp = np.asarray(carrier_image), np.asarray(soft[0])
    np.testing.assert_array_equal(comp[~hard[1]], base[~hard[1]])  # nothing outside the hard edge
    assert (comp[hard[1] & ~soft[1]] != BLUE).any()  # a blend at the edge


def test_deterministic_bytes():
    def render(soft_edge):
        carrier_image, carrier_mask = carrier()
        obj_image, obj_mask = disc()
        composite, object_mask, updated, recipe = make_composite(
            obj_image, obj_mask, carrier_image, carrier_mask, anchor="upper", scale=0.7, soft_edge=soft_edge
        )
        buf = io.BytesIO()
        composite.save(buf, format="PNG")
        return buf.getvalue(), object_mask.tobytes(), updated.tobytes(), recipe

    for soft_edge in (0, 2):
        assert render(soft_edge) == render(soft_edge)


@pytest.mark.parametrize(
    "kwargs, field, message",
    [
        (dict(carrier_mask=np.zeros((200, 200), bool)), "context.onto", "carrier's mask is empty"),
        (dict(obj_mask=np.zeros((100, 100), bool)), "mask", "object's mask is empty"),
        (dict(anchor="above"), "context.anchor", "unknown anchor 'above'"),
        (dict(anchor=(0.5, 0.5, 0.2, 0.9)), "context.anchor", "is empty"),
        (dict(anchor=(0, 0, 1.5, 1)), "context.anchor", "in [0, 1]"),
        (dict(scale=0.0), "context.scale", "scale=0.0"),
        (dict(scale=float("nan")), "context.scale", "scale=nan"),
        (dict(soft_edge=-1), "context.soft_edge", "soft_edge=-1"),
        (dict(carrier_mask=np.ones((10, 10), bool)), "context.onto", "differs from the carrier image's"),
    ],
)
def test_errors_name_field_and_reason(kwargs, field, message):
    carrier_image, carrier_mask = carrier()
    obj_image, obj_mask = disc()
    args = (
        dict(obj_mask=obj_mask, carrier_mask=carrier_mask, anchor="center", scale=0.5, soft_edge=0) | kwargs
    )
    with pytest.raises(RowError) as info:
        make_composite(
            obj_image,
            args["obj_mask"],
            carrier_image,
            args["carrier_mask"],
            anchor=args["anchor"],
            scale=args["scale"],
            soft_edge=args["soft_edge"],
        )
    assert info.value.field == field and message in info.value.reason


# --------------------------------------------------------------------------- concept sets


def resolved(image: Image.Image, mask: np.ndarray, prompt: str, path: str = "") -> ResolvedConcept:
    return ResolvedConcept(
        image=image,
        mask=mask,
        prompt=prompt,
        weight=3.0,
        mask_source="file",
        image_digest=image_digest(image),
        mask_digest=mask_digest(mask),
        image_path=path,
    )


def concept_set():
    carrier_image, carrier_mask = carrier()
    hat_image, hat_mask = disc()
    glasses = np.zeros((60, 60), dtype=bool)
    glasses[20:40, 5:55] = True
    glasses_image = Image.new("RGB", (60, 60), (0, 200, 0))
    concepts = [
        resolved(carrier_image, carrier_mask, "a dog", "dog.png"),
        resolved(hat_image, hat_mask, "a hat", "hat.png"),
        resolved(glasses_image, glasses, "glasses", "glasses.png"),
    ]
    specs = [
        ConceptSpec(image="dog.png", prompt="a dog"),
        ConceptSpec(image="hat.png", prompt="a hat", context=ContextSpec(onto=0, anchor="top", scale=0.5)),
        ConceptSpec(
            image="glasses.png", prompt="glasses", context=ContextSpec(onto=0, anchor="upper", scale=0.6)
        ),
    ]
    return concepts, specs


def test_resolve_concept_set_builds_one_scene_with_disjoint_masks():
    concepts, specs = concept_set()
    final = resolve_concept_set(concepts, specs)
    dog, hat, glasses = final
    scene = np.asarray(dog.image)
    for c in final:  # one picture, three references
        np.testing.assert_array_equal(np.asarray(c.image), scene)
        assert c.mask_source == "composite" and c.image_digest == image_digest(dog.image)
        assert c.mask_digest == mask_digest(c.mask) and c.composite["objects"][0]["concept"] == 1
    assert (
        not (dog.mask & hat.mask).any()
        and not (dog.mask & glasses.mask).any()
        and not (hat.mask & glasses.mask).any()
    )
    np.testing.assert_array_equal(dog.mask, concepts[0].mask & ~hat.mask & ~glasses.mask)
    assert (scene[hat.mask] == BLUE).all() and (scene[glasses.mask] == (0, 200, 0)).all()
    assert dog.composite["role"] == "carrier" and hat.composite["role"] == "object"
    assert hat.composite["carrier"] == {
        "concept": 0,
        "image_digest": concepts[0].image_digest,
        "mask_digest": concepts[0].mask_digest,
        "mask_source": "file",
    }
    assert [o["anchor"] for o in hat.composite["objects"]] == ["top", "upper"]
    assert hat.extra["source_image_digest"] == concepts[1].image_digest and hat.image_path == "hat.png"
    assert (hat.prompt, hat.weight) == ("a hat", 3.0)
    # the inputs are untouched, and a set without context comes back as it was
    assert concepts[0].mask_source == "file"
    plain = [dataclasses.replace(s, context=None) for s in specs]
    assert resolve_concept_set(concepts, plain) == concepts


def test_later_pastes_cover_earlier_ones():
    concepts, specs = concept_set()
    block = np.ones((60, 60), dtype=bool)  # a solid square, pasted over the hat
    concepts[2] = resolved(Image.new("RGB", (60, 60), (0, 200, 0)), block, "a box")
    specs[2] = dataclasses.replace(specs[2], context=ContextSpec(onto=0, anchor="top", scale=1.0))
    with pytest.raises(RowError) as info:
        resolve_concept_set(concepts, specs)
    assert info.value.field == "concepts[1].mask"
    assert "fully covered by the object(s) pasted after it: [2]" in info.value.reason


@pytest.mark.parametrize(
    "onto, field, message",
    [
        (1, "concepts[1].context.onto", "cannot be pasted onto itself"),
        (7, "concepts[1].context.onto", "out of range (the set has 3 concepts)"),
        (2, "concepts[1].context.onto", "chains are not supported"),
        ("", "concepts[1].context.onto", "expected a concept index or an image path"),
    ],
)
def test_bad_carrier_references(onto, field, message):
    concepts, specs = concept_set()
    specs[1] = dataclasses.replace(specs[1], context=ContextSpec(onto=onto))
    with pytest.raises(RowError) as info:
        resolve_concept_set(concepts, specs)
    assert info.value.field == field and message in info.value.reason


def test_errors_inside_make_composite_name_the_concept():
    concepts, specs = concept_set()
    specs[1] = dataclasses.replace(specs[1], context=ContextSpec(onto=0, scale=-1))
    with pytest.raises(RowError) as info:
        resolve_concept_set(concepts, specs)
    assert info.value.field == "concepts[1].context.scale"


def test_carrier_given_by_path():
    concepts, specs = concept_set()
    backdrop_image, backdrop_mask = carrier(size=(160, 120), box=(40, 20, 120, 100))
    backdrop = resolved(backdrop_image, backdrop_mask, "", "/data/backdrop.png")
    calls = []

    def load_carrier(path, i):
        calls.append((path, i))
        return backdrop

    specs[1] = dataclasses.replace(
        specs[1], context=ContextSpec(onto="backdrop.png", anchor="center", scale=0.5)
    )
    specs[2] = dataclasses.replace(specs[2], context=None)
    final = resolve_concept_set(concepts, specs, load_carrier=load_carrier)
    assert calls == [("backdrop.png", 1)]
    assert final[0] is concepts[0] and final[2] is concepts[2]  # the dog is not this carrier
    hat = final[1]
    assert hat.image.size == (160, 120) and hat.extra["carrier_path"] == "/data/backdrop.png"
    assert hat.composite["carrier"]["concept"] is None and "path" not in str(hat.composite)
    with pytest.raises(RowError, match="need a loader"):
        resolve_concept_set(concepts, specs)


# --------------------------------------------------------------------------- previews and stage


def test_write_previews(tmp_path):
    concepts, specs = concept_set()
    final = resolve_concept_set(concepts, specs)
    folder = Path(write_previews(OutputFolder(tmp_path), "abc123", final, concepts, tile_size=64))
    assert folder == tmp_path / "references" / "abc123"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        ["contact_sheet.png"]
        + [f"{i:02d}_{kind}.png" for i in range(3) for kind in ("reference", "mask", "overlay")]
    )
    sheet = Image.open(folder / "contact_sheet.png")
    assert sheet.size == (3 * 64 + 16, 3 * (64 + 16) + 16)
    mask = np.asarray(Image.open(folder / "01_mask.png")) >= 128
    np.testing.assert_array_equal(mask, final[1].mask)
    # the encoding of references in rows: fixed compression, no metadata
    row = final[1].to_row()
    assert (folder / "01_reference.png").read_bytes() == row["image_png"]
    assert (folder / "01_mask.png").read_bytes() == row["mask_png"]
    before = (folder / "contact_sheet.png").read_bytes()
    again = write_previews(OutputFolder(tmp_path), "abc123", final, concepts, tile_size=64)
    assert Path(again) == folder and (folder / "contact_sheet.png").read_bytes() == before  # kept as it is
    assert [p.name for p in (tmp_path / "references").iterdir()] == ["abc123"]  # no temp folder left
    with pytest.raises(ValueError, match="concept_set_id"):
        write_previews(OutputFolder(tmp_path), "../escape", final, concepts)

    # any pyarrow filesystem: the same files, through the output folder's filesystem
    subtree = pafs.SubTreeFileSystem(str(tmp_path / "elsewhere"), pafs.LocalFileSystem())
    pafs.LocalFileSystem().create_dir(str(tmp_path / "elsewhere"))
    write_previews(OutputFolder("out", subtree), "abc123", final, concepts, tile_size=64)
    moved = tmp_path / "elsewhere" / "out" / "references" / "abc123"
    assert {p.name: p.read_bytes() for p in moved.iterdir()} == {
        p.name: p.read_bytes() for p in folder.iterdir()
    }


def test_composite_stage_rows(tmp_path):
    concepts, specs = concept_set()
    bad_specs = list(specs)
    bad_specs[2] = dataclasses.replace(specs[2], context=ContextSpec(onto=9))
    rows = [(specs, ""), (bad_specs, ""), (specs, "earlier failure")]
    batch = {
        "key": np.array(["ok", "bad", "earlier"], dtype=object),
        "concepts": np.empty(3, dtype=object),
        "resolved": np.empty(3, dtype=object),
        "base_dir": np.array([str(tmp_path)] * 3, dtype=object),
        "error_stage": np.array(["", "", "segment"], dtype=object),
        "error_field": np.array(["", "", "concepts[0].mask"], dtype=object),
        "error_reason": np.array([r for _, r in rows], dtype=object),
    }
    for i, (row_specs, _) in enumerate(rows):
        batch["concepts"][i] = [s.to_row() for s in row_specs]
        batch["resolved"][i] = [c.to_row() for c in concepts]
    identity = dict(
        model_id="tiny", height=64, width=64, num_inference_steps=2, reference_seed=0, mrsa={"blocks": [5, 6]}
    )
    stage = CompositeStage(out_dir=tmp_path, identity_defaults=identity)
    out = stage(batch)
    assert all(v.shape == (3,) for v in out.values())

    assert out["error_reason"][0] == "" and len(out["concept_set_id"][0]) == 16
    final = [ResolvedConcept.from_row(d) for d in out["resolved"][0]]
    assert [c.mask_source for c in final] == ["composite"] * 3
    expected = resolve_concept_set(concepts, specs)
    for got, want in zip(final, expected, strict=True):
        np.testing.assert_array_equal(got.mask, want.mask)
        assert got.image_digest == want.image_digest and got.composite == want.composite
    assert Path(out["preview_dir"][0]) == tmp_path / "references" / out["concept_set_id"][0]
    assert (Path(out["preview_dir"][0]) / "contact_sheet.png").is_file()

    assert (out["error_stage"][1], out["error_field"][1]) == ("composite", "concepts[2].context.onto")
    assert len(out["resolved"][1]) == 0 and out["concept_set_id"][1] is None
    assert (out["error_stage"][2], out["error_reason"][2]) == ("segment", "earlier failure")

    # the same content gives the same id in another batch; without identity: no id, no previews
    assert stage(batch)["concept_set_id"][0] == out["concept_set_id"][0]
    anonymous = CompositeStage()(batch)
    assert anonymous["concept_set_id"][0] is None and anonymous["preview_dir"][0] is None

    # the row's settings as a JSON ``params`` column (the reference K/V stage's convention)
    params = {k: v for k, v in identity.items() if k != "model_id"}
    with_params = dict(batch, params=np.array([json.dumps(params)] * 3, dtype=object))
    by_params = CompositeStage(identity_defaults={"model_id": "tiny"})(with_params)
    assert by_params["concept_set_id"][0] == out["concept_set_id"][0]
    other_negative = dict(
        with_params, params=np.array([json.dumps(params | {"negative_prompt": "x"})] * 3, dtype=object)
    )
    assert CompositeStage(identity_defaults={"model_id": "tiny"})(other_negative)["concept_set_id"][
        0
    ] not in (
        None,
        out["concept_set_id"][0],
    )
    incomplete = CompositeStage(identity_defaults={"model_id": "tiny"})(batch)
    assert incomplete["error_field"][0] == "params" and "missing" in incomplete["error_reason"][0]


def test_composite_stage_carrier_image_by_path(tmp_path):
    backdrop = np.zeros((80, 120, 4), dtype=np.uint8)
    backdrop[..., :3] = 200
    backdrop[20:60, 30:90, 3] = 255  # an RGBA cut-out: its alpha is the carrier mask
    Image.fromarray(backdrop).save(tmp_path / "backdrop.png")
    Image.new("RGB", (50, 40), (10, 10, 10)).save(tmp_path / "scene.jpg")  # no alpha: whole image
    concepts, specs = concept_set()
    specs = [
        specs[0],
        dataclasses.replace(specs[1], context=ContextSpec(onto="backdrop.png")),
        dataclasses.replace(specs[2], context=ContextSpec(onto="scene.jpg")),
    ]
    batch = {
        "key": np.array(["k"], dtype=object),
        "concepts": np.empty(1, dtype=object),
        "resolved": np.empty(1, dtype=object),
        "base_dir": np.array([str(tmp_path)], dtype=object),
    }
    batch["concepts"][0] = [s.to_row() for s in specs]
    batch["resolved"][0] = [c.to_row() for c in concepts]
    out = CompositeStage()(batch)
    assert out["error_reason"][0] == ""
    _, hat, glasses = (ResolvedConcept.from_row(d) for d in out["resolved"][0])
    assert hat.image.size == (120, 80) and hat.composite["carrier"]["mask_source"] == "alpha"
    assert hat.composite["objects"][0]["carrier_box"] == [30, 20, 90, 60]
    assert glasses.image.size == (50, 40) and glasses.composite["carrier"]["mask_source"] == "whole_image"
    assert glasses.extra["carrier_path"] == str(tmp_path / "scene.jpg")

    missing = dict(batch)
    missing["concepts"] = np.empty(1, dtype=object)
    missing["concepts"][0] = [
        specs[0].to_row(),
        dataclasses.replace(specs[1], context=ContextSpec(onto="gone.png")).to_row(),
        specs[2].to_row(),
    ]
    out = CompositeStage()(missing)
    assert out["error_field"][0] == "concepts[1].context.onto" and "file not found" in out["error_reason"][0]


# --------------------------------------------------------------------------- the release's sample


def test_hat_onto_the_dog(tmp_path, samples_dir):
    """dog_hat_sunglasses_0: paste the hat (with the release's mask) on the dog's head."""
    case = samples_dir / "dog_hat_sunglasses_0"

    def load(name: str) -> ResolvedConcept:
        loaded = load_image(f"image/{name}.jpg", base_dir=str(case))
        mask = load_mask(f"mask/{name}.jpg", loaded.image.size, base_dir=str(case))
        return ResolvedConcept(
            loaded.image, mask, f"a {name}", 3.0, "file", loaded.digest, mask_digest(mask), loaded.path
        )

    dog, hat = load("dog"), load("hat")
    specs = [
        ConceptSpec("dog.jpg", "a dog"),
        ConceptSpec("hat.jpg", "a hat", context=ContextSpec(0, "top", 0.5)),
    ]
    final = resolve_concept_set([dog, hat], specs)
    scene_dog, scene_hat = final
    assert scene_hat.image.size == dog.image.size == (780, 780)
    dog_box, hat_box = mask_bbox(dog.mask), mask_bbox(scene_hat.mask)
    centre = (hat_box[0] + hat_box[2]) / 2
    assert abs(centre - (dog_box[0] + dog_box[2]) / 2) <= 0.05 * (
        dog_box[2] - dog_box[0]
    )  # centred on the dog
    assert hat_box[1] < dog_box[1] < hat_box[3]  # sits on top, overlapping the head
    assert 0.4 <= (hat_box[2] - hat_box[0]) / (dog_box[2] - dog_box[0]) <= 0.5 + 1e-6  # scale 0.5 at most
    assert not (scene_dog.mask & scene_hat.mask).any() and scene_dog.mask.sum() < dog.mask.sum()
    folder = Path(write_previews(OutputFolder(tmp_path), "dog-hat", final, [dog, hat]))
    assert Image.open(folder / "contact_sheet.png").size[0] == 3 * 256 + 16


def _zlib_level(png: bytes) -> int:
    """The FLEVEL field (0 fastest, 1 fast, 2 default, 3 maximum) of a PNG's first IDAT zlib stream."""
    at = png.index(b"IDAT") + 4
    return png[at + 1] >> 6


def test_rows_and_previews_use_fast_png_and_sample_members_the_default():
    """Rows cross processes and previews are drawn once per concept set: zlib level 1, 2.5x cheaper on the
    authors' photos (benchmarks/resolve.py). The PNGs inside samples (--embed-references) keep level 6, so
    a shard's bytes stay those of earlier versions. Both decode to the same pixels."""
    from stages.generation.embed import reference_members

    concepts, specs = concept_set()
    final = resolve_concept_set(concepts, specs)
    row = final[0].to_row()
    assert _zlib_level(row["image_png"]) == 0 and _zlib_level(row["mask_png"]) == 0
    back = ResolvedConcept.from_row(row)
    assert back.image.tobytes() == final[0].image.convert("RGB").tobytes()
    np.testing.assert_array_equal(back.mask, final[0].mask)
    files = preview_files(final, concepts, tile_size=64)
    assert {_zlib_level(b) for b in files.values()} == {0}
    members = reference_members([(final[0].image, Image.fromarray(final[0].mask.astype(np.uint8) * 255))], (64, 64))
    assert {_zlib_level(b) for b in members.values()} == {2}
    assert _zlib_level(image_to_png(final[0].image)) == 2 and _zlib_level(mask_to_png(final[0].mask)) == 2


def test_each_image_is_encoded_once_and_unchanged_concepts_keep_their_rows(tmp_path):
    """The stage does not encode again what its input rows hold: a concept the composite leaves as it was
    keeps its row's bytes (written here at level 6, which the stage itself never writes), the three
    concepts of one composite scene share one encoding, and the previews are the rows' PNGs."""
    concepts, specs = concept_set()
    ball, ball_mask = disc(size=80, radius=15, centre=(40, 40))  # a fourth concept without context
    concepts.append(resolved(ball, ball_mask, "a ball", "ball.png"))
    specs.append(ConceptSpec(image="ball.png", prompt="a ball"))
    rows = [c.to_row(image_png=image_to_png(c.image), mask_png=mask_to_png(c.mask)) for c in concepts]
    assert {_zlib_level(r["image_png"]) for r in rows} == {2}
    batch = {"key": np.array(["k"], dtype=object), "concepts": np.empty(1, dtype=object),
             "resolved": np.empty(1, dtype=object), "base_dir": np.array([str(tmp_path)], dtype=object)}
    batch["concepts"][0] = [s.to_row() for s in specs]
    batch["resolved"][0] = rows
    identity = dict(model_id="tiny", height=64, width=64, num_inference_steps=2, reference_seed=0,
                    mrsa={"blocks": [5, 6]})
    out = CompositeStage(out_dir=tmp_path, identity_defaults=identity)(batch)
    assert out["error_reason"][0] == "", out["error_reason"][0]
    got = out["resolved"][0]
    assert got[3]["image_png"] == rows[3]["image_png"] and got[3]["mask_png"] == rows[3]["mask_png"]
    assert got[0]["image_png"] == got[1]["image_png"] == got[2]["image_png"]  # the scene
    assert _zlib_level(got[0]["image_png"]) == 0 and len({r["mask_png"] for r in got}) == 4
    expected = resolve_concept_set(concepts, specs)
    for row, want in zip(got, expected, strict=True):
        back = ResolvedConcept.from_row(row)
        assert back.image.tobytes() == want.image.convert("RGB").tobytes()
        np.testing.assert_array_equal(back.mask, want.mask)
    folder = Path(out["preview_dir"][0])
    for i, row in enumerate(got):
        assert (folder / f"{i:02d}_reference.png").read_bytes() == row["image_png"]
        assert (folder / f"{i:02d}_mask.png").read_bytes() == row["mask_png"]
