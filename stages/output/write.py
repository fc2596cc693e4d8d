"""Stage: store one shard: ``write_batch`` takes the generation stage's rows (``generate.shard_row``)
and writes each shard's tar, its Parquet table and then its done marker through ``OutputFolder``.

A write error (disk full, ...) leaves nothing under a final name and is reported in the marker
(status ``write_failed``, an error per sample) instead of raised, so the run ends with a clear
message and a rerun completes it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ErrorRecord
from ..scoring.score import score_arrays
from .folder import OutputFolder
from .layout import ANNOTATIONS, EMBEDDED, shard_name
from .probe import StorageProbe

# The shard Parquet's columns, each read from the sample's metadata (plus ``metadata``, the whole
# JSON). A new output column is one entry here (and the metadata field it reads).
SHARD_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "id": pa.string(),
    "seed": pa.int64(),
    "prompt": pa.string(),
    "negative_prompt": pa.string(),
    "concept_set_id": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
    "num_inference_steps": pa.int64(),
    "guidance_scale": pa.float64(),
}
STAGE = "write"
# run --embed-references / --annotate: columns read from the sample's metadata, written when a shard's samples
# have them (a function of the metadata -> the value, and the type)
TRAINING_COLUMNS: dict[str, tuple] = {
    "reference_fields": (lambda m: (m.get(EMBEDDED) or {}).get("images"), pa.list_(pa.string())),
    "reference_mask_fields": (lambda m: (m.get(EMBEDDED) or {}).get("masks"), pa.list_(pa.string())),
    "boxes": (lambda m: [a["box"] for a in m[ANNOTATIONS]] if ANNOTATIONS in m else None,
              pa.list_(pa.list_(pa.int64()))),
    "annotation_masks": (lambda m: [a["mask"] for a in m[ANNOTATIONS]] if ANNOTATIONS in m else None,
                         pa.list_(pa.string())),
    "confidence": (lambda m: [a["confidence"] for a in m[ANNOTATIONS]] if ANNOTATIONS in m else None,
                   pa.list_(pa.float64())),
    "presence": (lambda m: m.get("presence"), pa.list_(pa.float64())),
    "overlap": (lambda m: m.get("overlap"), pa.float64()),
}


# Where a pass-through column named like a built-in column (``key``, ``metadata``...) goes instead.
PASSTHROUGH_PREFIX = "passthrough."
# The shard Parquet's schema metadata key mapping each pass-through column to its manifest column.
PASSTHROUGH_META = b"freecustom.passthrough"


def parquet_bytes(
    metas: list[dict], passthrough_schema: bytes | None = None, *, scored: bool = False, rejected: bool = False
) -> bytes:
    """One row per sample: ``SHARD_COLUMNS``, with ``scored`` the scores (``stages.scoring.score.SCORE_COLUMNS``,
    from ``meta["scores"]``), with ``rejected`` ``rejected_by`` (the thresholds it failed, comma
    separated), ``metadata`` (its JSON), then the pass-through columns.

    ``passthrough_schema``: the manifest's pass-through fields (an Arrow schema serialized with
    ``schema.serialize().to_pybytes()``; the driver sends the manifest columns that are not in
    ``MANIFEST_SCHEMA``). Each becomes a top-level column of the manifest's type, built from the
    JSON-safe values in ``meta["passthrough"]`` (see ``passthrough_column`` for the rule when a
    value cannot be typed back). A pass-through column named like a built-in column is written as
    ``passthrough.<name>`` (the built-in column keeps its name); the schema metadata
    ``freecustom.passthrough`` maps each pass-through column to its manifest name. Without a schema
    no pass-through columns are written (they stay in ``metadata``): their types are unknown, and
    types guessed per shard could differ between shards.
    ``reused_from`` (``--reuse``) is nothing special: it stays in ``metadata``. ``TRAINING_COLUMNS``
    (``--embed-references``, ``--annotate``) follow ``SHARD_COLUMNS`` when the samples have them.
    """
    columns = {name: pa.array([m[name] for m in metas], dtype) for name, dtype in SHARD_COLUMNS.items()}
    for name, (read, dtype) in TRAINING_COLUMNS.items():
        values = [read(m) for m in metas]
        if any(v is not None for v in values):
            columns[name] = pa.array(values, dtype)
    if scored:
        columns.update(score_arrays([m.get("scores") for m in metas]))
    if rejected:
        columns["rejected_by"] = pa.array([", ".join(m.get("rejected_by") or []) for m in metas], pa.string())
    columns["metadata"] = pa.array([json.dumps(m, sort_keys=True) for m in metas], pa.string())
    names = {}
    if passthrough_schema is not None:
        for field in pa.ipc.read_schema(pa.py_buffer(passthrough_schema)):
            name = field.name
            while name in columns:
                name = PASSTHROUGH_PREFIX + name
            values = [(m.get("passthrough") or {}).get(field.name) for m in metas]
            columns[name] = passthrough_column(values, field.type)
            names[name] = field.name
    table = pa.table(columns)
    if names:
        table = table.replace_schema_metadata({PASSTHROUGH_META: json.dumps(names).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _leaf_casts(dtype: pa.DataType) -> bool:
    """Whether ``pa.array(json_safe_values).cast(dtype)`` types values of ``dtype`` back faithfully
    (binary inside a list would cast from its base64 text without decoding it: not faithful)."""
    t = pa.types
    if t.is_list(dtype) or t.is_large_list(dtype) or t.is_fixed_size_list(dtype):
        return _leaf_casts(dtype.value_type)
    if t.is_struct(dtype):
        return all(_leaf_casts(f.type) for f in dtype)
    return (
        t.is_integer(dtype)
        or t.is_floating(dtype)
        or t.is_boolean(dtype)
        or t.is_string(dtype)
        or t.is_large_string(dtype)
        or t.is_date(dtype)
        or t.is_timestamp(dtype)
        or t.is_decimal(dtype)
        or t.is_null(dtype)
    )


def _plain(dtype: pa.DataType) -> bool:
    """Whether JSON values convert to ``dtype`` as they are (a map's values)."""
    t = pa.types
    return t.is_integer(dtype) or t.is_floating(dtype) or t.is_boolean(dtype) or t.is_string(dtype)


def passthrough_column(values: list, dtype: pa.DataType) -> pa.Array:
    """A pass-through column of the manifest type ``dtype`` from its JSON-safe values
    (``pipeline.validate._json_safe``), or, where they cannot be typed back, their JSON-safe form as strings.

    Typed back: integers, floats (also "NaN" / "Infinity" / "-Infinity"), booleans, strings,
    dates and timestamps (ISO strings, time zones kept), decimals (exact strings) and lists and
    structs of these (``pa.array(values).cast(dtype)``, a safe cast); at the top level also binary
    (base64), times (ISO), durations (seconds) and maps from strings to integers, floats, booleans or
    strings. Any other
    type (a map with non-string keys, binary inside a list, an extension type...) becomes a
    ``string`` column: a string value as it is, any other value as its JSON text, nulls null. So
    the column type follows from the manifest type alone, the same in every shard, with one
    exception: a value that does not cast back (a non-finite float inside a list) turns that
    shard's column into the string form.
    """

    def each(convert):
        return [None if v is None else convert(v) for v in values]

    def as_text():
        return pa.array(
            each(lambda v: v if isinstance(v, str) else json.dumps(v, sort_keys=True)), pa.string()
        )

    t = pa.types
    try:
        if t.is_binary(dtype) or t.is_large_binary(dtype) or t.is_fixed_size_binary(dtype):
            return pa.array(each(lambda v: base64.b64decode(v, validate=True)), dtype)
        if t.is_floating(dtype):
            return pa.array(each(float), pa.float64()).cast(dtype)
        if t.is_time(dtype):
            return pa.array(each(dt.time.fromisoformat), dtype)
        if t.is_duration(dtype):
            return pa.array(each(lambda v: dt.timedelta(seconds=v)), dtype)
        if t.is_map(dtype) and t.is_string(dtype.key_type) and _plain(dtype.item_type):
            # an object, or [] for an empty map (``_json_safe`` cannot tell it from an empty list)
            return pa.array(each(lambda v: list(v.items()) if isinstance(v, dict) else v), dtype)
        if _leaf_casts(dtype):
            return pa.array(values).cast(dtype)
    except (
        pa.ArrowInvalid,
        pa.ArrowNotImplementedError,
        pa.ArrowTypeError,
        TypeError,
        ValueError,
        OverflowError,
        AttributeError,
        binascii.Error,
    ):
        pass
    return as_text()


def write_shard(
    out: OutputFolder,
    shard_id: int,
    tar: bytes,
    metas: list[dict],
    errors: list[dict],
    *,
    expected: int,
    reused: int = 0,
    faults: dict | None = None,
    passthrough_schema: bytes | None = None,
    scored: bool = False,
    rejected: tuple[bytes, list[dict]] | None = None,
) -> dict:
    """Write one shard; return its marker (also when the write failed). ``reused``: samples copied from
    a previous output (``--reuse``), recorded in the marker when there are any. ``passthrough_schema``:
    the manifest's pass-through fields, typed columns of the shard's Parquet (see ``parquet_bytes``).
    ``scored``: score columns in the Parquet (``run --score``). ``rejected``: the tar and metadata of
    the samples a ``--min-score`` threshold rejected, written under ``rejected/`` and counted in the
    marker (``rejected``, ``rejected_keys``)."""
    rejected_metas = rejected[1] if rejected else []
    marker = {
        "shard": shard_id,
        "samples": len(metas),
        "expected": expected,
        "keys": [m["key"] for m in metas],
        "errors": errors,
        "status": "complete" if not errors and len(metas) + len(rejected_metas) == expected else "partial",
        **({"reused": reused} if reused else {}),
        **({"rejected": len(rejected_metas), "rejected_keys": [m["key"] for m in rejected_metas]}
           if rejected_metas else {}),
    }
    try:
        files = None
        if rejected_metas:
            files = (rejected[0], parquet_bytes(rejected_metas, passthrough_schema, scored=scored, rejected=True))
        parquet = parquet_bytes(metas, passthrough_schema, scored=scored)
        return out.write_shard(shard_id, tar, parquet, marker, faults=faults, rejected=files)
    except Exception as e:  # noqa: BLE001 - disk full, permissions, anything: nothing stays under a final name
        failed = [
            ErrorRecord(
                STAGE,
                "",
                f"writing shard {shard_name(shard_id)} failed: {e}",
                id=m["id"],
                row=m.get("row"),
                seed=m["seed"],
            ).to_row()
            for m in metas + rejected_metas
        ]
        return dict(marker, samples=0, keys=[], status="write_failed", errors=errors + failed, reused=0,
                    rejected=0, rejected_keys=[])


def write_batch(
    batch: dict, out_dir: str, faults: dict | None = None, passthrough_schema: bytes | None = None,
    probe: StorageProbe | None = None,
) -> dict:
    """The stage (a CPU task). Input: ``generate.shard_row`` columns (after ``ScoreStage`` also
    ``rejected_tar`` and ``rejected_metas``: the shard is then written with score columns). Output:
    ``shard_id``, ``marker`` (JSON), and ``reference_passes``, ``node``, ``warnings`` and ``model`` (when
    given) passed on. ``passthrough_schema``: see ``parquet_bytes``. ``probe``: checked on this node before writing."""
    if probe is not None:
        probe.check()
    out = OutputFolder(out_dir)
    markers = []
    reused = batch["reused"] if "reused" in batch else [0] * len(batch["shard_id"])
    scored = "rejected_tar" in batch
    rejected_tars = batch["rejected_tar"] if scored else [b""] * len(batch["shard_id"])
    rejected_metas = batch["rejected_metas"] if scored else ["[]"] * len(batch["shard_id"])
    for shard_id, tar, metas, errors, expected, n_reused, rejected_tar, rejected_meta in zip(
        batch["shard_id"],
        batch["tar"],
        batch["metas"],
        batch["errors"],
        batch["expected"],
        reused,
        rejected_tars,
        rejected_metas,
        strict=True,
    ):
        rejected = json.loads(rejected_meta)
        marker = write_shard(
            out,
            int(shard_id),
            bytes(tar),
            json.loads(metas),
            json.loads(errors),
            expected=int(expected),
            reused=int(n_reused),
            faults=faults,
            passthrough_schema=passthrough_schema,
            scored=scored,
            rejected=(bytes(rejected_tar), rejected) if rejected else None,
        )
        markers.append(json.dumps(marker))
    passed = {c: list(batch[c]) for c in ("node", "warnings", "model") if c in batch}
    return {
        "shard_id": [int(n) for n in batch["shard_id"]],
        "marker": markers,
        "reference_passes": [int(n) for n in batch["reference_passes"]],
        **passed,
    }
