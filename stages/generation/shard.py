"""A shard as the generation stage hands it to the write stage: its tar and its rows, built without torch.

The light part of generation: the WebDataset tar of a shard's samples (``pack_shard``, same samples,
same bytes), the stage's output row (``shard_row``) and the package versions every sample records.
The model actor (``generate``) and the model-free copy of whole shards (``copy``) both build shards here.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Callable
from importlib import metadata as importlib_metadata

from ..errors import ErrorRecord
from ..output.layout import ANNOTATIONS, EMBEDDED, extra_fields

ANNOTATED = (ANNOTATIONS, "presence", "overlap")  # what run --annotate adds to a sample's JSON
RUN_FIELDS = ("attention", EMBEDDED, *ANNOTATED)  # what --save-attention, --embed-references, --annotate add
STAGE = "generate"  # the stage a sample that cannot be packed fails in (``generate.STAGE``)

logger = logging.getLogger(__name__)


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
    member attributes (same samples, same bytes). Raises when a sample cannot be packed (``shard_row``
    fails that sample alone instead).

    POSIX (pax) format: a member name that ustar cannot hold (over 100 bytes: a key of a long id and seed
    has no '/' to split at) gets a pax header with the whole name; any other member is written as the
    very same ustar header (so shards of ordinary keys are byte for byte what ustar wrote)."""
    return _pack(samples, extras)[0]


def _pack(samples: list[tuple[str, str, bytes, dict]], extras: dict[str, bytes] | None,
          failed: Callable[[tuple, Exception], None] | None = None) -> tuple[bytes, list]:
    """``pack_shard``'s tar and the samples in it. ``failed``: called with a sample that cannot be packed
    and why, which is then left out whole (none of its members written); without it, the failure is raised."""
    buf, packed = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            key, ext, data, meta = sample
            try:
                fields = [(f"{key}.{field}", extras[f"{key}.{field}"]) for field in extra_fields(meta)]
                members = []
                for name, blob in ((f"{key}.{ext}", data), *fields,
                                   (f"{key}.json", json.dumps(meta, sort_keys=True).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(blob), 0, 0o644
                    info.tobuf(tar.format, tar.encoding, tar.errors)  # fails before the sample is written
                    members.append((info, blob))
            except Exception as e:  # noqa: BLE001 - with ``failed``, this sample fails alone
                if failed is None:
                    raise
                failed(sample, e)
                continue
            for info, blob in members:
                tar.addfile(info, io.BytesIO(blob))
            packed.append(sample)
    return buf.getvalue(), packed


def shard_row(shard_id: int, samples: list[tuple[str, str, bytes, dict]], errors: list[ErrorRecord], *,
              expected: int, reference_passes: int = 0, reused: int = 0, warnings: dict | None = None,
              extras: dict[str, bytes] | None = None, stage: str = STAGE) -> dict:
    """One output row of the generation stage (the write stage's input). ``warnings``: kind -> count
    (e.g. ``prompt_truncated``), reported by the driver once per kind instead of per row. ``extras``:
    the samples' further fields (see ``pack_shard``). A sample that cannot be packed is left out and fails
    alone (its error, in ``stage``, joins ``errors``; ``reused`` no longer counts it), never the shard."""
    errors = list(errors)

    def failed(sample: tuple, e: Exception) -> None:
        nonlocal reused
        meta = sample[3]
        logger.error("shard %s: sample %s cannot be packed: %s", shard_id, sample[0], e)
        error = ErrorRecord.from_exception(e, stage=stage)
        errors.append(error.for_target(id=meta.get("id"), row=meta.get("row"), seed=meta.get("seed")))
        reused -= "reused_from" in meta  # a copied sample (``reused_meta``)

    tar, samples = _pack(samples, extras, failed)
    return {"shard_id": shard_id, "tar": tar, "metas": json.dumps([s[3] for s in samples]),
            "errors": json.dumps([e.to_row() for e in errors]), "expected": expected,
            "reference_passes": reference_passes, "reused": reused, "warnings": json.dumps(warnings or {})}
