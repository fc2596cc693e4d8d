"""Writing a built manifest: a folder of Parquet files (or one file), atomically.

Rows are buffered in chunks and written as row groups; a file holds ``rows_per_file`` rows
(``part-00000.parquet``, ...). Everything goes to a temporary sibling (``.MANIFEST.tmp-<pid>``) that is
renamed into place by ``commit`` after the build's checks passed, together with ``_build.json`` (the
build's summary; Parquet readers skip names starting with ``_``). ``abort`` removes the temporary.
A folder is replaced only when it is an earlier build (it has ``_build.json``) or empty.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .spec import BuildError

__all__ = ["BUILD_FILE", "CHUNK_ROWS", "ManifestWriter"]

BUILD_FILE = "_build.json"
CHUNK_ROWS = 20_000  # rows buffered as Python values before they become a row group


class ManifestWriter:
    """``add`` rows (dicts of ``schema``'s columns), then ``commit`` or ``abort``."""

    def __init__(
        self, out: str, schema: pa.Schema, *, rows_per_file: int = 100_000, single_file: bool = False
    ):
        if rows_per_file < 1:
            raise BuildError(f"--rows-per-file must be >= 1, got {rows_per_file}")
        self.out = os.path.abspath(out)
        self.schema, self.rows_per_file, self.single_file = schema, rows_per_file, single_file
        _refuse_foreign(self.out, single_file)
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        self.tmp = os.path.join(
            parent, f".{os.path.basename(self.out)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        if not single_file:
            os.makedirs(self.tmp)
        self.files = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0
        self._buffer: list[dict] = []

    @property
    def staging(self) -> str:
        """Where files that must end up inside the output folder are written now."""
        return self.tmp

    def add(self, row: dict) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        rows = self._buffer
        self._buffer = []
        while rows:
            if self._writer is None:
                path = (
                    self.tmp if self.single_file else os.path.join(self.tmp, f"part-{self.files:05d}.parquet")
                )
                self._writer = pq.ParquetWriter(path, self.schema)
                self.files += 1
                self._in_file = 0
            room = len(rows) if self.single_file else self.rows_per_file - self._in_file
            chunk, rows = rows[:room], rows[room:]
            self._writer.write_table(pa.Table.from_pylist(chunk, schema=self.schema))
            self._in_file += len(chunk)
            if not self.single_file and self._in_file >= self.rows_per_file:
                self._writer.close()
                self._writer = None

    def commit(self, summary: dict) -> str:
        """Close the last file, write the summary, and put the output in place (replacing an earlier build)."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        summary.update(output=self.out, files=self.files)
        if self.single_file:
            if not os.path.exists(self.tmp):  # no rows at all: still a valid (empty) file
                pq.write_table(self.schema.empty_table(), self.tmp)
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.out)
            return self.out
        Path(self.tmp, BUILD_FILE).write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
        old = None
        if os.path.exists(self.out):
            old = f"{self.tmp}.old"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _refuse_foreign(out: str, single_file: bool) -> None:
    if single_file:
        if os.path.isdir(out):
            raise BuildError(f"-o {out}: is a folder; a single-file manifest needs a file name")
        return
    if os.path.isfile(out):
        raise BuildError(f"-o {out}: is a file; give a folder (or --single-file)")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, BUILD_FILE)):
        raise BuildError(
            f"-o {out}: the folder holds other files and no {BUILD_FILE}: not an earlier build, "
            "so it is not replaced"
        )
