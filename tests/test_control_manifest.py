"""The manifest's ControlNet columns (``control``, ``controls``, ``control_references``): validation by row,
the refusal of rows without a control in a ControlNet run, and what enters concept groups."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pyarrow as pa
import pytest

from pipeline.manifest import FIELD_PATTERN, MANIFEST_SCHEMA, conform_table
from pipeline.settings import RunSettings
from pipeline.shards import concept_group_rows, group_key
from stages.inputs.control import CANNY_HIGH, CANNY_LOW, ControlSettings, RowControl
from tests.test_manifest import Env, concept, encode, row  # noqa: F401  (env fixture below)
from tests.test_manifest import env as env  # noqa: PLC0414  the shared manifest folder fixture

ONE = ControlSettings(controlnet=("lllyasviel/sd-controlnet-canny",), canny=(50.0, 150.0))
TWO = ControlSettings(controlnet=("cn-canny", "cn-depth"))
NONE = ControlSettings(controlnet=())


def control(**over: Any) -> dict:
    return {"image": "good.png", "type": "canny", "scale": None, "start": None, "end": None, **over}


def check(env: Env, rows: list[dict], settings: ControlSettings):
    return env.validate(rows, control=settings)


BAD = [
    ("type_unknown", dict(control=control(type="depth")), ONE, "control.type", "unknown control type 'depth'"),
    ("type_missing", dict(control=control(type=None)), ONE, "control.type", "unknown control type None"),
    ("scale_nan", dict(control=control(scale=math.nan)), ONE, "control.scale", "finite number"),
    ("scale_inf", dict(control=control(scale=math.inf)), ONE, "control.scale", "finite number"),
    ("start_over_1", dict(control=control(start=1.2)), ONE, "control.start", "outside [0, 1]"),
    ("end_negative", dict(control=control(end=-0.1)), ONE, "control.end", "outside [0, 1]"),
    ("start_not_below_end", dict(control=control(start=0.6, end=0.4)), ONE, "control.start", "below end 0.4"),
    ("start_equals_default_end", dict(control=control(start=1.0)), ONE, "control.start", "below end 1.0"),
    ("image_missing_file", dict(control=control(image="nope.png")), ONE, "control.image", "file not found"),
    ("image_null", dict(control=control(image=None)), ONE, "control.image", "missing"),
    ("no_control_in_a_controlnet_run", {}, ONE, "control",
     "this run has --controlnet lllyasviel/sd-controlnet-canny; give the row a control image (type none with a "
     "blank image for no layout)"),
    ("control_without_controlnet", dict(control=control()), NONE, "control", "this run has no --controlnet"),
    ("control_references_without_controlnet", dict(control_references=True), NONE, "control_references",
     "no --controlnet"),
    ("both_columns", dict(control=control(), controls=[control()]), ONE, "controls", "not both"),
    ("single_control_for_two_nets", dict(control=control()), TWO, "control", "give controls, a list of 2"),
    ("controls_count", dict(controls=[control()]), TWO, "controls", "1 entries for 2 ControlNets"),
    ("controls_scale", dict(controls=[control(), control(type="none", scale=math.inf)]), TWO, "controls[1].scale",
     "finite number"),
    ("controls_image", dict(controls=[control(image="nope.png"), control()]), TWO, "controls[0].image",
     "file not found"),
]


@pytest.mark.parametrize("over,settings,field,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_control_is_a_row_error_and_other_rows_go_on(env, over, settings, field, words):
    good = dict(control=control()) if settings is ONE else dict(controls=[control(), control(type="none")]) \
        if settings is TWO else {}
    specs, problems = check(env, [row("good_a", **good), row("bad", **over), row("good_b", **good)], settings)
    assert [s.id for s in specs] == ["good_a", "good_b"]
    assert {p.index for p in problems} == {1}
    assert any(p.field == field and words in p.reason for p in problems), [(p.field, p.reason) for p in problems]
    assert all(FIELD_PATTERN.fullmatch(p.field) for p in problems)


def test_a_good_control_is_resolved_with_its_defaults_and_the_runs_thresholds(env):
    env.image("layouts/pose.png")
    rows = [row("a", control=control(scale=0.3, end=0.7)),
            row("b", control=control(image="layouts/pose.png", type="none", start=0.2), control_references=True)]
    specs, problems = check(env, rows, ONE)
    assert not problems
    a, b = (s.control for s in specs)
    (ea,), (eb,) = a.entries, b.entries
    assert (ea.type, ea.scale, ea.start, ea.end, ea.canny) == ("canny", 0.3, 0.0, 0.7, (50.0, 150.0))
    assert ea.image_path == str(env.root / "good.png")  # relative to the manifest, as concept images
    assert (eb.type, eb.scale, eb.start, eb.end, eb.canny) == ("none", 1.0, 0.2, 1.0, None)
    assert (a.references, b.references) == (False, True)  # the row's column wins over the run's default
    assert RowControl.from_row(b.to_row()) == b
    assert FIELD_PATTERN.fullmatch("controls[3].end") and FIELD_PATTERN.fullmatch("control_references")


def test_rows_without_control_validate_as_before_outside_a_controlnet_run(env):
    specs, problems = check(env, [row("a")], NONE)
    assert not problems and specs[0].control is None


def test_control_columns_are_cast_to_the_schema(env):
    table = pa.table({"id": ["a"], "prompt": ["p"], "seeds": [[0]],
                      "concepts": pa.array([[concept()]], MANIFEST_SCHEMA.field("concepts").type),
                      "control": pa.array([{"image": "x.png", "type": "none", "scale": 1}],
                                          pa.struct([("image", pa.string()), ("type", pa.string()),
                                                     ("scale", pa.int32())]))})
    conformed = conform_table(table)
    assert conformed.schema.field("control").type == MANIFEST_SCHEMA.field("control").type


def test_k_v_grouping_follows_the_control_only_with_control_references(env):
    env.image("other.png", colour=(10, 10, 200))
    rows = [row("a", control=control()), row("b", control=control(image="other.png")),
            row("c", control=control(), control_references=True),
            row("d", control=control(image="other.png"), control_references=True),
            row("e", control=control(), control_references=True)]
    specs, problems = check(env, rows, ONE)
    assert not problems
    a, b, c, d, e = map(group_key, specs)
    assert a == b == group_key(dataclasses.replace(specs[0], control=None))  # default: as without a control
    assert len({a, c, d}) == 3 and c == e
    groups = concept_group_rows(specs, base_dir=str(env.root), model_identity="m", controlnet=ONE.controlnet)
    assert [g["control"] == "" for g in groups] == [True, False, False]
    assert '"controlnet": ["lllyasviel/sd-controlnet-canny"]' in groups[1]["control"]


def test_run_settings_keep_the_identity_of_runs_without_controlnet(tmp_path):
    plain = RunSettings(manifest="m.parquet", out=str(tmp_path / "o"))
    assert "controlnet" not in plain.output_identity() and "controlnet" not in plain.generator_kwargs()
    cn = RunSettings(manifest="m.parquet", out=str(tmp_path / "o"), controlnet=("a", "b"), canny_low=20,
                     control_references=True)
    assert cn.output_identity()["controlnet"] == {"ids": ["a", "b"], "canny": [20, CANNY_HIGH],
                                                  "control_references": True}
    assert cn.generator_kwargs()["controlnet"] == ["a", "b"]
    assert cn.control() == ControlSettings(controlnet=("a", "b"), canny=(20, CANNY_HIGH), references=True)
    with pytest.raises(ValueError, match="need --controlnet"):
        RunSettings(manifest="m.parquet", out=str(tmp_path / "o"), control_references=True)
    with pytest.raises(ValueError, match="need 0 <= low <= high"):
        RunSettings(manifest="m.parquet", out=str(tmp_path / "o"), controlnet=("a",), canny_low=CANNY_LOW + 200)


def test_canny_defaults_are_the_engines():
    from freecustom_core import controlnet

    assert (CANNY_LOW, CANNY_HIGH) == (controlnet.CANNY_LOW, controlnet.CANNY_HIGH)


def test_validate_command_checks_controls_against_its_controlnet_option(env):
    import json

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from pipeline.cli import app

    path = env.root / "m.parquet"
    pq.write_table(pa.Table.from_pylist([row("with", control=control()), row("without")], schema=MANIFEST_SCHEMA),
                   path)
    loose = CliRunner().invoke(app, ["validate", str(path), "--json"])
    assert loose.exit_code == 0, loose.output  # no --controlnet: the structs are checked, presence is not
    strict = CliRunner().invoke(app, ["validate", str(path), "--json", "--controlnet", "cn"])
    problems = json.loads(strict.stdout)["problems"]
    assert strict.exit_code == 1 and [(p["id"], p["field"]) for p in problems] == [("without", "control")]


def test_model_actors_declare_the_controlnets_memory(tmp_path):
    from pipeline.plan_memory import CONTROLNET_HOST_BYTES, actor_memory

    folder = tmp_path / "cn"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"0" * 12345)
    plain = RunSettings(manifest="m.parquet", out=str(tmp_path / "o"))
    cn = dataclasses.replace(plain, controlnet=(str(folder), "hub/controlnet"))
    assert actor_memory(cn, [], device="cpu") - actor_memory(plain, [], device="cpu") == 12345 + CONTROLNET_HOST_BYTES


def test_the_runs_control_references_is_the_default_a_row_overrides(env):
    on = dataclasses.replace(ONE, references=True)
    specs, problems = check(env, [row("a", control=control()), row("b", control=control(), control_references=False)],
                            on)
    assert not problems and [s.control.references for s in specs] == [True, False]
    assert group_key(specs[0]) != group_key(specs[1])  # only a's K/V go through ControlNet
