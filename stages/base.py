"""The one stage interface: a Ray-format batch in, the same rows with more columns out.

A batch is a dict of equal-length columns (numpy arrays as Ray Data hands them over, or lists).
``RowStage.__call__`` does what every row stage needs: every input column passes through, rows
that an earlier stage failed pass untouched, each row's work is caught once and a failure becomes
that row's ``ErrorRecord`` in the error columns. A stage implements ``rows`` (its work over the
rows still alive; per row by default, via ``row``) and names the columns it adds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import ERROR_COLUMNS, ErrorRecord


def batch_len(batch: Mapping[str, Any]) -> int:
    """Rows in a Ray-format batch (a dict of equal-length columns)."""
    return len(next(iter(batch.values()))) if batch else 0


def to_column(values: list) -> np.ndarray:
    """A 1-D object array, element by element (``np.array`` would build 2-D from equal-length lists)."""
    arr = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        arr[i] = value
    return arr


def null_to_none(value: Any) -> Any:
    """``None`` for what Ray's numpy batches make of a null (a column null in every row of a block
    arrives as float NaN), else ``value``; the columns it is used on never hold a real NaN."""
    return None if isinstance(value, float) and value != value else value


def row_error(batch: Mapping[str, Any], row: int) -> ErrorRecord | None:
    """The error an earlier stage recorded for ``row``, if any."""
    if "error_reason" not in batch:
        return None
    return ErrorRecord.from_columns(*(batch[c][row] if c in batch else "" for c in ERROR_COLUMNS))


class RowStage:
    """Base of the Ray-free row stages (segment, composite, reference K/V).

    Subclasses set ``stage`` (the name errors carry) and ``columns`` (the columns they add, with the
    value a row keeps when it failed), and implement ``row(batch, i, out)`` (write this row's
    outputs into ``out[column][i]``; raise ``RowError`` or anything else to fail the row) or, to
    work on all live rows at once (batched model calls), ``rows(batch, live, out)`` calling
    ``fail`` per failed row.
    """

    stage: str = ""
    columns: Mapping[str, Any] = {}  # column -> value of a failed row (copied per row)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        n = batch_len(batch)
        out: dict[str, list] = {c: [null_to_none(v) for v in values] for c, values in batch.items()}
        for c in ERROR_COLUMNS:
            out[c] = ["" if v is None else str(v) for v in out.get(c, [""] * n)]
        for c, empty in self.columns.items():
            out[c] = [_copy(empty) for _ in range(n)] if c not in out else out[c]
        live = [i for i in range(n) if not out["error_reason"][i]]
        self.rows(batch, live, out)
        return {name: to_column(values) for name, values in out.items()}

    def rows(self, batch: Mapping[str, Any], live: list[int], out: dict[str, list]) -> None:
        for i in live:
            try:
                self.row(batch, i, out)
            except Exception as exc:  # noqa: BLE001 - a bad input or a bug costs one row, never the batch
                self.fail(out, i, exc)

    def row(self, batch: Mapping[str, Any], i: int, out: dict[str, list]) -> None:
        raise NotImplementedError

    def fail(self, out: dict[str, list], i: int, exc: BaseException | ErrorRecord, *, field: str = "concepts") -> None:
        """Record row ``i``'s failure and reset the columns this stage adds."""
        err = exc if isinstance(exc, ErrorRecord) else ErrorRecord.from_exception(exc, stage=self.stage, field=field)
        for c, value in zip(ERROR_COLUMNS, err.to_columns(), strict=True):
            out[c][i] = value
        for c, empty in self.columns.items():
            out[c][i] = _copy(empty)

    @staticmethod
    def failed(out: Mapping[str, list], i: int) -> bool:
        return bool(out["error_reason"][i])


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value
