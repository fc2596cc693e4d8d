"""Property tests of manifest validation: random rows never crash it, every refusal names a field."""

from __future__ import annotations

import io
import math

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.manifest import FIELD_PATTERN, MANIFEST_SCHEMA
from pipeline.validate import duplicate_ids, format_problem, validate_table
from stages.inputs.concepts import ANCHORS
from stages.inputs.read import InputSettings
from stages.params import MAX_INT64, GenParams, Limits, param_problems

INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 80), st.sampled_from([0.0, 0.5, 1.0, 4.0])
)
MAYBE_NUMBER = st.one_of(st.none(), NUMBER)
TEXT = st.one_of(st.none(), st.sampled_from(["", "  ", "a cat", "x" * 10_001]), st.text(max_size=12))
PATHS = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "good.png",
            "mask.png",
            "black.png",
            "notes.png",
            "zero.png",
            "nope.png",
            ".",
            "",
            " ",
            "../outside.png",
        ]
    ),
    st.sampled_from(["s3://bucket/x.png", "/etc/passwd", "sub/../good.png"]),
    st.text(max_size=8),
)
BOX = st.one_of(st.none(), st.lists(MAYBE_NUMBER, max_size=5), st.just([1.0, 1.0, 30.0, 30.0]))
POINTS = st.one_of(st.none(), st.lists(st.one_of(st.none(), st.lists(MAYBE_NUMBER, max_size=3)), max_size=3))
CONTEXT = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {
            "onto": st.one_of(st.none(), st.sampled_from(["0", "1", "2", "-1", "9", "+1", " 1 "]), PATHS),
            "anchor": st.one_of(st.none(), st.sampled_from([*ANCHORS, "middle", ""])),
            "box": BOX,
            "scale": MAYBE_NUMBER,
            "soft_edge": st.one_of(st.none(), INT32, st.integers(-2, 8)),
        }
    ),
)
CONCEPT = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {
            "image": PATHS,
            "prompt": TEXT,
            "mask": PATHS,
            "weight": MAYBE_NUMBER,
            "box": BOX,
            "points": POINTS,
            "label": TEXT,
            "context": CONTEXT,
        }
    ),
)
SMALL_OR_ANY_INT = st.one_of(st.none(), st.integers(-3, 1100), INT64)
ROW = st.fixed_dictionaries(
    {
        "id": st.one_of(
            st.none(), st.sampled_from(["a", "b", "cat_1", "../x", "a" * 129]), st.text(max_size=6)
        ),
        "prompt": TEXT,
        "seeds": st.one_of(st.none(), st.lists(st.one_of(st.none(), st.integers(-2, 5), INT64), max_size=4)),
        "concepts": st.one_of(st.none(), st.lists(CONCEPT, max_size=10)),
        "negative_prompt": TEXT,
        "guidance_scale": MAYBE_NUMBER,
        "num_inference_steps": SMALL_OR_ANY_INT,
        "height": st.one_of(st.none(), st.sampled_from([32, 64, 500, 512, 4096]), INT64),
        "width": st.one_of(st.none(), st.sampled_from([64, 512, 2056]), INT64),
        "reference_seed": st.one_of(st.none(), INT64),
        "style_fidelity": MAYBE_NUMBER,
        "mask_mode": st.one_of(st.none(), st.sampled_from(["bias", "scale", "multiply", ""])),
        "start_step": SMALL_OR_ANY_INT,
        "end_step": SMALL_OR_ANY_INT,
        "null_ref_prompts": st.one_of(st.none(), st.booleans()),
        "mrsa_blocks": st.one_of(st.none(), st.lists(st.one_of(st.none(), st.integers(-2, 8)), max_size=3)),
        "mrsa_layers": st.one_of(st.none(), st.lists(st.one_of(st.none(), st.text(max_size=4)), max_size=3)),
    }
)
ROWS = st.lists(ROW, min_size=1, max_size=6)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A manifest folder with one file per kind of input the strategies name."""
    root = tmp_path_factory.mktemp("props") / "inside"
    (root / "sub").mkdir(parents=True)

    def save(im: Image.Image, name: str) -> None:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        (root / name).write_bytes(buf.getvalue())

    save(Image.new("RGB", (64, 48), (1, 2, 3)), "good.png")
    save(Image.new("L", (64, 48), 255), "mask.png")
    save(Image.new("L", (64, 48), 0), "black.png")
    (root / "notes.png").write_text("not an image")
    (root / "zero.png").write_bytes(b"")
    save(Image.new("RGB", (8, 8)), "../outside.png")
    return root


def check_invariants(rows: list[dict], specs, problems) -> None:
    """The validator's contract, whatever the input."""
    good = [s.index for s in specs]
    bad = {p.index for p in problems}
    assert not set(good) & bad, "a row is both accepted and refused"
    assert set(good) | bad == set(range(len(rows))), "a row was neither accepted nor refused"
    assert len({s.id for s in specs}) == len(specs), "two accepted rows share an id"
    for p in problems:
        assert FIELD_PATTERN.fullmatch(p.field), p.field
        assert p.id == rows[p.index]["id"]
        assert isinstance(p.reason, str) and p.reason.strip()
        assert "\n" not in format_problem(p)
    limits = Limits()
    for s in specs:
        row = rows[s.index]
        assert s.id == row["id"] and s.prompt == row["prompt"]
        assert s.seeds and len(set(s.seeds)) == len(s.seeds) and all(0 <= x < MAX_INT64 for x in s.seeds)
        assert 1 <= len(s.concepts) <= limits.max_concepts
        for c in s.concepts:
            assert c.image_path and c.prompt.strip() and math.isfinite(c.weight) and c.weight > 0
            if c.context is not None and isinstance(c.context.onto, int):
                target = s.concepts[c.context.onto]
                assert target is not c and target.context is None
        assert param_problems(vars(s.params), limits) == []


def run(rows: list[dict], **kwargs):
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    return validate_table(table, defaults=GenParams(), limits=Limits(), **kwargs)


@settings(max_examples=300, deadline=None, database=None)
@given(ROWS)
def test_random_rows_never_crash_the_static_validator(rows):
    specs, problems = run(rows, base_dir="/data/manifests", check_files=False)
    check_invariants(rows, specs, problems)


@settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(rows=ROWS)
def test_random_rows_never_crash_the_validator_with_files(files, rows):
    inputs = InputSettings(allow_roots=(str(files),), retry_backoff_s=0.0)
    specs, problems = run(rows, base_dir=str(files), inputs=inputs, check_files=True)
    check_invariants(rows, specs, problems)
    for s in specs:
        for c in s.concepts:
            assert c.image_path.startswith(str(files))


@given(
    ids=st.lists(
        st.one_of(st.none(), st.sampled_from(["a", "b", "c", "a-1", ""]), st.text(max_size=3)), max_size=60
    ),
    cut=st.integers(0, 60),
)
@settings(max_examples=300, deadline=None)
def test_duplicate_ids_match_a_first_use_map(ids, cut):
    """The sort-based duplicate check names the same first row as a dict of every id would."""
    first, expected = {}, {}
    for i, x in enumerate(ids):
        if x is not None:
            expected[i] = first.setdefault(x, i)
    expected = {i: f for i, f in expected.items() if i != f}
    column = pa.chunked_array([ids[:cut], ids[cut:]], pa.string())
    assert duplicate_ids(column) == expected
    assert duplicate_ids(pa.array(ids, pa.string())) == expected
