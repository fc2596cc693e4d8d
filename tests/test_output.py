"""stages.output.folder: the output folder's names, atomic writes, markers, resume policy and errors.parquet."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from stages.errors import ErrorRecord
from stages.output.folder import OutputFolder, OutputRefused, collect_errors
from stages.output.layout import ERRORS_FILE, RUN_FILE
from stages.output.locations import open_location


def test_write_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch):
    out = OutputFolder(tmp_path / "out")
    out.write("shards/00000.tar", b"abc")
    assert (tmp_path / "out" / "shards" / "00000.tar").read_bytes() == b"abc"

    class Full:  # the local filesystem, with a disk that fills up at the rename
        def __getattr__(self, name):
            return getattr(fs, name)

        def move(self, src, dst):
            raise OSError(28, "No space left on device")

    fs = out.fs
    monkeypatch.setattr(out, "fs", Full())
    with pytest.raises(OSError, match="No space"):
        out.write("shards/00001.tar", b"def")
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["00000.tar"]


def test_a_shard_is_done_only_when_its_marker_vouches_for_both_files(tmp_path):
    out = OutputFolder(tmp_path)
    marker = out.write_shard(3, b"tar-bytes", b"parquet-bytes", {"shard": 3, "status": "complete"})
    assert marker["files"]["tar"] == {"size": 9, "sha256": __import__("hashlib").sha256(b"tar-bytes").hexdigest()}
    markers = out.read_markers()
    assert markers[3] == marker and out.pending(4, markers) == [0, 1, 2]
    (tmp_path / "shards" / "00003.parquet").write_bytes(b"torn")  # another size than the marker says
    assert out.pending(4, out.read_markers()) == [0, 1, 2, 3]
    # a marker written before markers named their files: the tar must exist
    (tmp_path / "_progress" / "00003.json").write_text(json.dumps({"shard": 3, "status": "complete"}))
    assert out.pending(4, out.read_markers()) == [0, 1, 2]
    (tmp_path / "shards" / "00003.tar").unlink()
    assert out.pending(4, out.read_markers()) == [0, 1, 2, 3]


def test_resume_checks_the_sha256_the_marker_names(tmp_path):
    out = OutputFolder(tmp_path)
    for n in range(3):
        out.write_shard(n, b"tar-%d" % n, b"parquet-%d" % n, {"shard": n, "status": "complete"})
    markers = out.read_markers()
    assert out.pending(3, markers) == []
    # same size, other bytes (a torn or foreign object the size check alone would take as done)
    (tmp_path / "shards" / "00001.tar").write_bytes(b"tar-X")
    (tmp_path / "shards" / "00002.parquet").write_bytes(b"parquet-Y")
    assert out.pending(3, markers) == [1, 2]
    assert out.pending(3, markers, verify=False) == []
    assert out.sha256("shards/00000.tar") == __import__("hashlib").sha256(b"tar-0").hexdigest()


def test_a_failed_shard_write_leaves_nothing_under_a_final_name(tmp_path, monkeypatch):
    out = OutputFolder(tmp_path)
    real = OutputFolder.write

    def fail_on_marker(self, rel, data):
        if rel.startswith("_progress/"):
            raise OSError(5, "I/O error")
        return real(self, rel, data)

    monkeypatch.setattr(OutputFolder, "write", fail_on_marker)
    with pytest.raises(OSError):
        out.write_shard(0, b"t", b"p", {"shard": 0, "status": "complete"})
    assert not list((tmp_path / "shards").iterdir())


def test_prepare_refuses_another_run_and_sweeps_temporaries(tmp_path):
    out = OutputFolder(tmp_path)
    out.prepare({"manifest": "a"}, overwrite=False)
    assert json.loads((tmp_path / RUN_FILE).read_text()) == {"manifest": "a"}
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / ".00000.tar.tmp-1234abcd").write_bytes(b"torn")
    (tmp_path / "references").mkdir()
    (tmp_path / "references" / ".abc.tmp-99").mkdir()
    (tmp_path / "shards" / "keep.txt").write_bytes(b"x")
    out.prepare({"manifest": "a"}, overwrite=False)  # the same run: resumed, temporaries swept
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["keep.txt"]
    assert not list((tmp_path / "references").iterdir())
    with pytest.raises(OutputRefused, match="differs in: manifest"):
        out.prepare({"manifest": "b"}, overwrite=False)
    out.prepare({"manifest": "b"}, overwrite=True)
    assert not (tmp_path / "shards").exists() and json.loads((tmp_path / RUN_FILE).read_text()) == {"manifest": "b"}


def test_a_key_an_earlier_version_did_not_record_is_adopted_not_refused(tmp_path):
    out = OutputFolder(tmp_path)
    out.prepare({"manifest": "a"}, overwrite=False)  # written by a version without "source"
    out.prepare({"manifest": "a", "source": "/m"}, overwrite=False, recorded_since=("source",))
    assert json.loads((tmp_path / RUN_FILE).read_text()) == {"manifest": "a", "source": "/m"}
    with pytest.raises(OutputRefused, match="differs in: source"):  # once recorded, it must match
        out.prepare({"manifest": "a", "source": "/n"}, overwrite=False, recorded_since=("source",))
    with pytest.raises(OutputRefused, match="differs in: manifest"):  # other keys are still compared
        out.prepare({"manifest": "b", "source": "/m"}, overwrite=False, recorded_since=("source",))


def test_symbolic_links_are_never_written_through(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shards").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputRefused, match="symbolic links"):
        OutputFolder(tmp_path / "out").prepare({}, overwrite=False)


def test_errors_parquet_has_one_row_per_failed_row_with_every_failed_seed(tmp_path):
    markers = {
        1: {"errors": [{"stage": "generate", "field": "", "reason": "boom", "id": "b", "row": 4, "seed": 7}]},
        0: {"errors": [ErrorRecord("reference_kv", "concepts", "bad", id="b", row=4, seed=3).to_row(),
                       ErrorRecord("segment", "concepts[0].mask", "empty", id="c", row=9, seed=1).to_row()]},
    }
    problems = [ErrorRecord("validate", "seeds", "empty", id="a", row=2)]
    rows = collect_errors(problems, markers)
    assert [(r["row"], r["stage"], r["seeds"]) for r in rows] == [(2, "validate", []), (4, "reference_kv", [3, 7]),
                                                                  (9, "segment", [1])]
    out = OutputFolder(tmp_path)
    out.write_errors(rows)
    assert pq.read_table(tmp_path / ERRORS_FILE).to_pylist() == rows


@pytest.mark.parametrize("value, why", [("s3:/bucket/x", "two slashes"), ("foo://x", "unsupported storage"),
                                        ("ftp://host/x", "unsupported storage"), ("hf://datasets/x", "read-only")])
def test_locations_that_cannot_be_written_are_refused_by_option(value, why):
    with pytest.raises(ValueError, match=why) as e:
        open_location(value, option="-o/--out")
    assert str(e.value).startswith(f"-o/--out {value!r}")
