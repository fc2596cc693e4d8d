"""The render stages on plain batches, without Ray: reference K/V, generate, write."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.concepts import ResolvedConcept
from stages.generate import ERRORS_MEMBER, GenerateStage, pack_result
from stages.reference_kv import ReferenceKVStage
from stages.segment import encode_resolved, to_column
from stages.write import write_batch, write_shard

PARAMS = {"num_inference_steps": 2, "height": 64, "width": 64, "reference_seed": 0,
          "mrsa": {"blocks": [5, 6], "layers": None, "start_step": 0, "end_step": None, "mask_mode": "bias",
                   "style_fidelity": 1.0, "null_ref_prompts": False}, "negative_prompt": None}


def _resolved(concepts):
    out = []
    for c in concepts:
        mask = np.asarray(c.mask.resize(c.image.size).convert("L")) >= 128
        out.append(ResolvedConcept(image=c.image, mask=mask, prompt=c.prompt, weight=c.weight, mask_source="file",
                                   image_digest="d" * 64, mask_digest="m" * 64))
    return out


@pytest.fixture
def kv_stage(tiny_model_dir, tmp_path):
    return ReferenceKVStage(str(tiny_model_dir), store_dir=str(tmp_path / "store"), kv_cache=str(tmp_path / "cache"))


def test_reference_kv_stage_computes_once_then_reuses(kv_stage, concepts, tmp_path):
    batch = {"concept_set_id": ["abc"], "resolved": [[encode_resolved(c) for c in _resolved(concepts[:2])]],
             "params": [json.dumps(PARAMS)]}
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
    bad = dict(PARAMS, height=60)
    out = kv_stage({"concept_set_id": ["x"], "resolved": [[]], "params": [json.dumps(bad)]})
    assert out["kv_path"] == [""] and out["error_stage"] == ["reference_kv"] and out["error_reason"][0]


def test_reference_kv_stage_chained_after_composite(kv_stage, concepts):
    """In the chained execution: other columns pass through, a row an earlier stage failed is not computed."""
    good = [encode_resolved(c) for c in _resolved(concepts[:1])]
    out = kv_stage({"concept_set_id": ["abc", None], "resolved": [good, []], "params": [json.dumps(PARAMS)] * 2,
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
    good = [encode_resolved(c) for c in _resolved(concepts[:1])]
    column = to_column
    batch = {"concept_set_id": column(["abc", float("nan"), "abc"]), "resolved": column([good, [], good]),
             "params": np.array([json.dumps(PARAMS)] * 3, dtype=object), "key": np.array(["g1", "g2", "g3"], dtype=object),
             "preview_dir": column([float("nan")] * 3),
             "error_stage": np.array(["", "composite", ""], dtype=object),
             "error_field": np.array(["", "concepts[0].context", ""], dtype=object),
             "error_reason": np.array(["", "carrier not found", ""], dtype=object)}
    out = kv_stage(batch)
    assert out["concept_set_id"] == ["abc", None, "abc"] and list(out["preview_dir"]) == [None] * 3
    assert out["reference_pass"] == [1, 0, 0] and out["kv_path"][2] == out["kv_path"][0] != ""
    assert out["error_reason"] == ["", "carrier not found", ""] and out["error_stage"][1] == "composite"


def test_generate_stage_and_atomic_write(kv_stage, tiny_model_dir, concepts, tmp_path):
    kv_path = kv_stage({"concept_set_id": ["abc"], "resolved": [[encode_resolved(c) for c in _resolved(concepts[:2])]],
                        "params": [json.dumps(PARAMS)]})["kv_path"][0]
    gen_params = {"num_inference_steps": 2, "height": 64, "width": 64, "guidance_scale": 7.5, "negative_prompt": "bad"}

    def target(i, seed, **kw):
        return dict({"row": i, "id": f"r{i}", "key": f"r{i}-{seed}", "prompt": "a red cube", "seed": seed,
                     "kv_path": kv_path, "error": None, "params": gen_params,
                     "meta": {"key": f"r{i}-{seed}", "id": f"r{i}", "row": i, "seed": seed, "prompt": "a red cube",
                              "negative_prompt": "bad", "concept_set_id": "abc", "width": 64, "height": 64,
                              "num_inference_steps": 2, "guidance_scale": 7.5}}, **kw)

    unit = {"shard_id": 3, "targets": [target(0, 5), target(1, 6),
                                       target(2, 7, error={"stage": "segment", "field": "concepts[0].mask", "reason": "empty"})]}
    stage = GenerateStage(str(tiny_model_dir), image_format="png", batch_size=2)
    out = stage({"shard_id": [3], "unit": [json.dumps(unit)]})
    assert out["expected"] == [3]
    marker = json.loads(write_batch({"shard_id": out["shard_id"], "result": out["result"], "expected": out["expected"]},
                                    out_dir=str(tmp_path / "out"))["marker"][0])
    assert marker["status"] == "partial" and marker["samples"] == 2
    assert marker["errors"] == [{"stage": "segment", "field": "concepts[0].mask", "reason": "empty", "id": "r2", "row": 2, "seed": 7}]
    with tarfile.open(tmp_path / "out" / "shards" / "00003.tar") as tar:
        names = tar.getnames()
    assert names == ["r0-5.png", "r0-5.json", "r1-6.png", "r1-6.json"]
    table = pq.read_table(tmp_path / "out" / "shards" / "00003.parquet")
    assert table["key"].to_pylist() == ["r0-5", "r1-6"]
    meta = json.loads(table["metadata"][0].as_py())
    assert meta["model"]["fingerprint"] == stage.generator.model_fingerprint and meta["prompt_truncated"] is False
    # deterministic: the same unit gives the same bytes
    assert stage({"shard_id": [3], "unit": [json.dumps(unit)]})["result"] == out["result"]


def test_generate_stage_computes_missing_kv_from_a_request_once(kv_stage, tiny_model_dir, concepts, tmp_path):
    """With one generation actor the run skips the reference pool: the actor computes each set's K/V."""
    from stages.reference_kv import write_reference_request

    resolved = [encode_resolved(c) for c in _resolved(concepts[:2])]
    reference_kv = kv_stage({"concept_set_id": ["abc"], "resolved": [resolved], "params": [json.dumps(PARAMS)]})["kv_path"][0]
    write_reference_request(tmp_path / "store" / "abc.request.json", "abc", resolved, PARAMS)
    write_reference_request(tmp_path / "store" / "bad.request.json", "bad", resolved, dict(PARAMS, height=60))
    gen_params = {"num_inference_steps": 2, "height": 64, "width": 64, "guidance_scale": 7.5, "negative_prompt": "bad"}
    own = tmp_path / "store" / "own" / "abc.safetensors"

    def unit(kv_path, request, seeds):
        group = {"kv_path": str(kv_path), "reference": str(request), "error": None, "params": gen_params,
                 "meta": {"concept_set_id": "abc"}}
        return json.dumps({"shard_id": 0, "groups": [group], "targets": [
            {"g": 0, "row": i, "id": f"r{i}", "key": f"r{i}-{s}", "prompt": "a red cube", "seed": s} for i, s in enumerate(seeds)]})

    stage = GenerateStage(str(tiny_model_dir), image_format="png", batch_size=2)
    first = stage({"shard_id": [0], "unit": [unit(own, tmp_path / "store" / "abc.request.json", [5, 6])]})
    assert first["reference_passes"] == [1] and own.is_file()
    again = stage({"shard_id": [1], "unit": [unit(own, tmp_path / "store" / "abc.request.json", [5, 6])]})
    assert again["reference_passes"] == [0] and again["result"] == first["result"]
    # the same images as from K/V a reference actor computed
    by_actor = stage({"shard_id": [0], "unit": [unit(reference_kv, tmp_path / "store" / "abc.request.json", [5, 6])]})
    assert by_actor["reference_passes"] == [0] and by_actor["result"] == first["result"]
    # a set whose K/V cannot be computed fails its targets (stage reference_kv), once per actor
    bad = stage({"shard_id": [2], "unit": [unit(tmp_path / "store" / "bad.safetensors", tmp_path / "store" / "bad.request.json", [1, 2])]})
    marker = json.loads(write_batch({k: bad[k] for k in ("shard_id", "result", "expected", "reference_passes")},
                                    out_dir=str(tmp_path / "out"))["marker"][0])
    assert marker["samples"] == 0 and [e["stage"] for e in marker["errors"]] == ["reference_kv"] * 2
    assert "height" in marker["errors"][0]["reason"]


def test_write_failure_leaves_nothing_under_a_final_name(tmp_path, monkeypatch):
    import errno

    import stages.write as write

    result = pack_result([("k-1", "png", b"\x89PNG fake", {"key": "k-1", "id": "k", "row": 0, "seed": 1, "prompt": "p",
                                                            "negative_prompt": "", "concept_set_id": "c", "width": 8,
                                                            "height": 8, "num_inference_steps": 1, "guidance_scale": 1.0})], [])
    real = write.atomic_write

    def full_disk(path, data):
        if path.suffix == ".parquet":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(write, "atomic_write", full_disk)
    marker = write_shard(tmp_path, 0, result, expected=1)
    assert marker["status"] == "write_failed" and "No space left" in marker["errors"][0]["reason"]
    assert not list((tmp_path / "shards").iterdir()) and not list((tmp_path / "_progress").iterdir())
    monkeypatch.setattr(write, "atomic_write", real)
    assert write_shard(tmp_path, 0, result, expected=1)["status"] == "complete"
    with tarfile.open(fileobj=io.BytesIO(result)) as tar:
        assert ERRORS_MEMBER in tar.getnames()
