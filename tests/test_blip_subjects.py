"""BLIP-Diffusion subjects per row (``blip_subject``): validation by field, the row's column winning over
``--blip-subject``, concept groups per subject, and a catalog rendered in one run (one subject per product)
pixel-equal to the engine per row, the subject's digest in each sample's record and in ``--reuse``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.shards import group_key
from pipeline.validate import validate_table
from stages.inputs.subject import SubjectSettings
from stages.reference.family import model_family

runner = CliRunner()
TWO = [
    {"image": "red.png", "prompt": "a red cube"},
    {"image": "blue.png", "prompt": "a blue hat", "weight": 2.5},
]


def _png(path: Path, color: str, box=(8, 8, 40, 40), size=(64, 64)) -> Path:
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (box[2] - box[0], box[3] - box[1]), color), box[:2])
    image.save(path)
    return path


def _blip_index(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "BlipDiffusionPipeline"}))
    return folder


def _table(rows: list[dict]) -> pa.Table:
    columns = sorted({k for r in rows for k in r})
    return pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])


def _row(i: str, subject=None) -> dict:
    return {"id": i, "prompt": "a toy", "seeds": [1], "concepts": TWO[:1], "blip_subject": subject}


def test_rows_bring_their_subjects_and_are_checked_by_field(tmp_path):
    for name, color in (("red", "red"), ("mug", "orange"), ("lamp", "purple")):
        _png(tmp_path / f"{name}.png", color)
    blip = model_family(str(_blip_index(tmp_path / "blip")))
    table = _table(
        [
            _row("own", {"image": "mug.png", "category": "mug", "target_category": None}),
            _row("default"),
            _row("no-category", {"image": "mug.png", "category": " ", "target_category": None}),
            _row("no-file", {"image": "missing.png", "category": "mug", "target_category": None}),
            _row("target", {"image": "lamp.png", "category": "lamp", "target_category": "light"}),
        ]
    )
    run_default = {"image": str(tmp_path / "lamp.png"), "category": "dog", "target_category": None}
    good, problems = validate_table(
        table,
        family=blip,
        base_dir=str(tmp_path),
        defaults=blip.defaults(),
        subject=SubjectSettings(default=run_default),
    )
    by_id = {r.id: r.blip_subject for r in good}
    assert sorted(by_id) == ["default", "own", "target"]
    assert (by_id["own"].image, by_id["own"].image_path, by_id["own"].category, by_id["own"].column) == (
        "mug.png",
        str(tmp_path / "mug.png"),
        "mug",
        "blip_subject",
    )  # relative to the manifest's folder
    assert (by_id["default"].category, by_id["default"].column) == ("dog", "--blip-subject")  # the row's wins
    assert (by_id["target"].target_category, by_id["target"].references) == ("light", True)
    assert sorted((p.id, p.field) for p in problems) == [
        ("no-category", "blip_subject.category"),
        ("no-file", "blip_subject.image"),
    ]
    # the references get the subject (the release's): K/V per subject, so rows of one concept set with two
    # subjects are two concept groups; without (--no-blip-subject-references) they share one
    specs = {r.id: r for r in good}
    assert group_key(specs["own"]) != group_key(specs["target"])
    good, _ = validate_table(
        table,
        family=blip,
        base_dir=str(tmp_path),
        defaults=blip.defaults(),
        subject=SubjectSettings(default=run_default, references=False),
    )
    assert len({group_key(r) for r in good}) == 1
    # no --blip-subject: a row without its own subject is refused by row, not the run
    _, problems = validate_table(table, family=blip, base_dir=str(tmp_path), defaults=blip.defaults())
    assert ("default", "blip_subject") in {(p.id, p.field) for p in problems}
    # any other model: a subject would be ignored, so it is refused
    _, problems = validate_table(table.slice(0, 2), base_dir=str(tmp_path))
    assert [(p.id, p.field) for p in problems] == [("own", "blip_subject")]


def test_validate_model_checks_the_subjects(tmp_path):
    _png(tmp_path / "red.png", "red")
    _png(tmp_path / "mug.png", "orange")
    blip = _blip_index(tmp_path / "blip")
    pq.write_table(
        _table(
            [_row("own", {"image": "mug.png", "category": "mug", "target_category": None}), _row("default")]
        ),
        tmp_path / "m.parquet",
    )
    result = runner.invoke(app, ["validate", str(tmp_path / "m.parquet"), "--model", str(blip), "--json"])
    assert result.exit_code == 1
    assert [(p["id"], p["field"]) for p in json.loads(result.stdout)["problems"]] == [
        ("default", "blip_subject")
    ]
    result = runner.invoke(
        app,
        [
            "validate",
            str(tmp_path / "m.parquet"),
            "--model",
            str(blip),
            "--blip-subject",
            str(tmp_path / "mug.png"),
            "--blip-category",
            "mug",
        ],
    )
    assert result.exit_code == 0, result.output


def _catalog(folder: Path) -> Path:
    _png(folder / "red.png", "red")
    _png(folder / "blue.png", "blue", (24, 4, 60, 28))
    products = [
        ("mug", "orange", (10, 10, 50, 54)),
        ("lamp", "purple", (4, 20, 60, 44)),
        ("shoe", "cyan", (20, 6, 44, 60)),
    ]
    rows = []
    for k, (name, color, box) in enumerate(products):
        _png(folder / f"{name}.png", color, box)
        rows.append(
            {
                "id": name,
                "prompt": f"a {name} next to a red cube",
                "seeds": [k + 1, k + 7],
                "concepts": TWO,
                "blip_subject": {"image": f"{name}.png", "category": name, "target_category": None},
            }
        )
    pq.write_table(_table(rows), folder / "catalog.parquet")
    return folder / "catalog.parquet"


def _check_rows(gen, out: Path, kv_cache: Path, folder: Path, **kwargs) -> dict[str, list[dict]]:
    """Each row's samples equal ``gen.generate`` of that row alone (its seeds, its subject, its concept set's
    K/V), on one thread as the run's actors: a row batched with another product's subject would differ."""
    import torch

    from stages.reference.reference_kv import KVFile, kv_location
    from tests.test_family_run import _samples

    rows: dict[str, list] = {}
    for _key, (meta, pixels) in sorted(_samples(out).items()):
        rows.setdefault(meta["id"], []).append((meta, pixels))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for samples in rows.values():
            meta = samples[0][0]
            kv = KVFile(kv_location(str(kv_cache), meta["concept_set_id"])).load(verify=True)
            subject = meta["blip_subject"]
            images = gen.generate(
                meta["prompt"],
                [m["seed"] for m, _ in samples],
                kv,
                height=64,
                width=64,
                num_inference_steps=2,
                subject_category=subject["category"],
                subject_image=Image.open(folder / subject["image"]).convert("RGB"),
                **kwargs,
            )
            for (_, pixels), image in zip(samples, images, strict=True):
                np.testing.assert_array_equal(pixels, np.asarray(image.convert("RGB")))
    finally:
        torch.set_num_threads(threads)
    return {i: [m for m, _ in samples] for i, samples in rows.items()}


@pytest.mark.ray
@pytest.mark.slow
def test_a_catalog_renders_each_product_as_its_own_subject(ray_session, tmp_path):
    from freecustom_core import FreeCustomGenerator
    from tests.blip_tiny import build_tiny_blip_diffusion

    blip_dir = build_tiny_blip_diffusion(tmp_path / "blip", seed=0)
    manifest = _catalog(tmp_path)
    common = ["--model", str(blip_dir), "--num-inference-steps", "2", "--height", "64", "--width", "64"]
    out, kv_cache = tmp_path / "out", tmp_path / "kv"
    result = runner.invoke(app, ["run", str(manifest), "-o", str(out), "--kv-cache", str(kv_cache), *common])
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "_stats.json").read_text())
    assert (stats["samples_written"], stats["reference_passes"]) == (6, 3)  # one concept set, K/V per subject

    gen = FreeCustomGenerator.from_pretrained(str(blip_dir), device="cpu")
    by_id = _check_rows(gen, out, kv_cache, tmp_path)
    records = {i: metas[0]["blip_subject"] for i, metas in by_id.items()}
    assert sorted(records) == ["lamp", "mug", "shoe"]
    assert len({r["digest"] for r in records.values()}) == 3 and all(
        r["references"] for r in records.values()
    )
    assert {metas[0]["model"]["scheduler"]["class"] for metas in by_id.values()} == {"PNDMScheduler"}
    assert {metas[0]["negative_prompt"] for metas in by_id.values()} == {""}

    # --reuse: equal records are copied; a product whose subject image changed is rendered again
    _png(tmp_path / "mug.png", "orange", (12, 10, 50, 54))
    again = tmp_path / "again"
    result = runner.invoke(app, ["run", str(manifest), "-o", str(again), "--reuse", str(out), *common])
    assert result.exit_code == 0, result.output
    stats = json.loads((again / "_stats.json").read_text())
    assert (stats["samples_reused"], stats["samples_rendered"]) == (4, 2)

    # the old defaults stay reachable (the SD script's DDIM, references without the subject: one K/V for the
    # catalog, three subjects in three engine calls), and their samples are never served as the new default's
    old, old_kv = tmp_path / "old", tmp_path / "old-kv"
    result = runner.invoke(
        app,
        [
            "run",
            str(manifest),
            "-o",
            str(old),
            "--kv-cache",
            str(old_kv),
            *common,
            "--scheduler",
            "release",
            "--no-blip-subject-references",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((old / "_stats.json").read_text())["reference_passes"] == 1
    release = FreeCustomGenerator.from_pretrained(str(blip_dir), device="cpu", scheduler="release")
    old_meta = _check_rows(release, old, old_kv, tmp_path, subject_references=False)
    assert {m[0]["model"]["scheduler"]["class"] for m in old_meta.values()} == {"DDIMScheduler"}
    newest = tmp_path / "newest"
    result = runner.invoke(
        app,
        ["run", str(manifest), "-o", str(newest), "--reuse", str(old), "--kv-cache", str(old_kv), *common],
    )
    assert result.exit_code == 0, result.output
    stats = json.loads((newest / "_stats.json").read_text())
    assert (stats["samples_reused"], stats["reference_passes"]) == (0, 3)  # nor the old K/V in the cache
