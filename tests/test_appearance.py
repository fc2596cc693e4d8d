"""Appearance transfer end to end: the example manifest (manifests/examples/appearance.py) through `run`.

One concept per row, a masked reference and a whole-image one, each target prompt naming an object of
another kind; the tiny random model renders them (noise: only the wiring can be checked here).
"""

from __future__ import annotations

import json
import tarfile

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from manifests.examples.appearance import appearance_rows, build_appearance_example
from pipeline.cli import app


def test_every_row_has_one_concept_and_names_another_object():
    objects = {"striped_vase_to_teapot": ("vase", "teapot"), "knit_swatch_to_armchair": ("wool", "armchair")}
    for row in appearance_rows():
        (concept,) = row["concepts"]
        reference, target = objects[row["id"]]
        assert reference in concept["prompt"] and target in row["prompt"] and target not in concept["prompt"]
        assert "vase" not in row["prompt"]


@pytest.mark.ray
@pytest.mark.slow
def test_appearance_example_runs_end_to_end(tiny_model_dir, ray_session, tmp_path):
    manifest = build_appearance_example(tmp_path / "example")
    runner = CliRunner()
    assert runner.invoke(app, ["validate", str(manifest)]).exit_code == 0
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(manifest), "-o", str(out), "--model", str(tiny_model_dir),
                                 "--num-inference-steps", "2", "--height", "64", "--width", "64"])
    assert result.exit_code == 0, result.output
    metas = [json.loads(m) for f in sorted((out / "shards").glob("*.parquet"))
             for m in pq.read_table(f)["metadata"].to_pylist()]
    assert sorted((m["id"], m["seed"]) for m in metas) == [
        ("knit_swatch_to_armchair", 0), ("knit_swatch_to_armchair", 1),
        ("striped_vase_to_teapot", 0), ("striped_vase_to_teapot", 1)]
    by_id = {m["id"]: m for m in metas}
    assert by_id["striped_vase_to_teapot"]["prompt"].startswith("a teapot")
    assert [c["prompt"] for c in by_id["knit_swatch_to_armchair"]["concepts"]] == ["red and cream knitted wool"]
    assert all(len(m["concepts"]) == 1 and m["concepts"][0]["mask_source"] for m in metas)
    with tarfile.open(next((out / "shards").glob("*.tar"))) as tar:
        assert sum(name.endswith(".png") for name in tar.getnames()) == len(metas)
