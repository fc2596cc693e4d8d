"""The render stages on plain batches, without Ray: reference K/V, generate, write."""

from __future__ import annotations

import errno
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.base import to_column
from stages.errors import ErrorRecord
from stages.generation.generate import GenerateStage, pack_shard, shard_row
from stages.generation.units import Group, Target, WorkUnit, group_meta
from stages.inputs.concepts import ResolvedConcept
from stages.output.folder import OutputFolder
from stages.output.write import write_batch
from stages.params import GenParams
from stages.reference.reference_kv import ReferenceKVStage, ReferenceRequest

GEN = GenParams(num_inference_steps=2, height=64, width=64, negative_prompt="bad")
PARAMS = json.dumps(GEN.to_row())


def _resolved(concepts):
    out = []
    for c in concepts:
        mask = np.asarray(c.mask.resize(c.image.size).convert("L")) >= 128
        out.append(ResolvedConcept(image=c.image, mask=mask, prompt=c.prompt, weight=c.weight, mask_source="file",
                                   image_digest="d" * 64, mask_digest="m" * 64))
    return out


class _Lists(ReferenceKVStage):
    """The stage with its output columns as lists, to compare with ``==``."""

    def __call__(self, batch):
        return {k: list(v) for k, v in super().__call__(batch).items()}


@pytest.fixture
def kv_stage(tiny_model_dir, tmp_path):
    return _Lists(str(tiny_model_dir), store_dir=str(tmp_path / "store"), kv_cache=str(tmp_path / "cache"))


def test_reference_kv_stage_computes_once_then_reuses(kv_stage, concepts, tmp_path):
    batch = {"concept_set_id": ["abc"], "resolved": [[c.to_row() for c in _resolved(concepts[:2])]],
             "gen_params": [PARAMS]}
    first = kv_stage(batch)
    assert first["reference_pass"] == [1] and first["error_reason"] == [""]
    assert first["kv_path"][0].endswith("cache/abc.safetensors")
    again = kv_stage(batch)
    assert again["reference_pass"] == [0] and again["kv_path"] == first["kv_path"]
    # a truncated cache entry is detected and recomputed
    path = tmp_path / "cache" / "abc.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    assert kv_stage(batch)["reference_pass"] == [1]


def test_reference_kv_stage_error_is_data(kv_stage):
    bad = dict(GEN.to_row(), height=60)
    out = kv_stage({"concept_set_id": ["x"], "resolved": [[]], "gen_params": [json.dumps(bad)]})
    assert out["kv_path"] == [""] and out["error_stage"] == ["reference_kv"] and out["error_reason"][0]


def test_reference_kv_stage_chained_after_composite(kv_stage, concepts):
    """In the chained execution: other columns pass through, a row an earlier stage failed is not computed."""
    good = [c.to_row() for c in _resolved(concepts[:1])]
    out = kv_stage({"concept_set_id": ["abc", None], "resolved": [good, []], "gen_params": [PARAMS] * 2,
                    "key": ["g1", "g2"], "preview_dir": ["/p", None],
                    "error_stage": ["", "segment"], "error_field": ["", "concepts[0].mask"],
                    "error_reason": ["", "mask is empty"]})
    assert out["reference_pass"] == [1, 0] and out["kv_path"][0] and out["kv_path"][1] == ""
    assert list(out["key"]) == ["g1", "g2"] and list(out["preview_dir"]) == ["/p", None]
    assert [out[k][1] for k in ("error_stage", "error_field", "error_reason")] == ["segment", "concepts[0].mask", "mask is empty"]
    assert out["error_reason"][0] == ""
    assert list(out["resolved"][0]) == good  # passed on unchanged (the driver reads the concepts' metadata from it)


def test_reference_kv_stage_on_ray_typed_batches(kv_stage, concepts):
    """As Ray hands batches over: numpy object columns, NaN where a column is null; same-content groups once."""
    good = [c.to_row() for c in _resolved(concepts[:1])]
    column = to_column
    batch = {"concept_set_id": column(["abc", float("nan"), "abc"]), "resolved": column([good, [], good]),
             "gen_params": np.array([PARAMS] * 3, dtype=object), "key": np.array(["g1", "g2", "g3"], dtype=object),
             "preview_dir": column([float("nan")] * 3),
             "error_stage": np.array(["", "composite", ""], dtype=object),
             "error_field": np.array(["", "concepts[0].context", ""], dtype=object),
             "error_reason": np.array(["", "carrier not found", ""], dtype=object)}
    out = kv_stage(batch)
    assert out["concept_set_id"] == ["abc", None, "abc"] and list(out["preview_dir"]) == [None] * 3
    assert out["reference_pass"] == [1, 0, 0] and out["kv_path"][2] == out["kv_path"][0] != ""
    assert out["error_reason"] == ["", "carrier not found", ""] and out["error_stage"][1] == "composite"


def _unit(shard_id, kv_path, seeds, *, reference=None, error=None):
    meta = group_meta(GEN, shard_id=shard_id, concept_set_id="abc", concepts=[])
    group = Group(params=GEN, meta=meta, kv_path=str(kv_path),
                  reference=str(reference) if reference else None, error=error)
    targets = [Target(group=0, row=i, id=f"r{i}", key=f"r{i}-{s}", prompt="a red cube", seed=s)
               for i, s in enumerate(seeds)]
    return WorkUnit(shard_id, [group], targets)


def _write(out: dict, folder) -> dict:
    return json.loads(write_batch(out, out_dir=str(folder))["marker"][0])


def test_generate_stage_and_atomic_write(kv_stage, tiny_model_dir, concepts, tmp_path):
    kv_path = kv_stage({"concept_set_id": ["abc"], "resolved": [[c.to_row() for c in _resolved(concepts[:2])]],
                        "gen_params": [PARAMS]})["kv_path"][0]
    ok = _unit(3, kv_path, [5, 6])
    failed = Group(params=GEN, meta={}, error=ErrorRecord("segment", "concepts[0].mask", "empty"))
    unit = WorkUnit(3, [ok.groups[0], failed],
                    [*ok.targets, Target(group=1, row=2, id="r2", key="r2-7", prompt="a red cube", seed=7,
                                         passthrough={"sku": "S-2"})])
    stage = GenerateStage(str(tiny_model_dir), image_format="png", batch_size=2)
    out = stage({"shard_id": [3], "unit": [unit.encode()]})
    assert out["expected"] == [3]
    marker = _write(out, tmp_path / "out")
    assert marker["status"] == "partial" and marker["samples"] == 2
    assert marker["errors"] == [{"stage": "segment", "field": "concepts[0].mask", "reason": "empty", "id": "r2", "row": 2, "seed": 7}]
    with tarfile.open(tmp_path / "out" / "shards" / "00003.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("r0-5.json").read())
    assert names == ["r0-5.png", "r0-5.json", "r1-6.png", "r1-6.json"]
    table = pq.read_table(tmp_path / "out" / "shards" / "00003.parquet")
    assert table["key"].to_pylist() == ["r0-5", "r1-6"] and table["negative_prompt"].to_pylist() == ["bad", "bad"]
    assert json.loads(table["metadata"][0].as_py()) == meta
    assert meta["model"]["fingerprint"] == stage.generator.model_fingerprint and meta["prompt_truncated"] is False
    assert (meta["concept_set_id"], meta["shard"], meta["seed"], meta["row"]) == ("abc", 3, 5, 0)
    # the tar written is the one the actor packed: no second tar is built
    assert (tmp_path / "out" / "shards" / "00003.tar").read_bytes() == out["tar"][0]
    # deterministic: the same unit gives the same bytes
    assert stage({"shard_id": [3], "unit": [unit.encode()]})["tar"] == out["tar"]


def test_generate_stage_computes_missing_kv_from_a_request_once(kv_stage, tiny_model_dir, concepts, tmp_path):
    """With one generation actor the run skips the reference pool: the actor computes each set's K/V."""
    resolved = [c.to_row() for c in _resolved(concepts[:2])]
    reference_kv = kv_stage({"concept_set_id": ["abc"], "resolved": [resolved], "gen_params": [PARAMS]})["kv_path"][0]
    request, bad_request = tmp_path / "store" / "abc.request.json", tmp_path / "store" / "bad.request.json"
    request.parent.mkdir(parents=True, exist_ok=True)
    request.write_bytes(ReferenceRequest("abc", resolved, GEN).to_json())
    bad_params = GenParams.from_row(dict(GEN.to_row(), height=64))
    object.__setattr__(bad_params, "height", 60)  # past validation: the engine refuses it
    bad_request.write_bytes(ReferenceRequest("bad", resolved, bad_params).to_json())
    own = tmp_path / "store" / "own" / "abc.safetensors"

    stage = GenerateStage(str(tiny_model_dir), image_format="png", batch_size=2)
    first = stage({"shard_id": [0], "unit": [_unit(0, own, [5, 6], reference=request).encode()]})
    assert first["reference_passes"] == [1] and own.is_file()
    again = stage({"shard_id": [1], "unit": [_unit(0, own, [5, 6], reference=request).encode()]})
    assert again["reference_passes"] == [0] and again["tar"] == first["tar"]
    # the same images as from K/V a reference actor computed
    by_actor = stage({"shard_id": [0], "unit": [_unit(0, reference_kv, [5, 6], reference=request).encode()]})
    assert by_actor["reference_passes"] == [0] and by_actor["tar"] == first["tar"]
    # a set whose K/V cannot be computed fails its targets (stage reference_kv), once per actor
    bad = stage({"shard_id": [2], "unit": [_unit(2, tmp_path / "store" / "bad.safetensors", [1, 2],
                                                 reference=bad_request).encode()]})
    marker = _write(bad, tmp_path / "out")
    assert marker["samples"] == 0 and [e["stage"] for e in marker["errors"]] == ["reference_kv"] * 2
    assert "height" in marker["errors"][0]["reason"]


def test_write_failure_leaves_nothing_under_a_final_name(tmp_path, monkeypatch):
    meta = {"key": "k-1", "id": "k", "row": 0, "seed": 1, "prompt": "p", "negative_prompt": "", "concept_set_id": "c",
            "width": 8, "height": 8, "num_inference_steps": 1, "guidance_scale": 1.0}
    row = shard_row(0, [("k-1", "png", b"\x89PNG fake", meta)], [], expected=1)
    batch = {k: [v] for k, v in row.items()}
    real = OutputFolder.write

    def full_disk(self, rel, data):
        if rel.endswith(".parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, rel, data)

    monkeypatch.setattr(OutputFolder, "write", full_disk)
    marker = _write(batch, tmp_path)
    assert marker["status"] == "write_failed" and "No space left" in marker["errors"][0]["reason"]
    assert marker["errors"][0]["stage"] == "write" and marker["errors"][0]["seed"] == 1
    assert not list((tmp_path / "shards").iterdir()) and not (tmp_path / "_progress").exists()
    monkeypatch.setattr(OutputFolder, "write", real)
    assert _write(batch, tmp_path)["status"] == "complete"
    assert (tmp_path / "shards" / "00000.tar").read_bytes() == pack_shard([("k-1", "png", b"\x89PNG fake", meta)])
