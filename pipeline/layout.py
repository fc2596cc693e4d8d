"""Which manifest files an output folder holds, and what a rerun does when the manifest folder changed.

``_run.json``'s ``manifest`` entry (``ManifestLayout``) lists every file of the manifest the output
was rendered from, in the order the runs first saw them: its name (relative to the manifest's
root), its sha256, the first row and shard numbers its rows and shards got, and its counts. The
rule a rerun into the same OUT follows (``reconcile``; docs/scale.md):

* a file with the same name and sha256: kept, with its plan, shards and markers as they are;
* a file of more than ``manifest_files.PIECE_ROWS`` rows is planned in pieces of that many rows, each
  its own record (``piece``: its rows in the file) with its own row and shard numbers: the first
  piece's shards render while the others are planned. A piece planned and kept stays; a piece not yet
  planned (a run that broke off) is planned again, as a new one;
* a new file: planned on its own; its rows and shards are numbered after every number ever
  given out (``next_row``, ``next_shard``), so no finished shard changes;
* a changed file (same name, other sha256): its old shards are removed and it is planned again
  as a new file (new row and shard numbers);
* a file no longer there: its shards are removed.

Refused (``OutputRefused``, nothing written): files that would change the shards' pass-through
columns (a new column, or a column of another type) while finished shards exist without them.
An id used by an earlier file is a row error of the later one (exactly once per sample).
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping

import pyarrow as pa

from pipeline.manifest import MANIFEST_SCHEMA, ManifestError, check_schema
from pipeline.manifest_files import ManifestPart, ManifestSource, pieces
from pipeline.part_plan import PartRecord
from stages.output.folder import OutputRefused

LAYOUT_VERSION = 1


@dataclasses.dataclass
class ManifestLayout:
    """``_run.json``'s ``manifest``: the files in first-seen order and the numbers given out so far."""

    files: list[PartRecord]
    next_row: int = 0
    next_shard: int = 0
    passthrough: str = ""  # the union of the files' pass-through columns: a serialized Arrow schema, base64

    def to_row(self) -> dict:
        return {
            "version": LAYOUT_VERSION,
            "files": [f.to_row() for f in self.files],
            "next_row": self.next_row,
            "next_shard": self.next_shard,
            "passthrough": self.passthrough,
        }

    @classmethod
    def from_row(cls, row: Mapping | None) -> ManifestLayout | None:
        if not isinstance(row, Mapping) or row.get("version") != LAYOUT_VERSION:
            return None
        return cls(
            files=[PartRecord.from_row(f) for f in row["files"]],
            next_row=row["next_row"],
            next_shard=row["next_shard"],
            passthrough=row.get("passthrough") or "",
        )

    def passthrough_schema(self) -> bytes | None:
        return base64.b64decode(self.passthrough) if self.passthrough else None

    def shard_of(self) -> dict[int, PartRecord]:
        """Planned shard id -> its file's record (a few bytes per shard)."""
        return {n: f for f in self.files for n in f.shard_ids()}


@dataclasses.dataclass
class Reconciled:
    """What a rerun does: the layout to run (new files with their row numbers, not yet planned), the
    new files to plan, and the records of files whose shards go."""

    layout: ManifestLayout
    new: list[tuple[ManifestPart, PartRecord]]
    dropped: list[PartRecord]


def reconcile(
    previous: ManifestLayout | None, source: ManifestSource, digests: Mapping[str, str], *, finished: bool,
    split: bool = True,
) -> Reconciled:
    """The rule of the module docstring. ``finished``: OUT holds finished shards (a changed pass-through
    schema is then refused); ``split``: large files are planned in pieces (not for an output folder of
    an earlier version, planned whole). Raises ``ManifestError`` for a file whose schema does not fit, or
    a manifest without rows."""
    previous = previous or ManifestLayout(files=[])
    parts = {p.name: p for p in source.parts}
    kept = [f for f in previous.files if f.name in parts and digests[f.name] == f.sha256 and f.planned]
    kept_pieces = {(f.name, tuple(f.piece) if f.piece else None) for f in kept}  # a whole file's piece: None
    dropped = [f for f in previous.files if f not in kept]
    layout = ManifestLayout(
        files=list(kept),
        next_row=previous.next_row,
        next_shard=previous.next_shard,
        passthrough=previous.passthrough,
    )
    # the finished shards' pass-through columns bind the new files only while some of those shards stay
    fields = {f.name: f for f in _schema(layout.passthrough)} if kept else {}
    new = []
    for part in source.parts:
        if (part.name, None) in kept_pieces:
            continue
        metadata = part.open().metadata
        schema = metadata.schema.to_arrow_schema()
        for column, _ in part.partitions:
            schema = schema.append(pa.field(column, pa.string()))
        check_schema(schema, source=part.location)
        for field in schema:
            if field.name in MANIFEST_SCHEMA.names:
                continue
            if field.name in fields and not fields[field.name].type.equals(field.type):
                raise ManifestError(
                    f"{part.location}: pass-through column {field.name!r} has type {field.type}, "
                    f"other files of the manifest {fields[field.name].type}; give it one type"
                )
            fields.setdefault(field.name, field)
        for piece in pieces(metadata.num_rows) if split else [None]:  # a large file is planned piece by piece (first shards sooner)
            if (part.name, piece) in kept_pieces:
                continue
            rows = metadata.num_rows if piece is None else piece[1] - piece[0]
            record = PartRecord(name=part.name, sha256=digests[part.name], size=part.size, row_base=layout.next_row,
                                shard_base=-1, rows=rows, piece=None if piece is None else list(piece))
            layout.next_row += rows
            new.append((part if piece is None else dataclasses.replace(part, rows=piece), record))
    if not sum(f.rows or 0 for f in layout.files) + sum(r.rows for _, r in new):
        raise ManifestError(f"{source.spec}: the manifest has no rows")
    union = pa.schema(list(fields.values()))
    encoded = base64.b64encode(union.serialize().to_pybytes()).decode() if len(union) else ""
    if encoded != layout.passthrough and finished and kept:
        before = {f.name for f in _schema(layout.passthrough)}
        raise OutputRefused(
            f"the manifest's files change the shards' pass-through columns (now {sorted(fields)}, the finished "
            f"shards have {sorted(before)}); finished shards cannot gain a column. Render into a new output "
            "folder, or rerun with --overwrite to render everything again."
        )
    layout.passthrough = encoded
    return Reconciled(layout=layout, new=new, dropped=dropped)


def _schema(encoded: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded))) if encoded else pa.schema([])
