"""Whole shards copied from previous outputs without a model (``run --reuse``, nothing of the shard changed).

A generation actor copies a sample whose reproducibility record (``reuse.sample_record``) is in a
previous output; but it must load the model first, since the record names the model's weight
fingerprint. When the previous run recorded what it loaded (``_stats.json`` ``model_loaded``: the
model's files, the settings that shape its metadata, and that metadata) and those are unchanged, the
record is known without the model, and a shard whose every target is found is copied here by a CPU
task, byte for byte as the actor would (``GenerateStage._reuse_sample``). A shard with anything to
render (a target not found, a LoRA, ControlNet or BLIP-Diffusion input), or whose previous sample cannot
be read, is left to the actor whole (which fails such a shard's targets as rows, never the run).
"""

from __future__ import annotations

import logging

from ..output.layout import extra_fields
from .reuse import ReusedShards, sample_record
from .shard import reused_meta, shard_row
from .units import WorkUnit

logger = logging.getLogger(__name__)


def copy_unit(unit: WorkUnit, model_meta: dict, versions: dict, image_format: str, index: dict[str, dict],
              shards: ReusedShards) -> dict | None:
    """The shard's ``shard_row`` with every target copied from a previous output (``index``:
    ``reuse.build_index``'s), targets of a failed concept group as their errors; None when any target
    would render. ``model_meta``: the model's metadata as the previous run's actor loaded it."""
    samples, errors = [], []
    for t in unit.targets:
        group = unit.groups[t.group]
        if group.error:
            errors.append(t.fail(group.error))
            continue
        if group.params.loras or t.control is not None or t.blip_subject is not None:
            return None  # their metadata needs the model (a LoRA's fingerprint, the conditions' digests)
        entry = index.get(sample_record(dict(unit.sample_meta(t), model=model_meta, versions=versions), image_format))
        if entry is None:
            return None
        try:
            image, previous, fields = shards.sample(entry)
        except Exception:  # noqa: BLE001 - e.g. the previous shard since removed: the actor records it per target
            return None
        meta = reused_meta(previous, shard=unit.shard_id, row=t.row, passthrough=t.passthrough, entry=entry)
        if extra_fields(meta):  # a field this run would have to draw: left to the actor
            return None
        samples.append((t.key, image_format, image, meta))
    try:  # a sample that cannot be packed fails alone (shard_row)
        return shard_row(unit.shard_id, samples, errors, expected=len(unit.targets), reused=len(samples))
    except Exception:  # noqa: BLE001 - anything else: left to the actor, which records it per target
        logger.exception("shard %s: not copied, left to the generation actors", unit.shard_id)
        return None
