"""pipeline.manifest and pipeline.validate: schema and casts, whole-run errors, every bad input refused by row."""

from __future__ import annotations

import errno
import importlib.util
import io
import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.manifest import FIELD_PATTERN, MANIFEST_SCHEMA, ManifestError, conform_table
from pipeline.manifest_files import manifest_base_dir, read_manifest
from pipeline.validate import RowProblem, format_problem, validate_table
from stages.inputs import read as inputs
from stages.inputs.concepts import ContextSpec
from stages.inputs.read import InputSettings
from stages.params import GenParams, Limits

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


def encode(im: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def bomb_png(side: int = 100_000) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


@dataclass
class Env:
    """A manifest folder (also the only allowed root) with a few good inputs in it."""

    root: Path
    monkeypatch: pytest.MonkeyPatch

    def write(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return name

    def image(self, name: str, size=(64, 48), colour=(200, 30, 30), fmt="PNG") -> str:
        return self.write(name, encode(Image.new("RGB", size, colour), fmt))

    def mask(self, name: str, size=(64, 48), box=(8, 8, 40, 30)) -> str:
        m = Image.new("L", size, 0)
        m.paste(255, box)
        return self.write(name, encode(m))

    def settings(self) -> InputSettings:
        return InputSettings(allow_roots=(str(self.root),), retry_backoff_s=0.0)

    def validate(self, rows: list[dict], **kwargs: Any):
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        kwargs.setdefault("inputs", self.settings())
        return validate_table(table, base_dir=str(self.root), **kwargs)


@pytest.fixture
def env(tmp_path, monkeypatch) -> Env:
    e = Env(tmp_path / "inside", monkeypatch)
    e.image("good.png")
    e.mask("good_mask.png")
    e.image("carrier.png", size=(80, 80), colour=(10, 120, 10))
    return e


def concept(**over: Any) -> dict:
    return {"image": "good.png", "prompt": "a cat", "mask": "good_mask.png", **over}


def row(row_id: str | None = "bad", **over: Any) -> dict:
    base = {"id": row_id, "prompt": "a cat on a sofa", "seeds": [0, 1], "concepts": [concept()]}
    return {**base, **over}


def with_concept(**over: Any):
    return lambda env: row(concepts=[concept(**over)])


def with_context(ctx: dict, second: dict | None = None):
    """Concept 1 pasted by ``ctx``; concept 0 optionally changed by ``second``."""
    return lambda env: row(concepts=[concept(**(second or {})), concept(context=ctx)])


def unreadable(env: Env) -> dict:
    env.image("locked.png")
    real = inputs._read_local

    def read(path: str) -> bytes:
        if path.endswith("locked.png"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path)

    env.monkeypatch.setattr(inputs, "_read_local", read)
    return row(concepts=[concept(image="locked.png")])


def truncated(env: Env) -> dict:
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    return row(concepts=[concept(image=env.write("cut.jpg", data[: len(data) // 2]), mask=None)])


def outside(env: Env) -> dict:
    (env.root.parent / "outside.png").write_bytes(encode(Image.new("RGB", (64, 48))))
    return row(concepts=[concept(image="../outside.png")])


def mask_outside(env: Env) -> dict:
    (env.root.parent / "outside_mask.png").write_bytes(encode(Image.new("L", (64, 48), 255)))
    return row(concepts=[concept(mask=str(env.root.parent / "outside_mask.png"))])


# (case, build the bad row, field, words in the reason). The bad row sits between two good rows.
BAD_INPUTS = [
    ("id_missing", lambda env: row(None), "id", "missing"),
    ("id_traversal", lambda env: row("../../etc/passwd"), "id", "is not a valid id"),
    ("id_absolute", lambda env: row("/tmp/evil"), "id", "is not a valid id"),
    ("id_too_long", lambda env: row("a" * 129), "id", "is not a valid id"),
    ("id_duplicate", lambda env: row("good_a"), "id", "duplicate id 'good_a': already used by row 0"),
    ("prompt_empty", lambda env: row(prompt="   "), "prompt", "empty or whitespace"),
    ("prompt_null", lambda env: row(prompt=None), "prompt", "missing"),
    ("prompt_too_long", lambda env: row(prompt="x" * 10_001), "prompt", "over the limit of 10000"),
    ("seeds_null", lambda env: row(seeds=None), "seeds", "missing"),
    ("seeds_empty", lambda env: row(seeds=[]), "seeds", "empty"),
    ("seeds_duplicate", lambda env: row(seeds=[3, 4, 3]), "seeds", "duplicate seed(s) [3]"),
    ("seeds_negative", lambda env: row(seeds=[1, -1]), "seeds", "negative seed(s) [-1]"),
    ("seeds_null_entry", lambda env: row(seeds=[1, None]), "seeds", "null seed"),
    ("concepts_null", lambda env: row(concepts=None), "concepts", "missing"),
    ("concepts_empty", lambda env: row(concepts=[]), "concepts", "no concepts"),
    ("concepts_too_many", lambda env: row(concepts=[concept()] * 9), "concepts", "9 concepts; at most 8"),
    ("image_path_null", with_concept(image=None), "concepts[0].image", "missing"),
    ("image_missing", with_concept(image="nope.png"), "concepts[0].image", "file not found"),
    (
        "image_directory",
        lambda env: row(concepts=[concept(image=".")]),
        "concepts[0].image",
        "is a directory",
    ),
    ("image_unreadable", unreadable, "concepts[0].image", "permission denied"),
    (
        "image_not_an_image",
        lambda env: row(concepts=[concept(image=env.write("notes.png", b"plain text"))]),
        "concepts[0].image",
        "not an image",
    ),
    ("image_truncated", truncated, "concepts[0].image", "truncated or corrupt"),
    (
        "image_zero_bytes",
        lambda env: row(concepts=[concept(image=env.write("zero.png", b""), mask=None)]),
        "concepts[0].image",
        "file is empty (0 bytes)",
    ),
    (
        "image_decompression_bomb",
        lambda env: row(concepts=[concept(image=env.write("bomb.png", bomb_png()), mask=None)]),
        "concepts[0].image",
        "decompression bomb",
    ),
    ("image_outside_allowed_roots", outside, "concepts[0].image", "outside the allowed roots"),
    ("concept_prompt_empty", with_concept(prompt=""), "concepts[0].prompt", "empty"),
    ("concept_null", lambda env: row(concepts=[concept(), None]), "concepts[1]", "null concept"),
    ("mask_missing", with_concept(mask="gone.png"), "concepts[0].mask", "file not found"),
    (
        "mask_empty",
        lambda env: row(concepts=[concept(mask=env.write("black.png", encode(Image.new("L", (64, 48), 0))))]),
        "concepts[0].mask",
        "mask is empty (no pixel >= 50 %)",
    ),
    (
        "mask_other_aspect",
        lambda env: row(concepts=[concept(mask=env.mask("square.png", size=(48, 48)))]),
        "concepts[0].mask",
        "aspect ratios differ",
    ),
    ("mask_outside_allowed_roots", mask_outside, "concepts[0].mask", "outside the allowed roots"),
    ("weight_nan", with_concept(weight=math.nan), "concepts[0].weight", "must be a finite number > 0"),
    ("weight_inf", with_concept(weight=math.inf), "concepts[0].weight", "must be a finite number > 0"),
    ("weight_zero", with_concept(weight=0.0), "concepts[0].weight", "must be > 0"),
    ("weight_negative", with_concept(weight=-2.0), "concepts[0].weight", "must be > 0"),
    (
        "box_outside_image",
        with_concept(box=[0, 0, 100, 48]),
        "concepts[0].box",
        "outside the image [0, 0, 64, 48]",
    ),
    ("box_negative", with_concept(box=[-1, 0, 10, 10]), "concepts[0].box", "outside the image"),
    ("box_inverted", with_concept(box=[30, 10, 10, 20]), "concepts[0].box", "empty or inverted"),
    ("box_three_numbers", with_concept(box=[1, 2, 3]), "concepts[0].box", "4 finite numbers"),
    (
        "points_outside_image",
        with_concept(points=[[10, 10], [64, 5]]),
        "concepts[0].points",
        "outside the 64x48",
    ),
    ("points_malformed", with_concept(points=[[1.0]]), "concepts[0].points", "2 finite numbers"),
    ("points_empty", with_concept(points=[]), "concepts[0].points", "empty"),
    ("label_empty", with_concept(label=" "), "concepts[0].label", "empty"),
    (
        "context_onto_itself",
        with_context({"onto": "1"}),
        "concepts[1].context.onto",
        "points to this concept itself",
    ),
    (
        "context_onto_out_of_range",
        with_context({"onto": "5"}),
        "concepts[1].context.onto",
        "concept index 5 is out of range: this row has 2 concepts",
    ),
    ("context_onto_negative", with_context({"onto": "-1"}), "concepts[1].context.onto", "out of range"),
    (
        "context_onto_chain",
        with_context({"onto": "0"}, second={"context": {"onto": "carrier.png"}}),
        "concepts[1].context.onto",
        "concept 0 is itself pasted",
    ),
    (
        "context_onto_cycle",
        with_context({"onto": "0"}, second={"context": {"onto": "1"}}),
        "concepts[0].context.onto",
        "concept 1 is itself pasted",
    ),
    ("context_onto_missing", with_context({"onto": None}), "concepts[1].context.onto", "missing"),
    (
        "context_carrier_missing",
        with_context({"onto": "gone.png"}),
        "concepts[1].context.onto",
        "file not found",
    ),
    (
        "context_anchor_unknown",
        with_context({"onto": "0", "anchor": "middle"}),
        "concepts[1].context.anchor",
        "unknown anchor 'middle'",
    ),
    (
        "context_anchor_and_box",
        with_context({"onto": "0", "anchor": "top", "box": [0, 0, 0.5, 0.5]}),
        "concepts[1].context.anchor",
        "not both",
    ),
    (
        "context_box_outside_unit",
        with_context({"onto": "0", "box": [0, 0, 1.5, 1]}),
        "concepts[1].context.box",
        "[0, 1]",
    ),
    ("context_scale_zero", with_context({"onto": "0", "scale": 0.0}), "concepts[1].context.scale", "(0, 4]"),
    (
        "context_scale_too_big",
        with_context({"onto": "0", "scale": 4.5}),
        "concepts[1].context.scale",
        "(0, 4]",
    ),
    (
        "context_soft_edge_negative",
        with_context({"onto": "0", "soft_edge": -3}),
        "concepts[1].context.soft_edge",
        "-3",
    ),
    ("height_not_multiple_of_8", lambda env: row(height=500), "height", "not a multiple of 8"),
    ("height_below_64", lambda env: row(height=32), "height", "below 64"),
    ("width_over_limit", lambda env: row(width=4096), "width", "over the limit of 2048"),
    ("steps_zero", lambda env: row(num_inference_steps=0), "num_inference_steps", "outside [1, 1000]"),
    (
        "steps_over_limit",
        lambda env: row(num_inference_steps=1001),
        "num_inference_steps",
        "outside [1, 1000]",
    ),
    ("guidance_nan", lambda env: row(guidance_scale=math.nan), "guidance_scale", "finite number >= 0"),
    ("guidance_negative", lambda env: row(guidance_scale=-1.0), "guidance_scale", "finite number >= 0"),
    ("style_fidelity_over_1", lambda env: row(style_fidelity=1.5), "style_fidelity", "outside [0, 1]"),
    ("style_fidelity_negative", lambda env: row(style_fidelity=-0.1), "style_fidelity", "outside [0, 1]"),
    ("start_after_end", lambda env: row(start_step=30, end_step=20), "start_step", "below end_step 20"),
    ("end_past_steps", lambda env: row(end_step=60), "end_step", "past num_inference_steps 50"),
    ("start_negative", lambda env: row(start_step=-1), "start_step", ">= 0"),
    ("start_past_steps", lambda env: row(start_step=50), "start_step", "below num_inference_steps 50"),
    ("mask_mode_unknown", lambda env: row(mask_mode="multiply"), "mask_mode", "unknown mask_mode 'multiply'"),
    ("mrsa_blocks_empty", lambda env: row(mrsa_blocks=[]), "mrsa_blocks", "empty"),
    ("mrsa_blocks_negative", lambda env: row(mrsa_blocks=[5, -1]), "mrsa_blocks", "negative"),
    ("mrsa_layers_empty", lambda env: row(mrsa_layers=[]), "mrsa_layers", "empty"),
    ("reference_seed_negative", lambda env: row(reference_seed=-5), "reference_seed", "outside [0, 2**63)"),
]


@pytest.mark.parametrize("make,field,words", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_by_row_and_good_rows_still_validate(env, make, field, words):
    bad = make(env)
    specs, problems = env.validate([row("good_a"), bad, row("good_b")])

    assert [s.id for s in specs] == ["good_a", "good_b"]
    assert problems, "the bad row was accepted"
    assert {p.index for p in problems} == {1}
    assert all(p.id == bad["id"] for p in problems)
    lines = [format_problem(p) for p in problems]
    assert any(p.field == field and words in p.reason for p in problems), lines
    assert all(FIELD_PATTERN.fullmatch(p.field) for p in problems), lines


def test_at_least_25_bad_input_kinds_are_covered():
    assert len(BAD_INPUTS) >= 25
    assert len({c[0] for c in BAD_INPUTS}) == len(BAD_INPUTS)


def test_every_problem_of_a_row_is_reported(env):
    bad = row(prompt="", seeds=[-1, -1], concepts=[concept(weight=math.nan, box=[5, 5, 1, 1])], height=100)
    _, problems = env.validate([bad])
    fields = sorted(p.field for p in problems)
    assert fields == ["concepts[0].box", "concepts[0].weight", "height", "prompt", "seeds", "seeds"]


def test_seeds_at_or_over_2_63_are_refused_by_row(env):
    table = pa.table(
        {
            "id": ["big", "ok"],
            "prompt": ["a cat", "a cat"],
            "seeds": pa.array([[2**63], [2**63 - 1]], type=pa.list_(pa.uint64())),
            "concepts": [[concept()], [concept()]],
        }
    )
    specs, problems = validate_table(table, base_dir=str(env.root), inputs=env.settings())
    assert [s.id for s in specs] == ["ok"] and specs[0].seeds == (2**63 - 1,)
    assert [(p.id, p.field) for p in problems] == [("big", "seeds")]
    assert ">= 2**63" in problems[0].reason


def test_reference_seed_at_2_63_is_refused(env):
    table = pa.Table.from_pylist([row("r")], schema=MANIFEST_SCHEMA)
    table = set_col(table, "reference_seed", pa.array([2**63], pa.uint64()))
    _, problems = validate_table(table, base_dir=str(env.root), inputs=env.settings())
    assert [(p.field, "outside [0, 2**63)" in p.reason) for p in problems] == [("reference_seed", True)]


# --------------------------------------------------------------------------- handled, not refused


def test_unusual_but_valid_images_validate(env):
    cmyk = env.write("cmyk.jpg", encode(Image.new("CMYK", (64, 48), (0, 200, 200, 0)), "JPEG"))
    pal = env.write("pal.png", encode(Image.new("RGB", (64, 48), (1, 2, 3)).convert("P")))
    grey = env.write("grey.png", encode(Image.new("L", (64, 48), 100)))
    wide = env.write("wide.png", encode(Image.fromarray(np.full((48, 64), 40000, np.uint16))))
    cut = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    cut.paste((250, 200, 0, 255), (10, 10, 40, 30))
    cutout = env.write("cutout.png", encode(cut))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 48x64, shown 64x48: the box below is in shown pixels
    rotated = env.write("rotated.jpg", encode(Image.new("RGB", (48, 64)), "JPEG", exif=exif.tobytes()))
    big_mask = env.mask("big_mask.png", size=(128, 96), box=(10, 10, 90, 70))
    rows = [
        row("cmyk", concepts=[concept(image=cmyk)]),
        row("palette", concepts=[concept(image=pal)]),
        row("grey", concepts=[concept(image=grey)]),
        row("sixteen_bit", concepts=[concept(image=wide)]),
        row("rgba_no_mask", concepts=[concept(image=cutout, mask=None)]),
        row("exif_rotated", concepts=[concept(image=rotated, box=[0, 0, 64, 48], points=[[63, 47]])]),
        row("mask_twice_the_size", concepts=[concept(mask=big_mask)]),
    ]
    specs, problems = env.validate(rows)
    assert [format_problem(p) for p in problems] == []
    assert [s.id for s in specs] == [r["id"] for r in rows]
    assert specs[4].concepts[0].mask is None and specs[4].concepts[0].mask_path is None


def test_specs_carry_resolved_paths_defaults_and_recipes(env):
    rows = [
        row(
            "full",
            concepts=[
                concept(box=[1, 2, 30, 40], points=[[5, 6]], label="cat", weight=2),
                concept(mask=None, context={"onto": "0", "anchor": "top", "scale": 0.3, "soft_edge": 4}),
                concept(mask=None, context={"onto": "carrier.png", "box": [0.1, 0.2, 0.5, 0.6]}),
            ],
        )
    ]
    (spec,), problems = env.validate(rows)
    assert problems == []
    c0, c1, c2 = spec.concepts
    assert c0.image == "good.png" and c0.image_path == str(env.root / "good.png")
    assert c0.mask_path == str(env.root / "good_mask.png")
    assert (c0.weight, c0.box, c0.points, c0.label) == (2.0, (1.0, 2.0, 30.0, 40.0), ((5.0, 6.0),), "cat")
    assert c1.weight == 3.0 and c1.context == ContextSpec(onto=0, anchor="top", scale=0.3, soft_edge=4)
    assert c2.context == ContextSpec(onto=str(env.root / "carrier.png"), anchor=(0.1, 0.2, 0.5, 0.6))
    assert spec.seeds == (0, 1) and spec.params == GenParams()


def test_onto_may_be_an_integer_column(env):
    ctx_type = pa.struct([("onto", pa.int64())])
    concepts_type = pa.list_(
        pa.struct([("image", pa.string()), ("prompt", pa.string()), ("context", ctx_type)])
    )
    table = pa.table(
        {
            "id": ["r"],
            "prompt": ["p"],
            "seeds": [[1]],
            "concepts": pa.array(
                [
                    [
                        {"image": "good.png", "prompt": "a"},
                        {"image": "good.png", "prompt": "b", "context": {"onto": 0}},
                    ]
                ],
                type=concepts_type,
            ),
        }
    )
    (spec,), problems = validate_table(table, base_dir=str(env.root))
    assert problems == [] and spec.concepts[1].context.onto == 0


def test_row_overrides_apply_and_nulls_keep_the_run_defaults(env):
    defaults = GenParams(num_inference_steps=30, guidance_scale=5.0)
    rows = [
        row(
            "custom",
            height=768,
            width=640,
            num_inference_steps=20,
            end_step=10,
            mask_mode="scale",
            mrsa_blocks=[4],
        ),
        row("plain", height=None, mrsa_layers=None),
        row("layers", mrsa_layers=["up_blocks.3.attentions.0"], null_ref_prompts=True),
    ]
    (custom, plain, layers), problems = env.validate(rows, defaults=defaults)
    assert problems == []
    assert (custom.params.height, custom.params.width, custom.params.num_inference_steps) == (768, 640, 20)
    assert (custom.params.end_step, custom.params.mask_mode, custom.params.mrsa_blocks) == (10, "scale", (4,))
    assert custom.params.guidance_scale == 5.0
    assert plain.params == defaults
    assert layers.params.mrsa_layers == ("up_blocks.3.attentions.0",) and layers.params.null_ref_prompts


def test_problems_caused_by_a_run_default_say_so(env):
    _, problems = env.validate([row("r", num_inference_steps=20)], defaults=GenParams(end_step=50))
    assert [(p.field, p.reason) for p in problems] == [
        ("end_step", "end_step 50 is past num_inference_steps 20 [end_step is the run's default]")
    ]


def test_limits_are_configurable(env):
    limits = Limits(max_side=4096, max_steps=2000, max_concepts=2, max_prompt_chars=200)
    specs, problems = env.validate(
        [
            row("big", prompt="short", width=4096, num_inference_steps=1500),
            row("many", prompt="p" * 201, concepts=[concept()] * 3),
        ],
        limits=limits,
    )
    assert [s.id for s in specs] == ["big"]
    assert [(p.id, p.field) for p in problems] == [("many", "prompt"), ("many", "concepts")]


def test_passthrough_columns_are_kept_json_safe(env):
    import datetime as dt
    import decimal

    table = pa.Table.from_pylist([row("a"), row("b")], schema=MANIFEST_SCHEMA)
    extras = {
        "sku": pa.array(["X-1", None]),
        "split": pa.array(["train", "val"]).dictionary_encode(),
        "when": pa.array([dt.datetime(2024, 5, 1, 3, 0), None], pa.timestamp("s")),
        "price": pa.array([decimal.Decimal("1.10"), None], pa.decimal128(5, 2)),
        "score": pa.array([math.nan, 0.5]),
        "blob": pa.array([b"\x00\x01", None]),
        "attrs": pa.array([[("colour", "red")], None], pa.map_(pa.string(), pa.string())),
        "nested": pa.array([{"a": [1, 2]}, None]),
    }
    for name, column in extras.items():
        table = table.append_column(name, column)
    (a, b), problems = validate_table(table, base_dir=str(env.root), inputs=env.settings())
    assert problems == []
    assert a.passthrough == {
        "sku": "X-1",
        "split": "train",
        "when": "2024-05-01T03:00:00",
        "price": "1.10",
        "score": "NaN",
        "blob": "AAE=",
        "attrs": {"colour": "red"},
        "nested": {"a": [1, 2]},
    }
    assert b.passthrough["score"] == 0.5 and b.passthrough["sku"] is None
    json.dumps([a.passthrough, b.passthrough], allow_nan=False)


def test_check_files_false_skips_io_but_keeps_static_checks(env):
    rows = [row("ghost", concepts=[concept(image="nope.png", mask="nope_mask.png")]), row("bad", seeds=[])]
    specs, problems = env.validate(rows, check_files=False)
    assert [s.id for s in specs] == ["ghost"]
    assert [(p.id, p.field) for p in problems] == [("bad", "seeds")]


def test_format_problem_is_one_line_naming_row_id_field_reason():
    line = format_problem(RowProblem(3, "cat_1", "concepts[1].mask", "mask is empty (no pixel >= 50 %)"))
    assert line == "row 3 (id=cat_1): concepts[1].mask: mask is empty (no pixel >= 50 %)"
    assert format_problem(RowProblem(0, None, "id", "missing")) == "row 0 (id missing): id: missing"
    assert format_problem(RowProblem(1, "a/b\n", "id", "bad")) == "row 1 (id='a/b\\n'): id: bad"


def test_each_file_is_opened_once_however_many_rows_share_it(env, monkeypatch):
    calls: list[str] = []
    real = inputs._read_local
    monkeypatch.setattr(inputs, "_read_local", lambda p: calls.append(p) or real(p))
    specs, _ = env.validate([row(f"r{i}") for i in range(20)])
    assert len(specs) == 20
    assert sorted(calls) == sorted([str(env.root / "good.png"), str(env.root / "good_mask.png")])


# --------------------------------------------------------------------------- parameters


def test_run_defaults_that_break_the_limits_stop_validation(env):
    with pytest.raises(ValueError, match="run defaults: num_inference_steps"):
        env.validate([row("r")], defaults=GenParams(num_inference_steps=100), limits=Limits(max_steps=50))


# --------------------------------------------------------------------------- whole-run errors and casts


def write_table(path: Path, table: pa.Table) -> str:
    pq.write_table(table, path)
    return str(path)


def set_col(table: pa.Table, name: str, column: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, column)


def good_table() -> pa.Table:
    return pa.Table.from_pylist([row("a")], schema=MANIFEST_SCHEMA)


def test_read_manifest_round_trips_and_relative_paths_use_the_manifest_folder(env):
    path = write_table(env.root / "m.parquet", good_table())
    table = read_manifest(path)
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert manifest_base_dir(path) == str(env.root)
    assert manifest_base_dir("s3://bucket/runs/m.parquet") == "s3://bucket/runs"
    (spec,), problems = validate_table(table, base_dir=manifest_base_dir(path))
    assert problems == [] and spec.concepts[0].image_path == str(env.root / "good.png")


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda d: str(d / "absent.parquet"), "manifest not found"),
        (
            lambda d: str((d / "m.parquet").write_bytes(b"id,prompt\na,b\n") and d / "m.parquet"),
            "not a readable Parquet",
        ),
        (lambda d: write_table(d / "m.parquet", good_table().slice(0, 0)), "has no rows"),
        (
            lambda d: write_table(d / "m.parquet", good_table().drop_columns(["seeds"])),
            "required column(s) ['seeds'] missing",
        ),
        (
            lambda d: write_table(d / "m.parquet", good_table().set_column(1, "prompt", pa.array([7]))),
            "column 'prompt' has type int64, expected string",
        ),
        (
            lambda d: write_table(d / "m.parquet", good_table().set_column(2, "seeds", pa.array([7]))),
            "column 'seeds' has type int64, expected list<item: int64> (a list of seeds per row",
        ),
        (
            lambda d: write_table(
                d / "m.parquet",
                good_table().set_column(
                    3, "concepts", pa.array([[{"image": "a.png", "prompt": "p", "weight": "heavy"}]])
                ),
            ),
            "column 'concepts', field 'concepts.weight' has type string, expected double",
        ),
        (
            lambda d: write_table(
                d / "m.parquet", good_table().set_column(3, "concepts", pa.array([[{"image": "a.png"}]]))
            ),
            "column 'concepts' has no field(s) ['prompt']",
        ),
        (
            lambda d: write_table(d / "m.parquet", set_col(good_table(), "height", pa.array(["tall"]))),
            "column 'height' has type string, expected int64",
        ),
        (
            lambda d: write_table(d / "m.parquet", set_col(good_table(), "null_ref_prompts", pa.array([1]))),
            "column 'null_ref_prompts' has type int64, expected bool",
        ),
    ],
    ids=[
        "missing_file",
        "not_parquet",
        "zero_rows",
        "missing_column",
        "prompt_int",
        "seeds_scalar",
        "weight_string",
        "concept_without_prompt",
        "height_string",
        "bool_as_int",
    ],
)
def test_whole_run_errors_raise_manifest_error_naming_file_and_column(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert words in str(err.value)
    assert str(err.value).startswith(path)


def test_a_folder_that_is_not_a_manifest_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        read_manifest(str(tmp_path))


def test_compatible_types_are_cast(env):
    concept_type = pa.struct(
        [
            ("image", pa.large_string()),
            ("prompt", pa.string_view()),
            ("weight", pa.float32()),
            ("box", pa.large_list(pa.int16())),
            ("sku", pa.string()),  # unknown concept fields are kept
        ]
    )
    table = pa.table(
        {
            "id": pa.array(["a", "b"], pa.large_string()),
            "prompt": pa.array(["p", "q"]).dictionary_encode(),
            "seeds": pa.array([[1, 2], [3]], pa.list_(pa.int32())),
            "concepts": pa.array(
                [
                    [{"image": "good.png", "prompt": "c", "weight": 2.5, "box": [0, 0, 10, 10], "sku": "s"}],
                    [{"image": "good.png", "prompt": "c", "weight": None, "box": None, "sku": None}],
                ],
                pa.large_list(concept_type),
            ),
            "height": pa.array([256, None], pa.uint16()),
            "guidance_scale": pa.array([None, None], pa.null()),
            "style_fidelity": pa.array([0.5, 1], pa.float32()),
            "mrsa_blocks": pa.array([[5], None], pa.list_(pa.int8())),
            "extra": pa.array([1, 2], pa.int8()),
        }
    )
    conformed = conform_table(table)
    for name in ("id", "prompt", "seeds", "height", "guidance_scale", "style_fidelity", "mrsa_blocks"):
        assert conformed.schema.field(name).type == MANIFEST_SCHEMA.field(name).type, name
    assert conformed.schema.field("extra").type == pa.int8()
    (a, b), problems = validate_table(table, base_dir=str(env.root))
    assert problems == []
    assert a.seeds == (1, 2) and a.concepts[0].weight == 2.5 and a.concepts[0].box == (0.0, 0.0, 10.0, 10.0)
    assert a.params.height == 256 and a.params.style_fidelity == 0.5 and a.params.mrsa_blocks == (5,)
    assert b.params.height == 512 and b.concepts[0].weight == 3.0


def test_example_manifest_builds_and_validates(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_example", REPO / "manifests" / "examples" / "make_example.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.build_example(tmp_path / "example")
    table = read_manifest(str(path))
    specs, problems = validate_table(table, base_dir=manifest_base_dir(str(path)))
    assert [format_problem(p) for p in problems] == []
    assert len(specs) == table.num_rows >= 3
    assert any(c.context is not None for s in specs for c in s.concepts)
    assert any(c.mask is None for s in specs for c in s.concepts)
    assert any(s.passthrough for s in specs)
