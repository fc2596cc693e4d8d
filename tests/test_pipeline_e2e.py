"""End to end: the authors' five sample cases imported with `manifest from-config` and rendered on Ray.

Tiny random-weight SD1.5-topology model, 64x64, 2 steps. Shards are read back with webdataset,
ray.data.read_webdataset and pyarrow; resume, K/V cache and per-row errors are checked on real runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import authors_layout

pytestmark = [pytest.mark.ray]

runner = CliRunner()
COMMON = ["--num-inference-steps", "2", "--height", "64", "--width", "64", "--samples-per-shard", "4", "--batch-size", "4"]


def _run(manifest: Path, out: Path, model: Path, *extra: str):
    result = runner.invoke(app, ["run", str(manifest), "-o", str(out), "--model", str(model), *COMMON, *extra])
    stats = json.loads((out / "_stats.json").read_text()) if (out / "_stats.json").exists() else None
    return result, stats


def _expected_pairs(manifest: Path) -> set[tuple[str, int]]:
    t = pq.read_table(manifest).to_pylist()
    return {(r["id"], s) for r in t for s in r["seeds"]}


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("authors")
    root, configs = authors_layout(tmp)
    manifest = tmp / "manifest.parquet"
    result = runner.invoke(app, ["manifest", "from-config", *map(str, configs), "--root", str(root), "-o", str(manifest)])
    assert result.exit_code == 0, result.output
    return manifest


@pytest.fixture(scope="module")
def first_run(imported, tiny_model_dir, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    kv = out.parent / "kv-cache"
    result, stats = _run(imported, out, tiny_model_dir, "--kv-cache", str(kv))
    assert result.exit_code == 0, result.output
    return out, stats, kv


def _read_wds(out: Path) -> list[dict]:
    import webdataset as wds

    urls = [str(p) for p in sorted((out / "shards").glob("*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_every_sample_exactly_once_in_three_readers(imported, first_run, ray_session):
    out, stats, _ = first_run
    expected = _expected_pairs(imported)
    assert len(expected) == stats["samples_expected"] == stats["samples_written"]
    # 1. webdataset
    samples = _read_wds(out)
    pairs = [(json.loads(s["json"])["id"], json.loads(s["json"])["seed"]) for s in samples]
    assert sorted(pairs) == sorted(expected) and len(pairs) == len(set(pairs))
    for s in samples:
        assert s["png"][:8] == b"\x89PNG\r\n\x1a\n"
    # 2. ray.data
    ds = ray_session.data.read_webdataset([str(p) for p in sorted((out / "shards").glob("*.tar"))])
    assert ds.count() == len(expected)
    # 3. pyarrow, the per-shard Parquet
    table = pa.concat_tables(pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet")))
    assert sorted(zip(table["id"].to_pylist(), table["seed"].to_pylist(), strict=True)) == sorted(expected)
    # no temp files anywhere
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_metadata_reproduces_the_sample(first_run, imported):
    out, _, _ = first_run
    sample = _read_wds(out)[0]
    meta = json.loads(sample["json"])
    for key in ("id", "seed", "prompt", "negative_prompt", "guidance_scale", "num_inference_steps", "height", "width",
                "reference_seed", "mrsa", "concept_set_id", "concepts", "model", "versions"):
        assert key in meta, key
    assert meta["model"]["fingerprint"] and meta["model"]["scheduler"]["class"] == "DDIMScheduler"
    assert meta["model"]["memory_format"] == "contiguous" and meta["model"]["dtype"] == "float32"
    assert meta["model"]["compiled"] is False
    assert meta["mrsa"]["blocks"] == [5, 6]
    assert all(c["mask_source"] == "file" and len(c["image_digest"]) == 64 for c in meta["concepts"])
    row = next(r for r in pq.read_table(imported).to_pylist() if r["id"] == meta["id"])
    assert meta["prompt"] == row["prompt"] and [c["weight"] for c in meta["concepts"]] == [c["weight"] for c in row["concepts"]]
    # regenerate this one sample with the engine directly from its metadata
    import io

    import numpy as np
    from PIL import Image

    from freecustom_core import ConceptRef, FreeCustomGenerator, MRSAConfig

    refs_dir = out / "references" / meta["concept_set_id"]
    assert (refs_dir / "contact_sheet.png").exists()
    gen = FreeCustomGenerator.from_pretrained(meta["model"]["id"], device="cpu")
    assert gen.model_fingerprint == meta["model"]["fingerprint"]
    concepts = [ConceptRef(Image.open(refs_dir / f"{i:02d}_reference.png"), Image.open(refs_dir / f"{i:02d}_mask.png"),
                           c["prompt"], c["weight"]) for i, c in enumerate(meta["concepts"])]
    image = gen.generate(meta["prompt"], [meta["seed"]], concepts, num_inference_steps=meta["num_inference_steps"],
                         height=meta["height"], width=meta["width"], guidance_scale=meta["guidance_scale"],
                         negative_prompt=meta["negative_prompt"], reference_seed=meta["reference_seed"],
                         mrsa=MRSAConfig.from_dict(meta["mrsa"]))[0]
    stored = np.asarray(Image.open(io.BytesIO(sample["png"])))
    assert np.abs(np.asarray(image).astype(int) - stored.astype(int)).max() <= 1


def test_reference_passes_and_kv_cache(first_run, imported, tiny_model_dir, tmp_path):
    out, stats, kv = first_run
    assert stats["reference_passes"] == stats["concept_sets"] == 5
    assert len(list(kv.glob("*.safetensors"))) == 5
    assert not (out / "_kv").exists()
    # a nightly rerun into a fresh folder with the same cache: nothing recomputed, identical bytes
    out2 = tmp_path / "out2"
    result, stats2 = _run(imported, out2, tiny_model_dir, "--kv-cache", str(kv))
    assert result.exit_code == 0, result.output
    assert stats2["reference_passes"] == 0 and stats2["samples_written"] == stats["samples_written"]
    for tar in sorted((out / "shards").glob("*.tar")):
        assert (out2 / "shards" / tar.name).read_bytes() == tar.read_bytes()


def test_reference_actor_pool_gives_the_same_output(first_run, imported, tiny_model_dir, tmp_path):
    """The generation actor resolves concept sets and computes their K/V as its shards come up (default); a
    reference actor pool first, after every concept set is resolved, gives the same bytes."""
    out, stats, _ = first_run
    assert not {"resolve", "resolve_and_reference_kv", "reference_kv"} & set(stats["seconds"])  # one model load
    pooled = tmp_path / "pooled"
    result, stats2 = _run(imported, pooled, tiny_model_dir, "--reference-actors", "always")
    assert result.exit_code == 0, result.output
    assert "resolve_and_reference_kv" in stats2["seconds"] and stats2["reference_passes"] == 5
    assert not (pooled / "_kv").exists()  # the run's store goes once the run is complete
    for tar in sorted((out / "shards").glob("*.tar")):
        assert (pooled / "shards" / tar.name).read_bytes() == tar.read_bytes()


def test_rerun_is_a_noop_and_a_deleted_or_altered_shard_comes_back_identical(first_run, imported, tiny_model_dir):
    out, stats, kv = first_run
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").iterdir()}
    result, again = _run(imported, out, tiny_model_dir, "--kv-cache", str(kv))
    assert result.exit_code == 0, result.output
    assert again["samples_generated_this_run"] == 0 and again["reference_passes"] == 0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").iterdir()} == before
    # one rerun for two damaged shards: a deleted tar (4 samples), and a tar replaced by other bytes of the
    # same size (a torn copy, a foreign file): the size its marker names still fits, its sha256 does not.
    # Both are rendered again, byte for byte; nothing else is.
    victim, swapped = sorted((out / "shards").glob("*.tar"))[1], sorted((out / "shards").glob("*.tar"))[0]
    victim.unlink()
    original = before[swapped.name][1]
    swapped.write_bytes(bytes(b ^ 0x5A for b in original[:700]) + original[700:])
    assert swapped.stat().st_size == len(original)
    result, again = _run(imported, out, tiny_model_dir, "--kv-cache", str(kv))
    assert result.exit_code == 0, result.output
    rows = pq.read_table(swapped.with_suffix(".parquet")).num_rows
    assert rows > 0 and again["samples_generated_this_run"] == 4 + rows
    assert victim.read_bytes() == before[victim.name][1] and swapped.read_bytes() == original
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == {n: b for n, (_, b) in before.items()}


def test_other_settings_on_the_same_output_are_refused(first_run, imported, tiny_model_dir):
    out, _, _ = first_run
    result = runner.invoke(app, ["run", str(imported), "-o", str(out), "--model", str(tiny_model_dir),
                                 "--num-inference-steps", "3", "--height", "64", "--width", "64"])
    assert result.exit_code == 2
    assert "another manifest or other settings" in result.output
    # a fast path that changes pixels (within rounding) is part of the output's identity too
    result = runner.invoke(app, ["run", str(imported), "-o", str(out), "--model", str(tiny_model_dir), *COMMON,
                                 "--channels-last"])
    assert result.exit_code == 2 and "channels_last" in result.output


def test_broken_rows_fail_alone(imported, tiny_model_dir, ray_session, tmp_path):
    rows = pq.read_table(imported).to_pylist()[:2]
    good = dict(rows[0], seeds=rows[0]["seeds"][:1])
    missing = dict(rows[1], id="missing_image", seeds=[1])
    missing["concepts"] = [dict(c) for c in missing["concepts"]]
    missing["concepts"][0]["image"] = str(tmp_path / "nope.jpg")
    no_mask = dict(rows[1], id="no_mask_source", seeds=[2])
    no_mask["concepts"] = [dict(c, mask=None) for c in no_mask["concepts"]]
    manifest = imported.with_name("broken-rows.parquet")  # beside it: from-config's image paths are relative to it
    pq.write_table(pa.Table.from_pylist([good, missing, no_mask], schema=pq.read_schema(imported)), manifest)

    v = runner.invoke(app, ["validate", str(manifest)])
    assert v.exit_code == 1 and "row 1 (id=missing_image): concepts[0].image:" in v.output

    out = tmp_path / "out"
    result, stats = _run(manifest, out, tiny_model_dir)
    assert result.exit_code == 1, result.output
    errors = {e["id"]: e for e in pq.read_table(out / "errors.parquet").to_pylist()}
    assert set(errors) == {"missing_image", "no_mask_source"}
    assert errors["missing_image"]["stage"] == "validate" and errors["missing_image"]["field"] == "concepts[0].image"
    # no mask source under --mask-policy fail: refused when the manifest is validated, as `validate` reports it
    assert (errors["no_mask_source"]["stage"], errors["no_mask_source"]["field"]) == ("validate", "concepts[0].mask")
    assert "--mask-policy whole_image" in errors["no_mask_source"]["reason"]
    assert "row 2 (id=no_mask_source): concepts[0].mask: no mask source" in v.output
    assert stats["samples_written"] == 1
    assert [json.loads(s["json"])["id"] for s in _read_wds(out)] == [good["id"]]

    # the same with a reference actor pool first: the same errors, samples and counts
    pooled = tmp_path / "pooled"
    result, pooled_stats = _run(manifest, pooled, tiny_model_dir, "--reference-actors", "always")
    assert result.exit_code == 1, result.output
    assert pq.read_table(pooled / "errors.parquet").to_pylist() == pq.read_table(out / "errors.parquet").to_pylist()
    for k in ("rows_failed", "samples_written", "concept_sets", "concept_sets_this_run", "reference_passes"):
        assert pooled_stats[k] == stats[k], k
    assert (pooled / "shards" / "00000.tar").read_bytes() == (out / "shards" / "00000.tar").read_bytes()

    inspected = runner.invoke(app, ["inspect", str(out)])
    assert inspected.exit_code == 0 and "no_mask_source" in inspected.output and "00000.tar" in inspected.output
    key = f"{good['id']}-{good['seeds'][0]}"
    one = runner.invoke(app, ["inspect", str(out), "--sample", key])
    assert one.exit_code == 0 and json.loads(one.output)["key"] == key


def test_unusable_manifest_exits_2(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    result = runner.invoke(app, ["run", str(bad), "-o", str(tmp_path / "o"), "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "error:" in result.output
    result = runner.invoke(app, ["run", str(bad), "-o", str(tmp_path / "o"), "--image-format", "gif"])
    assert result.exit_code == 2
