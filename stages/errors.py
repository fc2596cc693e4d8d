"""Per-row errors: data, never a crashed run."""

from __future__ import annotations


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
        err = RowError(f"{prefix}.{self.field}" if self.field else prefix, self.reason, stage=self.stage)
        return err
