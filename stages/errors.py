"""Per-row errors: data, never a crashed run.

``RowError`` is raised where a problem is found (it names the manifest field and the reason);
``ErrorRecord`` is the one shape an error has from then on: in a stage's error columns, in a
shard's marker, in ``errors.parquet``. ``ErrorRecord.from_exception`` is the one place an
unexpected exception becomes a reason (``"ValueError: ..."``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


class RowError(Exception):
    """A problem with one manifest row (or one concept of it), naming the field and the reason.

    ``field`` uses the manifest's column names, with a concept index where it applies
    (``concepts[1].mask``); ``stage`` is filled by whoever catches it.
    """

    def __init__(self, field: str, reason: str, *, stage: str | None = None):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.stage = stage

    def with_stage(self, stage: str) -> RowError:
        self.stage = self.stage or stage
        return self

    def with_prefix(self, prefix: str) -> RowError:
        """Re-home the field under a parent, e.g. ``mask`` -> ``concepts[1].mask``."""
        return RowError(f"{prefix}.{self.field}" if self.field else prefix, self.reason, stage=self.stage)


def describe(exc: BaseException) -> str:
    """An unexpected exception as a reason: its type and message."""
    return f"{type(exc).__name__}: {exc}"


# the columns a row stage's batch carries its error in ("" when the row is fine)
ERROR_COLUMNS = ("error_stage", "error_field", "error_reason")


@dataclass(frozen=True)
class ErrorRecord:
    """Why a row (or one of its samples) failed: where (``stage``, ``field``) and why (``reason``).

    ``id`` / ``row`` name the manifest row and ``seed`` the sample when one failed alone; a
    concept set's error (``id``, ``row`` and ``seed`` None) is given to each of its targets
    with ``for_target``.
    """

    stage: str
    field: str
    reason: str
    id: str | None = None
    row: int | None = None
    seed: int | None = None

    @classmethod
    def from_exception(cls, exc: BaseException, *, stage: str, field: str = "") -> ErrorRecord:
        """A ``RowError`` keeps its field, reason (and stage, when it names one); anything else
        becomes ``field`` and ``"Type: message"``."""
        if isinstance(exc, RowError):
            return cls(stage=exc.stage or stage, field=exc.field, reason=exc.reason)
        return cls(stage=stage, field=field, reason=describe(exc))

    def for_target(self, *, id: str, row: int, seed: int) -> ErrorRecord:
        return replace(self, id=id, row=row, seed=seed)

    def to_row(self) -> dict[str, Any]:
        """As in a shard's marker (``errors``) and a unit's group: plain JSON."""
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ErrorRecord:
        return cls(stage=row.get("stage") or "", field=row.get("field") or "", reason=row.get("reason") or "",
                   id=row.get("id"), row=row.get("row"), seed=row.get("seed"))

    def to_columns(self) -> tuple[str, str, str]:
        """Values of ``ERROR_COLUMNS``."""
        return self.stage, self.field, self.reason

    @classmethod
    def from_columns(cls, stage: Any, field: Any, reason: Any) -> ErrorRecord | None:
        """The record a row's error columns hold, or None when they hold none (Ray hands a null as
        None or NaN)."""
        values = ["" if v is None or v != v else str(v) for v in (stage, field, reason)]
        return cls(*values) if values[2] else None
