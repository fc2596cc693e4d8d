"""Bad input, end to end: one manifest, one run, every bad row refused by row and every good row rendered.

The manifest mixes a plain good row, ten rows that look odd but are valid (CMYK, palette, grey,
16-bit and RGBA images, EXIF orientation, an RGBA cut-out without a mask, a mask of another size,
an over-long prompt, extra columns) and 42 kinds of bad rows. It is rendered once through
``run()`` on the tiny model (module fixture); the tests read that one output. Its columns use
compatible but non-schema types (large strings, int32 seeds, int16 sizes, float32, a null-typed
optional column), which are cast, not refused. Unit-level validation of each kind is in
``tests/test_manifest.py``; properties of the validator in ``tests/test_manifest_properties.py``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.manifest import CONCEPT_TYPE
from stages.inputs import read as inputs
from tests.conftest import ray_worker_hook
from tests.faults.conftest import CLI_ARGS, read_output, settings_for, visible_temporaries

pytestmark = pytest.mark.ray
runner = CliRunner()
MAX_PIXELS = 500_000  # the run's configurable decompression-bomb limit (--max-pixels)


def encode(im: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def noise(w: int, h: int, seed: int, base=(180, 40, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(base) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    m = Image.new("L", size, 0)
    m.paste(255, box)
    return m


class Files:
    """The job folder (the only allowed root): inputs written as the tests need them."""

    def __init__(self, root: Path):
        self.root = root

    def write(self, name: str, data: bytes) -> str:
        path = self.root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return f"images/{name}"


def concept(
    image: str = "images/good.png",
    mask: str | None = "images/good_mask.png",
    prompt: str = "a red box",
    **over: Any,
) -> dict:
    return {"image": image, "prompt": prompt, "mask": mask, **over}


def context(**over: Any) -> dict:
    return {"onto": "0", "anchor": "top", "box": None, "scale": 0.5, "soft_edge": 0, **over}


def row(row_id: str | None, **over: Any) -> dict:
    return {"id": row_id, "prompt": "a red box on a table", "seeds": [7], "concepts": [concept()], **over}


EXTRA = {"sku": "SKU-1", "score": 0.25, "tags": ["a", "b"]}  # unknown columns: passed through


@dataclass
class Case:
    name: str
    row: dict
    field: str | None = None  # None: a good row
    words: str = ""


def build_cases(f: Files, outside: Path, abs_escape: Path) -> list[Case]:
    # ---- good inputs
    f.write("good.png", encode(noise(64, 48, 0)))
    f.write("good_mask.png", encode(box_mask((64, 48), (8, 8, 40, 30))))
    cmyk = Image.new("CMYK", (64, 48), (0, 255, 255, 0))  # red in CMYK
    f.write("cmyk.jpg", encode(cmyk, "JPEG", quality=95))
    palette = noise(64, 48, 2, base=(30, 160, 30)).quantize(colors=16)
    f.write("palette.png", encode(palette))
    f.write("grey.png", encode(Image.new("L", (64, 48), 100)))
    f.write("grey16.png", encode(Image.fromarray(np.full((48, 64), 32768, dtype=np.uint16))))
    rgba = np.dstack([np.asarray(noise(64, 48, 3)), np.full((48, 64), 200, np.uint8)])
    f.write("rgba.png", encode(Image.fromarray(rgba, "RGBA")))
    cutout = np.zeros((48, 64, 4), np.uint8)
    cutout[..., :3] = (40, 40, 200)
    cutout[10:40, 16:48, 3] = 255  # the product; everything else transparent
    f.write("cutout.png", encode(Image.fromarray(cutout, "RGBA")))
    stored = noise(96, 64, 4)  # stored landscape, EXIF orientation 6: seen as 64 wide x 96 high
    exif = Image.Exif()
    exif[0x0112] = 6
    f.write("exif.jpg", encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    f.write("exif_mask.png", encode(box_mask((64, 96), (8, 10, 56, 60))))  # portrait, as seen
    f.write("big_mask.png", encode(box_mask((128, 96), (16, 16, 80, 60))))  # 2x the image, same aspect
    long_prompt = " ".join(["a red box on a wooden table in warm light"] * 20)  # ~200 tokens > 77

    # ---- bad inputs
    f.write("notes.png", b"plain text, not an image")
    full = encode(noise(64, 48, 5))
    f.write("cut.png", full[: len(full) // 2])
    f.write("zero.png", b"")
    f.write("bomb.png", encode(Image.new("RGB", (800, 800), (10, 10, 10))))  # 640 000 px > MAX_PIXELS
    f.write("locked.png", full)
    (f.root / "images" / "locked.png").chmod(0)
    f.write("black_mask.png", encode(Image.new("L", (64, 48), 0)))
    f.write("square_mask.png", encode(box_mask((48, 48), (8, 8, 40, 40))))
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "outside.png").write_bytes(full)
    (f.root / "images" / "link.png").symlink_to(outside / "outside.png")

    good = [
        Case("good", row("good", **EXTRA)),
        Case("cmyk_image", row("cmyk", concepts=[concept("images/cmyk.jpg")], **EXTRA)),
        Case("palette_image", row("palette", concepts=[concept("images/palette.png")], **EXTRA)),
        Case("grey_image", row("grey", concepts=[concept("images/grey.png")], **EXTRA)),
        Case("grey_16bit_image", row("grey16", concepts=[concept("images/grey16.png")], **EXTRA)),
        Case("rgba_image_with_mask", row("rgba", concepts=[concept("images/rgba.png")], **EXTRA)),
        Case(
            "rgba_cutout_without_mask", row("cutout", concepts=[concept("images/cutout.png", None)], **EXTRA)
        ),
        Case(
            "exif_orientation",
            row("exif", concepts=[concept("images/exif.jpg", "images/exif_mask.png")], **EXTRA),
        ),
        Case(
            "mask_other_size_same_aspect",
            row("big_mask", concepts=[concept(mask="images/big_mask.png")], **EXTRA),
        ),
        Case("prompt_over_text_encoder_limit", row("long_prompt", prompt=long_prompt, **EXTRA)),
    ]
    second = concept("images/cmyk.jpg", None, "a hat", context=context())  # a good pasted concept
    bad = [
        Case("id_missing", row(None), "id", "missing"),
        Case("id_duplicate", row("good"), "id", "duplicate id 'good': already used by row 0"),
        Case("id_ill_formed", row("has space.png"), "id", "is not a valid id"),
        Case("id_traversal", row("../escape"), "id", "is not a valid id"),
        Case("id_absolute_path", row(str(abs_escape)), "id", "is not a valid id"),
        Case("id_too_long", row("x" * 129), "id", "is not a valid id"),
        Case("prompt_empty", row("b_prompt_empty", prompt="   "), "prompt", "empty or whitespace"),
        Case("prompt_null", row("b_prompt_null", prompt=None), "prompt", "missing"),
        Case("seeds_empty", row("b_seeds_empty", seeds=[]), "seeds", "empty"),
        Case("seeds_duplicate", row("b_seeds_dup", seeds=[5, 5]), "seeds", "duplicate seed(s) [5]"),
        Case("seeds_negative", row("b_seeds_neg", seeds=[3, -1]), "seeds", "negative seed(s) [-1]"),
        Case("concepts_none", row("b_concepts_none", concepts=[]), "concepts", "no concepts"),
        Case(
            "concepts_over_8",
            row("b_concepts_9", concepts=[concept()] * 9),
            "concepts",
            "9 concepts; at most 8",
        ),
        Case(
            "image_missing",
            row("b_img_missing", concepts=[concept("images/nope.png")]),
            "concepts[0].image",
            "file not found",
        ),
        Case(
            "image_directory",
            row("b_img_dir", concepts=[concept("images")]),
            "concepts[0].image",
            "is a directory",
        ),
        Case(
            "image_unreadable",
            row("b_img_locked", concepts=[concept("images/locked.png")]),
            "concepts[0].image",
            "permission denied",
        ),
        Case(
            "image_not_an_image",
            row("b_img_text", concepts=[concept("images/notes.png", None)]),
            "concepts[0].image",
            "not an image",
        ),
        Case(
            "image_truncated",
            row("b_img_cut", concepts=[concept("images/cut.png")]),
            "concepts[0].image",
            "truncated or corrupt",
        ),
        Case(
            "image_zero_bytes",
            row("b_img_zero", concepts=[concept("images/zero.png", None)]),
            "concepts[0].image",
            "file is empty (0 bytes)",
        ),
        Case(
            "image_decompression_bomb",
            row("b_img_bomb", concepts=[concept("images/bomb.png", None)]),
            "concepts[0].image",
            f"over max_pixels={MAX_PIXELS}",
        ),
        Case(
            "image_outside_allowed_root",
            row("b_img_outside", concepts=[concept("../outside/outside.png")]),
            "concepts[0].image",
            "outside the allowed roots",
        ),
        Case(
            "image_symlink_out_of_allowed_root",
            row("b_img_link", concepts=[concept("images/link.png")]),
            "concepts[0].image",
            "outside the allowed roots",
        ),
        Case(
            "concept_prompt_empty",
            row("b_concept_prompt", concepts=[concept(prompt="")]),
            "concepts[0].prompt",
            "empty",
        ),
        Case(
            "mask_missing",
            row("b_mask_missing", concepts=[concept(mask="images/gone.png")]),
            "concepts[0].mask",
            "file not found",
        ),
        Case(
            "mask_all_empty",
            row("b_mask_black", concepts=[concept(mask="images/black_mask.png")]),
            "concepts[0].mask",
            "mask is empty",
        ),
        Case(
            "mask_other_aspect_ratio",
            row("b_mask_square", concepts=[concept(mask="images/square_mask.png")]),
            "concepts[0].mask",
            "aspect ratios differ",
        ),
        Case(
            "weight_nan",
            row("b_weight_nan", concepts=[concept(weight=math.nan)]),
            "concepts[0].weight",
            "must be a finite number",
        ),
        Case(
            "weight_infinite",
            row("b_weight_inf", concepts=[concept(weight=math.inf)]),
            "concepts[0].weight",
            "must be a finite number",
        ),
        Case(
            "weight_zero",
            row("b_weight_zero", concepts=[concept(weight=0.0)]),
            "concepts[0].weight",
            "must be > 0",
        ),
        Case(
            "box_outside_image",
            row("b_box", concepts=[concept(box=[0.0, 0.0, 500.0, 500.0])]),
            "concepts[0].box",
            "outside the image",
        ),
        Case(
            "points_outside_image",
            row("b_points", concepts=[concept(points=[[1000.0, 5.0]])]),
            "concepts[0].points",
            "outside the 64x48 image",
        ),
        Case(
            "context_onto_itself",
            row("b_onto_self", concepts=[concept(), dict(second, context=context(onto="1"))]),
            "concepts[1].context.onto",
            "points to this concept itself",
        ),
        Case(
            "context_onto_out_of_range",
            row("b_onto_range", concepts=[concept(), dict(second, context=context(onto="5"))]),
            "concepts[1].context.onto",
            "out of range",
        ),
        Case(
            "context_unknown_anchor",
            row("b_anchor", concepts=[concept(), dict(second, context=context(anchor="sideways"))]),
            "concepts[1].context.anchor",
            "unknown anchor",
        ),
        Case("height_not_multiple_of_8", row("b_height", height=100), "height", "not a multiple of 8"),
        Case("width_over_limit", row("b_width", width=4096), "width", "over the limit of 2048"),
        Case(
            "steps_zero",
            row("b_steps_zero", num_inference_steps=0),
            "num_inference_steps",
            "outside [1, 1000]",
        ),
        Case(
            "steps_over_limit",
            row("b_steps_big", num_inference_steps=5000),
            "num_inference_steps",
            "outside [1, 1000]",
        ),
        Case(
            "style_fidelity_out_of_range",
            row("b_fidelity", style_fidelity=1.5),
            "style_fidelity",
            "outside [0, 1]",
        ),
        Case(
            "start_end_steps_inconsistent",
            row("b_start_end", start_step=1, end_step=1),
            "start_step",
            "must be below end_step 1",
        ),
        Case(
            "mask_mode_unknown", row("b_mask_mode", mask_mode="soft"), "mask_mode", "unknown mask_mode 'soft'"
        ),
        Case(
            "reference_seed_negative",
            row("b_ref_seed", reference_seed=-3),
            "reference_seed",
            "outside [0, 2**63)",
        ),
    ]
    return good[:1] + bad + good[1:]


CONTEXT = CONCEPT_TYPE.field("context").type
SCHEMA = pa.schema(
    [
        ("id", pa.large_string()),
        ("prompt", pa.large_string()),
        ("seeds", pa.list_(pa.int32())),
        ("concepts", pa.list_(CONCEPT_TYPE)),
        ("height", pa.int16()),
        ("width", pa.int16()),
        ("num_inference_steps", pa.int16()),
        ("style_fidelity", pa.float32()),
        ("start_step", pa.int32()),
        ("end_step", pa.int32()),
        ("mask_mode", pa.string()),
        ("reference_seed", pa.int64()),
        ("guidance_scale", pa.null()),  # an optional column with no values at all
        ("sku", pa.string()),
        ("score", pa.float64()),
        ("tags", pa.list_(pa.string())),
    ]
)


@dataclass
class Job:
    tmp: Path
    root: Path
    manifest: Path
    out: Path
    cases: list[Case]
    summary: Any
    before: set[str]
    after: set[str]

    def index(self, name: str) -> int:
        return next(i for i, c in enumerate(self.cases) if c.name == name)


def tree(folder: Path, skip: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if skip not in p.parents and p != skip}


def locked_reader(monkeypatch) -> None:
    """root reads a mode-000 file anyway: then make ``locked.png`` refuse like it would for anyone else."""
    if os.geteuid() != 0:
        return
    real = inputs._read_local

    def read(path: str) -> bytes:
        if path.endswith("locked.png"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(inputs, "_read_local", read)


def _locked_reader_in_worker() -> None:
    """``locked_reader`` in a Ray worker process (the run validates and plans in Ray tasks)."""
    locked_reader(pytest.MonkeyPatch())


@pytest.fixture(scope="module")
def job(tiny_model_dir, ray_session, tmp_path_factory) -> Job:
    from pipeline.run import run

    tmp = tmp_path_factory.mktemp("bad-input")
    root = tmp / "job"
    runs = tmp / "runs"
    runs.mkdir()
    cases = build_cases(Files(root), tmp / "outside", runs / "abs_escape")
    manifest = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist([c.row for c in cases], schema=SCHEMA), manifest)
    out = runs / "out"
    before = tree(tmp, out)
    workers = ray_worker_hook(_locked_reader_in_worker) if os.geteuid() == 0 else contextlib.nullcontext()
    with pytest.MonkeyPatch.context() as mp, workers:
        locked_reader(mp)
        summary = run(
            settings_for(manifest, out, tiny_model_dir, allow_roots=(str(root),), max_pixels=MAX_PIXELS)
        )
    return Job(
        tmp=tmp,
        root=root,
        manifest=manifest,
        out=out,
        cases=cases,
        summary=summary,
        before=before,
        after=tree(tmp, out),
    )


# The kinds built by build_cases, in manifest order (a test checks the two lists agree).
BAD_KINDS = [
    "id_missing",
    "id_duplicate",
    "id_ill_formed",
    "id_traversal",
    "id_absolute_path",
    "id_too_long",
    "prompt_empty",
    "prompt_null",
    "seeds_empty",
    "seeds_duplicate",
    "seeds_negative",
    "concepts_none",
    "concepts_over_8",
    "image_missing",
    "image_directory",
    "image_unreadable",
    "image_not_an_image",
    "image_truncated",
    "image_zero_bytes",
    "image_decompression_bomb",
    "image_outside_allowed_root",
    "image_symlink_out_of_allowed_root",
    "concept_prompt_empty",
    "mask_missing",
    "mask_all_empty",
    "mask_other_aspect_ratio",
    "weight_nan",
    "weight_infinite",
    "weight_zero",
    "box_outside_image",
    "points_outside_image",
    "context_onto_itself",
    "context_onto_out_of_range",
    "context_unknown_anchor",
    "height_not_multiple_of_8",
    "width_over_limit",
    "steps_zero",
    "steps_over_limit",
    "style_fidelity_out_of_range",
    "start_end_steps_inconsistent",
    "mask_mode_unknown",
    "reference_seed_negative",
]


@pytest.fixture(scope="module")
def validated(job) -> list[str]:
    """``freecustom-pipeline validate`` on the same manifest, with the run's settings: its lines."""
    with pytest.MonkeyPatch.context() as mp:
        locked_reader(mp)
        args = ["validate", str(job.manifest), "--allow-root", str(job.root), "--max-pixels", str(MAX_PIXELS)]
        result = runner.invoke(app, [*args, *CLI_ARGS[:6]])
    assert result.exit_code == 1, result.output
    return result.output.splitlines()


def test_the_manifest_holds_at_least_25_kinds_of_bad_rows(job):
    assert [c.name for c in job.cases if c.field] == BAD_KINDS
    assert len(BAD_KINDS) >= 25 and len(set(BAD_KINDS)) == len(BAD_KINDS)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_row_is_refused_by_row_in_errors_parquet_and_validate(kind, job, validated):
    i = job.index(kind)
    case = job.cases[i]
    (error,) = [e for e in pq.read_table(job.out / "errors.parquet").to_pylist() if e["row"] == i]
    assert error["stage"] == "validate", error
    assert error["id"] == case.row["id"], error  # the id as given (None when missing); the row index always
    assert error["field"] == case.field and case.words in error["reason"], error
    mine = [line for line in validated if line.startswith(f"row {i} (")]
    assert any(f": {case.field}: " in line and case.words in line for line in mine), mine


def test_only_the_bad_rows_fail_and_every_good_row_completes(job, validated):
    bad = [i for i, c in enumerate(job.cases) if c.field]
    errors = pq.read_table(job.out / "errors.parquet").to_pylist()
    assert sorted(e["row"] for e in errors) == bad
    assert job.summary.exit_code == 1 and len(job.summary.errors) == len(bad)
    assert job.summary.stats["rows"] == len(job.cases) and job.summary.stats["rows_failed"] == len(bad)
    assert {int(line.split()[1]) for line in validated if line.startswith("row ")} == set(bad)

    got = read_output(job.out)
    good = [c.row["id"] for c in job.cases if not c.field]
    assert sorted(s["meta"]["id"] for s in got.samples.values()) == sorted(good)
    assert all(m["status"] == "complete" for m in got.markers.values())
    assert job.summary.stats["samples_written"] == len(good)
    assert visible_temporaries(job.out) == []


def _sample(job: Job, row_id: str) -> dict:
    (sample,) = [s for s in read_output(job.out).samples.values() if s["meta"]["id"] == row_id]
    return sample


def _reference(job: Job, row_id: str, what: str = "reference") -> Image.Image:
    csid = _sample(job, row_id)["meta"]["concept_set_id"]
    return Image.open(job.out / "references" / csid / f"00_{what}.png")


def _mean_rgb(job: Job, row_id: str) -> np.ndarray:
    return np.asarray(_reference(job, row_id).convert("RGB")).reshape(-1, 3).mean(axis=0)


def test_cmyk_image_is_converted_to_rgb(job):
    r, g, b = _mean_rgb(job, "cmyk")
    assert r > 200 and g < 60 and b < 60, (r, g, b)  # CMYK (0, 255, 255, 0) is red


def test_palette_image_is_converted_to_rgb(job):
    r, g, b = _mean_rgb(job, "palette")
    assert g > 120 and r < 80 and b < 80, (r, g, b)


def test_grey_image_is_converted_to_rgb(job):
    assert (np.asarray(_reference(job, "grey").convert("RGB")) == 100).all()


def test_16bit_image_is_scaled_not_clipped(job):
    grey16 = np.asarray(_reference(job, "grey16").convert("RGB"))
    assert (grey16 == 128).all(), np.unique(grey16)  # 32768 / 65535, not clipped to 255


def test_rgba_image_with_a_mask_file_uses_the_file(job):
    (c,) = _sample(job, "rgba")["meta"]["concepts"]
    assert c["mask_source"] == "file"
    assert _reference(job, "rgba").mode == "RGB"


def test_rgba_cutout_without_mask_uses_its_alpha(job):
    (c,) = _sample(job, "cutout")["meta"]["concepts"]
    assert c["mask_source"] == "alpha"
    mask = np.asarray(_reference(job, "cutout", "mask")) > 127
    expected = np.zeros((48, 64), bool)
    expected[10:40, 16:48] = True
    np.testing.assert_array_equal(mask, expected)


def test_exif_orientation_is_applied(job):
    assert _reference(job, "exif").size == (64, 96)  # stored 96x64, rotated by its EXIF tag


def test_mask_of_another_size_with_the_same_aspect_is_resized(job):
    mask = np.asarray(_reference(job, "big_mask", "mask")) > 127
    expected = np.zeros((48, 64), bool)
    expected[8:30, 8:40] = True  # (16, 16, 80, 60) at half size
    np.testing.assert_array_equal(mask, expected)


def test_prompt_over_the_text_encoder_limit_is_truncated_and_recorded(job):
    assert _sample(job, "long_prompt")["meta"]["prompt_truncated"] is True
    assert _sample(job, "good")["meta"]["prompt_truncated"] is False


def test_extra_columns_pass_through_into_the_sample_metadata(job):
    got = read_output(job.out)
    for sample in got.samples.values():
        assert sample["meta"]["passthrough"] == EXTRA, sample["meta"]["id"]


# --------------------------------------------------------------------------- security


def test_ids_with_traversal_or_absolute_paths_write_nothing_outside_out(job):
    assert job.after == job.before, sorted(job.after ^ job.before)  # nothing new or gone outside OUT
    assert sorted(p.name for p in (job.tmp / "runs").iterdir()) == ["out"]
    assert not (job.tmp / "runs" / "abs_escape").exists()
    names = [p.name for p in job.tmp.rglob("*")]
    assert not [n for n in names if "escape" in n]
    for path in job.out.rglob("*"):  # everything the run wrote is a plain file or folder inside OUT
        assert not path.is_symlink() and path.resolve().is_relative_to(job.out.resolve()), path


@pytest.mark.parametrize("link", ["shards", "_progress", "references", "_kv"])
def test_a_symlinked_output_subfolder_refuses_the_run(link, example, tiny_model_dir, tmp_path):
    out, target = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    target.mkdir()
    (out / link).symlink_to(target, target_is_directory=True)
    result = runner.invoke(
        app, ["run", str(example), "-o", str(out), "--model", str(tiny_model_dir), *CLI_ARGS]
    )
    assert result.exit_code == 2, result.output
    assert "symbolic link" in result.output and link in result.output
    assert list(target.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == [link]


def test_a_symlinked_output_folder_refuses_the_run(example, tiny_model_dir, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real", target_is_directory=True)
    result = runner.invoke(
        app, ["run", str(example), "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir), *CLI_ARGS]
    )
    assert result.exit_code == 2 and "symbolic link" in result.output, result.output
    assert list((tmp_path / "real").iterdir()) == []


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from the weights file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_model_folder_with_only_pickled_weights_is_refused(tiny_model_dir, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from freecustom_core import FreeCustomGenerator

    pickled = tmp_path / "pickled-model"
    pipe = StableDiffusionPipeline.from_pretrained(
        str(tiny_model_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.save_pretrained(pickled, safe_serialization=False)
    for st in list(pickled.rglob("*.safetensors")):  # whatever a library still saved as safetensors
        torch.save(
            load_file(st),
            st.with_name("pytorch_model.bin" if st.name == "model.safetensors" else st.stem + ".bin"),
        )
        st.unlink()
    marker = tmp_path / "code-ran"
    unet_bin = pickled / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(unet_bin, weights_only=True)
    state["payload"] = _Payload(str(marker))
    torch.save(state, unet_bin)
    assert not list(pickled.rglob("*.safetensors")) and list(pickled.rglob("*.bin"))

    with pytest.raises(OSError, match="safetensors"):
        FreeCustomGenerator.from_pretrained(str(pickled), torch_dtype=torch.float32, device="cpu")
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(str(marker))))  # the payload is live: unpickling does run it
    assert marker.exists()


# --------------------------------------------------------------------------- whole-run refusals


def _good_rows(root: Path) -> list[dict]:
    Files(root).write("good.png", encode(noise(64, 48, 0)))
    Files(root).write("good_mask.png", encode(box_mask((64, 48), (8, 8, 40, 30))))
    return [row("good")]


def _zero_rows(root: Path) -> Path:
    path = root / "m.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [], schema=pa.schema([(n, SCHEMA.field(n).type) for n in ("id", "prompt", "seeds", "concepts")])
        ),
        path,
    )
    return path


def _not_parquet(root: Path) -> Path:
    path = root / "m.parquet"
    path.write_text("id,prompt,seeds\nx,a cat,1\n")
    return path


def _missing_column(root: Path) -> Path:
    path = root / "m.parquet"
    rows = [{k: v for k, v in r.items() if k != "seeds"} for r in _good_rows(root)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _incompatible_type(root: Path) -> Path:
    path = root / "m.parquet"
    rows = [dict(r, seeds="1,2") for r in _good_rows(root)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(
    "make,words",
    [
        (_zero_rows, "the manifest has no rows"),
        (_not_parquet, "not a readable Parquet file"),
        (_missing_column, "required column(s) ['seeds'] missing"),
        (_incompatible_type, "column 'seeds' has type string, expected list<item: int64>"),
    ],
    ids=["zero-rows", "not-parquet", "missing-required-column", "incompatible-column-type"],
)
def test_unusable_manifest_refuses_the_whole_run(make, words, tiny_model_dir, tmp_path):
    manifest = make(tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["run", str(manifest), "-o", str(out), "--model", str(tiny_model_dir), *CLI_ARGS]
    )
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert message.startswith("error:") and str(manifest) in message and words in message, message
    assert not out.exists()
    assert runner.invoke(app, ["validate", str(manifest)]).exit_code == 2
