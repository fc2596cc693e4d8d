"""The stage before generation: a pending shard (its plan file and number) becomes its work unit.

``ShardUnits`` is a Ray-free callable class (the plan runs it on a small CPU actor pool). Each input
row names a shard: ``shard_id``, ``local`` (its number in its file's plan) and ``plan`` (that
file). The shard's rows are read from the plan file (``part_plan.shard_unit``) and each concept
group they use gets its resolved row:

* from ``sets`` when the run resolved every concept group before rendering (segmentation models,
  ``--reference-actors always``);
* else resolved here, as the shards that need it come up (``GroupResolver``): segment and composite
  on this actor (no model: file reads and image arithmetic), once per actor; the group's K/V
  request is written into the run's store (``_kv/<concept-set id>.request.json``, content-addressed)
  and the generation actor computes or finds the K/V there or in ``--kv-cache`` when it first needs
  them. Two actors that race on one concept set at worst both resolve it (the same bytes: previews
  and requests are written whole under names their content gives) and, in the generation actors,
  both compute its K/V (each save is a temporary file renamed, or one object PUT: a reader sees the
  whole file or none); every computation counts in ``reference_passes``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from pipeline.part_plan import shard_unit
from pipeline.shards import ConceptSets
from stages.base import null_to_none, to_column
from stages.generation.units import WorkUnit
from stages.masks.composite import CompositeStage
from stages.masks.segment import SegmentConfig
from stages.masks.segment_stage import SegmentStage
from stages.output.folder import OutputFolder
from stages.params import GenParams
from stages.reference.reference_kv import ReferenceRequest, kv_location


class GroupResolver:
    """Masks and composites of one concept group at a time (``SegmentStage`` then ``CompositeStage`` on a
    one-row batch), and its K/V request. ``kv_dir``: where K/V live (``--kv-cache`` or the run's store)."""

    def __init__(self, *, out_dir: str, kv_dir: str, input_settings, segment_config: SegmentConfig):
        self.out = OutputFolder(out_dir)
        self.kv_dir = kv_dir
        self.segment = SegmentStage(segment_config, input_settings=input_settings)
        self.composite = CompositeStage(out_dir=out_dir, input_settings=input_settings)

    def resolve(self, group: Mapping[str, Any], sets: ConceptSets) -> None:
        """Add ``group`` (a ``shards.concept_group_rows`` row) resolved to ``sets``, with its K/V request."""
        batch = {k: to_column([v]) for k, v in group.items()}
        out = self.composite(self.segment(batch))
        row = {k: null_to_none(v[0]) for k, v in out.items()}
        row["resolved"] = list(row["resolved"] or [])
        sets.add(row)
        csid = row.get("concept_set_id")
        if csid and not row.get("error_reason") and csid not in sets.requests:
            request = ReferenceRequest(
                csid,
                row["resolved"],
                GenParams.from_row(json.loads(row["gen_params"])),
                control=row.get("control_condition") or None,
            )
            name = self.out.kv_request(csid)
            if not self.out.exists(name):
                self.out.write(name, request.to_json())
            sets.requests[csid] = self.out.uri(name)
            sets.kv[csid] = kv_location(self.kv_dir, csid)


class ShardUnits:
    """Callable class: shard rows in, ``shard_id`` and ``unit`` (``WorkUnit.encode``) out.

    ``sets``: every concept group already resolved (then ``resolver`` is None); else ``resolver``'s
    arguments (``GroupResolver``) and each group is resolved here when a shard first needs it."""

    def __init__(self, *, sets: ConceptSets | None = None, resolver: dict | None = None):
        self.sets = sets if sets is not None else ConceptSets()
        self.resolver = GroupResolver(**resolver) if resolver else None

    def __call__(self, batch: Mapping[str, Any]) -> dict:
        units = [self.unit(int(n), int(local), str(plan)).encode()
                 for n, local, plan in zip(batch["shard_id"], batch["local"], batch["plan"], strict=True)]
        return {"shard_id": [int(n) for n in batch["shard_id"]], "unit": units}

    def unit(self, shard_id: int, local: int, plan: str) -> WorkUnit:
        """Shard ``local`` of ``plan`` (numbered ``shard_id`` in OUT) as its work unit, its groups resolved."""
        if self.resolver is not None:
            for group in self._missing(plan, local):
                self.resolver.resolve(group, self.sets)
        return shard_unit(shard_id, local, plan, self.sets)

    def _missing(self, plan: str, local: int) -> list[dict]:
        """The concept groups shard ``local`` of ``plan`` uses that this actor has not resolved yet."""
        import pyarrow.parquet as pq

        fs, path = OutputFolder.open_file(plan)
        keys = set(
            pq.read_table(path, filesystem=fs, columns=["group"], filters=[("shard", "=", local)])
            .column("group")
            .to_pylist()
        )
        keys -= set(self.sets.resolved)
        if not keys:
            return []
        groups = _summary_groups(plan.removesuffix(".parquet") + ".summary.json")
        return [groups[k] for k in sorted(keys)]


@functools.lru_cache(maxsize=8)
def _summary_groups(location: str) -> dict[str, dict]:
    """A file's concept groups by key, from its plan summary (``part_plan.plan_part``)."""
    fs, path = OutputFolder.open_file(location)
    with fs.open_input_stream(path) as f:
        return {g["key"]: g for g in json.loads(f.read())["groups"]}
