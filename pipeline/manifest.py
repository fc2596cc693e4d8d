"""The manifest: its Parquet schema, reading it, and validating every row without a model.

One row = one prompt rendered for one or more seeds with one concept set (see
``manifests/schema.md`` for every column). Two kinds of failure, kept apart on purpose:

* ``ManifestError``: the run cannot start (file missing or not Parquet, no rows, a required
  column missing, a column of an incompatible type). The CLI exits 2 with the message.
* ``RowProblem``: one row is wrong (an id, a seed, a path, a value). ``validate_table`` never
  raises on row data: it returns every good row as a ``RowSpec`` and *every* problem of every
  bad row, each naming the row, the field (``concepts[1].mask``) and the reason. Bad rows go
  to ``errors.parquet``; good rows still run.

Compatible column types are cast to ``MANIFEST_SCHEMA`` (any integer width, float32/64,
large/view strings, dictionary-encoded strings, large/fixed-size lists, null-typed columns);
columns the schema does not know pass through untouched into each sample's metadata.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import decimal
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from freecustom_core.config import DEFAULT_NEGATIVE_PROMPT, MASK_MODES  # torch-free module
from stages.concepts import ANCHORS, ConceptSpec, ContextSpec
from stages.errors import RowError
from stages.inputs import InputSettings, is_uri, load_mask, probe_image, resolve_path

__all__ = [
    "CONCEPT_TYPE",
    "CONTEXT_TYPE",
    "DEFAULT_NEGATIVE_PROMPT",
    "FIELD_PATTERN",
    "ID_PATTERN",
    "MANIFEST_SCHEMA",
    "MAX_INT64",
    "MASK_MODES",
    "OVERRIDE_COLUMNS",
    "REQUIRED_COLUMNS",
    "GenParams",
    "Limits",
    "ManifestError",
    "RowProblem",
    "RowSpec",
    "conform_table",
    "format_problem",
    "manifest_base_dir",
    "param_problems",
    "read_manifest",
    "validate_table",
]

# The authors' negative prompt (freecustom_core.DEFAULT_NEGATIVE_PROMPT; kept here so that
# reading a manifest does not import the engine).

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_INT64 = 2**63  # seeds and reference_seed lie in [0, 2**63)
DEFAULT_WEIGHT = 3.0
MAX_CONTEXT_SCALE = 4.0

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
# Per-row overrides of the run's GenParams; a null cell means "the run's default".
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
}
OVERRIDE_COLUMNS = tuple(OVERRIDE_TYPES)
MANIFEST_SCHEMA = pa.schema(list(REQUIRED_COLUMNS.items()) + list(OVERRIDE_TYPES.items()))
_REQUIRED_CONCEPT_FIELDS = ("image", "prompt")

_CONCEPT_FIELDS = tuple(f.name for f in CONCEPT_TYPE)
_CONTEXT_FIELDS = tuple(f.name for f in CONTEXT_TYPE)
FIELD_PATTERN = re.compile(
    r"(?:id|prompt|seeds|{overrides}|concepts(?:\[\d+\](?:\.(?:{concept}|context\.(?:{context})))?)?)".format(
        overrides="|".join(OVERRIDE_COLUMNS),
        concept="|".join(_CONCEPT_FIELDS),
        context="|".join(_CONTEXT_FIELDS),
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


def conform_table(table: pa.Table, *, source: str = "manifest") -> pa.Table:
    """Check the schema and cast known columns to ``MANIFEST_SCHEMA`` types; others untouched.

    Raises ``ManifestError`` (naming ``source`` and the column) for zero rows, a duplicated
    or missing required column, a concept struct without ``image``/``prompt``, or a column
    whose type cannot hold the schema's values. Integers that do not fit the schema's width
    (a uint64 seed >= 2**63) keep their type, so the validator refuses that *row*.
    """
    names = table.column_names
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ManifestError(f"{source}: column(s) {duplicated} appear more than once")
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise ManifestError(
            f"{source}: required column(s) {missing} missing; a manifest needs "
            f"{list(REQUIRED_COLUMNS)} (found {names})"
        )
    if table.num_rows == 0:
        raise ManifestError(f"{source}: the manifest has no rows")
    expected_types = {**REQUIRED_COLUMNS, **OVERRIDE_TYPES}
    for name, expected in expected_types.items():
        if name not in names:
            continue
        column = table.column(name)
        try:
            target = _cast_type(column.type, expected, name)
        except _Incompatible as exc:
            hint = _TYPE_HINTS.get(exc.path, "")
            where = f"column {name!r}" if exc.path == name else f"column {name!r}, field {exc.path!r}"
            raise ManifestError(
                f"{source}: {where} has type {exc.actual}, expected {exc.expected}{hint}"
            ) from None
        if name == "concepts":
            _require_concept_fields(column.type, source)
        if column.type == target:
            continue
        try:
            cast = column.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue  # out-of-range integers: the row validator reads the values and refuses the row
        table = table.set_column(names.index(name), name, cast)
    return table


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


def read_manifest(path: str) -> pa.Table:
    """Read a manifest (a Parquet file, a folder of them, or a ``pyarrow.fs`` URI) and conform it.

    Raises ``ManifestError`` when the file is missing, not Parquet, unreadable, empty, or its
    schema does not fit (see ``conform_table``).
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    try:
        if is_uri(path):
            fs, inner = pafs.FileSystem.from_uri(path)
        else:
            fs, inner = pafs.LocalFileSystem(), os.path.abspath(path)
        info = fs.get_file_info(inner)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ManifestError(f"{path}: cannot open the manifest ({exc})") from None
    if info.type == pafs.FileType.NotFound:
        raise ManifestError(f"{path}: manifest not found")
    try:
        if info.type == pafs.FileType.Directory:  # a dataset written by Spark, Ray, ...
            table = pq.read_table(inner, filesystem=fs)
        else:
            with fs.open_input_file(inner) as fh:
                table = pq.ParquetFile(fh).read()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ManifestError(f"{path}: not a readable Parquet file ({exc})") from None
    table = conform_table(table, source=path)
    # decoding leaves freed buffers in Arrow's allocator (about 2x the table); hand them back, or the
    # driver keeps them for the whole run
    pa.default_memory_pool().release_unused()
    return table


def manifest_base_dir(path: str) -> str:
    """The folder relative input paths resolve against: the manifest's own folder (or URI)."""
    if is_uri(path):
        return path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Limits:
    """Sanity limits of a run: anything beyond them is refused by row, not attempted."""

    max_side: int = 2048  # height and width, pixels
    max_steps: int = 1000  # num_inference_steps
    max_concepts: int = 8  # concepts per row
    max_prompt_chars: int = 10_000  # prompt, concept prompts, negative_prompt

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{f.name} must be an integer >= 1, got {value!r}")
        if self.max_side < 64:
            raise ValueError(f"Limits.max_side must be >= 64, got {self.max_side}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _side_problem(name: str, value: Any, limits: Limits | None) -> str | None:
    if not _is_int(value):
        return f"{name} must be an integer, got {value!r}"
    if value < 64:
        return f"{name} {value} is below 64 pixels"
    if value % 8:
        return (
            f"{name} {value} is not a multiple of 8 (the VAE downsamples by 8); try {max(64, value // 8 * 8)}"
        )
    if limits is not None and value > limits.max_side:
        return f"{name} {value} is over the limit of {limits.max_side} pixels (Limits.max_side)"
    return None


def _int_list_problem(name: str, value: Any) -> str | None:
    if not isinstance(value, (list, tuple)):
        return f"{name} must be a list of integers, got {value!r}"
    if not value:
        return f"{name} is empty; omit it to use the run's default"
    if any(not _is_int(v) for v in value):
        return f"{name} must hold integers only (no nulls), got {list(value)}"
    if any(v < 0 for v in value):
        return f"{name} holds a negative block index: {list(value)}"
    if len(set(value)) != len(value):
        return f"{name} holds duplicates: {list(value)}"
    return None


def _str_list_problem(name: str, value: Any) -> str | None:
    if not isinstance(value, (list, tuple)):
        return f"{name} must be a list of layer names, got {value!r}"
    if not value:
        return f"{name} is empty; omit it to use mrsa_blocks"
    if any(not isinstance(v, str) or not v.strip() for v in value):
        return f"{name} must hold non-empty layer names (no nulls), got {list(value)}"
    if len(set(value)) != len(value):
        return f"{name} holds duplicates: {list(value)}"
    return None


def param_problems(values: Mapping[str, Any], limits: Limits | None = None) -> list[tuple[str, str]]:
    """Every problem of a set of generation parameters, as (field, reason) pairs.

    ``values`` has GenParams' fields (a GenParams' ``asdict`` with a row's overrides applied).
    Rules that depend on the run's ``limits`` (max side, max steps, prompt length) are skipped
    when ``limits`` is None.
    """
    problems: list[tuple[str, str]] = []

    def check(name: str, problem: str | None) -> None:
        if problem:
            problems.append((name, problem))

    negative = values["negative_prompt"]
    if not isinstance(negative, str):
        check("negative_prompt", f"must be a string, got {negative!r}")
    elif limits is not None and len(negative) > limits.max_prompt_chars:
        check("negative_prompt", f"{len(negative)} characters, over the limit of {limits.max_prompt_chars}")

    guidance = values["guidance_scale"]
    if not _finite(guidance) or guidance < 0:
        check("guidance_scale", f"guidance_scale {guidance!r} must be a finite number >= 0 (default 7.5)")

    steps = values["num_inference_steps"]
    steps_ok = _is_int(steps) and steps >= 1 and (limits is None or steps <= limits.max_steps)
    if not steps_ok:
        top = limits.max_steps if limits is not None else "max_steps"
        check("num_inference_steps", f"num_inference_steps {steps!r} is outside [1, {top}]")

    check("height", _side_problem("height", values["height"], limits))
    check("width", _side_problem("width", values["width"], limits))

    ref_seed = values["reference_seed"]
    if not _is_int(ref_seed) or not 0 <= ref_seed < MAX_INT64:
        check("reference_seed", f"reference_seed {ref_seed!r} is outside [0, 2**63)")

    fidelity = values["style_fidelity"]
    if not _finite(fidelity) or not 0 <= fidelity <= 1:
        check("style_fidelity", f"style_fidelity {fidelity!r} is outside [0, 1]")

    mode = values["mask_mode"]
    if mode not in MASK_MODES:
        check("mask_mode", f"unknown mask_mode {mode!r}; use one of {list(MASK_MODES)}")

    if not isinstance(values["null_ref_prompts"], bool):
        check("null_ref_prompts", f"must be true or false, got {values['null_ref_prompts']!r}")

    start, end = values["start_step"], values["end_step"]
    if not _is_int(start) or start < 0:
        check("start_step", f"start_step {start!r} must be an integer >= 0")
    elif end is None and steps_ok and start >= steps:
        check("start_step", f"start_step {start} must be below num_inference_steps {steps}")
    if end is not None:
        if not _is_int(end) or end < 1:
            check("end_step", f"end_step {end!r} must be an integer >= 1 (or null: all steps)")
        elif steps_ok and end > steps:
            check("end_step", f"end_step {end} is past num_inference_steps {steps}")
        elif _is_int(start) and start >= end:
            check("start_step", f"start_step {start} must be below end_step {end}")

    check("mrsa_blocks", _int_list_problem("mrsa_blocks", values["mrsa_blocks"]))
    if values["mrsa_layers"] is not None:
        check("mrsa_layers", _str_list_problem("mrsa_layers", values["mrsa_layers"]))
    return problems


@dataclass(frozen=True)
class GenParams:
    """How a row is rendered: the run's defaults (the paper's), with the row's overrides applied.

    ``end_step`` None means "through the last step". MRSA (multi-reference self-attention)
    runs in ``mrsa_blocks`` (attention-bearing UNet blocks numbered down 0..2, mid 3, up 4..6
    for SD1.5: the paper's (5, 6) are the last two up blocks), or, when ``mrsa_layers`` is
    given, in exactly those named layers. Validated on construction (limit-free rules; the
    run's ``Limits`` are applied by ``validate_table``).
    """

    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    height: int = 512
    width: int = 512
    reference_seed: int = 0
    style_fidelity: float = 1.0
    mask_mode: str = "bias"
    start_step: int = 0
    end_step: int | None = None
    null_ref_prompts: bool = False
    mrsa_blocks: tuple[int, ...] = (5, 6)
    mrsa_layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mrsa_blocks, list):
            object.__setattr__(self, "mrsa_blocks", tuple(self.mrsa_blocks))
        if isinstance(self.mrsa_layers, list):
            object.__setattr__(self, "mrsa_layers", tuple(self.mrsa_layers))
        for name in ("guidance_scale", "style_fidelity"):
            if _is_int(getattr(self, name)):
                object.__setattr__(self, name, float(getattr(self, name)))
        problems = param_problems(dataclasses.asdict(self))
        if problems:
            raise ValueError("invalid GenParams: " + "; ".join(f"{f}: {r}" for f, r in problems))

    def with_overrides(self, overrides: Mapping[str, Any]) -> GenParams:
        """A copy with the non-null values of ``overrides`` (manifest column -> value) applied."""
        unknown = sorted(set(overrides) - set(OVERRIDE_COLUMNS))
        if unknown:
            raise ValueError(f"not GenParams fields: {unknown}; known: {list(OVERRIDE_COLUMNS)}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self


# --------------------------------------------------------------------------- rows


@dataclass(slots=True)
class RowSpec:
    """A validated manifest row, ready for reference preparation and generation.

    ``index``: the row's 0-based position in the manifest. ``concepts``: paths resolved
    (``image_path``, ``mask_path``, a carrier path in ``context.onto``). ``params``: the run's
    defaults with this row's overrides. ``passthrough``: every column the schema does not
    know, as JSON-safe values, copied into each sample's metadata.
    """

    index: int
    id: str
    prompt: str
    seeds: tuple[int, ...]
    concepts: tuple[ConceptSpec, ...]
    params: GenParams
    passthrough: dict[str, Any] = field(default_factory=dict)


@dataclass
class RowProblem:
    """Why a row is refused: its index and id (None when missing), the field and the reason."""

    index: int
    id: str | None
    field: str
    reason: str


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def format_problem(p: RowProblem) -> str:
    """One line, e.g. ``row 3 (id=cat_1): concepts[1].mask: mask is empty (no pixel >= 50 %)``."""
    if p.id is None:
        who = "id missing"
    elif ID_PATTERN.fullmatch(p.id):
        who = f"id={p.id}"
    else:
        shown = p.id if len(p.id) <= 40 else p.id[:40] + "..."
        who = f"id={shown!r}"
    reason = _CONTROL.sub(lambda m: repr(m.group())[1:-1], p.reason)  # one line, whatever a path holds
    return f"row {p.index} ({who}): {p.field}: {reason}"


def _json_safe(value: Any) -> Any:
    """A pass-through cell as a JSON-safe value (for sample metadata and its Parquet twin).

    Dates and times become ISO strings, decimals strings (exact), bytes base64, non-finite
    floats the strings "NaN" / "Infinity" / "-Infinity", maps with string keys objects.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
            return {k: _json_safe(v) for k, v in value}  # a Parquet map with string keys
        return [_json_safe(v) for v in value]
    return str(value)


# --------------------------------------------------------------------------- validation

_INDEX = re.compile(r"[+-]?\d+")
_Fail = Callable[[str, str], None]


class _RowValidator:
    """Checks rows one by one; remembers what it learnt about files (many rows share images)."""

    def __init__(
        self,
        *,
        defaults: GenParams,
        limits: Limits,
        inputs: InputSettings,
        base_dir: str | None,
        check_files: bool,
    ):
        self.defaults = defaults
        self.limits = limits
        self.inputs = inputs
        self.base_dir = base_dir
        self.check_files = check_files
        self._sizes: dict[str, tuple[int, int] | str] = {}  # resolved path -> (W, H) or a reason
        self._masks: dict[tuple[str, tuple[int, int]], str | None] = {}  # -> None (good) or a reason
        # rows share few concept lists and parameter sets: one object each, however many rows use it
        # (a 100k-row manifest of 100 concept sets holds 100 concept tuples, not 100k)
        self._interned: dict[Any, Any] = {}
        self._params_seen: dict[tuple, tuple[GenParams | None, list[tuple[str, str]]]] = {}

    # -- files

    def _resolve(self, path: str, field: str, fail: _Fail) -> str | None:
        try:
            return resolve_path(path, base_dir=self.base_dir, settings=self.inputs, field=field)
        except RowError as exc:
            fail(field, exc.reason)
            return None

    def _probe(self, resolved: str, field: str, fail: _Fail) -> tuple[int, int] | None:
        """(W, H) of an image file, or None after reporting why it cannot be used."""
        if resolved not in self._sizes:
            try:
                self._sizes[resolved] = probe_image(
                    resolved, base_dir=None, settings=self.inputs, field=field
                )
            except RowError as exc:
                self._sizes[resolved] = exc.reason
        known = self._sizes[resolved]
        if isinstance(known, str):
            fail(field, known)
            return None
        return known

    def _check_mask(self, resolved: str, size: tuple[int, int], field: str, fail: _Fail) -> None:
        key = (resolved, size)
        if key not in self._masks:
            try:
                load_mask(resolved, size, base_dir=None, settings=self.inputs, field=field)
                self._masks[key] = None
            except RowError as exc:
                self._masks[key] = exc.reason
        if self._masks[key] is not None:
            fail(field, self._masks[key])

    # -- scalar fields

    def _text(self, value: Any, field: str, what: str, fail: _Fail) -> str | None:
        if value is None:
            fail(field, f"missing (null); {what}")
            return None
        if not value.strip():
            fail(field, f"empty or whitespace only; {what}")
            return None
        if len(value) > self.limits.max_prompt_chars:
            fail(field, f"{len(value)} characters, over the limit of {self.limits.max_prompt_chars}")
            return None
        return value

    def _seeds(self, seeds: Any, fail: _Fail) -> tuple[int, ...]:
        what = "give a non-empty list of distinct seeds in [0, 2**63), e.g. [0, 1, 2]"
        if seeds is None:
            fail("seeds", f"missing (null); {what}")
            return ()
        if not seeds:
            fail("seeds", f"empty; {what}")
            return ()
        nulls = [k for k, s in enumerate(seeds) if s is None]
        if nulls:
            fail("seeds", f"null seed(s) at position(s) {nulls[:5]}; {what}")
        values = [s for s in seeds if s is not None]
        negative = [s for s in values if s < 0]
        if negative:
            fail("seeds", f"negative seed(s) {negative[:5]}; seeds lie in [0, 2**63)")
        huge = [s for s in values if s >= MAX_INT64]
        if huge:
            fail("seeds", f"seed(s) {huge[:5]} >= 2**63; seeds lie in [0, 2**63)")
        seen: set[int] = set()
        duplicates = sorted({s for s in values if s in seen or seen.add(s)})
        if duplicates:
            fail(
                "seeds",
                f"duplicate seed(s) {duplicates[:5]}: each (id, seed) is one sample, list a seed once",
            )
        return tuple(values)

    # -- concepts

    def _concepts(self, value: Any, fail: _Fail) -> tuple[ConceptSpec | None, ...]:
        limit = self.limits.max_concepts
        if value is None:
            fail("concepts", f"missing (null); a row needs 1 to {limit} concepts")
            return ()
        if not value:
            fail("concepts", f"no concepts; a row needs 1 to {limit}")
            return ()
        if len(value) > limit:
            fail("concepts", f"{len(value)} concepts; at most {limit} per row (Limits.max_concepts)")
        has_context = [isinstance(c, Mapping) and c.get("context") is not None for c in value]
        return tuple(self._concept(i, c, has_context, fail) for i, c in enumerate(value))

    def _concept(self, i: int, c: Any, has_context: list[bool], fail: _Fail) -> ConceptSpec | None:
        prefix = f"concepts[{i}]"
        if not isinstance(c, Mapping):
            fail(prefix, "null concept; each concept needs at least image and prompt")
            return None
        image, image_path, size = c.get("image"), None, None
        if image is None or not image.strip():
            fail(f"{prefix}.image", "missing: every concept needs an image path")
        else:
            image_path = self._resolve(image, f"{prefix}.image", fail)
            if image_path is not None and self.check_files:
                size = self._probe(image_path, f"{prefix}.image", fail)
        prompt = self._text(
            c.get("prompt"), f"{prefix}.prompt", "each concept needs a prompt naming it, e.g. 'a cat'", fail
        )
        mask, mask_path = c.get("mask"), None
        if mask is not None:
            if not mask.strip():
                fail(f"{prefix}.mask", "empty path; leave mask null to use the image's alpha or segmentation")
            else:
                mask_path = self._resolve(mask, f"{prefix}.mask", fail)
            if mask_path is not None and self.check_files:
                if size is not None:
                    self._check_mask(mask_path, size, f"{prefix}.mask", fail)
                else:  # no image size to compare with: at least the file must be a readable image
                    self._probe(mask_path, f"{prefix}.mask", fail)
        weight = c.get("weight")
        weight = DEFAULT_WEIGHT if weight is None else weight
        if not _finite(weight):
            fail(
                f"{prefix}.weight",
                f"weight {weight!r} must be a finite number > 0 (default {DEFAULT_WEIGHT})",
            )
        elif weight <= 0:
            fail(
                f"{prefix}.weight",
                f"weight {weight!r} must be > 0: it is how strongly the concept's masked region is "
                f"attended (added to the attention logits in bias mode, multiplying them in scale "
                f"mode; default {DEFAULT_WEIGHT}); to weaken a concept use a smaller positive weight",
            )
        box = self._pixel_box(c.get("box"), size, f"{prefix}.box", fail)
        points = self._points(c.get("points"), size, f"{prefix}.points", fail)
        label = c.get("label")
        if label is not None and not label.strip():
            fail(f"{prefix}.label", "empty; leave label null or name the object for the detector")
        context = None
        if c.get("context") is not None:
            context = self._context(i, c["context"], has_context, f"{prefix}.context", fail)
        if image_path is None or prompt is None:
            return None
        return ConceptSpec(
            image=image,
            prompt=prompt,
            image_path=image_path,
            mask=mask,
            mask_path=mask_path,
            weight=float(weight) if _finite(weight) else DEFAULT_WEIGHT,
            box=box,
            points=points,
            label=label,
            context=context,
        )

    def _pixel_box(
        self, box: Any, size: tuple[int, int] | None, field: str, fail: _Fail
    ) -> tuple[float, float, float, float] | None:
        if box is None:
            return None
        if len(box) != 4 or not all(_finite(v) for v in box):
            fail(field, f"box must be 4 finite numbers [x0, y0, x1, y1] in pixels, got {box!r}")
            return None
        x0, y0, x1, y1 = box
        if x0 >= x1 or y0 >= y1:
            fail(field, f"box {list(box)} is empty or inverted: need x0 < x1 and y0 < y1")
            return None
        if x0 < 0 or y0 < 0 or (size is not None and (x1 > size[0] or y1 > size[1])):
            bounds = f"[0, 0, {size[0]}, {size[1]}]" if size is not None else "the image"
            fail(field, f"box {list(box)} is outside the image {bounds} (pixels, after EXIF rotation)")
            return None
        return (float(x0), float(y0), float(x1), float(y1))

    def _points(
        self, points: Any, size: tuple[int, int] | None, field: str, fail: _Fail
    ) -> tuple[tuple[float, float], ...] | None:
        if points is None:
            return None
        if not points:
            fail(field, "empty; leave points null or give at least one [x, y]")
            return None
        parsed: list[tuple[float, float]] = []
        for k, pt in enumerate(points):
            if pt is None or len(pt) != 2 or not all(_finite(v) for v in pt):
                fail(field, f"point {k} must be 2 finite numbers [x, y] in pixels, got {pt!r}")
                return None
            x, y = pt
            if x < 0 or y < 0 or (size is not None and (x >= size[0] or y >= size[1])):
                bounds = f"{size[0]}x{size[1]}" if size is not None else "image"
                fail(
                    field, f"point {k} {list(pt)} is outside the {bounds} image (pixels, after EXIF rotation)"
                )
                return None
            parsed.append((float(x), float(y)))
        return tuple(parsed)

    def _context(
        self, i: int, ctx: Mapping[str, Any], has_context: list[bool], field: str, fail: _Fail
    ) -> ContextSpec | None:
        n = len(has_context)
        ok = True
        onto_raw, onto = ctx.get("onto"), None
        if onto_raw is None or (isinstance(onto_raw, str) and not onto_raw.strip()):
            fail(f"{field}.onto", "missing: give a concept index (e.g. '0') or a carrier image path")
            ok = False
        elif _is_int(onto_raw) or _INDEX.fullmatch(onto_raw.strip()):
            k = int(onto_raw)
            if k == i:
                fail(
                    f"{field}.onto",
                    f"points to this concept itself ({k}); paste onto another concept or an image",
                )
                ok = False
            elif not 0 <= k < n:
                fail(
                    f"{field}.onto",
                    f"concept index {k} is out of range: this row has {n} concepts (0..{n - 1})",
                )
                ok = False
            elif has_context[k]:
                fail(
                    f"{field}.onto",
                    f"concept {k} is itself pasted (it has a context); a carrier must be a plain "
                    "concept (no chains or cycles)",
                )
                ok = False
            else:
                onto = k
        else:
            onto = self._resolve(onto_raw, f"{field}.onto", fail)
            if onto is None or (self.check_files and self._probe(onto, f"{field}.onto", fail) is None):
                ok = False

        anchor, rel_box = ctx.get("anchor"), ctx.get("box")
        if anchor is not None and rel_box is not None:
            fail(f"{field}.anchor", f"give either anchor ({anchor!r}) or box ({rel_box!r}), not both")
            ok = False
        elif anchor is not None and anchor not in ANCHORS:
            fail(
                f"{field}.anchor", f"unknown anchor {anchor!r}; use one of {list(ANCHORS)} or a relative box"
            )
            ok = False
        placed: str | tuple[float, float, float, float] = anchor if anchor is not None else "center"
        if rel_box is not None:
            problem = None
            if len(rel_box) != 4 or not all(_finite(v) for v in rel_box):
                problem = f"box must be 4 finite numbers [x0, y0, x1, y1] in [0, 1], got {rel_box!r}"
            elif not all(0 <= v <= 1 for v in rel_box):
                problem = f"box {list(rel_box)} must lie in [0, 1] (relative to the carrier's mask box)"
            elif rel_box[0] >= rel_box[2] or rel_box[1] >= rel_box[3]:
                problem = f"box {list(rel_box)} is empty or inverted: need x0 < x1 and y0 < y1"
            if problem:
                fail(f"{field}.box", problem)
                ok = False
            else:
                placed = tuple(float(v) for v in rel_box)  # type: ignore[assignment]

        scale = ctx.get("scale")
        scale = 0.5 if scale is None else scale
        if not _finite(scale) or not 0 < scale <= MAX_CONTEXT_SCALE:
            fail(
                f"{field}.scale",
                f"scale {scale!r} must be in (0, {MAX_CONTEXT_SCALE:g}] (relative to the carrier box)",
            )
            ok = False
        soft_edge = ctx.get("soft_edge")
        soft_edge = 0 if soft_edge is None else soft_edge
        if not _is_int(soft_edge) or not 0 <= soft_edge <= self.limits.max_side:
            fail(
                f"{field}.soft_edge", f"soft_edge {soft_edge!r} must be in [0, {self.limits.max_side}] pixels"
            )
            ok = False
        if not ok:
            return None
        return ContextSpec(onto=onto, anchor=placed, scale=float(scale), soft_edge=soft_edge)

    # -- parameters

    def _params(self, row: Mapping[str, Any], fail: _Fail) -> GenParams | None:
        overrides = {}
        for name in OVERRIDE_COLUMNS:
            value = row.get(name)
            if value is not None:
                overrides[name] = tuple(value) if isinstance(value, list) else value
        try:
            key = tuple(sorted(overrides.items()))
            hash(key)
        except TypeError:  # an unhashable override value: checked, not cached
            key = None
        checked = self._params_seen.get(key) if key is not None else None
        if checked is None:
            merged = {**dataclasses.asdict(self.defaults), **overrides}
            problems = param_problems(merged, self.limits)
            checked = (None if problems else self.defaults.with_overrides(overrides), problems)
            if key is not None:
                if len(self._params_seen) > 4096:  # rows with per-row parameters: keep the cache bounded
                    self._params_seen.clear()
                self._params_seen[key] = checked
        params, problems = checked
        for name, reason in problems:
            fail(name, reason if name in overrides else f"{reason} [{name} is the run's default]")
        return params

    # -- a row

    def row(self, index: int, row: Mapping[str, Any], fail: _Fail) -> RowSpec | None:
        """Check every field of one row, reporting each problem through ``fail``."""
        row_id = row.get("id")
        if row_id is None:
            fail("id", "missing (null); every row needs an id matching [A-Za-z0-9_-]{1,128}")
        elif not ID_PATTERN.fullmatch(row_id):
            shown = row_id if len(row_id) <= 60 else row_id[:60] + "..."
            fail(
                "id",
                f"{shown!r} is not a valid id: use 1 to 128 characters of A-Z a-z 0-9 _ - "
                "(ids name output files)",
            )
        prompt = self._text(row.get("prompt"), "prompt", "every row needs a prompt", fail)
        seeds = self._seeds(row.get("seeds"), fail)
        concepts = self._concepts(row.get("concepts"), fail)
        params = self._params(row, fail)
        if row_id is None or prompt is None or params is None or any(c is None for c in concepts):
            return None
        passthrough = {k: _json_safe(v) for k, v in row.items() if k not in MANIFEST_SCHEMA.names}
        if len(self._interned) > 65536:
            self._interned.clear()
        concepts = self._interned.setdefault(concepts, concepts)
        return RowSpec(
            index=index,
            id=row_id,
            prompt=prompt,
            seeds=seeds,
            concepts=concepts,  # type: ignore[arg-type]  # no None left (checked above)
            params=params,
            passthrough=passthrough,
        )


def validate_table(
    table: pa.Table,
    *,
    defaults: GenParams = GenParams(),
    limits: Limits = Limits(),
    inputs: InputSettings = InputSettings(),
    base_dir: str | None = None,
    check_files: bool = True,
) -> tuple[list[RowSpec], list[RowProblem]]:
    """Every row checked statically (no model): the good rows, and every problem of the bad ones.

    Never raises on row data. A row is good only if it has no problem at all; a bad row gets
    one ``RowProblem`` per problem found (all fields are checked, not just the first bad one).
    With ``check_files`` every image, mask and carrier is opened (exists, decodes, size,
    pixel limit; masks fully: empty, aspect ratio), each file once however many rows share it.
    A later row reusing an id is refused, naming the first row with it.

    Raises ``ManifestError`` for schema problems (see ``conform_table``) and ``ValueError`` if
    the run's ``defaults`` break its ``limits``. ``ManifestValidation`` does the same row by row
    without holding the good rows (the pipeline's driver uses it).
    """
    specs: list[RowSpec] = []
    problems: list[RowProblem] = []
    for _, spec, found in ManifestValidation(table, defaults=defaults, limits=limits, inputs=inputs,
                                             base_dir=base_dir, check_files=check_files):
        if found:
            problems.extend(found)
        elif spec is not None:
            specs.append(spec)
    return specs, problems


class ManifestValidation:
    """A manifest's rows validated one at a time; good rows can be read back later by index.

    Iterating yields ``(index, RowSpec or None, problems)`` per row, in order. ``rows(indices)``
    re-reads rows that were good from the (conformed) Arrow table and rebuilds their specs from
    the facts learnt in the first pass (file sizes and mask checks are cached, so files are not
    opened again): a caller can keep a few integers per row instead of every ``RowSpec``.
    """

    def __init__(self, table: pa.Table, *, defaults: GenParams = GenParams(), limits: Limits = Limits(),
                 inputs: InputSettings = InputSettings(), base_dir: str | None = None, check_files: bool = True):
        self.table = conform_table(table, source="manifest")
        default_problems = param_problems(dataclasses.asdict(defaults), limits)
        if default_problems:
            raise ValueError("run defaults: " + "; ".join(f"{f}: {r}" for f, r in default_problems))
        self.checker = _RowValidator(
            defaults=defaults, limits=limits, inputs=inputs, base_dir=base_dir, check_files=check_files
        )

    def __iter__(self):
        first_row_of = duplicate_ids(self.table.column("id"))  # only the rows whose id was used before
        for index, row in enumerate(_iter_rows(self.table)):
            row_id = row.get("id")
            found: list[RowProblem] = []

            def fail(field_name: str, reason: str, _index: int = index, _id: Any = row_id, _found=found) -> None:
                _found.append(RowProblem(index=_index, id=_id, field=field_name, reason=reason))

            if index in first_row_of and ID_PATTERN.fullmatch(row_id):
                fail("id", f"duplicate id {row_id!r}: already used by row {first_row_of[index]}")
            spec = self.checker.row(index, row, fail)
            yield index, (None if found else spec), found

    def rows(self, indices: Iterable[int]) -> dict[int, RowSpec]:
        """Specs of rows that were good in the first pass, re-read by index."""
        indices = sorted(set(indices))
        if not indices:
            return {}
        out: dict[int, RowSpec] = {}
        taken = self.table.take(pa.array(indices, pa.int64()))
        for index, row in zip(indices, _iter_rows(taken), strict=True):
            found: list[tuple[str, str]] = []
            spec = self.checker.row(index, row, lambda f, r, _found=found: _found.append((f, r)))
            if found or spec is None:  # cannot happen for a row that was good: same data, same cached facts
                raise RuntimeError(f"row {index}: re-reading a validated row gave other results: {found}")
            out[index] = spec
        return out


def duplicate_ids(ids: pa.ChunkedArray | pa.Array) -> dict[int, int]:
    """Row index -> the first row with the same id, for every row whose id an earlier row used.

    Sorts the ids in Arrow (about 20 bytes per row, transient) instead of keeping a Python map of
    every id for the whole pass (about 100 bytes per row); nulls are never duplicates.
    """
    import numpy as np
    import pyarrow.compute as pc

    n = len(ids) - ids.null_count
    if n < 2:
        return {}
    order = pc.array_sort_indices(ids, null_placement="at_end")[:n]
    ranked = ids.take(order)
    if isinstance(ranked, pa.ChunkedArray):
        ranked = ranked.combine_chunks()
    same = np.flatnonzero(pc.equal(ranked[1:], ranked[:-1]).to_numpy(zero_copy_only=False))  # ranked[i + 1] == ranked[i]
    if not same.size:
        return {}
    order = order.to_numpy()
    out: dict[int, int] = {}
    run: list[int] = []
    for i in same.tolist():  # runs of equal ids in sorted order; the smallest row index is the first use
        if run and run[-1] != i:
            _mark_run(order, run, out)
            run = []
        if not run:
            run.append(i)
        run.append(i + 1)
    _mark_run(order, run, out)
    return out


def _mark_run(order, run: list[int], out: dict[int, int]) -> None:
    rows = sorted(int(order[i]) for i in run)
    for r in rows[1:]:
        out[r] = rows[0]


def _iter_rows(table: pa.Table, chunk_rows: int = 4096) -> Iterable[dict[str, Any]]:
    """Rows as Python dicts, a few thousand at a time (bounded memory on big manifests)."""
    for batch in table.to_batches(max_chunksize=chunk_rows):
        yield from batch.to_pylist()
