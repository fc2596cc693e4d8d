"""The work unit: one shard's targets, as the driver hands them to a generation actor.

Words (the README's glossary uses the same):
- *target*: one sample to render, a manifest row and one of its seeds;
- *concept set*: a row's concepts once resolved (masks, composites), named by its content hash;
- *parameter set*: a row's ``GenParams`` (the run's defaults with its overrides);
- *group*: the targets of one work unit that share a concept set and a parameter set (they share
  reference K/V and the metadata stored once per group, and are batched through the UNet together);
- *work unit*: one shard's targets and their groups (a shard cannot be split: it is the unit of
  atomic writing and of resuming);
- *batch*: the targets of one UNet call (``--batch-size``), cut from a group.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import ErrorRecord
from ..params import GenParams


@dataclass
class Group:
    """What targets of one concept set and one parameter set share within a work unit.

    ``kv_path``: where the set's reference K/V are (None when it failed); ``reference``: the
    request file a generation actor computes them from when they are not there yet (runs with
    one generation actor); ``error``: why the set failed (its targets fail with it); ``meta``:
    the part of each sample's metadata the group shares (``sample_meta``).
    """

    params: GenParams
    meta: dict
    kv_path: str | None = None
    reference: str | None = None
    error: ErrorRecord | None = None

    def to_row(self) -> dict:
        return {"params": self.params.to_row(), "meta": self.meta, "kv_path": self.kv_path,
                "reference": self.reference, "error": self.error.to_row() if self.error else None}

    @classmethod
    def from_row(cls, row: dict) -> Group:
        return cls(params=GenParams.from_row(row["params"]), meta=row["meta"], kv_path=row.get("kv_path"),
                   reference=row.get("reference"), error=ErrorRecord.from_row(row["error"]) if row.get("error") else None)


@dataclass
class Target:
    """One sample to render: its manifest row (index and id), seed, key, prompt and pass-through
    columns, the index of its group in the unit, its ControlNet input (``RowControl.to_row``, None
    without) and its BLIP-Diffusion subject (``RowSubject.to_row``, None without)."""

    group: int
    row: int
    id: str
    key: str
    prompt: str
    seed: int
    passthrough: dict = field(default_factory=dict)
    control: dict | None = None
    blip_subject: dict | None = None

    def fail(self, error: ErrorRecord) -> ErrorRecord:
        """``error`` as this target's (its row, id and seed filled in)."""
        return error.for_target(id=self.id, row=self.row, seed=self.seed)

    def to_row(self) -> dict:
        return {"g": self.group, "row": self.row, "id": self.id, "key": self.key, "prompt": self.prompt,
                "seed": self.seed, "passthrough": self.passthrough,
                **({"control": self.control} if self.control is not None else {}),
                **({"blip_subject": self.blip_subject} if self.blip_subject is not None else {})}

    @classmethod
    def from_row(cls, row: dict) -> Target:
        return cls(group=row["g"], row=row["row"], id=row["id"], key=row["key"], prompt=row["prompt"],
                   seed=row["seed"], passthrough=row.get("passthrough") or {}, control=row.get("control"),
                   blip_subject=row.get("blip_subject"))


def sample_key(row_id: str, seed: int) -> str:
    """WebDataset key of one sample: row id and seed (ids are ``[A-Za-z0-9_-]``, so keys have no dots)."""
    return f"{row_id}-{seed}"


def group_meta(params: GenParams, *, shard_id: int, concept_set_id: str | None, concepts: list[dict]) -> dict:
    """The part of a sample's metadata its group shares."""
    return dict(params.sample_meta(), shard=shard_id, concept_set_id=concept_set_id, concepts=concepts)


@dataclass
class WorkUnit:
    """One shard's work. ``encode`` gives the bytes the driver hands to Ray: zlib-compressed JSON
    (the driver holds every pending unit until Ray has them, and a unit's JSON repeats keys on
    every target: it compresses 5-10x)."""

    shard_id: int
    groups: list[Group]
    targets: list[Target]

    def encode(self) -> bytes:
        payload = {"shard_id": self.shard_id, "groups": [g.to_row() for g in self.groups],
                   "targets": [t.to_row() for t in self.targets]}
        return zlib.compress(json.dumps(payload, separators=(",", ":")).encode(), 1)

    @classmethod
    def decode(cls, raw: Any) -> WorkUnit:
        payload = json.loads(zlib.decompress(bytes(raw)))
        return cls(shard_id=payload["shard_id"], groups=[Group.from_row(g) for g in payload["groups"]],
                   targets=[Target.from_row(t) for t in payload["targets"]])

    def sample_meta(self, target: Target) -> dict:
        """A sample's metadata as the driver knows it (the generation actor adds the model's)."""
        return dict(self.groups[target.group].meta, key=target.key, id=target.id, row=target.row, seed=target.seed,
                    prompt=target.prompt, passthrough=target.passthrough)
