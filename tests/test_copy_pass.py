"""The copy pass of ``run --reuse``: shards whose every sample is in a previous output are copied whole by
CPU tasks, without a model actor, byte for byte what the actor would have written."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.copy_pass import MODEL_LOADED, copies_whole_shards, model_key
from pipeline.examples import write_example_manifest
from pipeline.run import run
from pipeline.settings import RunSettings
from stages.errors import ErrorRecord
from stages.generation.copy import copy_unit
from stages.generation.reuse import ReusedShards, sample_record
from stages.generation.shard import pack_shard
from stages.generation.units import Group, Target, WorkUnit
from stages.params import GenParams


def _settings(manifest: Path, out: Path, model: Path, **kw) -> RunSettings:
    return RunSettings(manifest=str(manifest), out=str(out), model=str(model), samples_per_shard=3,
                       defaults=GenParams(num_inference_steps=2, height=64, width=64), **kw)


def _touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_the_model_key_follows_the_weight_files_and_how_they_load(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    settings = _settings(tmp_path / "m.parquet", tmp_path / "out", model)
    key = model_key(settings, "cpu")
    assert key is not None and key == model_key(settings, "cpu")
    assert any(name.endswith(".safetensors") for name, *_ in key["files"])
    assert model_key(settings, "cuda") != key  # the dtype "auto" resolves per device
    assert model_key(_settings(tmp_path / "m.parquet", tmp_path / "out", model, dtype="float32"), "cpu") != key
    assert model_key(_settings(tmp_path / "m.parquet", tmp_path / "out", model, scheduler="ddim"), "cpu") != key
    _touch(next(model.rglob("*.safetensors")))
    assert model_key(settings, "cpu") != key
    # nothing to list here: no key (the actors decide)
    assert model_key(_settings(tmp_path / "m.parquet", tmp_path / "out", "s3://bucket/model"), "cpu") is None
    assert model_key(_settings(tmp_path / "m.parquet", tmp_path / "out", "nobody/not-cached-model"), "cpu") is None


def test_copies_whole_shards_only_where_a_copy_needs_no_model(tmp_path):
    def settings(**kw):
        return _settings(tmp_path / "m.parquet", tmp_path / "out", tmp_path / "model", **kw)

    assert copies_whole_shards(settings(reuse=("prev",)), streaming=True)
    assert not copies_whole_shards(settings(), streaming=True)  # nothing to reuse
    assert not copies_whole_shards(settings(reuse=("prev",)), streaming=False)
    for needs_model in (dict(save_attention=True), dict(annotate=True), dict(embed_references=True),
                        dict(min_score=(("clip_t", 0.3),)), dict(controlnet=("cn",))):
        assert not copies_whole_shards(settings(reuse=("prev",), **needs_model), streaming=True), needs_model


def _unit(shard_id: int, targets: list[Target], groups: list[Group]) -> WorkUnit:
    return WorkUnit(shard_id=shard_id, groups=groups, targets=targets)


def test_copy_unit_copies_a_shard_only_when_every_sample_is_found(tmp_path):
    params = GenParams(num_inference_steps=2, height=64, width=64)
    group = Group(params=params, meta={"concept_set_id": "cs1", "guidance_scale": 7.5})
    failed = Group(params=params, meta={}, error=ErrorRecord(stage="composite", field="concepts[0].mask",
                                                                 reason="mask is empty"))
    model, versions = {"fingerprint": "f0"}, {"torch": "x"}
    found = Target(group=0, row=3, id="a", key="a-7", prompt="a dog", seed=7, passthrough={"sku": "n1"})
    # the previous output's sample: recorded at another shard and row, with attention maps of its own run
    previous = dict(_unit(9, [found], [group]).sample_meta(found), model=model, versions=versions, shard=9, row=0,
                    passthrough={"sku": "old"}, prompt_truncated=False,
                    attention={"file": "attn.png", "panels": 1})
    (tmp_path / "prev" / "shards").mkdir(parents=True)
    (tmp_path / "prev" / "shards" / "00009.tar").write_bytes(
        pack_shard([("a-7", "png", b"PIXELS", previous)], {"a-7.attn.png": b"MAPS"}))
    tar = str(tmp_path / "prev" / "shards" / "00009.tar")
    index = {sample_record(previous, "png"): {"tar": tar, "key": "a-7", "ext": "png", "attention": True}}

    lost = Target(group=1, row=4, id="b", key="b-1", prompt="p", seed=1)
    row = copy_unit(_unit(2, [found, lost], [group, failed]), model, versions, "png", index, ReusedShards())
    assert row["shard_id"] == 2 and row["expected"] == 2 and row["reused"] == 1 and row["reference_passes"] == 0
    (meta,) = json.loads(row["metas"])
    assert meta == dict({k: v for k, v in previous.items() if k != "attention"}, shard=2, row=3,
                        passthrough={"sku": "n1"}, reused_from=f"{tar}#a-7")
    assert json.loads(row["errors"]) == [dict(failed.error.to_row(), id="b", row=4, seed=1)]
    with tarfile.open(fileobj=io.BytesIO(row["tar"])) as t:  # the image as it was; the maps stay behind
        assert t.getnames() == ["a-7.png", "a-7.json"] and t.extractfile("a-7.png").read() == b"PIXELS"

    other = Target(group=0, row=5, id="c", key="c-2", prompt="a cat", seed=2)  # not in the previous output
    assert copy_unit(_unit(2, [found, other], [group]), model, versions, "png", index, ReusedShards()) is None
    assert copy_unit(_unit(2, [found], [group]), {"fingerprint": "f1"}, versions, "png", index, ReusedShards()) is None
    with_lora = Group(params=GenParams(loras=(("style.safetensors", 0.3),)), meta=group.meta)
    assert copy_unit(_unit(2, [found], [with_lora]), model, versions, "png", index, ReusedShards()) is None
    (tmp_path / "prev" / "shards" / "00009.tar").unlink()  # the previous shard gone since: left to the actor
    assert copy_unit(_unit(2, [found], [group]), model, versions, "png", index, ReusedShards()) is None


def test_a_stream_that_breaks_off_names_its_phase_and_keeps_what_it_finished():
    from pipeline.run import RunFailed, _drain

    def rows():
        yield {"shard": 0}
        raise OSError("bucket gone")

    seen = []
    with pytest.raises(RunFailed, match=r"^copying previous shards broke off \(OSError: bucket gone\); finished"):
        _drain(rows, seen.append, "copying previous shards")
    assert seen == [{"shard": 0}]
    with pytest.raises(RunFailed, match=r"^rendering broke off"):
        _drain(rows, seen.append)


def _files(folder: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert files
    return files


def _stats(out: Path) -> dict:
    return json.loads((out / "_stats.json").read_text())


@pytest.mark.ray
def test_unchanged_shards_are_copied_without_a_model_byte_for_byte(tmp_path, tiny_model_dir, ray_session):
    model = tmp_path / "model"  # a copy: its weight file is touched below
    shutil.copytree(tiny_model_dir, model)
    manifest = write_example_manifest(tmp_path / "inputs")
    # a row whose concept mask is empty: refused, and its error record the same in every night
    Image.new("L", (64, 64), 0).save(tmp_path / "inputs" / "images" / "empty_mask.png")
    rows = pq.read_table(manifest).to_pylist()
    broken = dict(rows[0], id="empty_mask", seeds=[5])
    broken["concepts"] = [dict(c, mask="images/empty_mask.png") for c in broken["concepts"]]
    pq.write_table(pa.Table.from_pylist([*rows, broken], schema=pq.read_schema(manifest)), manifest)
    night1 = tmp_path / "night1"
    first = run(_settings(manifest, night1, model)).stats
    assert first["rows_failed"] == 1 and not first["complete"]
    samples, shards = first["samples_written"], first["shards"]
    loaded = _stats(night1)[MODEL_LOADED]
    first_meta = json.loads(pq.read_table(next((night1 / "shards").glob("*.parquet")))["metadata"][0].as_py())
    assert loaded["meta"] == first_meta["model"]
    assert loaded["key"] == model_key(_settings(manifest, night1, model), loaded["key"]["device"])

    # the same night again: by the actors (night 1's record of its model hidden), then by the copy pass
    recorded = _stats(night1)
    (night1 / "_stats.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != MODEL_LOADED}))
    by_actor = run(_settings(manifest, tmp_path / "by_actor", model, reuse=(str(night1),))).stats
    (night1 / "_stats.json").write_text(json.dumps(recorded))
    copied = run(_settings(manifest, tmp_path / "copied", model, reuse=(str(night1),))).stats
    assert by_actor["samples_reused"] == copied["samples_reused"] == samples and copied["samples_rendered"] == 0
    assert "copy" not in by_actor["nodes"]
    assert copied["nodes"] == {"copy": shards} and "generate_and_write" not in copied["seconds"]
    assert copied["rows_failed"] == 1 and copied[MODEL_LOADED] == loaded  # kept for the next night
    rerun = run(_settings(manifest, tmp_path / "copied", model, reuse=(str(night1),))).stats  # nothing to do
    assert rerun["samples_generated_this_run"] == 0 and rerun[MODEL_LOADED] == loaded  # and kept still
    errors = pq.read_table(tmp_path / "copied" / "errors.parquet").to_pylist()
    assert [e["id"] for e in errors] == ["empty_mask"]
    assert errors == pq.read_table(tmp_path / "by_actor" / "errors.parquet").to_pylist()
    for folder in ("shards", "_progress"):  # tars, Parquet and markers, byte for byte
        assert _files(tmp_path / "copied" / folder) == _files(tmp_path / "by_actor" / folder)

    # one prompt changed: its shard renders on an actor, the others are copied
    rows = pq.read_table(manifest).to_pylist()
    rows[0]["prompt"] += " at dusk"
    changed = tmp_path / "inputs" / "night2.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(manifest)), changed)
    mixed = run(_settings(changed, tmp_path / "mixed", model, reuse=(str(night1),))).stats
    assert mixed["rows_failed"] == 1 and mixed["samples_rendered"] == len(rows[0]["seeds"])
    assert mixed["nodes"].get("copy") == shards - 1 and sum(mixed["nodes"].values()) == shards

    # a weight file touched: the record of night 1's model no longer holds; the actors copy (and check) again
    _touch(next(model.rglob("*.safetensors")))
    touched = run(_settings(manifest, tmp_path / "touched", model, reuse=(str(night1),))).stats
    assert "copy" not in touched["nodes"] and touched["samples_reused"] == samples
    assert touched[MODEL_LOADED]["key"] != loaded["key"] and touched[MODEL_LOADED]["meta"] == loaded["meta"]
