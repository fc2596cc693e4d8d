"""The manifest: its Parquet schema, and conforming its files' column types (the files themselves,
and reading them: ``pipeline.manifest_files``).

One row = one prompt rendered for one or more seeds with one concept set (see
``manifests/schema.md`` for every column). Two kinds of failure, kept apart on purpose:

* ``ManifestError`` (here): the run cannot start (file missing or not Parquet, no rows, a
  required column missing, a column of an incompatible type). The CLI exits 2 with the message.
* ``RowProblem`` (``pipeline.validate``): one row is wrong (an id, a seed, a path, a value);
  bad rows go to ``errors.parquet``, good rows still run.

Compatible column types are cast to ``MANIFEST_SCHEMA`` (any integer width, float32/64,
large/view strings, dictionary-encoded strings, large/fixed-size lists, null-typed columns);
columns the schema does not know pass through untouched into each sample's metadata.
"""

from __future__ import annotations

import re

import pyarrow as pa

__all__ = [
    "CONCEPT_TYPE",
    "CONTROL_COLUMNS",
    "CONTROL_TYPE",
    "CONTEXT_TYPE",
    "FIELD_PATTERN",
    "ID_PATTERN",
    "MANIFEST_SCHEMA",
    "OVERRIDE_COLUMNS",
    "OVERRIDE_TYPES",
    "REQUIRED_COLUMNS",
    "SUBJECT_COLUMNS",
    "SUBJECT_TYPE",
    "ManifestError",
    "check_schema",
    "conform_table",
    "summable_columns",
]

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")

# --------------------------------------------------------------------------- schema

CONTEXT_TYPE = pa.struct(
    [
        ("onto", pa.string()),  # a concept index ("0") or a carrier image path
        ("anchor", pa.string()),  # one of ANCHORS; absent when box is given
        ("box", pa.list_(pa.float64())),  # relative [x0, y0, x1, y1] of the carrier's mask box
        ("scale", pa.float64()),
        ("soft_edge", pa.int32()),
    ]
)
CONCEPT_TYPE = pa.struct(
    [
        ("image", pa.string()),
        ("prompt", pa.string()),
        ("mask", pa.string()),
        ("weight", pa.float64()),
        ("box", pa.list_(pa.float64())),  # [x0, y0, x1, y1] in image pixels
        ("points", pa.list_(pa.list_(pa.float64()))),  # [[x, y], ...] in image pixels
        ("label", pa.string()),
        ("context", CONTEXT_TYPE),
    ]
)
REQUIRED_COLUMNS: dict[str, pa.DataType] = {
    "id": pa.string(),
    "prompt": pa.string(),
    "seeds": pa.list_(pa.int64()),
    "concepts": pa.list_(CONCEPT_TYPE),
}
# Per-row overrides of the run's GenParams, one column per GenParams field (stages/params.py); a null
# cell means "the run's default". The only list of override names in pipeline/: derive from this.
OVERRIDE_TYPES: dict[str, pa.DataType] = {
    "negative_prompt": pa.string(),
    "guidance_scale": pa.float64(),
    "num_inference_steps": pa.int64(),
    "height": pa.int64(),
    "width": pa.int64(),
    "reference_seed": pa.int64(),
    "style_fidelity": pa.float64(),
    "mask_mode": pa.string(),
    "start_step": pa.int64(),
    "end_step": pa.int64(),
    "null_ref_prompts": pa.bool_(),
    "mrsa_blocks": pa.list_(pa.int64()),
    "mrsa_layers": pa.list_(pa.string()),
    "loras": pa.list_(pa.struct([("path", pa.string()), ("scale", pa.float64())])),
}
OVERRIDE_COLUMNS = tuple(OVERRIDE_TYPES)
# ControlNet (run --controlnet): a row's layout condition, one struct per ControlNet (stages/inputs/control.py)
CONTROL_TYPE = pa.struct(
    [
        ("image", pa.string()),  # path, URI or URL, read like a concept image
        ("type", pa.string()),  # canny | none
        ("scale", pa.float64()),  # null: 1.0
        ("start", pa.float64()),  # null: 0.0
        ("end", pa.float64()),  # null: 1.0
    ]
)
CONTROL_COLUMNS: dict[str, pa.DataType] = {
    "control": CONTROL_TYPE,  # one ControlNet
    "controls": pa.list_(CONTROL_TYPE),  # several, in --controlnet order
    "control_references": pa.bool_(),  # the row's --control-references
}
# BLIP-Diffusion (a --model of that family): the row's subject, read like a concept image (stages/inputs/subject.py)
SUBJECT_TYPE = pa.struct(
    [
        ("image", pa.string()),  # path, URI or URL of the subject image
        ("category", pa.string()),  # the subject's category in that image ("dog")
        ("target_category", pa.string()),  # the word the prompt names it by (null: the category)
    ]
)
SUBJECT_COLUMNS: dict[str, pa.DataType] = {"blip_subject": SUBJECT_TYPE}
MANIFEST_SCHEMA = pa.schema(
    list(REQUIRED_COLUMNS.items())
    + list(OVERRIDE_TYPES.items())
    + list(CONTROL_COLUMNS.items())
    + list(SUBJECT_COLUMNS.items())
)
_REQUIRED_CONCEPT_FIELDS = ("image", "prompt")

_CONCEPT_FIELDS = tuple(f.name for f in CONCEPT_TYPE)
_CONTEXT_FIELDS = tuple(f.name for f in CONTEXT_TYPE)
_CONTROL_FIELDS = tuple(f.name for f in CONTROL_TYPE)
_SUBJECT_FIELDS = tuple(f.name for f in SUBJECT_TYPE)
FIELD_PATTERN = re.compile(
    r"(?:id|prompt|seeds|{overrides}|control_references|blip_subject(?:\.(?:{subject}))?|(?:control|controls(?:\[\d+\])?)(?:\.(?:{control}))?|loras\[\d+\](?:\.(?:path|scale))?|concepts(?:\[\d+\](?:\.(?:{concept}|context\.(?:{context})))?)?)".format(
        overrides="|".join(OVERRIDE_COLUMNS),
        concept="|".join(_CONCEPT_FIELDS),
        context="|".join(_CONTEXT_FIELDS),
        control="|".join(_CONTROL_FIELDS),
        subject="|".join(_SUBJECT_FIELDS),
    )
)
"""Every field a ``RowProblem`` can name (``fullmatch`` it)."""


class ManifestError(Exception):
    """The manifest as a whole is unusable (the run cannot start; the CLI exits 2).

    The message names the file and, where it applies, the column and what was expected.
    """


class _Incompatible(Exception):
    def __init__(self, path: str, actual: pa.DataType, expected: pa.DataType):
        super().__init__(path)
        self.path, self.actual, self.expected = path, actual, expected


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list(t: pa.DataType) -> bool:
    return (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    )


def _cast_type(actual: pa.DataType, expected: pa.DataType, path: str) -> pa.DataType:
    """The type a column of type ``actual`` is cast to so it reads as ``expected``.

    Raises ``_Incompatible`` naming the nested path (``concepts.weight``) where it is not.
    A struct keeps the fields the schema does not know (they pass through) and gains the
    known optional ones it lacks (as nulls).
    """
    if pa.types.is_null(actual):
        return expected
    if pa.types.is_dictionary(actual):
        return _cast_type(actual.value_type, expected, path)
    if _is_string(expected):
        onto_index = path.endswith("context.onto") and pa.types.is_integer(actual)
        if _is_string(actual) or onto_index:
            return expected
        raise _Incompatible(path, actual, expected)
    if pa.types.is_integer(expected):
        if pa.types.is_integer(actual):
            return expected
        raise _Incompatible(path, actual, expected)
    if pa.types.is_floating(expected):
        if pa.types.is_floating(actual) or pa.types.is_integer(actual):
            return expected
        raise _Incompatible(path, actual, expected)
    if pa.types.is_boolean(expected):
        if pa.types.is_boolean(actual):
            return expected
        raise _Incompatible(path, actual, expected)
    if pa.types.is_list(expected):
        if not _is_list(actual):
            raise _Incompatible(path, actual, expected)
        return pa.list_(_cast_type(actual.value_type, expected.value_type, path))
    if pa.types.is_struct(expected):
        if not pa.types.is_struct(actual):
            raise _Incompatible(path, actual, expected)
        known = {f.name: f.type for f in expected}
        fields = [
            pa.field(f.name, _cast_type(f.type, known[f.name], f"{path}.{f.name}")) if f.name in known else f
            for f in actual
        ]
        present = {f.name for f in actual}
        fields += [pa.field(name, t) for name, t in known.items() if name not in present]
        return pa.struct(fields)
    raise _Incompatible(path, actual, expected)  # pragma: no cover - the schema uses the above only


_TYPE_HINTS = {
    "seeds": " (a list of seeds per row, e.g. [0, 1, 2]; write a single seed as [seed])",
    "concepts": " (a list of structs with at least image and prompt)",
}


def conform_table(table: pa.Table, *, source: str = "manifest", allow_empty: bool = False) -> pa.Table:
    """Check the schema and cast known columns to ``MANIFEST_SCHEMA`` types; others untouched.

    Raises ``ManifestError`` (naming ``source`` and the column) for zero rows, a duplicated
    or missing required column, a concept struct without ``image``/``prompt``, or a column
    whose type cannot hold the schema's values. Integers that do not fit the schema's width
    (a uint64 seed >= 2**63) keep their type, so the validator refuses that *row*. ``allow_empty``: zero
    rows are fine (one file of a folder: Spark and duckdb write empty ones; the manifest as a whole is
    still refused without rows).
    """
    targets = check_schema(table.schema, source=source)
    if table.num_rows == 0 and not allow_empty:
        raise ManifestError(f"{source}: the manifest has no rows")
    names = table.column_names
    for name, target in targets.items():
        column = table.column(name)
        if column.type == target:
            continue
        try:
            cast = column.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue  # out-of-range integers: the row validator reads the values and refuses the row
        table = table.set_column(names.index(name), name, cast)
    return table


def check_schema(schema: pa.Schema, *, source: str = "manifest") -> dict[str, pa.DataType]:
    """``conform_table``'s schema checks alone (a file's footer is enough): the type each known column
    is cast to, or ``ManifestError``."""
    names = schema.names
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ManifestError(f"{source}: column(s) {duplicated} appear more than once")
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise ManifestError(
            f"{source}: required column(s) {missing} missing; a manifest needs "
            f"{list(REQUIRED_COLUMNS)} (found {names})"
        )
    expected_types = {**REQUIRED_COLUMNS, **OVERRIDE_TYPES, **CONTROL_COLUMNS}
    targets = {}
    for name, expected in expected_types.items():
        if name not in names:
            continue
        actual = schema.field(name).type
        try:
            targets[name] = _cast_type(actual, expected, name)
        except _Incompatible as exc:
            hint = _TYPE_HINTS.get(exc.path, "")
            where = f"column {name!r}" if exc.path == name else f"column {name!r}, field {exc.path!r}"
            raise ManifestError(
                f"{source}: {where} has type {exc.actual}, expected {exc.expected}{hint}"
            ) from None
        if name == "concepts":
            _require_concept_fields(actual, source)
    return targets


def _require_concept_fields(column_type: pa.DataType, source: str) -> None:
    """A concepts struct without ``image`` or ``prompt`` is a schema mistake: stop the run
    once rather than report the same missing field on every row."""
    if pa.types.is_dictionary(column_type) or not _is_list(column_type):
        return  # null-typed: every row has no concepts, refused row by row
    struct = column_type.value_type
    if not pa.types.is_struct(struct):
        return
    present = {f.name for f in struct}
    lacking = [name for name in _REQUIRED_CONCEPT_FIELDS if name not in present]
    if lacking:
        raise ManifestError(
            f"{source}: column 'concepts' has no field(s) {lacking}; each concept needs "
            f"image and prompt (found fields {sorted(present)})"
        )


_INT64_RANGE = (-(2**63), 2**63 - 1)


def summable_columns(table: pa.Table) -> pa.Table:
    """Known columns as read (not conformed: no row validated yet; a run's planning sums and compares
    them over whole files) in types Arrow's compute kernels take, for every type ``check_schema`` lets
    through: ``id`` as strings, a null-typed ``seeds`` or ``concepts`` as a null list per row, other
    columns as int64, a value outside int64 (a uint64 height >= 2**63) as null. The validator refuses
    such rows later, each by row and field; here they only must not sink the file."""
    for i, name in enumerate(table.column_names):
        column = table.column(name)
        if name == "id":
            target = pa.string()
        elif name in ("seeds", "concepts"):
            if not pa.types.is_null(column.type):
                continue  # only their lengths are read, which any list type has
            target = pa.list_(pa.int64())
        else:
            target = pa.int64()
        if column.type == target:
            continue
        try:
            column = column.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            low, high = _INT64_RANGE
            column = pa.array(
                [v if isinstance(v, int) and low <= v <= high else None for v in column.to_pylist()], pa.int64()
            )
        table = table.set_column(i, name, column)
    return table
