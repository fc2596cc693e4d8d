"""A manifest as a folder, a glob or a prefix of Parquet files (pipeline.manifest_files.ManifestSource), planned
file by file (pipeline.part_plan), and a manifest folder that grows between runs (pipeline.layout)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.manifest import MANIFEST_SCHEMA, ManifestError
from pipeline.manifest_files import ManifestSource, manifest_base_dir, read_manifest
from pipeline.part_plan import Checks, PartRecord, part_ids, plan_file, plan_part, shard_unit
from pipeline.shards import ConceptSets, group_key, work_unit
from pipeline.validate import validate_table
from stages.params import GenParams, Limits
from tests.test_plan import _plan, _table

runner = CliRunner()
SMALL = GenParams(height=64, width=64, num_inference_steps=2)


def _rows(ids: list[str], image: str = "p.png", *, prompt: str = "scene", seeds: tuple = (7, 8),
          extra: dict | None = None) -> pa.Table:
    concept = [{"image": str(image), "prompt": "a hat", "mask": None, "weight": 3.0, "box": None, "points": None,
                "label": None, "context": None}]
    columns = {"id": ids, "prompt": [f"{prompt} {i}" for i in ids], "seeds": [list(seeds)] * len(ids),
               "concepts": [concept] * len(ids)}
    fields = [MANIFEST_SCHEMA.field(n) for n in ("id", "prompt", "seeds", "concepts")]
    for name, values in (extra or {}).items():
        columns[name] = values
        fields.append(pa.field(name, pa.string()))
    return pa.table(columns, schema=pa.schema(fields))


def _write(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_a_folder_lists_its_parquet_files_with_hive_partitions_and_skips_bookkeeping(tmp_path):
    root = tmp_path / "catalog"
    _write(root / "category=hats" / "part-1.parquet", _rows(["h1", "h2"]))
    _write(root / "category=mugs%20big" / "region=eu" / "part-0.parquet", _rows(["m1"]))
    _write(root / "_temporary" / "0" / "part-9.parquet", _rows(["junk"]))  # a Spark job's leftovers
    (root / "_SUCCESS").write_text("")
    (root / "category=hats" / ".part-1.parquet.crc").write_text("x")
    source = ManifestSource.open(str(root))
    assert [p.name for p in source.parts] == [
        "category=hats/part-1.parquet",
        "category=mugs%20big/region=eu/part-0.parquet",
    ]
    assert source.parts[1].partitions == (("category", "mugs big"), ("region", "eu"))
    table = read_manifest(str(root))
    assert table.column("id").to_pylist() == ["h1", "h2", "m1"]
    assert table.column("category").to_pylist() == [
        "hats",
        "hats",
        "mugs big",
    ]  # strings, as in the folder name
    assert table.column("region").to_pylist() == [None, None, "eu"]
    assert source.base_dir == str(root) == manifest_base_dir(str(root))


def test_a_glob_and_a_file_name_exactly_their_files(tmp_path):
    _write(tmp_path / "m" / "a" / "x.parquet", _rows(["a1"]))
    _write(tmp_path / "m" / "b" / "x.parquet", _rows(["b1"]))
    _write(tmp_path / "m" / "b" / "y.parquet", _rows(["b2"]))
    glob = ManifestSource.open(str(tmp_path / "m" / "*" / "x.parquet"))
    assert [p.name for p in glob.parts] == ["a/x.parquet", "b/x.parquet"]
    assert glob.base_dir == str(tmp_path / "m") == manifest_base_dir(str(tmp_path / "m" / "*" / "x.parquet"))
    deep = ManifestSource.open(str(tmp_path / "m" / "**.parquet"))
    assert [p.name for p in deep.parts] == ["a/x.parquet", "b/x.parquet", "b/y.parquet"]
    one = ManifestSource.open(str(tmp_path / "m" / "b" / "y.parquet"))
    assert [p.name for p in one.parts] == ["y.parquet"] and one.base_dir == str(tmp_path / "m" / "b")
    with pytest.raises(ManifestError, match="no \\*.parquet file"):
        ManifestSource.open(str(tmp_path / "m" / "*" / "z.parquet"))


def test_a_partition_named_like_a_column_is_refused(tmp_path):
    _write(tmp_path / "m" / "prompt=x" / "p.parquet", _rows(["a"]))
    with pytest.raises(ManifestError, match="'prompt' is both in the file and a hive partition"):
        read_manifest(str(tmp_path / "m"))


def test_part_plan_equals_the_in_memory_plan_unit_for_unit(tmp_path):
    """A file planned by plan_part (written to its plan file, read back per shard) gives the same work
    units, byte for byte, as the plan made over every validated row held in memory."""
    table = _table(41, sets=3, guidance={5: 4.0, 6: 4.0})
    _write(tmp_path / "m" / "a.parquet", table)
    (part,) = ManifestSource.open(str(tmp_path / "m")).parts
    record = PartRecord(part.name, part.digest(), part.size, row_base=0, shard_base=0)
    checks = Checks(defaults=SMALL, base_dir="/data", check_files=False, samples_per_shard=7)
    out = str(tmp_path / "out")
    part_ids(part, record, out)
    summary = plan_part(part, record, checks, out, [])
    rows, shards, sets = _plan(table, 7)
    assert summary["shards"] == len(shards) == 12 and summary["samples"] == 82
    assert [g["key"] for g in summary["groups"]] == list(dict.fromkeys(group_key(r) for r in rows))
    for n, shard in enumerate(shards):
        assert (
            shard_unit(n, n, str(tmp_path / "out" / plan_file(record)), sets).encode()
            == work_unit(n, shard, sets).encode()
        ), n


def test_an_id_an_earlier_file_used_is_refused_naming_that_file(tmp_path):
    _write(tmp_path / "m" / "a.parquet", _rows(["x", "y"]))
    _write(tmp_path / "m" / "b.parquet", _rows(["z", "y", "z"]))
    result = runner.invoke(app, ["validate", str(tmp_path / "m"), "--json"])
    answer = json.loads(result.stdout)
    assert result.exit_code == 1 and answer["rows"] == 5 and answer["valid"] == 0  # p.png is not there
    dupes = [p for p in answer["problems"] if p["field"] == "id"]
    assert [(p["row"], p["reason"]) for p in dupes] == [
        (3, "duplicate id 'y': already used by row 1 (a.parquet)"),
        (4, "duplicate id 'z': already used by row 2"),
    ]


def test_plan_part_refuses_ids_of_earlier_files_and_numbers_rows_after_them(tmp_path):
    from PIL import Image

    Image.new("RGBA", (16, 16), (255, 0, 0, 255)).save(tmp_path / "p.png")
    a = _write(tmp_path / "a.parquet", _rows(["x", "y"], image=str(tmp_path / "p.png")))
    b = _write(tmp_path / "b.parquet", _rows(["z", "y"], image=str(tmp_path / "p.png")))
    out = str(tmp_path / "out")
    (pa_,), (pb,) = ManifestSource.open(str(a)).parts, ManifestSource.open(str(b)).parts
    ra = PartRecord(pa_.name, pa_.digest(), pa_.size, row_base=0, shard_base=0)
    rb = PartRecord(pb.name, pb.digest(), pb.size, row_base=2, shard_base=3)
    checks = Checks(defaults=SMALL, samples_per_shard=3)
    for p, r in ((pa_, ra), (pb, rb)):
        part_ids(p, r, out)
    plan_part(pa_, ra, checks, out, [])
    summary = plan_part(pb, rb, checks, out, [(ra, pa_.location)])
    assert summary["rows_valid"] == 1 and summary["samples"] == 2
    plan = pq.read_table(Path(out) / plan_file(rb))
    assert plan.column("row").to_pylist() == [2] and plan.column("id").to_pylist() == ["z"]
    errors = pq.read_table(Path(out) / "_plan" / f"{rb.key}.errors.parquet").to_pylist()
    assert [(e["row"], e["id"], e["reason"]) for e in errors] == [
        (3, "y", "duplicate id 'y': already used by row 1 (a.parquet)")
    ]
    unit = shard_unit(3, 0, str(Path(out) / plan_file(rb)), ConceptSets())
    assert [t.key for t in unit.targets] == ["z-7", "z-8"] and unit.shard_id == 3


def test_validated_rows_are_numbered_across_files(tmp_path):
    _write(tmp_path / "m" / "a.parquet", _rows(["a"]))
    _write(tmp_path / "m" / "b.parquet", _rows(["b", ""]))
    _, problems = validate_table(read_manifest(str(tmp_path / "m")), check_files=False)
    assert [(p.index, p.field) for p in problems] == [(2, "id")]


# --------------------------------------------------------------------------- a manifest folder that grows


def _hat_rows(ids: list[str], hat: Path, prompt: str = "a hat in scene", extra: dict | None = None) -> pa.Table:
    return _rows(ids, hat, prompt=prompt, seeds=(3,), extra=extra)


def _state(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.parts[len(out.parts)] in ("shards", "_progress")
    }


def _keys(out: Path) -> list[str]:
    return sorted(
        k for p in sorted((out / "shards").glob("*.parquet")) for k in pq.read_table(p)["key"].to_pylist()
    )


@pytest.mark.slow
def test_a_growing_manifest_folder_renders_only_what_changed(tmp_path, tiny_model_dir, ray_session):
    from pipeline.examples import draw_example_images
    from pipeline.run import run
    from pipeline.settings import RunSettings

    hat = draw_example_images(tmp_path / "images")["hat"]
    folder, out = tmp_path / "catalog", tmp_path / "out"
    _write(folder / "a.parquet", _hat_rows(["a0", "a1", "a2"], hat))
    _write(folder / "z-empty.parquet", _hat_rows([], hat))  # Spark and duckdb write empty part files: no rows, no error
    settings = RunSettings(
        manifest=str(folder),
        out=str(out),
        model=str(tiny_model_dir),
        defaults=SMALL,
        samples_per_shard=2,
        device="cpu",
        scheduler="DDIMScheduler",
    )

    first = run(settings)
    assert first.exit_code == 0 and first.stats["shards"] == 2
    night1 = _state(out)

    # a new file: its rows only, into a new shard after a's; a's shards and markers untouched
    _write(folder / "b.parquet", _hat_rows(["b0", "a1"], hat))  # a1 is a's: refused in b
    second = run(settings)
    assert second.stats["samples_generated_this_run"] == 1 and second.stats["shards_pending_before_run"] == 1
    assert {k: v for k, v in _state(out).items() if k in night1} == night1
    assert sorted(set(_state(out)) - set(night1)) == [
        "_progress/00002.json",
        "shards/00002.parquet",
        "shards/00002.tar",
    ]
    assert _keys(out) == ["a0-3", "a1-3", "a2-3", "b0-3"]
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [(e["id"], e["row"], e["reason"]) for e in errors] == [
        ("a1", 4, "duplicate id 'a1': already used by row 1 (a.parquet)")
    ]
    assert second.exit_code == 1  # the refused row

    # a changed file: its shards go and it is rendered again under new numbers; b's shard stays
    after_b = _state(out)
    _write(folder / "a.parquet", _hat_rows(["a0", "a1", "a2"], hat, prompt="a hat at dusk"))
    # a rerun that breaks off after its first shard (the driver stops, as a killed or preempted one does)
    # leaves a folder that reads as unfinished: no _stats.json of the last run over shards now gone
    assert (out / "_stats.json").exists()

    written = []

    def stop(marker, *_):
        written.append(marker["samples"])
        raise KeyboardInterrupt("the night's deadline")

    with pytest.raises(KeyboardInterrupt):
        run(settings, on_shard=stop)
    assert not (out / "_stats.json").exists() and (out / "_run.json").exists()
    third = run(settings)  # resumes: what the broken run wrote is kept (its first shard at least)
    assert len(written) == 1 and third.stats["samples_generated_this_run"] <= 3 - written[0]
    assert third.stats["complete"] is False and third.exit_code == 1  # b's refused row, as before
    state = _state(out)
    assert not any(
        k.startswith(("shards/00000", "shards/00001", "_progress/00000", "_progress/00001")) for k in state
    )
    assert {k: v for k, v in state.items() if "00002" in k} == {
        k: v for k, v in after_b.items() if "00002" in k
    }
    assert _keys(out) == ["a0-3", "a1-3", "a2-3", "b0-3"]
    meta = json.loads(pq.read_table(out / "shards" / "00003.parquet")["metadata"][0].as_py())
    assert meta["prompt"].startswith("a hat at dusk") and meta["row"] == 5  # rows numbered after b's (a: 0-2, b: 3-4)

    # a file gone: its shard goes; a file that adds a pass-through column finished shards lack: refused
    (folder / "b.parquet").unlink()
    fourth = run(settings)
    assert fourth.exit_code == 0 and fourth.stats["samples_generated_this_run"] == 0
    assert _keys(out) == ["a0-3", "a1-3", "a2-3"] and not (out / "shards" / "00002.tar").exists()
    _write(folder / "c.parquet", _hat_rows(["c0"], hat, extra={"sku": ["S-1"]}))
    from stages.output.folder import OutputRefused

    with pytest.raises(OutputRefused, match="pass-through columns"):
        run(settings)


def test_a_large_file_is_planned_in_fixed_pieces_read_across_row_groups(tmp_path):
    from pipeline.manifest_files import ManifestPart, pieces

    assert pieces(10, 4) == [(0, 4), (4, 8), (8, 10)] and pieces(4, 4) == [None] and pieces(0, 4) == [None]
    table = _rows([f"r{i}" for i in range(10)])
    path = tmp_path / "m.parquet"
    pq.write_table(table, path, row_group_size=3)  # pieces cut through row groups
    part = ManifestSource.open(str(path)).parts[0]
    for start, stop in pieces(10, 4):
        piece = ManifestPart(part.name, part.location, part.size, rows=(start, stop))
        assert piece.read().column("id").to_pylist() == [f"r{i}" for i in range(start, stop)]
        assert piece.read(columns=["id"]).column("id").to_pylist() == [f"r{i}" for i in range(start, stop)]


@pytest.mark.slow
def test_a_file_in_pieces_renders_exactly_the_samples_of_the_whole_file(tmp_path, tiny_model_dir, ray_session,
                                                                         monkeypatch):
    import pipeline.manifest_files as manifest_files
    from pipeline.examples import draw_example_images
    from pipeline.run import run
    from pipeline.settings import RunSettings

    hat = draw_example_images(tmp_path / "images")["hat"]
    ids = [f"r{i}" for i in range(10)] + ["r2"]  # the last row's id is piece 0's: refused, naming its row
    manifest = _write(tmp_path / "catalog" / "m.parquet", _hat_rows(ids, hat))

    def settings(out):
        return RunSettings(manifest=str(manifest), out=str(tmp_path / out), model=str(tiny_model_dir), defaults=SMALL,
                           samples_per_shard=2, device="cpu", scheduler="DDIMScheduler")

    whole = run(settings("whole")).stats
    monkeypatch.setattr(manifest_files, "PIECE_ROWS", 4)
    cut = run(settings("pieces")).stats
    records = json.loads((tmp_path / "pieces" / "_run.json").read_text())["manifest"]["files"]
    assert [r["piece"] for r in records] == [[0, 4], [4, 8], [8, 11]]
    assert [r["row_base"] for r in records] == [0, 4, 8] and {r["name"] for r in records} == {"m.parquet"}
    assert cut["files"] == whole["files"] == 1 and cut["rows"] == whole["rows"] == 11
    assert cut["samples_written"] == whole["samples_written"] == 10 and cut["rows_failed"] == whole["rows_failed"] == 1
    assert _keys(tmp_path / "pieces") == _keys(tmp_path / "whole")  # every sample exactly once
    # every shard written: the run's K/V store goes, also where a piece planned in the render stream (its last,
    # with the refused row) had numbers set aside for more shards than it got
    assert not (tmp_path / "whole" / "_kv").exists() and not (tmp_path / "pieces" / "_kv").exists()

    def metas(out):  # each sample's metadata but where it sits
        return {m["key"]: {k: v for k, v in m.items() if k != "shard"} for p in sorted((tmp_path / out / "shards").glob(
            "*.parquet")) for m in map(json.loads, pq.read_table(p)["metadata"].to_pylist())}

    assert metas("pieces") == metas("whole")
    errors = pq.read_table(tmp_path / "pieces" / "errors.parquet").to_pylist()
    assert [(e["id"], e["row"]) for e in errors] == [("r2", 10)] and "already used by row 2" in errors[0]["reason"]
    # a rerun: every piece kept, nothing rendered
    again = run(settings("pieces")).stats
    assert again["shards_pending_before_run"] == 0 and again["samples_generated_this_run"] == 0


def test_earlier_files_are_one_shared_list_not_a_copy_per_piece():
    import pickle

    from pipeline.plan_tasks import EarlierFiles

    chain = [(PartRecord(name=f"f{i}", sha256="0" * 64, size=1, row_base=i, shard_base=i), f"/m/f{i}") for i in range(5)]
    earlier = EarlierFiles(chain, 2)  # two kept files, then three new ones
    assert len(earlier) == 3 and [len(e) for e in earlier] == [2, 3, 4] and earlier[1] == chain[:3]
    picked = earlier.select([2, 0])  # the jobs planned in the stream: new files 2 and 0
    assert len(picked) == 2 and picked[0] == chain[:4] and picked[1] == chain[:2]
    assert list(zip([None, None], picked.select([1]), strict=False))[0][1] == chain[:2]
    # what a planning task is sent grows with the files, not with their square (a prefix list per job)
    chain = [(PartRecord(name=f"f{i}", sha256="0" * 64, size=1, row_base=i, shard_base=i), f"/m/f{i}")
             for i in range(1000)]
    shared = len(pickle.dumps(EarlierFiles(chain, 0).select(list(range(1000)))))
    assert shared < 1.2 * len(pickle.dumps(chain)) and shared * 4 < len(pickle.dumps([chain[:i] for i in range(1000)]))


def _plan_one(folder: Path, out: Path) -> tuple[dict, dict, PartRecord]:
    """Steps 1 and 2 of a run's planning for the one file in ``folder``: its ids' summary, its plan's."""
    (part,) = ManifestSource.open(str(folder)).parts
    record = PartRecord(part.name, part.digest(), part.size, row_base=0, shard_base=0)
    info = part_ids(part, record, str(out), Limits())
    checks = Checks(defaults=SMALL, base_dir="/data", check_files=False, samples_per_shard=4)
    return info, plan_part(part, record, checks, str(out), []), record


def test_an_empty_file_of_a_folder_plans_no_row_and_the_run_starts(tmp_path):
    """Spark and duckdb write empty part files: such a file plans nothing (no error), while a manifest
    with no row in any file is still refused as a whole."""
    folder = tmp_path / "m"
    schema = _rows(["x"]).schema
    _write(folder / "part-1.parquet", schema.empty_table())
    info, summary, _ = _plan_one(folder, tmp_path / "out")
    assert info["targets"] == 0 and summary["rows_valid"] == 0 and summary["shards"] == 0
    from pipeline.layout import reconcile

    source = ManifestSource.open(str(folder))
    with pytest.raises(ManifestError, match="the manifest has no rows"):
        reconcile(None, source, source.digests(), finished=False)
    _write(folder / "part-0.parquet", _rows(["x", "y"]))
    source = ManifestSource.open(str(folder))
    change = reconcile(None, source, source.digests(), finished=False)
    assert [r.rows for _, r in change.new] == [2, 0]


@pytest.mark.parametrize(
    ("column", "values", "field"),
    [
        ("height", pa.array([64, 2**64 - 1, 64], pa.uint64()), "height"),  # a uint64 above int64: the row alone
        ("seeds", pa.nulls(3), "seeds"),  # a null-typed column (every value null): each row refused
        ("id", pa.nulls(3), "id"),
    ],
)
def test_planning_reads_any_column_type_the_schema_accepts_and_refuses_rows_not_the_file(tmp_path, column, values,
                                                                                         field):
    table = _rows(["a", "b", "c"])
    table = table.set_column(table.column_names.index(column), column, values) if column in table.column_names \
        else table.append_column(column, values)
    _write(tmp_path / "m" / "a.parquet", table)
    info, summary, record = _plan_one(tmp_path / "m", tmp_path / "out")
    errors = pq.read_table(tmp_path / "out" / "_plan" / f"{record.key}.errors.parquet")
    refused = [(e["row"], e["field"]) for e in errors.to_pylist()]
    if column == "height":
        assert info["shape"]["height"] == 64 and info["targets"] == 6
        assert refused == [(1, "height")] and summary["rows_valid"] == 2
    else:
        assert summary["rows_valid"] == 0 and {f for _, f in refused} == {field}
        assert sorted({r for r, _ in refused}) == [0, 1, 2]


def test_each_planned_row_keeps_its_own_parameters_when_the_caches_let_go_of_them(tmp_path, monkeypatch):
    """Rows with per-row parameters (a guidance scale each): the validator keeps 4,096 parameter sets and
    the group keys' cache 65,536 (bounded at 16 here, so a test need not plan 70,000 rows); what they let
    go of is freed, and a new parameter set may take its address. Every plan row has its own values."""
    import functools

    import pipeline.shards as shards

    monkeypatch.setattr(shards, "_group_key", functools.lru_cache(maxsize=16)(shards._group_key.__wrapped__))
    n = 9000
    scales = [1.0 + i * 0.001 for i in range(n)]
    _write(tmp_path / "m" / "a.parquet", _rows([f"r{i}" for i in range(n)], seeds=(0,)).append_column(
        MANIFEST_SCHEMA.field("guidance_scale"), pa.array(scales, MANIFEST_SCHEMA.field("guidance_scale").type)))
    _, summary, record = _plan_one(tmp_path / "m", tmp_path / "out")
    assert summary["rows_valid"] == n
    plan = pq.read_table(tmp_path / "out" / plan_file(record))
    wrong = [(r, scales[r], json.loads(p)["guidance_scale"]) for r, p in
             zip(plan.column("row").to_pylist(), plan.column("params").to_pylist(), strict=True)
             if json.loads(p)["guidance_scale"] != scales[r]]
    assert not wrong, wrong[:5]


def test_a_pass_through_column_may_change_type_once_no_finished_shard_keeps_the_old_one(tmp_path):
    from pipeline.layout import reconcile

    def planned(folder: Path):
        source = ManifestSource.open(str(folder))
        change = reconcile(None, source, source.digests(), finished=False)
        for n, (_, record) in enumerate(change.new):
            record.shard_base, record.slots, record.shards, record.samples, record.rows_valid = n, 1, 1, 2, 1
            change.layout.files.append(record)
        change.layout.next_shard = len(change.new)
        return change.layout

    def as_int(table: pa.Table) -> pa.Table:
        return table.drop_columns(["sku"]).append_column(pa.field("sku", pa.int64()), pa.array([1], pa.int64()))

    one = tmp_path / "one"
    _write(one / "a.parquet", _rows(["a0"], extra={"sku": ["S-1"]}))
    layout = planned(one)
    _write(one / "a.parquet", as_int(_rows(["a0"], extra={"sku": ["S-1"]})))  # its only file: every shard goes
    source = ManifestSource.open(str(one))
    change = reconcile(layout, source, source.digests(), finished=True)
    assert [f.name for f in change.dropped] == ["a.parquet"] and len(change.new) == 1
    assert pa.ipc.read_schema(pa.py_buffer(change.layout.passthrough_schema())).field("sku").type == pa.int64()

    two = tmp_path / "two"  # another file's finished shards keep the string column: refused, naming the file
    _write(two / "a.parquet", _rows(["a0"], extra={"sku": ["S-1"]}))
    _write(two / "b.parquet", _rows(["b0"], extra={"sku": ["S-2"]}))
    layout = planned(two)
    _write(two / "b.parquet", as_int(_rows(["b0"], extra={"sku": ["S-2"]})))
    source = ManifestSource.open(str(two))
    with pytest.raises(ManifestError, match=r"b.parquet: pass-through column 'sku' has type int64, other files"):
        reconcile(layout, source, source.digests(), finished=True)
