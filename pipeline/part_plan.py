"""Planning one manifest file (a *part*) where its rows are: validation and shards, written as data.

A run plans each part on its own, in a Ray task (``pipeline.plan.plan_parts``), never in the driver:

  1. ``part_ids``   the part's ids, hashed and sorted, to ``_plan/<key>.ids.parquet``: how later
                    parts find an id an earlier part already used (a duplicate across files).
  2. ``plan_part``  every row validated in one streaming pass (``ManifestValidation``); the good
                    rows' targets cut into shards exactly as ``RunPlan`` does for a single file
                    (by concept group, then row, then seed); written to ``_plan/<key>.parquet``,
                    one row per (shard, manifest row) with the row's seeds of that shard, sorted
                    by shard; the bad rows to ``_plan/<key>.errors.parquet``. It returns a
                    summary the size of the part's concept groups, not of its rows.
  3. ``shard_unit`` (a Ray Data task per pending shard, just before generation) reads one shard's
                    rows back from the plan file and builds its ``WorkUnit``.

A part's shards are numbered from its ``shard_base`` and its rows from its ``row_base`` (both
recorded in ``_run.json``): a single-file manifest plans exactly as before (bases 0), and a file
added later gets fresh numbers after every earlier file's, so finished shards keep theirs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.manifest import summable_columns
from pipeline.manifest_files import ManifestPart
from pipeline.shards import ConceptSets, concept_group_rows, group_key
from pipeline.validate import ManifestValidation, RowProblem, check_defaults
from stages.errors import ErrorRecord
from stages.generation.units import Target, WorkUnit, sample_key
from stages.inputs.control import ControlSettings
from stages.inputs.read import InputSettings
from stages.inputs.subject import SubjectSettings
from stages.output.folder import OutputFolder
from stages.output.layout import ERRORS_SCHEMA
from stages.params import GenParams, Limits
from stages.reference.family import ModelFamily

# the plan file: one row per (shard, manifest row), the row's targets in that shard
PLAN_SCHEMA = pa.schema(
    [
        ("shard", pa.int64()),
        ("row", pa.int64()),
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("seeds", pa.list_(pa.int64())),
        ("group", pa.string()),
        ("params", pa.string()),
        ("passthrough", pa.string()),
        ("control", pa.string()),
        ("blip_subject", pa.string()),
    ]
)
IDS_SCHEMA = pa.schema([("hash", pa.uint64()), ("row", pa.int64())])
ROWS_PER_BATCH = 8192


@dataclasses.dataclass
class PartRecord:
    """What ``_run.json`` keeps of one manifest file (``manifest.files``): its name and digest, where its
    rows and shards are numbered from, and its plan's counts (None until planned)."""

    name: str
    sha256: str
    size: int
    row_base: int
    shard_base: int
    rows: int | None = None
    slots: int | None = None  # shard numbers set aside for it: enough for every seed of every row
    rows_valid: int | None = None
    shards: int | None = None
    samples: int | None = None
    piece: list[int] | None = None  # a piece of the file (``manifest_files.pieces``): rows [start, stop)

    @property
    def key(self) -> str:
        """The part's plan files are ``_plan/<key>.*``: its first row number and content name them."""
        return f"{self.row_base:010d}-{self.sha256[:16]}"

    @property
    def planned(self) -> bool:
        return self.shards is not None

    def shard_ids(self) -> range:
        """Its shards' numbers once planned; before, every number set aside for it."""
        return range(self.shard_base, self.shard_base + (self.shards if self.planned else self.slots or 0))

    def shard_size(self, shard_id: int, samples_per_shard: int) -> int:
        n = shard_id - self.shard_base
        return min(samples_per_shard, self.samples - n * samples_per_shard)

    def to_row(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row: Mapping) -> PartRecord:
        return cls(**{f.name: row.get(f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Checks:
    """What validating a row needs besides the row (the run's settings), picklable for a Ray task."""

    defaults: GenParams = GenParams()
    limits: Limits = Limits()
    inputs: InputSettings = InputSettings()
    base_dir: str | None = None
    family: ModelFamily | None = None
    control: ControlSettings = ControlSettings()
    samples_per_shard: int = 256
    model_identity: str = ""
    controlnet: tuple[str, ...] = ()
    check_files: bool = True
    mask_policy: str | None = None  # "fail": concepts no mask source applies to are problems
    subject: SubjectSettings = SubjectSettings()  # the run's BLIP-Diffusion subject options
    subjects: bool = False  # a BLIP-Diffusion run: concept groups carry their subject

    def __post_init__(self):
        check_defaults(self.defaults, self.limits, self.family or ModelFamily())

    def validation(
        self, table: pa.Table, *, row_base: int = 0, earlier: Mapping[int, str] | None = None
    ) -> ManifestValidation:
        return ManifestValidation(
            table,
            defaults=self.defaults,
            limits=self.limits,
            inputs=self.inputs,
            base_dir=self.base_dir,
            family=self.family,
            control=self.control,
            check_files=self.check_files,
            mask_policy=self.mask_policy,
            subject=self.subject,
            row_base=row_base,
            earlier=earlier,
            allow_empty=True,  # one file of a folder (the layout refuses a manifest without rows)
        )


def hash_ids(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A stable 64-bit hash per id (the same in every process; nulls hash as the empty string)."""
    import pandas as pd

    values = pc.fill_null(ids, "").to_numpy(zero_copy_only=False).astype(object)
    return pd.util.hash_array(values, categorize=False)


def id_index(ids: pa.Array | pa.ChunkedArray, row_base: int, rows: np.ndarray | None = None) -> pa.Table:
    """A file's non-null ids as (hash, global row), sorted by hash: what later files are checked against.
    ``rows``: each id's global row when not ``row_base`` + its position."""
    valid = pc.is_valid(ids).to_numpy(zero_copy_only=False)
    rows = (np.arange(len(ids)) + row_base if rows is None else np.asarray(rows))[valid]
    hashes = hash_ids(ids.filter(pa.array(valid)))
    order = np.argsort(hashes, kind="stable")
    return pa.table({"hash": hashes[order], "row": rows[order].astype(np.int64)}, schema=IDS_SCHEMA)


def part_ids(part: ManifestPart, record: PartRecord, out_dir: str, limits: Limits | None = None) -> dict:
    """Step 1: ``_plan/<key>.ids.parquet``, the part's ``id_index``. Returns what is known before any row
    is validated, from whole columns: ``targets``, every seed of every row (no plan of the part has more
    samples: the driver sets that many shard numbers aside), and ``shape``, the largest image, steps and
    concept count a row asks for (``None``: the run's default), for the actors' memory. With ``limits``,
    the largest a row the run accepts asks for: a refused row's width 4096 or 5000 steps would declare
    more memory than any node has, and the actors would never start."""
    return pieces_ids(part, [record], out_dir, limits)[0]


def pieces_ids(part: ManifestPart, records: list[PartRecord], out_dir: str, limits: Limits | None = None) -> list[dict]:
    """``part_ids`` for pieces of one file (``records``, each its ``piece``, or one record of the whole
    file), the file's columns read once."""
    whole = dataclasses.replace(part, rows=None)
    names = whole.open().schema_arrow.names
    table = whole.read(columns=[c for c in ("id", "seeds", "concepts", "height", "width", "num_inference_steps")
                                if c in names])
    table = summable_columns(table)
    return [_ids_info(table if r.piece is None else table.slice(r.piece[0], r.piece[1] - r.piece[0]), r, out_dir,
                      limits) for r in records]


def _ids_info(table: pa.Table, record: PartRecord, out_dir: str, limits: Limits | None) -> dict:
    OutputFolder(out_dir).write(ids_file(record), _parquet(id_index(table.column("id"), record.row_base), dictionary=False))

    def largest(column: str, values=None, bound: int | None = None, least: int = 1, multiple: int = 1):
        if column not in table.column_names:
            return None
        values = values if values is not None else table.column(column)
        if limits is not None and bound is not None:
            accepted = pc.and_(pc.and_(pc.less_equal(values, bound), pc.greater_equal(values, least)),
                               pc.equal(pc.bit_wise_and(values, multiple - 1), 0))
            values = values.filter(accepted)
        found = pc.max(values).as_py() if len(values) else None
        return int(found) if isinstance(found, (int, float)) else None

    counts = pc.list_value_length(table.column("seeds")) if "seeds" in table.column_names else None
    targets = int(pc.sum(counts).as_py() or 0) if counts is not None else 0
    shape = {
        "height": largest("height", bound=limits and limits.max_side, least=64, multiple=8),
        "width": largest("width", bound=limits and limits.max_side, least=64, multiple=8),
        "steps": largest("num_inference_steps", bound=limits and limits.max_steps),
        "concepts": largest("concepts", pc.list_value_length(table.column("concepts")),
                            bound=limits and limits.max_concepts),
    }
    return {"targets": targets, "shape": shape}


@dataclasses.dataclass
class EarlierIds:
    """An earlier file's ids for ``earlier_duplicates``: its ``id_index``, name, first row, and a way to read
    its id column (only when a hash matches)."""

    index: pa.Table
    name: str
    row_base: int
    read_ids: Callable[[], pa.ChunkedArray]


def earlier_duplicates(ids: pa.ChunkedArray | pa.Array, earlier: Iterable[EarlierIds]) -> dict[int, str]:
    """Local row -> why its id is taken, for ids an earlier file already used: its first use names that
    file and its global row."""
    if ids.null_count == len(ids):
        return {}
    mine = hash_ids(ids)
    present = pc.is_valid(ids).to_numpy(zero_copy_only=False)
    taken: dict[int, str] = {}
    for other in earlier:
        hashes = other.index.column("hash").to_numpy()
        hits = np.flatnonzero(np.isin(mine, hashes) & present)
        other_ids = None
        for local in hits.tolist():
            if local in taken:
                continue
            lo, hi = (
                np.searchsorted(hashes, mine[local], side="left"),
                np.searchsorted(hashes, mine[local], side="right"),
            )
            if other_ids is None:  # confirm by the id itself (a hash collision is no duplicate)
                other_ids = other.read_ids()
            rows = sorted(int(r) for r in other.index.column("row").to_numpy()[lo:hi])
            same = [r for r in rows if other_ids[r - other.row_base].as_py() == ids[local].as_py()]
            if same:
                taken[local] = f"already used by row {same[0]} ({other.name})"
    return taken


def _earlier_in_out(out: OutputFolder, earlier: list[tuple[PartRecord, str]]) -> Iterable[EarlierIds]:
    for record, location in earlier:
        index = pq.read_table(io.BytesIO(out.read(ids_file(record))))
        part = ManifestPart(record.name, location, record.size, rows=tuple(record.piece) if record.piece else None)
        yield EarlierIds(index, record.name, record.row_base, lambda part=part: part.read(columns=["id"]).column("id"))


def plan_part(part: ManifestPart, record: PartRecord, checks: Checks, out_dir: str,
              earlier: list[tuple[PartRecord, str]]) -> dict:
    """Step 2: validate and plan one part; write its plan and error files. Returns the summary: the
    record's counts, the part's pass-through schema (serialized) and its concept groups (one resolve
    row each, ``shards.concept_group_rows``)."""
    started = time.perf_counter()
    out = OutputFolder(out_dir)
    table = part.read()
    taken = earlier_duplicates(table.column("id"), _earlier_in_out(out, earlier))
    if taken:  # a row refused for an earlier file's id does not claim it: once that file goes, a later file may
        keep = np.ones(table.num_rows, bool)
        keep[list(taken)] = False
        ids = table.column("id")
        out.write(
            ids_file(record),
            _parquet(id_index(ids.filter(pa.array(keep)), 0, np.flatnonzero(keep) + record.row_base), dictionary=False),
        )
    validation = checks.validation(table, row_base=record.row_base, earlier=taken)
    columns: dict[str, list] = {
        name: [] for name in ("row", "id", "prompt", "seeds", "group", "params", "passthrough", "control", "blip_subject")
    }
    batches: list[pa.RecordBatch] = []
    problems: list[RowProblem] = []
    groups: dict[str, int] = {}
    firsts = []
    group_of_row: list[int] = []
    params_json: dict[int, tuple[Any, str]] = {}  # one JSON per (interned) parameter set, holding it: an id stays its

    def flush():
        if columns["row"]:
            schema = pa.schema([PLAN_SCHEMA.field(n) for n in columns])
            batches.append(pa.RecordBatch.from_pydict(columns, schema=schema))
            for values in columns.values():
                values.clear()

    for index, spec, found in validation:
        if found:
            problems.extend(found)
            continue
        if spec is None:
            continue
        key = group_key(spec)
        if key not in groups:
            groups[key] = len(groups)
            firsts.append(spec)
        group_of_row.append(groups[key])
        known = params_json.get(id(spec.params))
        if known is None:
            known = params_json[id(spec.params)] = (spec.params, json.dumps(spec.params.to_row(), sort_keys=True))
        pj = known[1]
        columns["row"].append(index)
        columns["id"].append(spec.id)
        columns["prompt"].append(spec.prompt)
        columns["seeds"].append(list(spec.seeds))
        columns["group"].append(key)
        columns["params"].append(pj)
        columns["passthrough"].append(json.dumps(spec.passthrough) if spec.passthrough else None)
        columns["control"].append(json.dumps(spec.control.to_row()) if spec.control is not None else None)
        columns["blip_subject"].append(
            json.dumps(spec.blip_subject.to_row()) if spec.blip_subject is not None else None
        )
        if len(columns["row"]) >= ROWS_PER_BATCH:
            flush()
    flush()
    plan, samples = _cut(batches, np.asarray(group_of_row, np.int64), checks.samples_per_shard)
    out.write(plan_file(record), _parquet(plan, row_group_size=max(64, min(checks.samples_per_shard, 65536))))
    errors = [p.record() for p in problems]
    out.write(errors_file(record), _parquet(errors_table(_first_errors(errors))))
    summary = {
        "name": record.name,
        "rows": table.num_rows,
        "rows_valid": len(group_of_row),
        "shards": -(-samples // checks.samples_per_shard),
        "samples": samples,
        "plan": plan_digest(plan),
        "groups": concept_group_rows(
            firsts,
            base_dir=checks.base_dir or "",
            model_identity=checks.model_identity,
            controlnet=checks.controlnet,
            subjects=checks.subjects,
        ),
    }
    out.write(summary_file(record), json.dumps(summary, sort_keys=True).encode())
    # the task's seconds, validation included: in the answer only (OUT's files depend on the input alone)
    return dict(summary, seconds=round(time.perf_counter() - started, 3))


def _cut(batches: list[pa.RecordBatch], group_of_row: np.ndarray, per_shard: int) -> tuple[pa.Table, int]:
    """The good rows, ordered by concept group (first appearance) then row, cut into shards of
    ``per_shard`` targets: one plan row per (shard, row), a row whose seeds straddle shards split.
    Shards are numbered from 0 in the part (the record's ``shard_base`` is added where they run)."""
    schema = pa.schema([f for f in PLAN_SCHEMA if f.name != "shard"])
    rows = pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()
    order = np.argsort(group_of_row, kind="stable")
    counts = (
        pc.list_value_length(rows.column("seeds")).to_numpy(zero_copy_only=False).astype(np.int64)[order]
        if rows.num_rows
        else np.zeros(0, np.int64)
    )
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]) if counts.size else counts
    first, last = start // per_shard, (start + counts - 1) // per_shard
    pieces = last - first + 1
    take = np.repeat(order, pieces)
    # the k-th piece of a row lies in shard first + k: its seeds [max(start, shard lo), min(end, shard hi)) - start
    k = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    shard = np.repeat(first, pieces) + k
    row_start, row_end = np.repeat(start, pieces), np.repeat(start + counts, pieces)
    lo = np.maximum(row_start, shard * per_shard) - row_start
    hi = np.minimum(row_end, (shard + 1) * per_shard) - row_start
    plan = rows.take(pa.array(take, pa.int64()))
    split = np.flatnonzero((lo != 0) | (hi != np.repeat(counts, pieces)))  # rows whose seeds straddle shards
    if split.size:  # only those are cut (Python lists); whole rows keep their seeds column as it is
        seeds = plan.column("seeds").to_pylist()
        for k in split.tolist():
            seeds[k] = seeds[k][lo[k] : hi[k]]
        plan = plan.set_column(plan.column_names.index("seeds"), "seeds", pa.array(seeds, pa.list_(pa.int64())))
    plan = plan.add_column(0, "shard", pa.array(shard, pa.int64()))
    return plan.select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA), int(counts.sum())


def _first_errors(errors: list[ErrorRecord]) -> list[dict]:
    """One entry per row: its first error (``errors.parquet``'s rule)."""
    by_row: dict[Any, dict] = {}
    for e in errors:
        entry = by_row.setdefault(
            e.row,
            {"id": e.id, "row": e.row, "stage": e.stage, "field": e.field, "reason": e.reason, "seeds": []},
        )
        if e.seed is not None:
            entry["seeds"].append(int(e.seed))
    return sorted(by_row.values(), key=lambda e: e["row"] if e["row"] is not None else -1)


def errors_table(entries: list[dict]) -> pa.Table:
    return pa.table(
        {f.name: pa.array([e.get(f.name) for e in entries], f.type) for f in ERRORS_SCHEMA},
        schema=ERRORS_SCHEMA,
    )


def part_errors(out: OutputFolder, record: PartRecord, markers: Mapping[int, dict]) -> pa.Table:
    """The part's rows of ``errors.parquet``: its validation errors, then its shards' (in shard order),
    one entry per row with every failed seed."""
    problems = pq.read_table(io.BytesIO(out.read(errors_file(record)))).to_pylist()
    records = [
        ErrorRecord(stage=p["stage"], field=p["field"], reason=p["reason"], id=p["id"], row=p["row"])
        for p in problems
    ]
    records += [
        ErrorRecord.from_row(e) for n in record.shard_ids() for e in (markers.get(n) or {}).get("errors", [])
    ]
    return errors_table(_first_errors(records))


def ids_file(record: PartRecord) -> str:
    return OutputFolder.plan_file(f"{record.key}.ids.parquet")


def plan_file(record: PartRecord) -> str:
    return OutputFolder.plan_file(f"{record.key}.parquet")


def summary_file(record: PartRecord) -> str:
    """The part's plan summary: counts, plan digest and concept groups (``plan_part``'s answer)."""
    return OutputFolder.plan_file(f"{record.key}.summary.json")


def errors_file(record: PartRecord) -> str:
    return OutputFolder.plan_file(f"{record.key}.errors.parquet")


def _parquet(table: pa.Table | list, *, row_group_size: int | None = None, dictionary: bool = True) -> bytes:
    buf = io.BytesIO()  # dictionary=False: the id hashes, all distinct (15x faster to write, and smaller)
    pq.write_table(table, buf, row_group_size=row_group_size, use_dictionary=dictionary)
    return buf.getvalue()


# ---- step 3: a shard's work unit, from the plan file --------------------------------------------------


def shard_unit(shard_id: int, local: int, plan_location: str, sets: ConceptSets) -> WorkUnit:
    """Shard ``shard_id``'s ``WorkUnit`` (its targets in plan order) from its part's plan file, where it
    is shard ``local``."""
    fs, path = OutputFolder.open_file(plan_location)
    table = pq.read_table(path, filesystem=fs, filters=[("shard", "=", local)])
    groups, group_of, targets = [], {}, []
    params_of: dict[str, GenParams] = {}
    for row in table.to_pylist():
        params = params_of.get(row["params"])
        if params is None:
            params = params_of[row["params"]] = GenParams.from_row(json.loads(row["params"]))
        gkey = (row["group"], row["params"])
        if gkey not in group_of:
            group_of[gkey] = len(groups)
            groups.append(sets.group_of(row["group"], params, shard_id=shard_id))
        passthrough = json.loads(row["passthrough"]) if row["passthrough"] else {}
        control = json.loads(row["control"]) if row["control"] else None
        subject = json.loads(row["blip_subject"]) if row.get("blip_subject") else None
        targets += [
            Target(
                group=group_of[gkey],
                row=row["row"],
                id=row["id"],
                key=sample_key(row["id"], seed),
                prompt=row["prompt"],
                seed=seed,
                passthrough=passthrough,
                control=control,
                blip_subject=subject,
            )
            for seed in row["seeds"]
        ]
    return WorkUnit(shard_id=shard_id, groups=groups, targets=targets)


def plan_digest(plan: pa.Table, shard_base: int = 0) -> str:
    """Digest of a plan's sample keys, shard by shard (``RunPlan.digest`` of the same plan)."""
    h = hashlib.sha256()
    keys: list[str] = []
    current = None
    for shard, rid, seeds in zip(
        plan.column("shard").to_pylist(),
        plan.column("id").to_pylist(),
        plan.column("seeds").to_pylist(),
        strict=True,
    ):
        if shard != current and current is not None:
            h.update(f"{current + shard_base}:{','.join(keys)};".encode())
            keys = []
        current = shard
        keys += [sample_key(rid, s) for s in seeds]
    if current is not None:
        h.update(f"{current + shard_base}:{','.join(keys)};".encode())
    return h.hexdigest()[:20]
