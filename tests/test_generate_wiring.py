"""The generation and reference stages wired to the engine's refusals and to per-group LoRA sets.

- a concept whose mask no token grid sees is its row's error on ``concepts[i].mask``;
- the generation stage hands ``generate`` the ``reference_seed`` of the row, so K/V computed with
  another one are refused (the target's error), never used;
- groups with different LoRA sets render apart, each with its own weights and fingerprint; a LoRA
  that does not load fails its group's targets on ``loras[i].path`` and the others render.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from stages.generation.generate import GenerateStage
from stages.generation.units import Group, Target, WorkUnit, group_meta
from stages.inputs.concepts import ResolvedConcept
from stages.params import GenParams
from stages.reference.reference_kv import ReferenceKVStage, ReferenceRequest
from tests.model_variants import write_random_lora

GEN = GenParams(num_inference_steps=2, height=64, width=64)


def _resolved(concepts) -> list[dict]:
    out = []
    for c in concepts:
        mask = np.asarray(c.mask.resize(c.image.size).convert("L")) >= 128
        out.append(ResolvedConcept(image=c.image, mask=mask, prompt=c.prompt, weight=c.weight, mask_source="file",
                                   image_digest="d" * 64, mask_digest="m" * 64).to_row())
    return out


@pytest.fixture(scope="module")
def stage(tiny_model_dir):
    return GenerateStage(str(tiny_model_dir), image_format="png", batch_size=2)


def _group(params: GenParams, kv_path, request=None) -> Group:
    return Group(params=params, meta=group_meta(params, shard_id=0, concept_set_id="s", concepts=[]),
                 kv_path=str(kv_path), reference=str(request) if request else None)


def _request(tmp_path, name: str, resolved, params: GenParams):
    path = tmp_path / f"{name}.request.json"
    path.write_bytes(ReferenceRequest(name, resolved, params).to_json())
    return path


def test_too_small_a_concept_is_a_row_error_on_its_mask(tiny_model_dir, concepts, tmp_path):
    speck = np.zeros((96, 96), dtype=bool)
    speck[2, 2] = True  # one pixel that no token grid of a 64x64 image samples
    resolved = _resolved(concepts[:1])
    resolved.append(dict(_resolved(concepts[1:2])[0], mask_png=ResolvedConcept(
        image=concepts[1].image, mask=speck, prompt="x", weight=1.0, mask_source="file", image_digest="",
        mask_digest="").to_row()["mask_png"]))
    stage = ReferenceKVStage(str(tiny_model_dir), store_dir=str(tmp_path / "store"))
    out = stage({"concept_set_id": ["tiny"], "resolved": [resolved], "gen_params": [json.dumps(GEN.to_row())]})
    assert list(out["error_field"]) == ["concepts[1].mask"] and list(out["error_stage"]) == ["reference_kv"]
    assert "covers no token of any MRSA layer" in out["error_reason"][0] and out["kv_path"][0] == ""


def test_a_reference_seed_other_than_the_kvs_is_refused(stage, concepts, tmp_path):
    resolved = _resolved(concepts[:1])
    seeded = GenParams(num_inference_steps=2, height=64, width=64, reference_seed=5)
    kv = tmp_path / "s.safetensors"
    ok = WorkUnit(0, [_group(GEN, kv, _request(tmp_path, "s", resolved, GEN))],
                  [Target(group=0, row=0, id="a", key="a-1", prompt="a cube", seed=1)])
    assert json.loads(stage({"shard_id": [0], "unit": [ok.encode()]})["errors"][0]) == []
    # the K/V file of reference_seed 0, handed to a group whose rows ask for 5 (a stale or mixed-up store)
    wrong = WorkUnit(1, [_group(seeded, kv)], [Target(group=0, row=0, id="b", key="b-1", prompt="a cube", seed=1)])
    errors = json.loads(stage({"shard_id": [1], "unit": [wrong.encode()]})["errors"][0])
    assert len(errors) == 1 and "reference_seed=5 differs" in errors[0]["reason"]


def test_groups_with_other_lora_sets_render_apart(stage, tiny_model_dir, concepts, tmp_path):
    lora = write_random_lora(tiny_model_dir, tmp_path / "lora", seed=1)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a LoRA")
    resolved = _resolved(concepts[:1])
    with_lora = GenParams(num_inference_steps=2, height=64, width=64, loras=[(str(lora), 0.3)])
    with_broken = GenParams(num_inference_steps=2, height=64, width=64, loras=[(str(lora), 1.0), (str(broken), 1.0)])
    groups = [_group(GEN, tmp_path / "plain.safetensors", _request(tmp_path, "plain", resolved, GEN)),
              _group(with_lora, tmp_path / "lora.safetensors", _request(tmp_path, "lora", resolved, with_lora)),
              _group(with_broken, tmp_path / "broken_kv.safetensors", _request(tmp_path, "b", resolved, with_broken))]
    targets = [Target(group=g, row=g, id=f"r{g}", key=f"r{g}-1", prompt="a cube", seed=1) for g in (1, 0, 2)]
    out = stage({"shard_id": [0], "unit": [WorkUnit(0, groups, targets).encode()]})
    metas = {m["id"]: m for m in json.loads(out["metas"][0])}
    errors = json.loads(out["errors"][0])
    assert set(metas) == {"r0", "r1"} and [e["id"] for e in errors] == ["r2"]
    assert errors[0]["field"] == "loras[1].path" and "broken.safetensors" in errors[0]["reason"]
    assert metas["r1"]["loras"] == [{"path": str(lora), "scale": 0.3}] and "loras" not in metas["r0"]
    assert metas["r0"]["model"]["fingerprint"] == stage.model_meta["fingerprint"] != metas["r1"]["model"]["fingerprint"]
    assert metas["r0"]["model"]["source"] == {"kind": "folder", "name": str(tiny_model_dir)}
    # the same unit again, groups in another order: the same bytes (the adapter set follows the group)
    again = stage({"shard_id": [0], "unit": [WorkUnit(0, groups, targets[::-1]).encode()]})
    images = {m["id"]: m for m in json.loads(again["metas"][0])}
    assert {k: v["model"]["fingerprint"] for k, v in images.items()} == {
        k: v["model"]["fingerprint"] for k, v in metas.items()}
    # a group without adapters after one with: the base weights again
    plain_only = WorkUnit(0, groups[:1], [Target(group=0, row=0, id="r0", key="r0-1", prompt="a cube", seed=1)])
    alone = stage({"shard_id": [0], "unit": [plain_only.encode()]})
    assert json.loads(alone["metas"][0])[0]["model"]["fingerprint"] == stage.model_meta["fingerprint"]
