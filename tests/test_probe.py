"""The shared-storage probe: written by the driver, checked on each node before a first write there."""

from __future__ import annotations

import pytest

from pipeline.plan import not_shared_in
from stages.output import probe as probe_module
from stages.output.folder import OutputFolder
from stages.output.probe import PROBE_PREFIX, NotShared, StorageProbe, probed


def test_a_node_that_sees_the_probe_passes_one_that_does_not_is_named(tmp_path, monkeypatch):
    out, cache = tmp_path / "out", tmp_path / "cache"
    probe = StorageProbe.create({"-o/--out": str(out), "--kv-cache": str(cache), "other": "s3://bucket/x"})
    assert [option for option, _, _ in probe.files] == ["-o/--out", "--kv-cache"]  # URIs need no probe
    assert len(list(out.glob(PROBE_PREFIX + "*"))) == 1 and len(list(cache.glob(PROBE_PREFIX + "*"))) == 1
    probe.check()
    assert probe.unseen() is None

    monkeypatch.setattr(probe_module, "_seen", set())  # another process: checks again
    (cache / (PROBE_PREFIX + probe.token)).write_text("another run's token")
    monkeypatch.setattr(probe_module, "_node_description", lambda: "n2 (10.0.0.2)")
    assert probe.unseen() == ("--kv-cache", str(cache))
    with pytest.raises(NotShared, match=rf"--kv-cache {cache} is a local path that node n2 \(10.0.0.2\) does not see"):
        probe.check()
    probe.remove()
    assert not list(out.iterdir()) and not list(cache.iterdir())
    assert StorageProbe.create({"-o/--out": "s3://bucket/out", "--kv-cache": None}) is None


def test_an_actor_class_checks_the_probe_before_its_own_constructor(tmp_path, monkeypatch):
    calls = []

    class Stage:
        def __init__(self, x):
            calls.append(x)

    probe = StorageProbe.create({"-o/--out": str(tmp_path)})
    checked = probed(Stage, probe)
    assert checked.__name__ == "Stage" and probed(Stage, None) is Stage
    checked(x=3)
    assert calls == [3]
    monkeypatch.setattr(probe_module, "_seen", set())
    probe.remove()
    with pytest.raises(NotShared):
        checked(x=4)
    assert calls == [3]  # nothing ran on a node that does not see OUT


def test_the_refusal_is_found_in_the_ray_error_that_carries_it():
    text = ("RayTaskError(NotShared): ray::MapBatches(GenerateStage)() (pid=1, ip=10.0.0.2)\n  File x\n"
            "stages.output.probe.NotShared: -o/--out /data/out is a local path that node abc (10.0.0.2) does not see: "
            "on a multi-node cluster OUT and --kv-cache must be on storage every node mounts at the same path, "
            "or an object-store URI (s3://...). Nothing was written from that node.")
    refused = not_shared_in(RuntimeError(text))
    assert isinstance(refused, NotShared) and str(refused).startswith("-o/--out /data/out is a local path")
    assert str(refused).endswith("Nothing was written from that node.")
    assert not_shared_in("ValueError: something else") is None


def test_a_probe_a_killed_run_left_in_out_is_swept_at_the_next_start(tmp_path):
    (tmp_path / (PROBE_PREFIX + "0123")).write_text("0123")
    (tmp_path / "keep.txt").write_text("a user's file")
    OutputFolder(tmp_path).sweep_temporaries()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_planning_tasks_check_the_probe_before_writing_into_out(tmp_path, ray_session):
    """The manifest's files are planned in Ray tasks that write ``_plan/`` into OUT: a task on a node that
    does not see the driver's probe refuses (``NotShared``, exit 2) and writes nothing."""
    from pipeline.manifest_files import ManifestSource
    from pipeline.part_plan import PartRecord
    from pipeline.plan import part_infos
    from tests.test_manifest_folders import _table, _write

    _write(tmp_path / "m" / "a.parquet", _table(5, sets=2))
    (part,) = ManifestSource.open(str(tmp_path / "m")).parts
    jobs = [(part, PartRecord(part.name, part.digest(), part.size, row_base=0, shard_base=0))]
    out = tmp_path / "out"
    probe = StorageProbe.create({"-o/--out": str(out)})
    (info,) = part_infos(jobs, str(out), probe=probe)  # seen: planned
    assert info["targets"] > 0 and list((out / "_plan").iterdir())

    other = tmp_path / "other"
    blind = StorageProbe(((("-o/--out", str(other), str(out / (PROBE_PREFIX + "gone")))),), "gone")
    with pytest.raises(NotShared, match=rf"-o/--out {other} is a local path that node \S+ .* does not see"):
        part_infos(jobs, str(other), probe=blind)
    assert not other.exists()  # nothing was written from that node
    probe.remove()
