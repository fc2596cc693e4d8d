"""``run --embed-references --annotate`` end to end on the tiny SD1.5-topology model (a local Ray): each
sample holds its references and masks as the engine took them and where each concept landed; a
WebDataset reader yields complete examples; ``--reuse`` and ``--min-score`` (rejected/, ``presence``
and ``overlap<``) keep the fields consistent."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.examples import write_example_manifest
from stages.generation.annotate import attention_region, decode_panels, overlap
from stages.generation.embed import engine_input
from stages.inputs.concepts import mask_from_png
from stages.scoring.score_stage import tar_members
from tests.test_object_storage import BUCKET, _objects, _upload, s3  # noqa: F401 - s3: the moto server fixture

pytestmark = [pytest.mark.ray, pytest.mark.slow]

WIDTH, HEIGHT, STEPS = 80, 64, 2  # not square: width and height cannot be swapped unseen
COMMON = [
    "--num-inference-steps",
    str(STEPS),
    "--height",
    str(HEIGHT),
    "--width",
    str(WIDTH),
    "--samples-per-shard",
    "3",
    "--device",
    "cpu",
]


def run_cli(manifest: Path, out: Path, model: Path, *extra: str):
    result = CliRunner().invoke(
        app, ["run", str(manifest), "-o", str(out), "--model", str(model), *COMMON, *extra]
    )
    stats = json.loads((out / "_stats.json").read_text()) if (out / "_stats.json").exists() else None
    return result, stats


def members_of(out: Path, kind: str = "shards") -> dict[str, bytes]:
    members = {}
    for tar in sorted((out / kind).glob("*.tar")):
        members.update(tar_members(tar.read_bytes()))
    return members


def metas_of(out: Path, kind: str = "shards") -> list[dict]:
    return [
        json.loads(m)
        for p in sorted((out / kind).glob("*.parquet"))
        for m in pq.read_table(p)["metadata"].to_pylist()
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, ray_session):
    """``full``: 1 row (2 concepts) x 3 seeds with --embed-references --annotate --save-attention;
    ``reused``: --embed-references --annotate reusing ``full`` (no --save-attention: the maps stay
    behind, the annotations are drawn again from them); ``plain``: neither, reusing ``full``."""
    root = tmp_path_factory.mktemp("training-run")
    example = write_example_manifest(root / "in", seeds_per_row=3)
    table = pq.read_table(example)
    manifest = root / "in" / "one_row.parquet"
    pq.write_table(table.filter(pc.equal(table["id"], "dog_hat_park")), manifest)
    full, stats = run_cli(
        manifest, root / "full", tiny_model_dir, "--embed-references", "--annotate", "--save-attention"
    )
    assert full.exit_code == 0, full.output
    assert stats["samples_written"] == 3
    reused, reused_stats = run_cli(
        manifest,
        root / "reused",
        tiny_model_dir,
        "--embed-references",
        "--annotate",
        "--reuse",
        str(root / "full"),
    )
    assert reused.exit_code == 0, reused.output
    assert reused_stats["samples_reused"] == 3
    plain, _ = run_cli(manifest, root / "plain", tiny_model_dir, "--reuse", str(root / "full"))
    assert plain.exit_code == 0, plain.output
    return {"root": root, "manifest": manifest, "model": tiny_model_dir, "stats": stats}


def test_references_are_the_engines_inputs(runs):
    out = runs["root"] / "full"
    members, metas = members_of(out), metas_of(out)
    assert len(metas) == 3
    refs = out / "references" / metas[0]["concept_set_id"]
    for meta in metas:
        key = meta["key"]
        assert meta["embedded_references"] == {
            "images": ["ref0.png", "ref1.png"],
            "masks": ["ref0.mask.png", "ref1.mask.png"],
            "size": [WIDTH, HEIGHT],
        }
        for i in range(2):
            # the final reference (another size) resized as the engine's encode_images does
            final = Image.open(refs / f"{i:02d}_reference.png").convert("RGB")
            mask = Image.open(refs / f"{i:02d}_mask.png")
            assert final.size != (WIDTH, HEIGHT)
            image, inside = engine_input(final, mask, (WIDTH, HEIGHT))
            got = Image.open(io.BytesIO(members[f"{key}.ref{i}.png"]))
            assert got.size == (WIDTH, HEIGHT)
            assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(image))
            assert np.array_equal(mask_from_png(members[f"{key}.ref{i}.mask.png"]), inside)
            assert 0 < inside.mean() < 1


def test_annotations_are_the_rule_on_the_saved_maps(runs):
    out = runs["root"] / "full"
    members, metas = members_of(out), metas_of(out)
    for meta in metas:
        key = meta["key"]
        heats = decode_panels(members[f"{key}.attn.png"], 2, (WIDTH, HEIGHT))
        regions = [attention_region(h) for h in heats]
        assert [a["box"] for a in meta["annotations"]] == [r.box for r in regions]
        assert [a["mask"] for a in meta["annotations"]] == ["ann0.mask.png", "ann1.mask.png"]
        assert [a["source"] for a in meta["annotations"]] == ["attention"] * 2
        assert meta["annotations"][0]["confidence"] == pytest.approx(regions[0].confidence, abs=1e-6)
        assert meta["presence"] == pytest.approx([r.presence for r in regions], abs=1e-6)
        assert meta["overlap"] == pytest.approx(overlap([r.mask for r in regions]), abs=1e-6)
        for i, region in enumerate(regions):
            assert np.array_equal(mask_from_png(members[f"{key}.ann{i}.mask.png"]), region.mask)


def test_webdataset_yields_complete_examples(runs):
    wds = pytest.importorskip("webdataset")
    tars = [str(p) for p in sorted((runs["root"] / "full" / "shards").glob("*.tar"))]
    examples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(examples) == 3
    for ex in examples:
        assert ex["png"].size == (WIDTH, HEIGHT)
        for name in (
            "ref0.png",
            "ref1.png",
            "ref0.mask.png",
            "ref1.mask.png",
            "ann0.mask.png",
            "ann1.mask.png",
        ):
            assert ex[name].size == (WIDTH, HEIGHT), name
        assert [a["mask"] for a in ex["json"]["annotations"]] == ["ann0.mask.png", "ann1.mask.png"]


def test_parquet_and_card_name_the_fields(runs):
    out = runs["root"] / "full"
    table = pq.read_table(out / "shards" / "00000.parquet")
    assert table["reference_fields"].to_pylist()[0] == ["ref0.png", "ref1.png"]
    assert table["reference_mask_fields"].to_pylist()[0] == ["ref0.mask.png", "ref1.mask.png"]
    metas = metas_of(out)
    assert table["presence"].to_pylist() == [m["presence"] for m in metas]
    assert table["overlap"].to_pylist() == [m["overlap"] for m in metas]
    assert table["boxes"].to_pylist() == [[a["box"] for a in m["annotations"]] for m in metas]
    card = (out / "README.md").read_text()
    assert "ref0.png" in card and "ann0.mask.png" in card
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["annotations"]["overlap"]["n"] == 3 and stats["annotations"]["presence"]["n"] == 3


def test_reuse_draws_the_same_fields_again(runs):
    first, again = members_of(runs["root"] / "full"), members_of(runs["root"] / "reused")
    assert not any(name.endswith(".attn.png") for name in again)  # no --save-attention: the maps stay behind
    for name, data in again.items():
        if name.endswith(".json"):
            meta, before = json.loads(data), json.loads(first[name])
            for k in ("annotations", "presence", "overlap", "embedded_references"):
                assert meta[k] == before[k]
            assert "attention" not in meta
        else:
            assert data == first[name], name


def test_min_score_presence_and_overlap_route_samples(runs, tmp_path):
    metas = metas_of(runs["root"] / "full")
    lowest = sorted(min(m["presence"]) for m in metas)
    limit = round((lowest[0] + lowest[1]) / 2, 6)  # one sample below
    result, stats = run_cli(
        runs["manifest"],
        tmp_path / "filtered",
        runs["model"],
        "--embed-references",
        "--annotate",
        "--min-score",
        f"presence={limit}",
        "--reuse",
        str(runs["root"] / "full"),
    )
    assert result.exit_code == 0, result.output
    assert stats["samples_rejected"] == 1 and stats["samples_written"] == 2
    rejected = members_of(tmp_path / "filtered", "rejected")
    key = next(n for n in rejected if n.endswith(".json")).removesuffix(".json")
    meta = json.loads(rejected[f"{key}.json"])
    assert meta["rejected_by"] == [f"presence<{limit:g}"]
    assert {f"{key}.ref0.png", f"{key}.ref1.mask.png", f"{key}.ann1.mask.png"} <= set(rejected)
    # an upper bound: on the tiny model every concept's map covers the whole image (overlap 1.0), so
    # overlap<1 rejects every sample (read as a minimum it would keep them all)
    assert {m["overlap"] for m in metas} == {1.0}
    result, stats = run_cli(
        runs["manifest"],
        tmp_path / "upper",
        runs["model"],
        "--annotate",
        "--min-score",
        "overlap<1",
        "--reuse",
        str(runs["root"] / "full"),
    )
    assert result.exit_code == 0, result.output
    assert stats["samples_rejected"] == 3 and stats["samples_written"] == 0
    assert {tuple(m["rejected_by"]) for m in metas_of(tmp_path / "upper", "rejected")} == {("overlap>=1",)}


def test_score_annotate_equals_run_annotate(runs, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(runs["root"] / "full", out)
    result = CliRunner().invoke(app, ["score", str(out), "--annotate", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["samples"] == 3 and summary["shards_annotated"] == 1 and summary["errors"] == []
    members = members_of(out)
    rows = pq.read_table(out / "annotations" / "00000.parquet").to_pylist()
    for row, meta in zip(rows, metas_of(out), strict=True):
        assert row["key"] == meta["key"] and json.loads(row["annotations"]) == meta["annotations"]
        assert row["presence"] == meta["presence"] and row["overlap"] == meta["overlap"]
        assert row["masks"] == [members[f"{meta['key']}.{a['mask']}"] for a in meta["annotations"]]
    again = CliRunner().invoke(app, ["score", str(out), "--annotate", "--json"])
    assert json.loads(again.stdout)["shards_kept"] == 1  # up to date: not redone
    refused = CliRunner().invoke(app, ["score", str(runs["root"] / "reused"), "--annotate"])
    assert refused.exit_code == 2 and "run --save-attention" in refused.output


# --------------------------------------------------------------------------- export


def export(out: Path, dest, fmt: str, *extra: str):
    result = CliRunner().invoke(app, ["export", str(out), "-o", str(dest), "--format", fmt, "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_hf_export_round_trips_every_field(runs, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = runs["root"] / "full"
    summary = export(out, tmp_path / "hf", "hf")
    assert summary["samples"] == 3 and summary["shards_exported"] == 1
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    features = ds.features
    # a filter that keeps no sample: an empty dataset of the same features, which loads
    none = export(out, tmp_path / "hf-none", "hf", "--min-score", "overlap<0")
    assert (none["samples"], none["filtered_out"]) == (0, 3)
    empty = datasets.load_from_disk(str(tmp_path / "hf-none"))
    assert len(empty) == 0 and empty.features == features
    assert isinstance(features["image"], datasets.Image)
    assert isinstance(features["references"].feature, datasets.Image)
    assert isinstance(features["masks"].feature, datasets.Image)
    assert features["boxes"].feature.feature.dtype == "int64"
    members, metas = members_of(out), metas_of(out)
    raw = ds.cast_column("image", datasets.Image(decode=False))
    raw = raw.cast_column("references", datasets.List(datasets.Image(decode=False)))
    raw = raw.cast_column("reference_masks", datasets.List(datasets.Image(decode=False)))
    raw = raw.cast_column("masks", datasets.List(datasets.Image(decode=False)))
    assert len(raw) == 3
    for row, meta in zip(raw, metas, strict=True):
        key = meta["key"]
        assert row["key"] == key and row["prompt"] == meta["prompt"] and row["seed"] == meta["seed"]
        assert row["image"]["bytes"] == members[f"{key}.png"]
        assert [r["bytes"] for r in row["references"]] == [members[f"{key}.ref{i}.png"] for i in range(2)]
        assert [r["bytes"] for r in row["reference_masks"]] == [
            members[f"{key}.ref{i}.mask.png"] for i in range(2)
        ]
        assert [m["bytes"] for m in row["masks"]] == [members[f"{key}.ann{i}.mask.png"] for i in range(2)]
        assert row["boxes"] == [a["box"] for a in meta["annotations"]]
        assert row["confidence"] == [a["confidence"] for a in meta["annotations"]]
        assert row["sources"] == ["attention", "attention"]
        assert row["presence"] == meta["presence"] and row["overlap"] == meta["overlap"]
        assert json.loads(row["metadata"]) == meta
    decoded = ds[0]
    assert decoded["image"].size == (WIDTH, HEIGHT) and decoded["references"][1].size == (WIDTH, HEIGHT)


def test_export_draws_references_an_output_did_not_embed(runs, tmp_path):
    datasets = pytest.importorskip("datasets")
    export(runs["root"] / "plain", tmp_path / "hf", "hf")
    ds = datasets.load_from_disk(str(tmp_path / "hf")).cast_column(
        "references", datasets.List(datasets.Image(decode=False))
    )
    assert "boxes" not in ds.column_names  # not annotated
    members = members_of(runs["root"] / "full")
    for row in ds:
        assert [r["bytes"] for r in row["references"]] == [
            members[f"{row['key']}.ref{i}.png"] for i in range(2)
        ]


def test_jsonl_export_loads_as_an_imagefolder_filtered_and_resumes(runs, tmp_path):
    datasets = pytest.importorskip("datasets")
    out, dest = runs["root"] / "full", tmp_path / "jsonl"
    metas = metas_of(out)
    lowest = sorted(min(m["presence"]) for m in metas)
    limit = round((lowest[0] + lowest[1]) / 2, 6)
    summary = export(out, dest, "jsonl", "--min-score", f"presence={limit}")
    assert summary["samples"] == 2 and summary["filtered_out"] == 1
    lines = [json.loads(line) for line in (dest / "metadata.jsonl").read_text().splitlines()]
    kept = [m for m in metas if min(m["presence"]) >= limit]
    assert [r["key"] for r in lines] == [m["key"] for m in kept]
    members = members_of(out)
    for record, meta in zip(lines, kept, strict=True):
        assert record["text"] == meta["prompt"]
        assert (dest / record["file_name"]).read_bytes() == members[f"{meta['key']}.png"]
        assert [(dest / p).read_bytes() for p in record["references"]] == [
            members[f"{meta['key']}.ref{i}.png"] for i in range(2)
        ]
        assert [(dest / p).read_bytes() for p in record["masks"]] == [
            members[f"{meta['key']}.ann{i}.mask.png"] for i in range(2)
        ]
        assert record["boxes"] == [a["box"] for a in meta["annotations"]]
    # as diffusers' train_text_to_image.py loads a folder: an image column from file_name, the caption from text
    ds = datasets.load_dataset("imagefolder", data_dir=str(dest), split="train")
    assert ds["text"] == [m["prompt"] for m in kept] and ds[0]["image"].size == (WIDTH, HEIGHT)
    assert ds["boxes"] == [[a["box"] for a in m["annotations"]] for m in kept]
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    again = export(out, dest, "jsonl", "--min-score", f"presence={limit}")
    assert again["shards_kept"] == 1 and again["shards_exported"] == 0 and again["samples"] == 2
    (dest / "_export" / "00000.json").unlink()  # an interrupted export: the shard is done again, the same
    redone = export(out, dest, "jsonl", "--min-score", f"presence={limit}")
    assert redone["shards_exported"] == 1
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    other = CliRunner().invoke(app, ["export", str(out), "-o", str(dest), "--format", "hf"])
    assert other.exit_code == 2 and "holds another export" in other.output


def test_export_from_and_to_object_storage(runs, s3, tmp_path):  # noqa: F811 - the fixture imported above
    filesystem, _ = s3
    _upload(filesystem, runs["root"] / "full", f"{BUCKET}/train-out")
    summary = export(f"s3://{BUCKET}/train-out", f"s3://{BUCKET}/train-jsonl", "jsonl")
    assert summary["samples"] == 3
    local = export(runs["root"] / "full", tmp_path / "jsonl", "jsonl")
    assert local["samples"] == 3
    remote = _objects(filesystem, "train-jsonl")
    files = {
        p.relative_to(tmp_path / "jsonl").as_posix(): p.read_bytes()
        for p in (tmp_path / "jsonl").rglob("*")
        if p.is_file()
    }
    del remote["_export.json"], files["_export.json"]  # they name their source
    assert remote == files  # the same export, byte for byte


def test_the_dataset_card_loads_the_fields_in_datasets(runs, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    ds = datasets.load_dataset(str(runs["root"] / "full"), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 3
    assert {"png", "ref0.png", "ref1.mask.png", "ann1.mask.png", "json"} <= set(ds.column_names)
    assert ds[0]["ref1.png"].size == (WIDTH, HEIGHT)


def test_annotate_alone_renders_the_same_annotations_without_saving_the_maps(runs, tmp_path):
    result, stats = run_cli(runs["manifest"], tmp_path / "alone", runs["model"], "--annotate")
    assert result.exit_code == 0, result.output
    assert stats["samples_rendered"] == 3
    members, first = members_of(tmp_path / "alone"), members_of(runs["root"] / "full")
    assert not any(n.endswith((".attn.png", ".ref0.png")) for n in members)
    for meta, before in zip(metas_of(tmp_path / "alone"), metas_of(runs["root"] / "full"), strict=True):
        assert "attention" not in meta and "embedded_references" not in meta
        assert (meta["annotations"], meta["presence"], meta["overlap"]) == (
            before["annotations"],
            before["presence"],
            before["overlap"],
        )
        for i in range(2):
            assert members[f"{meta['key']}.ann{i}.mask.png"] == first[f"{meta['key']}.ann{i}.mask.png"]
