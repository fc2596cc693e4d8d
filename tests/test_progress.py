"""Progress a person can follow in a job log: plain lines when stderr is not a terminal; worker
warnings reach the driver once per kind with a count, and _stats.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.examples import write_example_manifest
from pipeline.progress import ProgressLog

REPO = Path(__file__).resolve().parents[1]


def test_lines_at_each_phase_and_at_most_every_period(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: now[0])
    lines: list[str] = []
    log = ProgressLog(lines.append, every=10.0)
    log.phase("validate")  # the first phase: reported only if it lasts (a refused run prints its error alone)
    log.planned(shards=4, images=10, rows_failed=1)
    log.phase("generate_and_write")
    assert len(lines) == 1 and lines[0].startswith("freecustom-pipeline: generate_and_write: shards 0/4")
    now[0] += 4
    log.shard({"samples": 3, "errors": []})  # 4 s after the last line: none
    assert len(lines) == 1
    now[0] += 7
    log.shard({"samples": 2, "errors": [{"row": 7}, {"row": 7}]})
    assert len(lines) == 2
    assert lines[1] == ("freecustom-pipeline: generate_and_write: shards 2/4, images 5/10, failed rows 2, "
                        "0.45 images/s, ETA 0:00:11")


@pytest.mark.slow
def test_a_run_in_a_job_log_shows_progress_and_warnings(tmp_path, tiny_model_dir):
    manifest = write_example_manifest(tmp_path / "inputs")
    rows = pq.read_table(manifest).to_pylist()
    rows[2]["prompt"] = " ".join(["a blue ceramic mug with a long detailed description"] * 20)  # > 77 tokens
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(manifest)), manifest)
    log = tmp_path / "job.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as stderr:  # not a terminal, as under ray job submit / KubeRay
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(manifest), "-o", str(tmp_path / "out"),
                               "--model", str(tiny_model_dir), "--num-inference-steps", "2", "--height", "64",
                               "--width", "64", "--samples-per-shard", "3",
                                   # concept sets resolved before rendering (a streamed run resolves them
                                   # in the generation actors, as their shards come up): the resolve phase
                                   "--reference-actors", "always"], stderr=stderr, stdout=subprocess.PIPE,
                              env=env, timeout=900, cwd=REPO)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("freecustom-pipeline: ")]
    assert any(line.startswith("freecustom-pipeline: generate_and_write: shards 0/3, images 0/8") for line in lines)
    # while concept sets resolve, they are counted (the example has 3), not images that do not exist yet
    assert any(line.startswith("freecustom-pipeline: resolve") and "concept sets 3/3 resolved" in line for line in lines)
    assert not any(line.startswith("freecustom-pipeline: resolve") and "images" in line for line in lines)
    assert any(line.startswith("freecustom-pipeline: done: shards 3/3, images 8/8, failed rows 0") for line in lines)
    assert all("images/s, ETA" in line for line in lines if " concept sets " not in line)
    assert "prompt_truncated: 2 time(s) in this run" in text
    stats = json.loads((tmp_path / "out" / "_stats.json").read_text())
    assert stats["warnings"] == {"prompt_truncated": 2}

    # the same command again: nothing is left, and the log says so
    with open(log, "w") as stderr:
        again = subprocess.run(done.args, stderr=stderr, stdout=subprocess.PIPE, env=env, timeout=900, cwd=REPO)
    assert again.returncode == 0 and "nothing to do: all 3 shards are complete" in log.read_text()
