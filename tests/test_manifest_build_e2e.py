"""``manifest build`` end to end: the examples built, validated and rendered with the tiny model, and a
nightly catalog: build, run, change 3 products in the feed, build again, ``run --reuse``: exactly those
products' samples are rendered, every other one is copied from the night before."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from manifests.examples.catalog import write_catalog
from manifests.examples.pools import write_pools
from pipeline.cli import app
from pipeline.manifest_files import read_manifest
from tests.test_manifest_build import feed, write_feed

pytestmark = [pytest.mark.slow, pytest.mark.ray]

runner = CliRunner()
RUN = ["--num-inference-steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "-q"]


def _build_and_validate(spec: Path, out: Path) -> list[dict]:
    result = runner.invoke(app, ["manifest", "build", str(spec), "-o", str(out), "--rows-per-file", "20"])
    assert result.exit_code == 0, result.output
    check = runner.invoke(app, ["validate", str(out), "--json"])
    assert check.exit_code == 0, check.output
    assert json.loads(check.stdout.splitlines()[0])["refused"] == 0
    return read_manifest(str(out)).to_pylist()


def _run(manifest: Path, out: Path, model: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["run", str(manifest), "-o", str(out), "--model", str(model), *RUN, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "_stats.json").read_text())


def _metadata(out: Path) -> list[dict]:
    return [
        json.loads(m)
        for p in sorted((out / "shards").glob("*.parquet"))
        for m in pq.read_table(p, columns=["metadata"])["metadata"].to_pylist()
    ]


def test_pools_example_renders_end_to_end(tmp_path, tiny_model_dir, ray_session):
    spec = write_pools(tmp_path / "pools")
    rows = _build_and_validate(spec, tmp_path / "manifest")
    stats = _run(tmp_path / "manifest", tmp_path / "out", tiny_model_dir)
    assert stats["samples_written"] == len(rows) == 9 and stats["rows_failed"] == 0
    metas = _metadata(tmp_path / "out")
    assert {m["id"] for m in metas} == {r["id"] for r in rows}
    assert all(m["passthrough"]["composition"] in ("pet_accessory", "pet_two_accessories") for m in metas)


def test_nightly_catalog_renders_exactly_the_changed_products(tmp_path, tiny_model_dir, ray_session):
    spec = write_catalog(tmp_path / "cat")
    night1 = _build_and_validate(spec, tmp_path / "manifest")
    stats = _run(tmp_path / "manifest", tmp_path / "night1", tiny_model_dir)
    assert stats["samples_written"] == sum(len(r["seeds"]) for r in night1) == 100

    products = feed(tmp_path / "cat")
    changed = {products[n]["sku"] for n in (2, 9, 17)}
    for n in (2, 9, 17):
        products[n]["title"] += " (new edition)"
    products.reverse()  # tomorrow's export lists the products in another order
    write_feed(tmp_path / "cat", products)
    night2 = _build_and_validate(spec, tmp_path / "manifest")  # rebuilt in place
    assert sorted(r["id"] for r in night2) == sorted(r["id"] for r in night1)

    stats = _run(
        tmp_path / "manifest", tmp_path / "night2", tiny_model_dir, "--reuse", str(tmp_path / "night1")
    )
    expected = {(r["id"], s) for r in night2 if r["item_keys"][0] in changed for s in r["seeds"]}
    assert stats["samples_rendered"] == len(expected) and stats["samples_reused"] == 100 - len(expected)
    rendered = {(m["id"], m["seed"]) for m in _metadata(tmp_path / "night2") if "reused_from" not in m}
    assert rendered == expected
