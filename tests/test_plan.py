"""Planning (pipeline.shards): shards, concept groups, work units; rows share interned specs."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.shards import ConceptSets, RunPlan, group_key, work_unit
from pipeline.validate import ManifestValidation, validate_table
from stages.errors import ErrorRecord
from stages.generation.units import WorkUnit, sample_key
from stages.params import GenParams


def plan_shards(rows, samples_per_shard: int) -> list[list[tuple]]:
    """The plan made over every validated row in memory, as (row, seed): the reference RunPlan must equal."""
    first: dict[str, int] = {}
    for r in rows:
        first.setdefault(group_key(r), r.index)
    ordered = sorted(rows, key=lambda r: (first[group_key(r)], r.index))
    targets = [(r, s) for r in ordered for s in r.seeds]
    return [targets[i : i + samples_per_shard] for i in range(0, len(targets), samples_per_shard)]


def plan_digest(shards: list[list[tuple]]) -> str:
    h = hashlib.sha256()
    for n, shard in enumerate(shards):
        h.update(f"{n}:{','.join(sample_key(r.id, s) for r, s in shard)};".encode())
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
    sets = ConceptSets()
    for k in {group_key(r) for r in rows}:
        sets.add({"key": k, "concept_set_id": f"cs-{k[:6]}", "kv_path": f"/out/_kv/cs-{k[:6]}.safetensors",
                  "resolved": [{"image_path": "/data/p.png", "prompt": "p", "weight": 3.0, "mask_source": "alpha"}]})
    return rows, shards, sets


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
    rows, shards, sets = _plan(table, per_shard=1000)
    (shard,) = shards
    unit = WorkUnit.decode(work_unit(0, shard, sets).encode())
    # 2 concept sets, one of them with a second parameter set (row 5's guidance scale)
    assert len(unit.groups) == 3
    assert [t.key for t in unit.targets] == [sample_key(r.id, s) for r, s in shard]
    for t, (r, seed) in zip(unit.targets, shard, strict=True):
        meta, group = unit.sample_meta(t), unit.groups[t.group]
        assert (meta["id"], meta["row"], meta["seed"], meta["prompt"]) == (r.id, r.index, seed, r.prompt)
        assert meta["passthrough"] == {"sku": f"SKU-{r.index}"}
        assert group.params == r.params
        assert meta["guidance_scale"] == group.params.guidance_scale == (4.0 if r.index == 5 else 7.5)
        assert meta["concept_set_id"] == sets.resolved[group_key(r)]["concept_set_id"]
        assert group.kv_path == sets.kv[meta["concept_set_id"]] and group.error is None
        assert meta["shard"] == 0 and meta["mrsa"]["blocks"] == [5, 6]
        assert meta["concepts"] == [{"image": "/data/p.png", "image_digest": None, "prompt": "p", "weight": 3.0,
                                     "mask_source": "alpha", "mask_digest": None, "composite": None}]


def test_a_failed_concept_set_fails_its_group_with_the_stage_error():
    table = _table(4)
    rows, shards, sets = _plan(table, per_shard=1000)
    failed = group_key(rows[1])
    sets.add({"key": failed, "concept_set_id": None, "resolved": [], "error_stage": "segment",
              "error_field": "concepts[0].mask", "error_reason": "mask is empty"})
    unit = WorkUnit.decode(work_unit(0, shards[0], sets).encode())
    errors = {unit.groups[t.group].error for t in unit.targets}
    assert errors == {None, ErrorRecord("segment", "concepts[0].mask", "mask is empty")}
    # a concept set whose K/V failed keeps its metadata; its group carries the reference_kv error, unless
    # another group of the same set got its K/V (same content reached through other paths)
    ok = group_key(rows[0])
    kv_failed = dict(sets.resolved[ok], kv_path="", error_stage="reference_kv", error_field="concepts",
                     error_reason="ValueError: boom")
    sets.add(kv_failed)
    assert work_unit(0, shards[0], sets).groups[0].error is None
    sets.kv.pop(sets.resolved[ok]["concept_set_id"])
    sets.add(kv_failed)
    group = work_unit(0, shards[0], sets).groups[0]
    assert group.error == ErrorRecord("reference_kv", "concepts", "ValueError: boom") and group.kv_path is None
    assert group.meta["concept_set_id"] == sets.resolved[ok]["concept_set_id"]


def test_unit_size_per_target_does_not_carry_the_shared_metadata():
    """Adding targets of an existing set adds only their own fields (the driver holds every unit)."""
    def size(n):
        _, shards, sets = _plan(_table(n), per_shard=10_000)
        raw = work_unit(0, shards[0], sets).encode()
        return len(__import__("zlib").decompress(raw)), len(raw)

    (json_200, raw_200), (json_400, raw_400) = size(200), size(400)
    per_target = (json_400 - json_200) / (2 * 200)  # two seeds per row
    assert per_target < 160, per_target
    # and the driver holds them compressed
    assert (raw_400 - raw_200) / (2 * 200) < per_target / 4, (raw_400, raw_200)


def test_run_plan_equals_plan_shards_without_holding_rows():
    """The driver's streaming plan gives the same shards, order and digest as plan_shards over all rows."""
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
        assert [(r.id, s) for r, s in got] == [(r.id, s) for r, s in shard] and plan.shard_size(n) == len(shard)
        assert [r for r, _ in got] == [r for r, _ in shard]
        groups = {group_key(r) for r, _ in shard}
        assert {group_key(r) for r in plan.groups_of([n])} == groups
    assert plan.digest() == plan_digest(expected)
    assert len(plan.group_keys) == len({group_key(r) for r in rows}) == 3  # guidance does not change the K/V


def test_output_identity_of_runs_without_new_flags_is_unchanged():
    from pipeline.settings import RunSettings

    plain = RunSettings(manifest="m.parquet", out="out").output_identity()
    assert "channels_last" not in plain  # folders written before the flag existed still resume
    assert "compile" not in plain
    assert RunSettings(manifest="m.parquet", out="out", channels_last=True).output_identity()["channels_last"] is True
    assert RunSettings(manifest="m.parquet", out="out", compile=True).output_identity()["compile"] is True
    assert "save_attention" not in plain
    assert RunSettings(manifest="m.parquet", out="out", save_attention=True).output_identity()["save_attention"] is True


def test_a_row_that_re_reads_differently_is_refused(tmp_path):
    """ManifestValidation.rows refuses a row whose second reading differs (a run never re-reads: each
    file's plan holds its validated rows, pipeline.part_plan)."""
    import pyarrow.parquet as pq
    import pytest
    from PIL import Image

    Image.new("RGBA", (16, 16), (255, 0, 0, 255)).save(tmp_path / "p0.png")
    table = _table(2, sets=1)
    rows = table.to_pylist()
    for r in rows:
        r["concepts"][0]["image"] = "p0.png"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "m.parquet")
    validation = ManifestValidation(pq.read_table(tmp_path / "m.parquet"), base_dir=str(tmp_path),
                                    defaults=GenParams(height=64, width=64, num_inference_steps=2))
    assert [spec is not None for _, spec, _ in validation] == [True, True]
    validation.checker.row = lambda index, row, fail: fail("prompt", "changed")
    with pytest.raises(RuntimeError, match="re-reading a validated row"):
        validation.rows([0])
