"""The run on a multi-node Ray cluster (``ray.cluster_utils.Cluster`` on this machine, fake GPUs).

The head has no GPU: ``--device cuda`` waits (saying so), a node with a GPU joins, the run
completes there and ``_stats.json`` names that node. ``RAY_ADDRESS`` is joined like ``--address``.
Each run is a subprocess (a driver of its own, as under ``ray job submit``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.examples import write_example_manifest
from tests.test_object_storage import BUCKET, _objects, s3  # noqa: F401 - s3: the moto server fixture

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
DRIVER = """
import json, sys
from pipeline.plan import NoGPU, NotShared
from pipeline.run import run
from pipeline.settings import RunSettings
from stages.params import GenParams
args = json.loads(sys.argv[1])
try:
    summary = run(RunSettings(defaults=GenParams(num_inference_steps=2, height=64, width=64), samples_per_shard=4,
                              cpus_per_worker=0.5, **args))
except (NoGPU, NotShared) as e:
    print(type(e).__name__, e, file=sys.stderr)
    sys.exit(2)
sys.exit(summary.exit_code)
"""


def _driver(env_extra: dict, **settings) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_extra, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(settings)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    yield c
    c.shutdown()


def test_device_cuda_waits_for_a_gpu_node_then_renders_there(cluster, tmp_path, tiny_model_dir):
    manifest = write_example_manifest(tmp_path / "inputs")
    out = tmp_path / "out"
    proc = _driver({}, manifest=str(manifest), out=str(out), model=str(tiny_model_dir), address=cluster.address,
                   device="cuda", gpu_wait=600)
    # no GPU in the cluster: the driver waits and says what for (its first line comes at once)
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "waiting for a GPU node" in line or not line:
            break
    assert any("waiting for a GPU node" in line for line in lines), "".join(lines)[-3000:]
    assert proc.poll() is None and not (out / "shards").exists()
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
    try:
        _, err = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["complete"] and stats["device"] == "cuda" and stats["seconds"]["wait_for_gpus"] > 0
    assert stats["nodes"] == {gpu_node.node_id: stats["shards"]}

    # RAY_ADDRESS and no --address: the run joins the same cluster (device auto: it has a GPU now)
    again = _driver({"RAY_ADDRESS": cluster.address}, manifest=str(manifest), out=str(tmp_path / "again"),
                    model=str(tiny_model_dir))
    _, err = again.communicate(timeout=900)
    assert again.returncode == 0, err[-3000:]
    stats = json.loads((tmp_path / "again" / "_stats.json").read_text())
    assert stats["device"] == "cuda" and set(stats["nodes"]) == {gpu_node.node_id}


def test_device_cuda_gives_up_after_gpu_wait_with_nothing_lost(cluster, tmp_path, tiny_model_dir):
    manifest = write_example_manifest(tmp_path / "inputs")
    started = time.monotonic()
    proc = _driver({"RAY_ADDRESS": cluster.address}, manifest=str(manifest), out=str(tmp_path / "out"),
                   model=str(tiny_model_dir), device="cuda", gpu_wait=3)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "no GPU joined the cluster in 3 s" in err and "--gpu-wait" in err
    assert time.monotonic() - started < 120
    assert not list((tmp_path / "out").glob("shards/*"))


def test_a_local_out_that_a_node_does_not_see_stops_the_run_before_rendering(cluster, tmp_path, tiny_model_dir):
    """A second node whose filesystem does not have OUT (simulated on this one machine: its probe read
    fails through the fault hook, set in that node's environment only)."""
    faults = {"dir": str(tmp_path / "faults"), "points": {"storage.probe": {"after": 1, "action": "raise"}}}
    blind = cluster.add_node(num_cpus=1, num_gpus=1, env_vars={"FREECUSTOM_FAULTS": json.dumps(faults)})
    manifest = write_example_manifest(tmp_path / "inputs")
    proc = _driver({}, manifest=str(manifest), out=str(tmp_path / "out"), model=str(tiny_model_dir),
                   address=cluster.address)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]
    assert "NotShared" in err and blind.node_id in err and str(tmp_path / "out") in err
    assert not list((tmp_path / "out").glob("shards/*")) and not list((tmp_path / "out").glob(".freecustom-probe-*"))


def test_a_node_that_joins_during_the_run_and_does_not_see_out_stops_it(tmp_path, tiny_model_dir):
    """The head can run nothing (no CPU); the run starts with one node, so the start-up check has no
    other node to ask; a node that does not see OUT joins afterwards: its first actor refuses (exit 2)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False})
    try:
        manifest = write_example_manifest(tmp_path / "inputs")
        out = tmp_path / "out"
        proc = _driver({}, manifest=str(manifest), out=str(out), model=str(tiny_model_dir), address=cluster.address,
                       device="cpu")
        deadline = time.monotonic() + 240
        while not list(out.glob(".freecustom-probe-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert list(out.glob(".freecustom-probe-*")), "the run never reached its storage check"
        faults = {"dir": str(tmp_path / "faults"), "points": {"storage.probe": {"after": 1, "action": "raise"}}}
        blind = cluster.add_node(num_cpus=2, env_vars={"FREECUSTOM_FAULTS": json.dumps(faults)})
        try:
            _, err = proc.communicate(timeout=600)
        finally:
            proc.kill()
        assert proc.returncode == 2, err[-3000:]
        assert "NotShared" in err and blind.node_id in err and str(out) in err
        assert not list(out.glob("shards/*")) and not list(out.glob(".freecustom-probe-*"))
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_worker_node_lost_while_its_actors_render_costs_nothing_but_time(where, request, tmp_path, tiny_model_dir):
    """Two GPU worker nodes render; one is removed after the first shard is written. The run finishes
    (Ray Data restarts the lost actors and retries their work elsewhere) with every sample exactly once
    and no stray file in OUT: a local OUT, and OUT on object storage (the moto server; the nodes read
    its endpoint and credentials from their environment, as a cluster's pods do)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.cluster_utils import Cluster

    env, filesystem = {}, None
    if where == "s3":
        filesystem, env = request.getfixturevalue("s3")  # sets os.environ: the nodes started below inherit it
        files = lambda: _objects(filesystem, "nodeloss")  # noqa: E731
        out_location = f"s3://{BUCKET}/nodeloss"
    else:
        out = tmp_path / "out"
        files = lambda: {p.relative_to(out).as_posix(): p.read_bytes()  # noqa: E731
                         for p in out.rglob("*") if p.is_file() and p.name not in ("_stats.json", "README.md")}
        out_location = str(out)
    example = write_example_manifest(tmp_path / "inputs")
    rows = pq.read_table(example).to_pylist()
    for i, r in enumerate(rows):
        r["seeds"] = [10 * i + k for k in range(6)]
    manifest = tmp_path / "inputs" / "many.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(example)), manifest)
    expected = sorted(f"{r['id']}-{s}" for r in rows for s in r["seeds"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    proc = None
    try:
        cluster.add_node(num_cpus=2, num_gpus=1)
        doomed = cluster.add_node(num_cpus=2, num_gpus=1)
        proc = _driver(env, manifest=str(manifest), out=out_location, model=str(tiny_model_dir),
                       address=cluster.address, device="cuda", max_workers=2)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None and not any(
                k.startswith("_progress/") for k in files()):
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        cluster.remove_node(doomed)
        _, err = proc.communicate(timeout=1200)
    finally:
        if proc is not None:
            proc.kill()
        cluster.shutdown()
    assert proc.returncode == 0, err[-3000:]
    written = files()
    keys = sorted(k for name in sorted(written) if name.startswith("shards/") and name.endswith(".parquet")
                  for k in pq.read_table(pa.BufferReader(written[name]))["key"].to_pylist())
    assert keys == expected  # every sample, exactly once
    assert not [k for k in written if ".tmp-" in k or ".freecustom-probe" in k]
    markers = sorted(Path(k).stem for k in written if k.startswith("_progress/") and k.endswith(".json"))
    assert markers == sorted(Path(k).stem for k in written if k.startswith("shards/") and k.endswith(".tar"))
    stats = json.loads(_stats(where, out_location, filesystem))
    assert stats["complete"] and stats["samples_written"] == len(expected)


def _stats(where: str, out_location: str, filesystem) -> str:
    if where == "s3":
        return filesystem.open_input_stream(out_location.removeprefix("s3://") + "/_stats.json").read().decode()
    return (Path(out_location) / "_stats.json").read_text()


def test_a_local_ray_counts_gpus_as_ray_does_and_the_driver_never_imports_torch():
    """Without a cluster the run starts its own Ray: its GPUs counted by Ray (none here, and none from a
    CUDA_VISIBLE_DEVICES that hides them), the driver free of torch (only actors load models)."""
    code = (
        "import sys, ray\n"
        "from pipeline.plan import ensure_ray\n"
        "ensure_ray(None)\n"
        "print(int(ray.cluster_resources().get('GPU', 0)), 'torch' in sys.modules)\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(env, CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["0", "False"]
