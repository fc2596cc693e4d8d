"""pipeline.run planning: shard units store what a concept set shares once; rows share interned specs."""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.manifest import MANIFEST_SCHEMA, GenParams, validate_table
from pipeline.run import Target, _unit, group_key, sample_key
from stages.generate import decode_unit, expand_targets


def plan_shards(rows, samples_per_shard: int) -> list[list[Target]]:
    """The plan made over every validated row in memory: the reference RunPlan must equal."""
    first: dict[str, int] = {}
    for r in rows:
        first.setdefault(group_key(r), r.index)
    ordered = sorted(rows, key=lambda r: (first[group_key(r)], r.index))
    targets = [Target(r, s, sample_key(r.id, s)) for r in ordered for s in r.seeds]
    return [targets[i : i + samples_per_shard] for i in range(0, len(targets), samples_per_shard)]


def plan_digest(shards: list[list[Target]]) -> str:
    import hashlib

    h = hashlib.sha256()
    for n, shard in enumerate(shards):
        h.update(f"{n}:{','.join(t.key for t in shard)};".encode())
    return h.hexdigest()[:20]


def _table(n: int, *, sets: int = 2, guidance: dict | None = None) -> pa.Table:
    concept = [[{"image": f"images/p{s}.png", "prompt": f"product {s}", "mask": None, "weight": 3.0, "box": None,
                 "points": None, "label": None, "context": None}] for s in range(sets)]
    guidance = guidance or {}
    cols = {
        "id": [f"r{i}" for i in range(n)],
        "prompt": [f"product {i % sets} in scene {i}" for i in range(n)],
        "seeds": [[i, i + 1000] for i in range(n)],
        "concepts": [concept[i % sets] for i in range(n)],
        "guidance_scale": [guidance.get(i) for i in range(n)],
        "sku": [f"SKU-{i}" for i in range(n)],
    }
    fields = [MANIFEST_SCHEMA.field(c) for c in ("id", "prompt", "seeds", "concepts", "guidance_scale")]
    return pa.table(cols, schema=pa.schema([*fields, pa.field("sku", pa.string())]))


def _plan(table: pa.Table, per_shard: int):
    rows, problems = validate_table(table, defaults=GenParams(height=64, width=64, num_inference_steps=2),
                                    base_dir="/data", check_files=False)
    assert not problems
    shards = plan_shards(rows, per_shard)
    keys = {group_key(r) for r in rows}
    resolved = {k: {"concept_set_id": f"cs-{k[:6]}", "resolved": [{"image_path": "/data/p.png", "prompt": "p",
                                                                   "weight": 3.0, "mask_source": "alpha"}]}
                for k in keys}
    kv_paths = {r["concept_set_id"]: f"/out/_kv/{r['concept_set_id']}.safetensors" for r in resolved.values()}
    return rows, shards, resolved, kv_paths


def test_rows_share_interned_concepts_and_params():
    rows, *_ = _plan(_table(40), per_shard=1000)
    by_set = {}
    for r in rows:
        by_set.setdefault(r.concepts[0].image, []).append(r)
    assert len(by_set) == 2
    for same in by_set.values():
        assert all(r.concepts is same[0].concepts and r.params is same[0].params for r in same)


def test_unit_groups_expand_to_the_full_sample_metadata():
    table = _table(12, guidance={5: 4.0})
    rows, shards, resolved, kv_paths = _plan(table, per_shard=1000)
    (shard,) = shards
    unit = decode_unit(_unit(0, shard, resolved, kv_paths)["unit"])
    # 2 concept sets, one of them with a second parameter set (row 5's guidance scale)
    assert len(unit["groups"]) == 3
    expanded = expand_targets(unit)
    assert [t["key"] for t in expanded] == [t.key for t in shard]
    for t, planned in zip(expanded, shard, strict=True):
        r = planned.row
        meta = t["meta"]
        assert (meta["id"], meta["row"], meta["seed"], meta["prompt"]) == (r.id, r.index, planned.seed, r.prompt)
        assert meta["passthrough"] == {"sku": f"SKU-{r.index}"}
        assert meta["guidance_scale"] == t["params"]["guidance_scale"] == (4.0 if r.index == 5 else 7.5)
        assert meta["concept_set_id"] == resolved[group_key(r)]["concept_set_id"]
        assert t["kv_path"] == kv_paths[meta["concept_set_id"]] and t["error"] is None
        assert meta["shard"] == 0 and meta["mrsa"]["blocks"] == [5, 6]


def test_unit_size_per_target_does_not_carry_the_shared_metadata():
    """Adding targets of an existing set adds only their own fields (the driver holds every unit)."""
    def size(n):
        _, shards, resolved, kv_paths = _plan(_table(n), per_shard=10_000)
        raw = _unit(0, shards[0], resolved, kv_paths)["unit"]
        return len(json.dumps(decode_unit(raw), separators=(",", ":"))), len(raw)

    (json_200, raw_200), (json_400, raw_400) = size(200), size(400)
    per_target = (json_400 - json_200) / (2 * 200)  # two seeds per row
    assert per_target < 160, per_target
    # and the driver holds them compressed
    assert (raw_400 - raw_200) / (2 * 200) < per_target / 4, (raw_400, raw_200)


def test_targets_without_a_group_are_taken_as_they_are():
    t = {"key": "a-1", "id": "a", "row": 0, "seed": 1, "prompt": "x", "kv_path": "k", "error": None,
         "params": {}, "meta": {"id": "a", "custom": 1}}
    assert expand_targets({"shard_id": 0, "targets": [t]}) == [t]


def test_run_plan_equals_plan_shards_without_holding_rows():
    """The driver's streaming plan gives the same shards, order and digest as plan_shards over all rows."""
    from pipeline.manifest import ManifestValidation
    from pipeline.run import RunPlan

    table = _table(23, sets=3, guidance={4: 4.0, 9: 4.0})
    bad = table.to_pylist()
    bad[7]["seeds"] = []  # refused rows leave no targets
    bad[12]["id"] = bad[2]["id"]  # duplicate id
    table = pa.Table.from_pylist(bad, schema=table.schema)
    kwargs = dict(defaults=GenParams(height=64, width=64, num_inference_steps=2), base_dir="/data", check_files=False)
    rows, problems = validate_table(table, **kwargs)
    expected = plan_shards(rows, 5)
    plan = RunPlan(ManifestValidation(table, **kwargs), 5)
    assert [(p.index, p.field) for p in plan.problems] == [(p.index, p.field) for p in problems] == [(7, "seeds"), (12, "id")]
    assert plan.rows_valid == len(rows) == 21 and plan.n_shards == len(expected) and plan.samples == 42
    for n, shard in enumerate(expected):
        got = plan.shard(n)
        assert [t.key for t in got] == [t.key for t in shard] and plan.shard_size(n) == len(shard)
        assert [t.row for t in got] == [t.row for t in shard]
        groups = {group_key(t.row) for t in shard}
        assert {group_key(r) for r in plan.groups_of([n])} == groups
    assert plan.digest() == plan_digest(expected)
    assert len(plan.group_keys) == len({group_key(r) for r in rows}) == 3  # guidance does not change the K/V


def test_output_identity_of_runs_without_new_flags_is_unchanged():
    from pipeline.run import RunSettings

    plain = RunSettings(manifest="m.parquet", out="out").output_identity()
    assert "channels_last" not in plain  # folders written before the flag existed still resume
    assert "compile" not in plain
    assert RunSettings(manifest="m.parquet", out="out", channels_last=True).output_identity()["channels_last"] is True
    assert RunSettings(manifest="m.parquet", out="out", compile=True).output_identity()["compile"] is True


def test_a_row_that_re_reads_differently_fails_the_run_cleanly(monkeypatch, tmp_path):
    """ManifestValidation.rows refuses a row whose second reading differs; run() reports it as RunFailed."""
    import pyarrow.parquet as pq
    import pytest
    from PIL import Image

    from pipeline.manifest import ManifestValidation
    from pipeline.run import RunFailed, RunSettings, run

    Image.new("RGBA", (16, 16), (255, 0, 0, 255)).save(tmp_path / "p0.png")
    table = _table(2, sets=1)
    rows = table.to_pylist()
    for r in rows:
        r["concepts"][0]["image"] = "p0.png"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "m.parquet")
    validation = ManifestValidation(pq.read_table(tmp_path / "m.parquet"), base_dir=str(tmp_path),
                                    defaults=GenParams(height=64, width=64, num_inference_steps=2))
    assert [spec is not None for _, spec, _ in validation] == [True, True]
    monkeypatch.setattr(validation.checker, "row", lambda index, row, fail: fail("prompt", "changed"))
    with pytest.raises(RuntimeError, match="re-reading a validated row"):
        validation.rows([0])

    def changed(self, indices):
        raise RuntimeError("row 0: re-reading a validated row gave other results")

    monkeypatch.setattr(ManifestValidation, "rows", changed)
    monkeypatch.setattr("pipeline.plan.ensure_ray", lambda address: None)
    monkeypatch.setattr("pipeline.plan.actor_pool_size", lambda resources, n: 1)
    monkeypatch.setattr("pipeline.run._prepare", lambda *a, **k: ({}, {}, {}, 0))
    settings = RunSettings(manifest=str(tmp_path / "m.parquet"), out=str(tmp_path / "out"),
                           defaults=GenParams(height=64, width=64, num_inference_steps=2))
    with pytest.raises(RunFailed, match="inputs changed during the run"):
        run(settings)
