"""An output folder written by the previous version of the pipeline resumes with this one.

The previous version is the last commit before the pipeline layer's redesign, taken from this
checkout's git history (``git archive``) and run with the same interpreter: its output folder is
then resumed by the current code, which must find nothing to redo, and must redo a deleted shard
byte for byte as the previous version wrote it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.examples import write_example_manifest

REPO = Path(__file__).resolve().parents[1]
PREVIOUS = "f631a82"  # the pipeline layer before the records / stage interface / output module redesign
OLD_DEFAULT = "b00cb97"  # the last commit whose default sampler ("release") had steps_offset 0 (980 ... 0)


def _previous_checkout(tmp_path: Path, commit: str = PREVIOUS) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("no git checkout to take the previous version from")
    known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"commit {commit} is not in this clone's history (shallow clone)")
    folder = tmp_path / f"previous-{commit}"
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def _run(code: Path, manifest: Path, out: Path, model: Path, *extra: str,
         scheduler: tuple[str, ...] = ("--scheduler", "DDIMScheduler")) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the checkout at ``code`` is imported, also by Ray's workers (they inherit it)
    # RAY_ADDRESS=local: a Ray of its own (the previous version would join another running on the machine)
    env = dict(os.environ, PYTHONPATH=str(code), RAY_ADDRESS="local")
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(manifest), "-o", str(out), "--model", str(model),
           "--num-inference-steps", "2", "--height", "64", "--width", "64", "--samples-per-shard", "3",
           *scheduler, *extra]  # by default the tiny model's own (a stable identity)
    return subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=900)


def _files(out: Path) -> dict[str, bytes]:
    """Every file of OUT but the run's bookkeeping: _stats.json and README.md say how this run went;
    _run.json and _plan/ are how this version records the manifest's files and their plans (written
    when it takes an earlier version's OUT over); errors.parquet's rows are compared apart."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("_stats.json", "README.md", "_run.json", "errors.parquet")
            and p.relative_to(out).parts[0] != "_plan"}


def _without_bookkeeping(meta: dict) -> dict:
    assert meta["model"]["scheduler"]["class"] == "DDIMScheduler"
    meta.pop("model")
    return meta


def _members(tar_bytes: bytes) -> dict:
    """A shard's members: images as bytes, sample JSON as dicts without diffusers' bookkeeping key."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return {name: _without_bookkeeping(json.loads(data)) if name.endswith(".json") else data
            for name, data in members.items()}


def _rows(parquet_bytes: bytes) -> list:
    rows = pq.read_table(io.BytesIO(parquet_bytes)).to_pylist()
    return [dict(r, metadata=_without_bookkeeping(json.loads(r["metadata"]))) for r in rows]  # same columns and more


@pytest.mark.slow
def test_output_of_the_previous_version_resumes(tmp_path, tiny_model_dir):
    previous = _previous_checkout(tmp_path)
    manifest = write_example_manifest(tmp_path / "inputs")
    out = tmp_path / "out"
    first = _run(previous, manifest, out, tiny_model_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    written = _files(out)
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    shards = sorted(name for name in written if name.endswith(".tar"))
    assert len(shards) >= 2

    # the current code resumes it: same identity, nothing pending, nothing rewritten
    again = _run(REPO, manifest, out, tiny_model_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["shards_pending_before_run"] == 0 and stats["complete"] is True
    assert _files(out) == written
    assert pq.read_table(out / "errors.parquet").to_pylist() == errors

    # a shard the previous version wrote, lost: the current code writes it again, its images byte for
    # byte and its metadata equal but for the model's identity record, which issue 13 changed on
    # purpose (the scheduler identity without diffusers' `_use_default_values` bookkeeping, a list in
    # set order that differed in every process; the weight fingerprint that follows adapters)
    lost = shards[-1]
    parquet = lost.removesuffix(".tar") + ".parquet"
    (out / lost).unlink()
    (out / "_progress" / Path(lost).with_suffix(".json").name).unlink()
    redo = _run(REPO, manifest, out, tiny_model_dir)
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert json.loads((out / "_stats.json").read_text())["shards_pending_before_run"] == 1
    marker = f"_progress/{Path(lost).stem}.json"
    now = _files(out)
    redone = (marker, lost, parquet)
    assert {k: v for k, v in now.items() if k not in redone} == {k: v for k, v in written.items() if k not in redone}
    assert _members(now[lost]) == _members(written[lost])
    old_rows = _rows(written[parquet])
    assert [{k: r[k] for k in old_rows[0]} for r in _rows(now[parquet])] == old_rows
    # the new marker also names its files' sizes and digests; the rest is as the previous version wrote it
    new_marker = json.loads(now[marker])
    assert new_marker.pop("files")["tar"]["size"] == len(now[lost])
    assert new_marker == json.loads(written[marker])
    with tarfile.open(out / lost) as tar:
        assert any(name.endswith(".png") for name in tar.getnames())


@pytest.mark.slow
def test_outputs_and_kv_of_the_old_default_sampler_are_not_served_as_the_new(tmp_path, tiny_model_dir):
    """The version whose default was the release's DDIM with steps_offset 0 writes an output folder and a
    --kv-cache with its default; the current default (steps_offset 1, what the release runs) must refuse
    to resume that folder and must recompute every K/V of that cache."""
    old = _previous_checkout(tmp_path, OLD_DEFAULT)
    manifest = write_example_manifest(tmp_path / "inputs")
    out, cache = tmp_path / "out", tmp_path / "kv-cache"
    first = _run(old, manifest, out, tiny_model_dir, "--kv-cache", str(cache), scheduler=())
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / "_run.json").read_text())["scheduler"] == "release"
    written = _files(out)

    resumed = _run(REPO, manifest, out, tiny_model_dir, "--kv-cache", str(cache), scheduler=())
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert "differs in: scheduler" in resumed.stderr
    assert _files(out) == written  # refused before anything was written

    fresh = tmp_path / "fresh"
    new = _run(REPO, manifest, fresh, tiny_model_dir, "--kv-cache", str(cache), scheduler=())
    assert new.returncode == 0, new.stderr[-3000:]
    stats = json.loads((fresh / "_stats.json").read_text())
    assert stats["reference_passes"] == stats["concept_sets"] > 0  # none of the old K/V served
    assert json.loads((fresh / "_run.json").read_text())["scheduler"] == "release:steps_offset=1"
    tars = sorted(name for name in written if name.endswith(".tar"))
    assert all(_members((fresh / name).read_bytes()) != _members(written[name]) for name in tars)
