"""Row validation of a manifest: every row checked without a model, every problem named.

``validate_table`` (and ``ManifestValidation``, row by row) never raises on row data: it returns
every good row as a ``RowSpec`` and *every* problem of every bad row as a ``RowProblem``, each
naming the row, the field (``concepts[1].mask``) and the reason. Bad rows go to
``errors.parquet``; good rows still run. Problems of the manifest as a whole (schema, no rows)
are ``pipeline.manifest.ManifestError``: the run cannot start.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import decimal
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.manifest import ID_PATTERN, MANIFEST_SCHEMA, OVERRIDE_COLUMNS, conform_table
from pipeline.validate_concepts import ConceptChecker, Fail, check_text
from pipeline.validate_control import ControlChecker
from pipeline.validate_subject import check_subject
from stages.errors import ErrorRecord
from stages.inputs.concepts import ConceptSpec
from stages.inputs.control import ControlSettings, RowControl
from stages.inputs.read import InputSettings, is_uri
from stages.inputs.subject import RowSubject, SubjectSettings
from stages.params import MAX_INT64, GenParams, Limits, lora_problems, normalize_loras, param_problems
from stages.reference.family import ModelFamily

__all__ = [
    "ManifestValidation",
    "RowProblem",
    "RowSpec",
    "check_defaults",
    "duplicate_ids",
    "format_problem",
    "validate_table",
]


@dataclass(slots=True)
class RowSpec:
    """A validated manifest row, ready for reference preparation and generation.

    ``index``: the row's 0-based position in the manifest. ``concepts``: paths resolved
    (``image_path``, ``mask_path``, a carrier path in ``context.onto``). ``params``: the run's
    defaults with this row's overrides. ``passthrough``: every column the schema does not
    know, as JSON-safe values, copied into each sample's metadata. ``control``: the row's ControlNet
    input (``control`` / ``controls``), None without. ``blip_subject``: the row's BLIP-Diffusion subject
    (its ``blip_subject`` column or the run's ``--blip-subject``), None on other models.
    """

    index: int
    id: str
    prompt: str
    seeds: tuple[int, ...]
    concepts: tuple[ConceptSpec, ...]
    params: GenParams
    passthrough: dict[str, Any] = field(default_factory=dict)
    control: RowControl | None = None
    blip_subject: RowSubject | None = None


@dataclass
class RowProblem:
    """Why a row is refused: its index and id (None when missing), the field and the reason."""

    index: int
    id: str | None
    field: str
    reason: str

    def record(self) -> ErrorRecord:
        """As every other error of a run (``errors.parquet``): stage ``validate``."""
        return ErrorRecord(stage="validate", field=self.field, reason=self.reason, id=self.id, row=self.index)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_KNOWN = frozenset(MANIFEST_SCHEMA.names)  # every other column passes through


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


class _RowValidator:
    """Checks rows one by one: id, prompt, seeds, concepts (``ConceptChecker``) and parameters."""

    def __init__(
        self,
        *,
        defaults: GenParams,
        limits: Limits,
        inputs: InputSettings,
        base_dir: str | None,
        check_files: bool,
        family: ModelFamily | None = None,
        control: ControlSettings = ControlSettings(),
        mask_policy: str | None = None,
        subject: SubjectSettings = SubjectSettings(),
    ):
        self.defaults = defaults
        self.subject = subject
        self.limits = limits
        self.family = family or ModelFamily()
        self.base_dir = base_dir
        self.check_files = check_files
        self.concept_checker = ConceptChecker(
            limits=limits, inputs=inputs, base_dir=base_dir, check_files=check_files, mask_policy=mask_policy
        )
        self.control_checker = ControlChecker(self.concept_checker, control)
        # rows share few concept lists and parameter sets: one object each, however many rows use it
        # (a 100k-row manifest of 100 concept sets holds 100 concept tuples, not 100k)
        self._interned: dict[Any, Any] = {}
        self._params_seen: dict[tuple, tuple[GenParams | None, list[tuple[str, str]]]] = {}

    def _seeds(self, seeds: Any, fail: Fail) -> tuple[int, ...]:
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

    # -- parameters

    def _params(self, row: Mapping[str, Any], fail: Fail) -> GenParams | None:
        overrides = {}
        for name in OVERRIDE_COLUMNS:
            value = row.get(name)
            if value is not None:
                overrides[name] = tuple(value) if isinstance(value, list) else value
        if "loras" in overrides:
            overrides["loras"] = self._loras(overrides["loras"], fail)
        try:
            key = tuple(sorted(overrides.items()))
            hash(key)
        except TypeError:  # an unhashable override value: checked, not cached
            key = None
        checked = self._params_seen.get(key) if key is not None else None
        if checked is None:
            merged = {**dataclasses.asdict(self.defaults), **overrides}
            problems = param_problems(merged, self.limits) or self.family.problems(merged, self.defaults)
            checked = (None if problems else self.defaults.with_overrides(overrides), problems)
            if key is not None:
                if len(self._params_seen) > 4096:  # rows with per-row parameters: keep the cache bounded
                    self._params_seen.clear()
                self._params_seen[key] = checked
        params, problems = checked
        for name, reason in problems:
            column = name.split("[")[0]
            fail(name, reason if column in overrides else f"{reason} [{column} is the run's default]")
        return params

    def _loras(self, loras: tuple, fail: Fail) -> tuple:
        """A row's ``loras`` as ``(path, scale)`` pairs where well formed, a relative local path resolved
        against the manifest's folder; a ``.safetensors`` file that is not there is refused (with
        ``check_files``). Anything else is left for ``param_problems`` to name."""
        if any(not isinstance(item, Mapping) for item in loras) or lora_problems(loras):
            return loras
        out = []
        for i, (path, scale) in enumerate(normalize_loras(loras)):
            local = self.base_dir is not None and not is_uri(self.base_dir) and not os.path.isabs(path)
            if local and os.path.exists(os.path.join(self.base_dir, path)):
                path = os.path.abspath(os.path.join(self.base_dir, path))
            if self.check_files and path.lower().endswith(".safetensors") and not os.path.isfile(path):
                fail(f"loras[{i}].path", f"no such LoRA file: {path}")
            out.append((path, scale))
        return tuple(out)

    # -- a row

    def row(self, index: int, row: Mapping[str, Any], fail: Fail) -> RowSpec | None:
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
        prompt = check_text(
            row.get("prompt"), "prompt", "every row needs a prompt", self.limits.max_prompt_chars, fail
        )
        seeds = self._seeds(row.get("seeds"), fail)
        concepts = self.concept_checker.concepts(row.get("concepts"), fail)
        params = self._params(row, fail)
        control_ok, control = self.control_checker.control(row, fail)
        subject_ok, subject = check_subject(row, family=self.family, settings=self.subject,
                                            files=self.concept_checker, fail=fail)
        if (row_id is None or prompt is None or params is None or any(c is None for c in concepts) or not control_ok
                or not subject_ok):
            return None
        passthrough = {k: _json_safe(v) for k, v in row.items() if k not in _KNOWN}
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
            control=control,
            blip_subject=subject,
        )


def validate_table(
    table: pa.Table,
    *,
    defaults: GenParams = GenParams(),
    limits: Limits = Limits(),
    inputs: InputSettings = InputSettings(),
    base_dir: str | None = None,
    check_files: bool = True,
    family: ModelFamily | None = None,
    control: ControlSettings = ControlSettings(),
    subject: SubjectSettings = SubjectSettings(),
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
    for _, spec, found in ManifestValidation(
        table, defaults=defaults, limits=limits, inputs=inputs, base_dir=base_dir, check_files=check_files,
        family=family,
        control=control,
        subject=subject,
    ):
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

    def __init__(
        self,
        table: pa.Table,
        *,
        defaults: GenParams = GenParams(),
        limits: Limits = Limits(),
        inputs: InputSettings = InputSettings(),
        base_dir: str | None = None,
        check_files: bool = True,
        family: ModelFamily | None = None,
        control: ControlSettings = ControlSettings(),
        mask_policy: str | None = None,
        subject: SubjectSettings = SubjectSettings(),
        row_base: int = 0,
        earlier: Mapping[int, str] | None = None,
        allow_empty: bool = False,
    ):
        """``family``: the run's model family (``stages.reference.family``); its rules apply to every row.
        ``mask_policy`` ``"fail"``: concepts no mask source applies to are problems (``ConceptChecker``).
        ``subject``: the run's BLIP-Diffusion subject options (``--blip-subject``).
        ``row_base``: the first row's index (a manifest file after others: rows are numbered across
        files). ``earlier``: table row -> why its id is taken (an earlier file used it): refused.
        ``allow_empty``: a table without rows is no error (one file of a manifest folder)."""
        self.table = conform_table(table, source="manifest", allow_empty=allow_empty)
        self.row_base = row_base
        self.earlier = earlier or {}
        family = family or ModelFamily()
        check_defaults(defaults, limits, family)
        self.checker = _RowValidator(
            defaults=defaults, limits=limits, inputs=inputs, base_dir=base_dir, check_files=check_files,
            family=family,
            control=control,
            mask_policy=mask_policy,
            subject=subject,
        )

    def __iter__(self):
        first_row_of = duplicate_ids(self.table.column("id"))  # only the rows whose id was used before
        for local, row in enumerate(_iter_rows(self.table)):
            index = local + self.row_base
            row_id = row.get("id")
            found: list[RowProblem] = []

            def fail(
                field_name: str, reason: str, _index: int = index, _id: Any = row_id, _found=found
            ) -> None:
                _found.append(RowProblem(index=_index, id=_id, field=field_name, reason=reason))

            if local in first_row_of and ID_PATTERN.fullmatch(row_id):
                fail("id", f"duplicate id {row_id!r}: already used by row {first_row_of[local] + self.row_base}")
            elif local in self.earlier and ID_PATTERN.fullmatch(row_id):
                fail("id", f"duplicate id {row_id!r}: {self.earlier[local]}")
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


def check_defaults(defaults: GenParams, limits: Limits, family: ModelFamily) -> None:
    """``ValueError`` when the run's defaults break its limits or its model family's rules."""
    problems = (param_problems(dataclasses.asdict(defaults), limits)
                or family.problems(dataclasses.asdict(defaults), defaults))
    if problems:
        raise ValueError("run defaults: " + "; ".join(f"{f}: {r}" for f, r in problems))


def duplicate_ids(ids: pa.ChunkedArray | pa.Array) -> dict[int, int]:
    """Row index -> the first row with the same id, for every row whose id an earlier row used.

    Sorts the ids in Arrow (about 20 bytes per row, transient) instead of keeping a Python map of
    every id for the whole pass (about 100 bytes per row); nulls are never duplicates.
    """
    n = len(ids) - ids.null_count
    if n < 2:
        return {}
    order = pc.array_sort_indices(ids, null_placement="at_end")[:n]
    ranked = ids.take(order)
    if isinstance(ranked, pa.ChunkedArray):
        ranked = ranked.combine_chunks()
    # the positions i where ranked[i + 1] == ranked[i]
    same = np.flatnonzero(pc.equal(ranked[1:], ranked[:-1]).to_numpy(zero_copy_only=False))
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
