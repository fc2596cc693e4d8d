"""Faults injected into real runs: a nightly job that dies must finish, on rerun, with exactly the output it should have had.

Every run renders the built-in example (4 rows x 2 seeds = 8 samples in 4 shards of 2, 3 concept
sets) with the tiny model on a local Ray, and is compared byte for byte with one uninterrupted
reference run (the ``--overwrite`` run packs shards differently: its images are compared within
float rounding, see ``assert_same_picture``). Faults come from ``stages/faults.py`` (``RunSettings.faults`` in process, the
``FREECUSTOM_FAULTS`` environment variable for the CLI in a subprocess).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.run import run
from stages.errors import RowError
from stages.faults import ENV as FAULTS_ENV
from stages.inputs import read as inputs
from tests.faults.conftest import (
    CLI_ARGS,
    REPO,
    SMALL,
    Output,
    assert_complete_and_identical,
    cli_command,
    read_output,
    read_tar_fully,
    settings_for,
    visible_temporaries,
)

pytestmark = pytest.mark.ray
runner = CliRunner()


@dataclass
class Reference:
    out: Path
    kv: Path
    stats: dict
    output: Output


@pytest.fixture(scope="module")
def reference(example, tiny_model_dir, ray_session, tmp_path_factory) -> Reference:
    """One uninterrupted run of the example; every fault test must end with exactly its bytes."""
    base = tmp_path_factory.mktemp("reference")
    summary = run(settings_for(example, base / "out", tiny_model_dir, kv_cache=str(base / "kv")))
    assert summary.exit_code == 0, summary.errors
    output = read_output(base / "out")
    assert len(output.samples) == 8 and len(output.tars) == 4
    return Reference(out=base / "out", kv=base / "kv", stats=summary.stats, output=output)


def shard_pairs(reference: Reference, shard: str) -> set[tuple[str, int]]:
    return {
        (s["meta"]["id"], s["meta"]["seed"]) for s in reference.output.samples.values() if s["shard"] == shard
    }


def plan(folder: Path, point: str, action: str, after: int, **extra) -> dict:
    return {"dir": str(folder), "points": {point: {"after": after, "action": action, **extra}}}


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png))).astype(np.int16)


def assert_same_picture(png: bytes, expected: bytes, what: str = "") -> None:
    """The same image up to float rounding: batched and single-target kernels differ by ~1e-6, which can
    move a pixel across a rounding boundary (one 8-bit level, a handful of pixels), never more."""
    diff = np.abs(_pixels(png) - _pixels(expected))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (what, int(diff.max()), int((diff > 0).sum()))


# --------------------------------------------------------------------------- a generation actor dies


def test_generation_actor_killed_mid_batch_is_restarted_and_the_run_completes(
    example, tiny_model_dir, reference, tmp_path
):
    faults = plan(tmp_path / "faults", "generate.unit", "exit", after=2)  # os._exit in the 2nd shard unit
    summary = run(settings_for(example, tmp_path / "out", tiny_model_dir, faults=faults))

    dead_pid = int((tmp_path / "faults" / "generate.unit.reached").read_text())
    assert not psutil.pid_exists(dead_pid) or psutil.Process(dead_pid).status() == psutil.STATUS_ZOMBIE
    assert summary.exit_code == 0 and summary.errors == [] and summary.stats["complete"]
    assert summary.stats["samples_written"] == 8
    assert_complete_and_identical(tmp_path / "out", reference.output, example)


# --------------------------------------------------------------------------- processes started by the tests

_SESSION = r"session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_%d(?!\d)"


def ray_processes_of(driver_pid: int) -> list[psutil.Process]:
    """Processes of the Ray session a driver started (Ray names the session after the driver's pid)."""
    pattern = re.compile(_SESSION % driver_pid)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if pattern.search(" ".join(proc.info["cmdline"] or [])):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:120]}"
    except psutil.Error:
        return f"{p.pid} (gone)"


def wait_gone(seen: dict[int, psutil.Process], driver_pid: int, timeout_s: float) -> list[psutil.Process]:
    """Wait for every process seen, and every process of the driver's Ray session, to end."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen.update({p.pid: p for p in ray_processes_of(driver_pid) if p.pid not in seen})
        alive = [p for p in seen.values() if _alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def run_detached(
    cmd: list[str],
    log: Path,
    *,
    faults: dict | None = None,
    extra_env: dict[str, str] | None = None,
    kill_when: Path | None = None,
    timeout_s: float = 300,
) -> dict:
    """Run ``cmd`` (with ``extra_env`` added to the environment) in its own session, and so its own local
    Ray; SIGKILL its process group once ``kill_when`` exists. Every process it started is tracked while it
    runs; returns those still alive 30 s after it ended (killed here by pid, for the caller to report as a
    failure).
    """
    # its own local Ray, as in production: never a cluster found on the machine (ray.init() without an
    # address joins the one named in /tmp/ray/ray_current_cluster, which `ray start` and
    # ray.cluster_utils.Cluster write, e.g. another test session's)
    env = dict(os.environ, RAY_ADDRESS="local")
    env.update(extra_env or {})
    if faults is not None:
        env[FAULTS_ENV] = json.dumps(faults)
    started = time.monotonic()
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    seen: dict[int, psutil.Process] = {}
    survivors: list[psutil.Process] = []
    try:
        while proc.poll() is None:
            try:
                seen.update({c.pid: c for c in psutil.Process(proc.pid).children(recursive=True)})
            except psutil.Error:
                pass
            if kill_when is not None and kill_when.exists():
                seen.update({c.pid: c for c in ray_processes_of(proc.pid)})
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if time.monotonic() - started > timeout_s:
                raise AssertionError(
                    f"still running after {timeout_s} s:\n" + log.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.2)
        proc.wait(timeout=30)
        if kill_when is not None and not kill_when.exists():
            raise AssertionError(
                f"ended (exit {proc.returncode}) before {kill_when.name}:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        survivors = wait_gone(seen, proc.pid, timeout_s=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for p in list(seen.values()) + survivors:  # only processes of this run, by pid
            try:
                p.kill()
            except psutil.Error:
                pass
    return {
        "pid": proc.pid,
        "returncode": proc.returncode,
        "processes": len(seen),
        "survivors": [describe(p) for p in survivors],
        "seconds": time.monotonic() - started,
    }


# --------------------------------------------------------------------------- an exception in one shard unit

# A driver that calls run() with the injected exception, in its own process and local Ray (a failed
# run can leave its GPU actor alive, see below: it must not stall this session's Ray). It reports
# whether run() raised, the summary if it did not, and which GenerateStage actors were alive while
# the exception was still held and after it was collected.
RAISE_DRIVER = """
import gc, json, sys, time
import psutil, ray
from stages.params import GenParams
from pipeline.run import RunSettings, run

manifest, out, model, faults_dir, report = sys.argv[1:6]
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")

def actors_after(seconds):
    deadline = time.monotonic() + seconds
    while True:
        found = []
        for p in psutil.Process().children(recursive=True):
            try:
                if "MapBatches(GenerateStage)" in " ".join(p.cmdline()):
                    found.append(p.pid)
            except psutil.Error:
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)

faults = {"dir": faults_dir, "points": {"generate.unit": {"after": 2, "action": "raise"}}}
settings = RunSettings(manifest=manifest, out=out, model=model, samples_per_shard=2, faults=faults,
                       defaults=GenParams(height=64, width=64, num_inference_steps=2))
result = {"crash": None, "summary": None, "held_actors": [], "actors_after_gc": []}
try:
    s = run(settings)
    result["summary"] = {"exit_code": s.exit_code, "errors": s.errors, "stats": s.stats}
except Exception as e:
    result["crash"] = (type(e).__name__ + ": " + str(e))[:3000]
    result["held_actors"] = actors_after(5)  # as a caller logging it, sys.last_value or a retry loop would
    del e
gc.collect()
result["actors_after_gc"] = actors_after(30)
result["driver_modules"] = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
open(report, "w").write(json.dumps(result))
"""


@pytest.fixture(scope="module")
def raised(example, tiny_model_dir, reference, tmp_path_factory):
    """A run with an exception injected into the 2nd generation unit, then the same run without it."""
    base = tmp_path_factory.mktemp("raised")
    out, report = base / "out", base / "report.json"
    cmd = [
        sys.executable,
        "-c",
        RAISE_DRIVER,
        str(example),
        str(out),
        str(tiny_model_dir),
        str(base / "faults"),
        str(report),
    ]
    process = run_detached(cmd, base / "driver.log")
    assert process["returncode"] == 0 and report.exists(), (base / "driver.log").read_text(errors="replace")[
        -3000:
    ]
    first = json.loads(report.read_text())
    second = run(settings_for(example, out, tiny_model_dir))  # the same run, without the fault
    return SimpleNamespace(out=out, first=first, process=process, second=second)


def test_injected_exception_fails_its_targets_as_rows_and_other_shards_complete(raised, reference):
    assert raised.first["crash"] is None, f"the whole run crashed: {raised.first['crash'][:500]}"
    summary = raised.first["summary"]
    assert summary["exit_code"] == 1
    (error,) = summary["errors"]
    assert error["stage"] == "generate" and "injected fault at generate.unit" in error["reason"]
    failed = {(error["id"], s) for s in error["seeds"]}
    assert any(failed == shard_pairs(reference, name) for name in reference.output.tars), failed
    assert summary["stats"]["samples_written"] == 8 - len(failed)


def test_the_driver_never_imports_the_model_libraries(raised):
    """Only the actors load models: a driver on a small head node (or a laptop joining a cluster) pays
    neither torch's import nor its memory."""
    assert raised.first["summary"] is not None and raised.first["driver_modules"] == []


def test_failed_run_leaves_no_process_and_the_rerun_completes_identically(raised, reference, example):
    assert raised.process["survivors"] == []
    assert raised.first["actors_after_gc"] == []  # the actor goes once nothing references the exception
    second = raised.second
    assert second.exit_code == 0 and second.errors == [] and second.stats["complete"]
    assert_complete_and_identical(raised.out, reference.output, example)


# --------------------------------------------------------------------------- the driver is SIGKILLed


KILL_POINTS = [
    pytest.param("reference_kv.unit", 1, id="during-reference-prep"),
    pytest.param("generate.unit", 2, id="mid-generation"),
    pytest.param("write.tar", 2, id="during-shard-write"),
]


@pytest.mark.parametrize("point,after", KILL_POINTS)
def test_driver_sigkill_then_the_same_command_completes_identically(
    point, after, example, tiny_model_dir, reference, ray_session, tmp_path
):
    out = tmp_path / "out"
    cmd = [
        *cli_command(),
        "run",
        str(example),
        "-o",
        str(out),
        "--model",
        str(tiny_model_dir),
        *CLI_ARGS,
    ]
    faults = plan(tmp_path / "faults", point, "hang", after, seconds=600)
    killed = run_detached(
        cmd, tmp_path / "cli.log", faults=faults, kill_when=tmp_path / "faults" / f"{point}.reached"
    )

    # 1. the kill took the driver and its whole local Ray with it
    assert killed["returncode"] == -signal.SIGKILL
    assert killed["processes"] > 1, "the driver had started no Ray processes?"
    assert killed["survivors"] == [], f"processes of the killed run still alive: {killed['survivors']}"
    # 2. what it left under final names is whole (a tar may lack its Parquet and marker: not done, redone)
    for path in (out / "shards").glob("*.tar") if (out / "shards").exists() else []:
        read_tar_fully(path)
    for path in (out / "_progress").glob("*.json") if (out / "_progress").exists() else []:
        json.loads(path.read_text())
    if point == "write.tar":  # killed between a shard's tar and its Parquet: the state the rerun must repair
        unfinished = [
            p for p in (out / "shards").glob("*.tar") if not (out / "_progress" / f"{p.stem}.json").exists()
        ]
        assert len(unfinished) == 1 and not unfinished[0].with_suffix(".parquet").exists()

    # K/V the killed run stored, and the concept sets the shards it left unfinished need
    stored = {p.stem for p in (out / "_kv").glob("*.safetensors")} if (out / "_kv").exists() else set()
    done = {p.stem for p in (out / "_progress").glob("*.json")} if (out / "_progress").exists() else set()
    needed = {
        row["concept_set_id"]
        for name, rows in reference.output.parquets.items()
        if name not in done
        for row in rows
    }

    # 3. the same command again (in process, same settings) completes the output exactly
    summary = run(settings_for(example, out, tiny_model_dir))
    assert summary.exit_code == 0 and summary.errors == [], summary.errors
    assert summary.stats["complete"] and summary.stats["samples_written"] == 8
    # K/V the killed run had stored are reused, not recomputed; the others are computed once
    assert summary.stats["reference_passes"] == len(needed - stored), (needed, stored)
    if point != "reference_kv.unit":
        assert stored, "the killed run had stored no K/V"
    assert_complete_and_identical(out, reference.output, example)
    assert not (out / "_kv").exists()


# --------------------------------------------------------------------------- disk full


def test_disk_full_while_writing_a_shard_then_a_run_with_space_completes(
    example, tiny_model_dir, reference, tmp_path
):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    faults = plan(
        tmp_path / "faults", "write.tar", "enospc", after=2
    )  # after the 2nd shard's tar, before its Parquet
    summary = run(settings_for(example, out, tiny_model_dir, faults=faults))

    assert summary.exit_code == 1
    (error,) = summary.errors
    assert error["stage"] == "write"
    assert "No space left on device" in error["reason"], error["reason"]
    shard = re.search(r"writing shard (\d{5}) failed", error["reason"]).group(1)
    assert {(error["id"], s) for s in error["seeds"]} == shard_pairs(reference, shard)
    assert pq.read_table(out / "errors.parquet").to_pylist() == [
        {k: error[k] for k in ("id", "row", "stage", "field", "reason", "seeds")}
    ]
    # nothing under a final name for that shard; every other shard whole and as in the reference
    assert not (out / "shards" / f"{shard}.tar").exists()
    assert not (out / "shards" / f"{shard}.parquet").exists()
    assert not (out / "_progress" / f"{shard}.json").exists()
    partial = read_output(out)
    assert set(partial.tars) == set(reference.output.tars) - {shard}
    assert all(partial.tars[n] == reference.output.tars[n] for n in partial.tars)
    assert visible_temporaries(out) == []
    assert summary.stats["samples_written"] == 6 and not summary.stats["complete"]

    again = run(settings_for(example, out, tiny_model_dir))
    assert again.exit_code == 0 and again.errors == []
    assert again.stats["shards_pending_before_run"] == 1 and again.stats["samples_generated_this_run"] == 2
    assert_complete_and_identical(out, reference.output, example)
    assert pq.read_table(out / "errors.parquet").num_rows == 0


# --------------------------------------------------------------------------- a real write error, stale temporaries


def stopped_before(
    reference: Reference, folder: Path, shard: str, example: Path, model: Path
) -> tuple[Path, list[str]]:
    """The reference output and K/V cache copied as a run left them that stopped before writing ``shard``
    (no tar, Parquet or done-marker of it), and the CLI arguments that resume it: that shard is written
    again, and no reference or K/V file (all are there)."""
    out, kv = folder / "out", folder / "kv"
    shutil.copytree(reference.out, out)
    shutil.copytree(reference.kv, kv)
    for path in (
        out / "shards" / f"{shard}.tar",
        out / "shards" / f"{shard}.parquet",
        out / "_progress" / f"{shard}.json",
    ):
        path.unlink()
    return out, ["run", str(example), "-o", str(out), "--model", str(model), "--kv-cache", str(kv), *CLI_ARGS]


# In every Ray worker process (they write the shards) a file can grow only to FREECUSTOM_TEST_FSIZE bytes:
# a write past that fails with EFBIG (SIGXFSZ ignored), part-way through the file, as a full disk fails
# it. Put on the CLI process itself (preexec_fn), the limit would stop Ray from starting: the raylet's object
# store is a file far larger than a shard. Installed as sitecustomize.py through PYTHONPATH.
WORKER_FSIZE_LIMIT = """
import os, sys
limit = os.environ.get("FREECUSTOM_TEST_FSIZE")
if limit and sys.argv and os.path.basename(sys.argv[0]) == "default_worker.py":
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
"""


def test_write_error_part_way_through_a_shard_leaves_nothing_torn_and_a_rerun_completes(
    example, tiny_model_dir, reference, tmp_path
):
    import pyarrow.parquet as pq

    shard = sorted(reference.output.tars)[-1]
    out, args = stopped_before(reference, tmp_path, shard, example, tiny_model_dir)
    limit = len(reference.output.tars[shard]) // 2  # the tar fails half-way; markers and metadata stay below
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(WORKER_FSIZE_LIMIT)
    pythonpath = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    limited = run_detached(
        [*cli_command(), *args],
        tmp_path / "cli.log",
        extra_env={"PYTHONPATH": pythonpath, "FREECUSTOM_TEST_FSIZE": str(limit)},
    )
    log = " ".join((tmp_path / "cli.log").read_text(errors="replace").split())

    # the run fails for that shard, with the write error, and says so
    assert limited["returncode"] == 1, log[-3000:]
    assert limited["survivors"] == []
    (error,) = pq.read_table(out / "errors.parquet").to_pylist()
    assert error["stage"] == "write" and error["reason"].startswith(f"writing shard {shard} failed: "), error
    assert os.strerror(errno.EFBIG) in error["reason"], error  # "File too large": the write itself failed
    assert {(error["id"], s) for s in error["seeds"]} == shard_pairs(reference, shard)
    assert f"writing shard {shard} failed" in log and os.strerror(errno.EFBIG) in log, log[-3000:]
    # nothing torn or temporary: no file of that shard under a final name, the others whole and untouched
    assert not (out / "shards" / f"{shard}.tar").exists()
    assert not (out / "shards" / f"{shard}.parquet").exists()
    assert not (out / "_progress" / f"{shard}.json").exists()
    assert visible_temporaries(out) == []
    partial = read_output(out)
    assert set(partial.tars) == set(reference.output.tars) - {shard}
    assert all(partial.tars[n] == reference.output.tars[n] for n in partial.tars)
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["samples_written"] == 6 and not stats["complete"]

    # the same command without the limit redoes that shard only, byte for byte as the uninterrupted run
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert json.loads((out / "_stats.json").read_text())["samples_generated_this_run"] == 2
    assert_complete_and_identical(out, reference.output, example)
    assert pq.read_table(out / "errors.parquet").num_rows == 0


def test_temporaries_left_by_a_killed_run_are_swept_when_it_resumes(
    example, tiny_model_dir, reference, tmp_path
):
    shard = sorted(reference.output.tars)[1]
    out, args = stopped_before(reference, tmp_path, shard, example, tiny_model_dir)
    # what a run SIGKILLed inside its atomic writes leaves: torn files and a half-written reference folder
    # under the temporary names of the pipeline's atomic writes (``.NAME.tmp-XXXXXXXX``, see the README)
    tar = reference.output.tars[shard]
    stale = {
        out / "shards" / f".{shard}.tar.tmp-0badc0de": tar[: len(tar) // 2],
        out / "shards" / f".{shard}.parquet.tmp-0badc0de": (
            reference.out / "shards" / f"{shard}.parquet"
        ).read_bytes()[:100],
        out / "_progress" / f".{shard}.json.tmp-0badc0de": b'{"shard": ',
    }
    for path, data in stale.items():
        path.write_bytes(data)
    csid = sorted(p.name for p in (out / "references").iterdir())[0]
    stale_dir = out / "references" / f".{csid}.tmp-k1ll3d"
    stale_dir.mkdir()
    (stale_dir / "00_reference.png").write_bytes(b"\x89PNG torn")

    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [p for p in [*stale, stale_dir] if p.exists()] == []
    assert json.loads((out / "_stats.json").read_text())["samples_generated_this_run"] == 2
    assert_complete_and_identical(out, reference.output, example)


# --------------------------------------------------------------------------- foreign output folders, bad K/V


@pytest.fixture(scope="module")
def other_manifest(tmp_path_factory) -> Path:
    """The example with one seed per row: the same concept sets, another manifest (and plan)."""
    from pipeline.examples import write_example_manifest

    return write_example_manifest(tmp_path_factory.mktemp("other-manifest"), seeds_per_row=1)


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_folder_of_another_manifest_or_other_settings_is_refused(
    example, other_manifest, tiny_model_dir, other_model_dir, reference, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    before = tree_snapshot(out)
    cases = {
        "manifest": ["run", str(other_manifest), "-o", str(out), "--model", str(tiny_model_dir), *CLI_ARGS],
        "defaults": [
            "run",
            str(example),
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            *CLI_ARGS,
            "--num-inference-steps",
            "3",
        ],
        "model": ["run", str(example), "-o", str(out), "--model", str(other_model_dir), *CLI_ARGS],
        "image_format": [
            "run",
            str(example),
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            *CLI_ARGS,
            "--image-format",
            "jpg",
        ],
    }
    for differs_in, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (differs_in, result.output)
        message = " ".join(result.output.split())
        assert "holds the output of another manifest or other settings" in message, message
        assert f"differs in: {differs_in}" in message or f", {differs_in}" in message, message
        assert "--overwrite" in message, message
    assert tree_snapshot(out) == before  # refused before touching anything


@pytest.fixture(scope="module")
def overwritten(other_manifest, tiny_model_dir, other_model_dir, reference, tmp_path_factory):
    """``--overwrite`` of the reference folder by another manifest, with every --kv-cache entry spoilt:
    one truncated, one with flipped bytes, one computed with another model for the same concepts."""
    from PIL import Image

    from freecustom_core import ConceptRef, FreeCustomGenerator, ReferenceKV, ReferenceKVError

    base = tmp_path_factory.mktemp("overwrite")
    out, kv = base / "out", base / "kv"
    shutil.copytree(reference.out, out)
    shutil.copytree(reference.kv, kv)
    entries = sorted(kv.glob("*.safetensors"))
    assert len(entries) == 3
    truncated, flipped, foreign = entries
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    data = bytearray(flipped.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # inside the tensor data, past the JSON header
        data[i] ^= 0xFF
    flipped.write_bytes(bytes(data))
    # the foreign entry: the same concepts (as resolved by the reference run), another model's weights
    csid = foreign.stem
    refs = reference.out / "references" / csid
    meta = next(s["meta"] for s in reference.output.samples.values() if s["meta"]["concept_set_id"] == csid)
    concepts = [
        ConceptRef(
            Image.open(refs / f"{i:02d}_reference.png"),
            Image.open(refs / f"{i:02d}_mask.png"),
            c["prompt"],
            c["weight"],
        )
        for i, c in enumerate(meta["concepts"])
    ]
    other = FreeCustomGenerator.from_pretrained(str(other_model_dir), torch_dtype=torch.float32, device="cpu")
    wrong = other.prepare_references(concepts, num_inference_steps=2, height=64, width=64)
    wrong.meta["concept_set_id"] = csid
    wrong.save(foreign)
    ours = FreeCustomGenerator.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32, device="cpu")
    expected = ours.kv_identity(num_inference_steps=2, height=64, width=64)
    for path in (truncated, flipped):
        with pytest.raises(ReferenceKVError):
            ReferenceKV.load(path, verify=True)
    with pytest.raises(ReferenceKVError, match="model"):  # a sound file, for another model
        ReferenceKV.load(foreign, verify=True).check_fits(expected)

    (out / "shards" / "00099.tar").write_bytes(b"left over")  # must not survive --overwrite
    summary = run(settings_for(other_manifest, out, tiny_model_dir, kv_cache=str(kv), overwrite=True))
    return SimpleNamespace(out=out, kv=kv, summary=summary, expected=expected)


def test_overwrite_replaces_a_foreign_output_folder(overwritten, other_manifest, reference):
    import hashlib

    summary, out = overwritten.summary, overwritten.out
    assert summary.exit_code == 0 and summary.stats["complete"], summary.errors
    got = read_output(out)
    assert sorted(got.tars) == ["00000", "00001"]  # the 4 old shards and the stray file are gone
    assert sorted(p.name for p in (out / "_progress").iterdir()) == ["00000.json", "00001.json"]
    assert not (out / "shards" / "00099.tar").exists()
    (file,) = json.loads((out / "_run.json").read_text())["manifest"]["files"]
    assert file["sha256"] == hashlib.sha256(other_manifest.read_bytes()).hexdigest()
    assert len(got.samples) == 4 and set(got.samples) < set(reference.output.samples)
    for key, sample in got.samples.items():  # same concepts, prompt and seed: the same picture
        assert_same_picture(sample["image"], reference.output.samples[key]["image"], key)
    assert visible_temporaries(out) == []


def test_corrupt_truncated_and_foreign_model_kv_cache_entries_are_recomputed(overwritten, reference):
    from freecustom_core import ReferenceKV

    summary = overwritten.summary
    assert summary.exit_code == 0
    assert summary.stats["reference_passes"] == 3  # all three entries were refused and recomputed
    for path in sorted(overwritten.kv.glob("*.safetensors")):  # sound, fitting, and exactly the clean K/V
        ReferenceKV.load(path, verify=True).check_fits(overwritten.expected)
        assert path.read_bytes() == (reference.kv / path.name).read_bytes(), path.name
    got = read_output(overwritten.out)
    for key, sample in got.samples.items():
        assert_same_picture(sample["image"], reference.output.samples[key]["image"], key)
    assert not [p for p in overwritten.kv.iterdir() if ".tmp" in p.name]


# --------------------------------------------------------------------------- transient read errors


def test_transient_read_errors_are_retried_a_bounded_number_of_times_then_the_row_fails(
    tmp_path, monkeypatch
):
    from pipeline.examples import write_example_manifest
    from pipeline.manifest_files import manifest_base_dir, read_manifest
    from pipeline.validate import validate_table

    manifest = write_example_manifest(tmp_path)
    real = inputs._read_local
    attempts: dict[str, int] = {}

    def reader(path: str) -> bytes:
        name = Path(path).name
        attempts[name] = attempts.get(name, 0) + 1
        if name == "hat.png":  # never recovers
            raise OSError(errno.ETIMEDOUT, "Connection timed out (injected)")
        if name == "mug.jpg" and attempts[name] <= 2:  # recovers on the 3rd attempt
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(path)

    monkeypatch.setattr(inputs, "_read_local", reader)
    settings = inputs.InputSettings(read_retries=2, retry_backoff_s=0.0)

    # unit level: 1 + read_retries attempts, then a RowError naming the field, the file and the cause
    with pytest.raises(RowError) as err:
        inputs.read_bytes(str(tmp_path / "images" / "hat.png"), settings=settings, field="concepts[0].image")
    assert attempts["hat.png"] == 3
    assert err.value.field == "concepts[0].image"
    assert (
        "after 3 attempts" in err.value.reason
        and "timed out" in err.value.reason
        and "hat.png" in err.value.reason
    )
    assert (
        inputs.read_bytes(str(tmp_path / "images" / "mug.jpg"), settings=settings)
        == (tmp_path / "images" / "mug.jpg").read_bytes()
    )
    assert attempts["mug.jpg"] == 3

    # row level: every row using hat.png fails on that field; the others (mug.jpg recovered) are valid
    attempts.clear()
    specs, problems = validate_table(
        read_manifest(str(manifest)),
        defaults=SMALL,
        inputs=settings,
        base_dir=manifest_base_dir(str(manifest)),
    )
    assert [s.id for s in specs] == ["mug_kitchen"]
    assert {(p.id, p.field) for p in problems} == {
        ("dog_hat_park", "concepts[1].image"),
        ("dog_hat_beach", "concepts[1].image"),
        ("hat_product", "concepts[0].image"),
    }
    assert all("after 3 attempts" in p.reason for p in problems)
    assert attempts["hat.png"] == 3  # the file is tried once per run (3 attempts), not once per row
    assert attempts["mug.jpg"] == 3

    # during the run (phase 1 reads the inputs again): the segment stage fails that row alone
    import dataclasses

    from stages.masks.segment_stage import SegmentStage

    rows = validate_table(  # static checks only: the reader is still broken
        read_manifest(str(manifest)),
        defaults=SMALL,
        base_dir=manifest_base_dir(str(manifest)),
        check_files=False,
    )[0]
    attempts.clear()
    stage = SegmentStage(input_settings=settings)
    batch = {
        "key": [r.id for r in rows],
        "concepts": [[dataclasses.asdict(c) for c in r.concepts] for r in rows],
        "base_dir": [manifest_base_dir(str(manifest))] * len(rows),
    }
    out = stage({k: np.array(v, dtype=object) if k != "concepts" else _objects(v) for k, v in batch.items()})
    reasons = dict(
        zip(
            out["key"],
            zip(out["error_stage"], out["error_field"], out["error_reason"], strict=True),
            strict=True,
        )
    )
    assert reasons["hat_product"][:2] == ("segment", "concepts[0].image")
    assert "after 3 attempts" in reasons["hat_product"][2]
    assert reasons["dog_hat_park"][1] == "concepts[1].image"
    assert reasons["mug_kitchen"] == ("", "", "")


def _objects(values: list) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        column[i] = v
    return column


# --------------------------------------------------------------------------- GPU out of memory


def _oom_above_one(monkeypatch, calls: list[int]):
    from freecustom_core import FreeCustomGenerator

    original = FreeCustomGenerator._denoise

    def denoise(self, prompts, seeds, **kwargs):
        calls.append(len(prompts))
        if len(prompts) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return original(self, prompts, seeds, **kwargs)

    monkeypatch.setattr(FreeCustomGenerator, "_denoise", denoise)


def test_out_of_memory_batch_is_split_and_every_image_equals_the_unsplit_batch(
    generator, concepts, monkeypatch
):
    kv = generator.prepare_references(concepts, num_inference_steps=2, height=64, width=64)
    prompts = ["a red cube", "a blue hat on a table", "green grass", "a cube wearing a hat"]
    seeds = [3, 1, 4, 1_000_000_007]
    call = dict(num_inference_steps=2, height=64, width=64, batch_size=4)
    unsplit = generator.generate(
        prompts, seeds, kv, output_type="np", **call
    )  # the reference, one batch of 4

    calls: list[int] = []
    _oom_above_one(monkeypatch, calls)
    split = generator.generate(prompts, seeds, kv, output_type="np", **call)
    assert calls == [4, 2, 1, 1, 2, 1, 1]  # 4 -> 2 + 2 -> 1 + 1 + 1 + 1, in order
    assert split.shape == unsplit.shape == (4, 64, 64, 3)
    np.testing.assert_allclose(split, unsplit, rtol=0, atol=1e-5)


def _always_oom(monkeypatch):
    from freecustom_core import FreeCustomGenerator

    def denoise(self, prompts, seeds, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(FreeCustomGenerator, "_denoise", denoise)


def test_out_of_memory_in_the_generate_stage_splits_the_batch_and_writes_the_same_shard(
    generator, concepts, tiny_model_dir, monkeypatch, tmp_path
):
    from stages.generation.generate import GenerateStage
    from stages.generation.units import Group, Target, WorkUnit

    kv_path = tmp_path / "kv.safetensors"
    generator.prepare_references(concepts, num_inference_steps=2, height=64, width=64).save(kv_path)
    targets = [
        Target(group=0, row=0, id="cube", key=f"cube-{s}", prompt="a red cube", seed=s) for s in range(4)
    ]
    unit = WorkUnit(shard_id=0, groups=[Group(params=SMALL, meta={}, kv_path=str(kv_path))], targets=targets)
    stage = GenerateStage(str(tiny_model_dir), batch_size=4, device="cpu", dtype="float32")
    samples, errors = stage.run_unit(unit)
    assert errors == [] and len(samples) == 4

    calls: list[int] = []
    _oom_above_one(monkeypatch, calls)
    split_samples, split_errors = stage.run_unit(unit)
    assert split_errors == [] and calls[0] == 4 and calls.count(1) == 4
    for (key, _, png, _), (key2, _, png2, _) in zip(split_samples, samples, strict=True):
        assert key == key2
        assert_same_picture(png, png2, key)  # not always byte-identical: batches of 1 vs 4 round differently
    assert [s[3] for s in split_samples] == [s[3] for s in samples]

    # only a target that does not fit even alone fails, as its own row error (never the run)
    _always_oom(monkeypatch)
    none, errors = stage.run_unit(unit)
    assert none == [] and [e.seed for e in errors] == [0, 1, 2, 3]
    assert all(e.stage == "generate" and e.reason.startswith("OutOfMemoryError") for e in errors)
