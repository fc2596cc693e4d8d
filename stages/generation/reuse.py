"""Incremental runs (``run --reuse PREVIOUS_OUT``): samples whose reproducibility record equals one in a
previous output are copied from there, byte for byte, instead of rendered.

A sample's *record* is its metadata without what says where it sits in this output (``shard``,
``row``), its pass-through columns (they do not change its pixels), and what a run adds
(``prompt_truncated``, ``reused_from``, ``attention``), plus the image format: model id, weight fingerprint,
dtype, layout, scheduler and its config, package versions, every generation and MRSA parameter,
the concept-set id (a hash of each concept's image and mask digests, prompt, weight and composite
recipe), each concept's digests, prompt, negative prompt, seed, key. Equal records mean the same
bytes would be rendered again.

Embedded references and annotations (``run --embed-references``, ``--annotate``) are not in the record
either: they are drawn again for the copy (an annotating run reuses only samples with attention maps).

Attention maps (``run --save-attention``: a ``<key>.attn.png`` field, ``attention`` in the JSON) are
not in the record: they follow from it. A run that saves them reuses only samples that have them
(and copies them); a run that does not reuses any sample and leaves the maps behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable

import pyarrow.parquet as pq

from ..output.folder import OutputFolder
from ..output.layout import RUN_FILE, extra_fields
from ..output.locations import read_location

NOT_IN_RECORD = ("shard", "row", "passthrough", "prompt_truncated", "reused_from", "scores", "score_error", "rejected_by",
                 "attention", "embedded_references", "annotations", "presence", "overlap")


def sample_record(meta: dict, image_format: str) -> str:
    """The digest of a sample's reproducibility record (see the module's docstring). diffusers'
    ``_use_default_values`` (which config keys took defaults: a set, listed in no fixed order) is
    compared as a set."""
    record = {k: v for k, v in meta.items() if k not in NOT_IN_RECORD}
    config = ((record.get("model") or {}).get("scheduler") or {}).get("config") or {}
    if isinstance(config.get("_use_default_values"), list):
        scheduler = dict(record["model"]["scheduler"], config=dict(config, _use_default_values=sorted(
            config["_use_default_values"])))
        record["model"] = dict(record["model"], scheduler=scheduler)
    record["image_format"] = image_format
    blob = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_index(previous: Iterable[str]) -> dict[str, dict]:
    """record digest -> where the sample is (``tar``: URI or path of its shard, ``key``, ``ext``, and
    ``attention`` when it has attention maps), over every written shard of the previous outputs (the
    first output that has a record wins, unless a later one also has the maps and it has not)."""
    index: dict[str, dict] = {}
    for location in previous:
        folder = OutputFolder(location, option="--reuse")
        if not folder.exists(RUN_FILE):
            raise ValueError(f"--reuse {location}: not an output folder of freecustom-pipeline run (no {RUN_FILE})")
        image_format = folder.read_json(RUN_FILE).get("image_format", "png")
        markers = folder.read_markers()
        for n in sorted(markers):
            if markers[n].get("status") not in ("complete", "partial") or not folder.exists(folder.shard_parquet(n)):
                continue
            with folder.fs.open_input_file(folder.path(folder.shard_parquet(n))) as f:
                metas = pq.read_table(f, columns=["metadata"])["metadata"].to_pylist()
            for raw in metas:
                meta = json.loads(raw)
                record = sample_record(meta, image_format)
                if record in index and (index[record].get("attention") or "attention" not in meta):
                    continue
                index[record] = {"tar": folder.uri(folder.shard_tar(n)), "key": meta["key"], "ext": image_format,
                                 **({"attention": True} if "attention" in meta else {})}
    return index


class ReusedShards:
    """Samples read out of previous shards' tars, one tar at a time (the last one read is kept)."""

    def __init__(self):
        self._location: str | None = None
        self._members: dict[str, bytes] = {}

    def sample(self, entry: dict) -> tuple[bytes, dict, dict[str, bytes]]:
        """The image bytes, metadata and further fields (field name -> bytes, e.g. ``attn.png``) of an
        index entry."""
        if entry["tar"] != self._location:
            data = read_location(entry["tar"], option="--reuse")  # the shard's URI, its query kept
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                self._members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
            self._location = entry["tar"]
        key = entry["key"]
        meta = json.loads(self._members[f"{key}.json"])
        fields = {field: self._members[f"{key}.{field}"] for field in extra_fields(meta)}
        return self._members[f"{key}.{entry['ext']}"], meta, fields
