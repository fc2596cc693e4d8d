"""Planning a run: its targets cut into shards, concept groups, and each shard's work unit.

Pure and deterministic (no Ray, no model): the same manifest and settings always give the same
shards, in the same order, with the same sample keys.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from array import array
from collections import OrderedDict
from pathlib import Path

import pyarrow as pa

from pipeline.validate import ManifestValidation, RowProblem, RowSpec
from stages.errors import ErrorRecord
from stages.generation.units import Group, Target, WorkUnit, group_meta, sample_key
from stages.inputs.concepts import ResolvedConcept
from stages.inputs.read import InputSettings, is_uri, read_bytes


def group_key(row: RowSpec) -> str:
    """Rows with the same concepts and reference parameters form one *concept group*: they share
    one resolution (masks, composites) and one K/V computation. With ``control_references`` the
    row's control (as written) is part of it: its K/V are computed through ControlNet; so is, when the
    references get it (the release's BLIP-Diffusion default), the row's BLIP-Diffusion subject."""
    subject = reference_subject(row)
    return _group_key(tuple(row.concepts), row.params, reference_control(row),
                      None if subject is None else (subject.image_path, subject.category))


def reference_control(row: RowSpec):
    """The row's control when its references go through ControlNet (``control_references``), else None."""
    return row.control if row.control is not None and row.control.references else None


def reference_subject(row: RowSpec):
    """The row's BLIP-Diffusion subject when its references get it too (``RowSubject.references``), else None."""
    return row.blip_subject if row.blip_subject is not None and row.blip_subject.references else None


@functools.lru_cache(maxsize=65536)
def _group_key(concepts: tuple, params, control=None, subject=None) -> str:
    parts = [[dataclasses.asdict(c) for c in concepts], params.reference_params()]
    if control is not None:  # only then: the keys of rows without it stay as they were
        parts.append(control.to_row())
    if subject is not None:
        parts.append({"blip_subject": list(subject)})
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class RunPlan:
    """The run's shards, planned without holding the rows: a few integers per target.

    Targets are ordered by concept group (in order of first appearance), then row order, then seed
    order, and cut into shards of ``samples_per_shard``. One streaming validation pass records, per
    good row, its concept group and seed count (and the first row of each group, which is what gets
    resolved); shard n's targets are rebuilt on demand from the manifest table
    (``ManifestValidation.rows``). tests/test_plan.py checks this against the same plan made over
    every validated row held in memory.
    """

    def __init__(self, validation: ManifestValidation, samples_per_shard: int):
        self.validation = validation
        self.samples_per_shard = samples_per_shard
        self.problems: list[RowProblem] = []
        self.rows_valid = 0
        self.group_keys: list[str] = []
        self.group_first: list[RowSpec] = []  # one row per group, in order of first appearance
        group_of: dict[str, int] = {}
        rows_of: list[array] = []  # per group: row indices, in manifest order
        seeds_of: list[array] = []  # per group: seed count of each of those rows
        self.row_group = array("l", [-1]) * validation.table.num_rows
        for index, spec, found in validation:
            if found:
                self.problems.extend(found)
                continue
            if spec is None:
                continue
            self.rows_valid += 1
            key = group_key(spec)
            g = group_of.get(key)
            if g is None:
                g = group_of[key] = len(self.group_keys)
                self.group_keys.append(key)
                self.group_first.append(spec)
                rows_of.append(array("q"))
                seeds_of.append(array("l"))
            rows_of[g].append(index)
            seeds_of[g].append(len(spec.seeds))
            self.row_group[index] = g
        self.target_row, self.target_seed = array("q"), array("l")  # (row index, position in its seeds)
        for rows, counts in zip(rows_of, seeds_of, strict=True):
            for index, count in zip(rows, counts, strict=True):
                self.target_row.extend([index] * count)
                self.target_seed.extend(range(count))
        self.samples = len(self.target_row)
        self.n_shards = -(-self.samples // samples_per_shard)

    def _bounds(self, n: int) -> tuple[int, int]:
        return n * self.samples_per_shard, min((n + 1) * self.samples_per_shard, self.samples)

    def shard_size(self, n: int) -> int:
        lo, hi = self._bounds(n)
        return hi - lo

    def shard(self, n: int) -> list[tuple[RowSpec, int]]:
        """Shard n's targets, in order, as (row, seed)."""
        lo, hi = self._bounds(n)
        rows = self.validation.rows(self.target_row[lo:hi])
        return [(rows[i], rows[i].seeds[pos]) for i, pos in zip(self.target_row[lo:hi], self.target_seed[lo:hi],
                                                                  strict=True)]

    def groups_of(self, shard_ids) -> list[RowSpec]:
        """The first row of every concept group that has targets in these shards."""
        wanted: set[int] = set()
        for n in shard_ids:
            lo, hi = self._bounds(n)
            wanted.update(self.row_group[i] for i in set(self.target_row[lo:hi]))
        return [self.group_first[g] for g in sorted(wanted)]

    def digest(self) -> str:
        """Digest of every shard's sample keys, in order (``_run.json``: a resume must plan the same
        shards); read from the id and seeds columns, no row is re-validated."""
        table = self.validation.table
        # one contiguous copy of each column (64-bit offsets: no overflow past 2 GiB of ids) instead of a
        # chunked take per shard, which would concatenate the chunks every time
        id_column = table.column("id").cast(pa.large_string()).combine_chunks()
        seeds_column = table.column("seeds").cast(pa.large_list(pa.int64())).combine_chunks()
        h = hashlib.sha256()
        for n in range(self.n_shards):
            lo, hi = self._bounds(n)
            idx = pa.array(self.target_row[lo:hi], pa.int64())
            ids = id_column.take(idx).to_pylist()
            seeds = seeds_column.take(idx).to_pylist()
            keys = [sample_key(i, s[p]) for i, s, p in zip(ids, seeds, self.target_seed[lo:hi], strict=True)]
            h.update(f"{n}:{','.join(keys)};".encode())
        return h.hexdigest()[:20]


def file_digest(path: str) -> str:
    """Content digest of the manifest (a file, or every Parquet file of a manifest folder)."""
    h = hashlib.sha256()
    if not is_uri(path) and Path(path).is_dir():
        for part in sorted(Path(path).rglob("*.parquet")):
            h.update(part.relative_to(path).as_posix().encode() + b"\0" + part.read_bytes())
    else:
        h.update(read_bytes(path, settings=InputSettings(), field="manifest"))
    return h.hexdigest()


# ---- concept groups: what reference preparation gets, and what it gave -------------------------------


def concept_group_rows(rows: list[RowSpec], *, base_dir: str, model_identity: str,
                       controlnet: tuple[str, ...] = (), subjects: bool = False) -> list[dict]:
    """One input row of the resolve chain (segment -> composite -> reference K/V) per concept group.

    With ``controlnet`` each row has a ``control`` column: the group's control (JSON, with the ControlNet
    ids) when its references go through ControlNet, else "" (the K/V do not depend on it). With
    ``subjects`` (a BLIP-Diffusion run) each row has a ``blip_subject`` column: the group's subject
    (``RowSubject.to_row`` JSON) when its references get it, else ""."""
    out: OrderedDict[str, dict] = OrderedDict()
    for r in rows:
        key = group_key(r)
        if key in out:
            continue
        p = r.params.reference_params()
        # LoRA adapters change the weights the K/V come from: part of the model (a string, so the
        # identity column keeps one Arrow type whether rows have adapters or not)
        model_id = model_identity + (f"|loras={json.dumps(p['loras'])}" if "loras" in p else "")
        out[key] = {
            "key": key,
            "concepts": [c.to_row() for c in r.concepts],
            "base_dir": base_dir,
            "identity": {"model_id": model_id, "height": p["height"], "width": p["width"],
                         "num_inference_steps": p["num_inference_steps"], "reference_seed": p["reference_seed"],
                         "mrsa": p["mrsa"], "extra": {"negative_prompt": p["negative_prompt"]}},
            "params": json.dumps(p, sort_keys=True),
            "gen_params": json.dumps(r.params.to_row(), sort_keys=True),
        }
        if controlnet:
            control = reference_control(r)
            out[key]["control"] = "" if control is None else json.dumps(
                dict(control.to_row(), controlnet=list(controlnet)), sort_keys=True)
        if subjects:
            subject = reference_subject(r)
            out[key]["blip_subject"] = "" if subject is None else json.dumps(subject.to_row(), sort_keys=True)
    return list(out.values())


@dataclasses.dataclass
class ConceptSets:
    """What reference preparation gave: per concept group its resolved row (concepts, concept-set
    id, or its error), and per concept-set id its K/V path or the error computing them."""

    resolved: dict[str, dict] = dataclasses.field(default_factory=dict)  # group key -> resolved row
    kv: dict[str, str | ErrorRecord] = dataclasses.field(default_factory=dict)  # concept-set id -> path | error
    requests: dict[str, str] = dataclasses.field(default_factory=dict)  # concept-set id -> request file
    passes: int = 0

    def ids(self) -> set[str]:
        return {r["concept_set_id"] for r in self.resolved.values() if r.get("concept_set_id")}

    def add(self, row: dict) -> None:
        """One output row of the resolve chain."""
        self.passes += int(row.get("reference_pass") or 0)
        csid = row.get("concept_set_id")
        error = ErrorRecord.from_columns(row.get("error_stage"), row.get("error_field"), row.get("error_reason"))
        if error is not None and error.stage == "reference_kv":
            # the concept set resolved but its K/V failed: the row stays resolved (its metadata), the
            # K/V entry carries the error; K/V another group with the same concept-set id got are kept
            if not isinstance(self.kv.get(csid), str):
                self.kv[csid] = error
            row = dict(row, error_stage="", error_field="", error_reason="")
        elif csid and error is None and row.get("kv_path"):
            self.kv[csid] = row["kv_path"]
        self.resolved[row["key"]] = row

    def group(self, row: RowSpec, *, shard_id: int) -> Group:
        """The work unit's group of ``row``'s concept set and parameter set."""
        return self.group_of(group_key(row), row.params, shard_id=shard_id)

    def group_of(self, key: str, params, *, shard_id: int) -> Group:
        """The work unit's group of concept group ``key`` and parameter set ``params``."""
        r = self.resolved.get(key, {})
        csid = r.get("concept_set_id")
        kv = self.kv.get(csid) if csid else None
        error = ErrorRecord.from_columns(r.get("error_stage"), r.get("error_field"), r.get("error_reason"))
        if error is None and not isinstance(kv, str):
            error = kv or ErrorRecord("reference_kv", "", "no reference K/V were produced for this concept set")
        meta = group_meta(params, shard_id=shard_id, concept_set_id=csid,
                          concepts=[ResolvedConcept.row_metadata(c) for c in r.get("resolved") or []])
        return Group(params=params, meta=meta, kv_path=kv if isinstance(kv, str) else None,
                     reference=self.requests.get(csid) if error is None else None, error=error)


def work_unit(shard_id: int, targets: list[tuple[RowSpec, int]], sets: ConceptSets) -> WorkUnit:
    """One shard's work: its targets, and a group per (concept group, parameter set) stored once."""
    groups: list[Group] = []
    group_of: dict[tuple, int] = {}
    out = []
    for row, seed in targets:
        gkey = (group_key(row), row.params)
        if gkey not in group_of:
            group_of[gkey] = len(groups)
            groups.append(sets.group(row, shard_id=shard_id))
        out.append(Target(group=group_of[gkey], row=row.index, id=row.id, key=sample_key(row.id, seed),
                          prompt=row.prompt, seed=seed, passthrough=row.passthrough,
                          control=row.control.to_row() if row.control is not None else None,
                          blip_subject=row.blip_subject.to_row() if row.blip_subject is not None else None))
    return WorkUnit(shard_id=shard_id, groups=groups, targets=out)
