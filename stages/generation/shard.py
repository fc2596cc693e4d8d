"""A shard as the generation stage hands it to the write stage: its tar and its rows, built without torch.

The light part of generation: the WebDataset tar of a shard's samples (``pack_shard``, same samples,
same bytes), the stage's output row (``shard_row``) and the package versions every sample records.
The model actor (``generate``) and the model-free copy of whole shards (``copy``) both build shards here.
"""

from __future__ import annotations

import io
import json
import tarfile
from importlib import metadata as importlib_metadata

from ..errors import ErrorRecord
from ..output.layout import ANNOTATIONS, EMBEDDED, extra_fields

ANNOTATED = (ANNOTATIONS, "presence", "overlap")  # what run --annotate adds to a sample's JSON
RUN_FIELDS = ("attention", EMBEDDED, *ANNOTATED)  # what --save-attention, --embed-references, --annotate add


def reused_meta(previous: dict, *, shard: int, row: int, passthrough: dict, entry: dict) -> dict:
    """A copied sample's metadata (``run --reuse``): the previous one's, with this output's shard, row and
    pass-through columns, where it came from (``reused_from``), and without what another run's options
    added (``RUN_FIELDS``: this run adds its own)."""
    meta = dict(previous, shard=shard, row=row, passthrough=passthrough, reused_from=f"{entry['tar']}#{entry['key']}")
    return {k: v for k, v in meta.items() if k not in RUN_FIELDS}


def package_versions() -> dict:
    """The versions a sample's metadata records (part of its reproducibility record)."""
    out = {}
    for name in ("freecustom-pipeline", "torch", "diffusers", "transformers"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def pack_shard(samples: list[tuple[str, str, bytes, dict]], extras: dict[str, bytes] | None = None) -> bytes:
    """A shard's WebDataset tar: ``<key>.<ext>``, the fields ``extra_fields`` names (bytes from ``extras``,
    member name -> bytes, e.g. ``<key>.attn.png``) and ``<key>.json`` per sample, in order, with fixed
    member attributes (same samples, same bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, ext, data, meta in samples:
            fields = [(f"{key}.{field}", extras[f"{key}.{field}"]) for field in extra_fields(meta)]
            for name, blob in ((f"{key}.{ext}", data), *fields, (f"{key}.json", json.dumps(meta, sort_keys=True).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(blob), 0, 0o644
                tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def shard_row(shard_id: int, samples: list[tuple[str, str, bytes, dict]], errors: list[ErrorRecord], *,
              expected: int, reference_passes: int = 0, reused: int = 0, warnings: dict | None = None,
              extras: dict[str, bytes] | None = None) -> dict:
    """One output row of the generation stage (the write stage's input). ``warnings``: kind -> count
    (e.g. ``prompt_truncated``), reported by the driver once per kind instead of per row. ``extras``:
    the samples' further fields (see ``pack_shard``)."""
    return {"shard_id": shard_id, "tar": pack_shard(samples, extras), "metas": json.dumps([s[3] for s in samples]),
            "errors": json.dumps([e.to_row() for e in errors]), "expected": expected,
            "reference_passes": reference_passes, "reused": reused, "warnings": json.dumps(warnings or {})}
