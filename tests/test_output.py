"""stages.output.folder: the output folder's names, atomic writes, markers, resume policy and errors.parquet;
the shards' tars (stages.generation.shard) and pass-through Parquet columns (stages.output.write)."""

from __future__ import annotations

import io
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


# --------------------------------------------------------------------------- shard tars and Parquet columns

LONG_ID = "L" * 128  # the longest id validation accepts (pipeline.manifest.ID_PATTERN)
LONG_SEED = 2**63 - 1  # the largest seed validation accepts: 19 digits


def _sample_meta(row_id: str, seed: int, *, row: int = 0, **more) -> dict:
    return {"key": f"{row_id}-{seed}", "id": row_id, "row": row, "seed": seed, "prompt": "p",
            "negative_prompt": "", "concept_set_id": "c", "width": 8, "height": 8, "num_inference_steps": 1,
            "guidance_scale": 1.0, **more}


def _with_fields(meta: dict) -> tuple[dict, dict[str, bytes]]:
    """``meta`` naming further fields (attention maps, an embedded reference and its mask), their bytes."""
    from stages.output.layout import ATTENTION_FILE, EMBEDDED, extra_fields

    embedded = {"images": ["ref0.png"], "masks": ["ref0.mask.png"]}
    meta = dict(meta, attention={"file": ATTENTION_FILE}, **{EMBEDDED: embedded})
    return meta, {f"{meta['key']}.{name}": f"{name} bytes".encode() for name in extra_fields(meta)}


def test_a_shard_of_the_longest_id_and_seed_reads_back_whole(tmp_path):
    import tarfile

    import webdataset as wds

    from stages.generation.shard import pack_shard

    meta, extras = _with_fields(_sample_meta(LONG_ID, LONG_SEED))
    key = meta["key"]
    assert len(f"{key}.ref0.mask.png") > 100  # more than a ustar name holds (no '/' in a key to split at)
    tar = pack_shard([(key, "png", b"PIXELS", meta)], extras)
    with tarfile.open(fileobj=io.BytesIO(tar)) as f:
        members = {m.name: f.extractfile(m).read() for m in f.getmembers()}
    assert members == {f"{key}.png": b"PIXELS", **extras,
                       f"{key}.json": json.dumps(meta, sort_keys=True).encode()}
    (tmp_path / "00000.tar").write_bytes(tar)
    samples = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [key]
    assert samples[0]["png"] == b"PIXELS" and samples[0]["ref0.mask.png"] == b"ref0.mask.png bytes"
    assert json.loads(samples[0]["json"]) == meta


def test_a_shard_of_ordinary_keys_has_the_bytes_ustar_gave_it():
    import tarfile

    from stages.generation.shard import pack_shard

    meta, extras = _with_fields(_sample_meta("row_7", 1234))
    plain = _sample_meta("x" * 75, 2**63 - 1, row=1)  # "<key>.json": 100 bytes, the most a ustar name holds
    samples = [(meta["key"], "png", b"PIXELS", meta), (plain["key"], "jpg", b"JPEG", plain)]
    ustar = io.BytesIO()  # as the previous version wrote shards (test_compat: a redone shard is identical)
    with tarfile.open(fileobj=ustar, mode="w", format=tarfile.USTAR_FORMAT) as f:
        for key, ext, data, m in samples:
            blobs = [(f"{key}.{ext}", data), *((n, b) for n, b in extras.items() if n.startswith(f"{key}.")),
                     (f"{key}.json", json.dumps(m, sort_keys=True).encode())]
            for name, blob in blobs:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(blob), 0, 0o644
                f.addfile(info, io.BytesIO(blob))
    assert len(f"{plain['key']}.json") == 100
    assert pack_shard(samples, extras) == ustar.getvalue()


def test_a_sample_that_cannot_be_packed_fails_alone():
    import tarfile

    from stages.generation.generate import GenerateStage
    from stages.generation.shard import shard_row
    from stages.generation.units import Group, Target, WorkUnit
    from stages.params import GenParams

    good, extras = _with_fields(_sample_meta(LONG_ID, LONG_SEED))
    broken, _ = _with_fields(_sample_meta("broken", 5, row=1, reused_from="00000.tar#broken-5"))  # no bytes
    samples = [(good["key"], "png", b"PIXELS", good), (broken["key"], "png", b"PIXELS", broken)]
    row = shard_row(3, samples, [], expected=2, reused=1, extras=extras)
    assert [m["key"] for m in json.loads(row["metas"])] == [good["key"]] and row["reused"] == 0
    [error] = json.loads(row["errors"])
    assert (error["stage"], error["id"], error["row"], error["seed"]) == ("generate", "broken", 1, 5)
    assert error["reason"].startswith("KeyError")
    with tarfile.open(fileobj=io.BytesIO(row["tar"])) as f:
        assert all(name.startswith(good["key"]) for name in f.getnames())

    # the generation actor: the row keeps the samples that pack, never raises (the run goes on)
    targets = [Target(group=0, row=m["row"], id=m["id"], key=m["key"], prompt="p", seed=m["seed"])
               for m in (good, broken)]
    unit = WorkUnit(shard_id=3, groups=[Group(params=GenParams(), meta={})], targets=targets)
    stage = object.__new__(GenerateStage)  # no model
    stage.model_meta = {}

    def run_unit(u):
        stage._unit_extras.update(extras)  # as the actor gathers them
        return samples, []

    stage.run_unit = run_unit
    out = stage({"shard_id": [3], "unit": [unit.encode()]})
    assert [m["key"] for m in json.loads(out["metas"][0])] == [good["key"]]
    assert [(e["id"], e["seed"]) for e in json.loads(out["errors"][0])] == [("broken", 5)]


def test_an_empty_map_keeps_its_pass_through_column_a_map_in_every_shard(tmp_path):
    import pyarrow as pa

    from pipeline.validate import _json_safe
    from stages.output.write import parquet_bytes

    dtype = pa.map_(pa.string(), pa.int64())
    schema = pa.schema([("tags", dtype)]).serialize().to_pybytes()

    def meta(key, tags):
        return _sample_meta(key, 0, passthrough={"tags": _json_safe(tags)})

    (tmp_path / "00000.parquet").write_bytes(parquet_bytes([meta("a", [("x", 1)])], schema))
    shard = [meta("b", [("y", 2)]), meta("c", []), meta("d", None)]  # "c": an empty map
    (tmp_path / "00001.parquet").write_bytes(parquet_bytes(shard, schema))
    assert [pq.read_schema(tmp_path / f"0000{n}.parquet").field("tags").type for n in (0, 1)] == [dtype] * 2
    table = pq.read_table(tmp_path)
    assert table.schema.field("tags").type == dtype
    assert table.column("tags").to_pylist() == [[("x", 1)], [("y", 2)], [], None]
