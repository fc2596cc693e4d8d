"""``run --score --min-score`` end to end on a real tiny run (tiny SD1.5 and tiny DINOv2 / CLIP scorers,
a local Ray): scores in each sample's JSON and as Parquet columns, rejected samples under rejected/
with their reasons, rejected.parquet, the distributions in _stats.json and inspect, resume and --reuse
exact with the filter on, the gallery over the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.examples import write_example_manifest
from pipeline.tiny_scorers import build_tiny_scorers
from stages.scoring.score_stage import tar_members

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def run_cli(manifest, out, model, scorers, *extra):
    args = [
        "run",
        str(manifest),
        "-o",
        str(out),
        "--model",
        str(model),
        "--num-inference-steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--samples-per-shard",
        "3",
        "--device",
        "cpu",
        "--score",
        "--dino-model",
        scorers.dino,
        "--clip-image-model",
        scorers.clip_image,
        "--clip-text-model",
        scorers.clip_text,
        *extra,
    ]
    return CliRunner().invoke(app, args)


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file a reader reads (not the run's reports, which say how each run went)."""
    skip = {"_stats.json", "README.md"}
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip and not str(p.relative_to(folder)).startswith(("_kv", "review"))
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, ray_session):
    root = tmp_path_factory.mktemp("score-run")
    manifest = write_example_manifest(root / "in")
    scorers = build_tiny_scorers(root / "scorers")
    plain = run_cli(manifest, root / "scored", tiny_model_dir, scorers)
    assert plain.exit_code == 0, plain.output
    rows = pq.read_table(sorted((root / "scored" / "shards").glob("*.parquet"))).to_pylist()
    clip_t = sorted(r["clip_t"] for r in rows)
    limit = round((clip_t[2] + clip_t[3]) / 2, 4)  # three samples below
    filtered = run_cli(
        manifest,
        root / "filtered",
        tiny_model_dir,
        scorers,
        "--min-score",
        f"clip_t={limit}",
        "--reuse",
        str(root / "scored"),
    )
    assert filtered.exit_code == 0, filtered.output
    return {
        "root": root,
        "manifest": manifest,
        "scorers": scorers,
        "model": tiny_model_dir,
        "limit": limit,
        "scored_rows": rows,
    }


def test_scores_in_metadata_and_columns(runs):
    out = runs["root"] / "scored"
    rows = runs["scored_rows"]
    assert len(rows) == 8 and not (out / "rejected").exists()
    for r in rows:
        meta = json.loads(r["metadata"])
        assert meta["scores"]["clip_t"] == r["clip_t"] and meta["scores"]["dino"] == r["dino"]
        assert len(r["dino"]) == len(meta["concepts"]) and 0 <= r["clip_t"] <= 100
        assert all(np.isclose(p, (d + 1) / 2) for p, d in zip(r["dino_paper"], r["dino"], strict=True))
    tar = tar_members((out / "shards" / "00000.tar").read_bytes())
    first = json.loads(rows[0]["metadata"])
    assert json.loads(tar[f"{first['key']}.json"])["scores"] == first["scores"]
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["samples_written"] == 8 and stats["samples_rejected"] == 0
    sets = stats["scores"]["concept_sets"]
    assert sum(s["samples"] for s in sets.values()) == 8
    some = next(iter(sets))
    mine = [r["clip_t"] for r in rows if r["concept_set_id"] == some]
    assert sets[some]["clip_t"]["mean"] == pytest.approx(np.mean(mine))


def test_rejected_samples_and_reasons(runs):
    out, limit = runs["root"] / "filtered", runs["limit"]
    by_key = {r["key"]: r for r in runs["scored_rows"]}
    below = {k for k, r in by_key.items() if r["clip_t"] < limit}
    assert len(below) == 3
    kept = pq.read_table(sorted((out / "shards").glob("*.parquet"))).to_pylist()
    rejected = pq.read_table(sorted((out / "rejected").glob("*.parquet"))).to_pylist()
    assert {r["key"] for r in kept} == set(by_key) - below and {r["key"] for r in rejected} == below
    for r in rejected:
        assert r["rejected_by"] == f"clip_t<{limit:g}" and r["clip_t"] == pytest.approx(
            by_key[r["key"]]["clip_t"]
        )
        shard = json.loads(r["metadata"])["shard"]
        members = tar_members((out / "rejected" / f"{shard:05d}.tar").read_bytes())
        image = (runs["root"] / "scored" / "shards").glob("*.tar")
        originals = {}
        for tar in image:
            originals.update(tar_members(tar.read_bytes()))
        assert (
            members[f"{r['key']}.png"] == originals[f"{r['key']}.png"]
        )  # the rendered image, reused byte for byte
    summary = pq.read_table(out / "rejected.parquet").to_pylist()
    assert sorted(r["key"] for r in summary) == sorted(below)
    assert {"key", "id", "seed", "rejected_by", "clip_t", "dino"} <= set(summary[0])
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["samples_written"] == 5 and stats["samples_rejected"] == 3 and stats["complete"]
    assert stats["samples_reused"] == 8 and stats["samples_rendered"] == 0  # scores are not in the record
    report = CliRunner().invoke(app, ["inspect", str(out)])
    assert "samples_rejected: 3" in report.output and "clip_t" in report.output


def test_resume_is_exact_with_the_filter(runs):
    out = runs["root"] / "filtered"
    before = files_of(out)
    rejected_shard = sorted((out / "rejected").glob("*.tar"))[0].stem
    other_shard = next(p.stem for p in sorted((out / "shards").glob("*.tar")) if p.stem != rejected_shard)
    (out / "rejected" / f"{rejected_shard}.parquet").unlink()  # its marker names it: the shard is redone
    for rel in (f"shards/{other_shard}.tar", f"_progress/{other_shard}.json"):
        (out / rel).unlink()
    again = run_cli(
        runs["manifest"],
        out,
        runs["model"],
        runs["scorers"],
        "--min-score",
        f"clip_t={runs['limit']}",
        "--reuse",
        str(runs["root"] / "scored"),
    )
    assert again.exit_code == 0, again.output
    assert files_of(out) == before
    other = run_cli(runs["manifest"], out, runs["model"], runs["scorers"], "--min-score", "clip_t=1")
    assert other.exit_code == 2 and "differs in: score" in other.output  # another threshold is another output


def test_review_of_a_filtered_run(runs):
    from pipeline.review import build_review

    result = build_review(str(runs["root"] / "filtered"))
    assert result["samples"] == 8 and result["rejected"] == 3 and result["thumbnails_made"] == 8
