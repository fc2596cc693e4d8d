"""The output folder: its layout, and every read and write of it.

    shards/{n:05d}.tar + .parquet   samples; under their final names only once complete
    _progress/{n:05d}.json          a shard's done marker, written last (resume reads these)
    references/<concept-set-id>/    reference previews and contact sheets
    _kv/                            the run's reference K/V store (removed once the run is complete)
    errors.parquet                  one row per failed manifest row
    _run.json                       what the output depends on (a rerun with other settings is refused)
    _stats.json                     counts and timings, written at the end of every run

Every name above is spelled here and nowhere else; every file the pipeline writes into OUT goes
through ``OutputFolder``, which works on a ``pyarrow.fs`` filesystem. Writes are atomic: a file
is written under a hidden temporary name (``.NAME.tmp-XXXXXXXX``) and renamed, so a reader, or a
resumed run, never sees a torn file; temporaries a killed run left are swept at the next start.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .faults import fault_point

SHARDS, PROGRESS, REFERENCES, KV_STORE = "shards", "_progress", "references", "_kv"
RUN_FILE, STATS_FILE, ERRORS_FILE = "_run.json", "_stats.json", "errors.parquet"
FOLDERS = (SHARDS, PROGRESS, REFERENCES, KV_STORE)
FILES = (RUN_FILE, STATS_FILE, ERRORS_FILE)
TMP_MARK = ".tmp-"  # in every temporary name: ".NAME.tmp-XXXXXXXX"

ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("row", pa.int64()), ("stage", pa.string()), ("field", pa.string()),
                          ("reason", pa.string()), ("seeds", pa.list_(pa.int64()))])


class OutputRefused(Exception):
    """OUT cannot take this run (it holds another run's output, or links): the run cannot start."""


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def temporary_name(name: str) -> str:
    return f".{name}{TMP_MARK}{uuid.uuid4().hex[:8]}"


class OutputFolder:
    """One output folder on a ``pyarrow.fs`` filesystem (local disk when none is given).

    Paths given to its methods are relative to the folder (``shards/00000.tar``); the layout
    helpers (``shard_tar`` ...) build them.
    """

    def __init__(self, root: str | os.PathLike, filesystem: pafs.FileSystem | None = None):
        self.fs = filesystem or pafs.LocalFileSystem()
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.root = os.path.abspath(os.fspath(root)) if self.local else str(root).rstrip("/")

    def __repr__(self) -> str:
        return f"OutputFolder({self.root!r})"

    def __str__(self) -> str:
        return self.root

    # -- layout

    def path(self, *parts: str) -> str:
        """The full path (for the filesystem) of a relative path."""
        return posixpath.join(self.root, *parts) if parts else self.root

    @staticmethod
    def shard_tar(shard_id: int) -> str:
        return f"{SHARDS}/{shard_name(shard_id)}.tar"

    @staticmethod
    def shard_parquet(shard_id: int) -> str:
        return f"{SHARDS}/{shard_name(shard_id)}.parquet"

    @staticmethod
    def marker(shard_id: int) -> str:
        return f"{PROGRESS}/{shard_name(shard_id)}.json"

    @staticmethod
    def references(concept_set_id: str) -> str:
        return f"{REFERENCES}/{concept_set_id}"

    @staticmethod
    def kv_request(concept_set_id: str) -> str:
        return f"{KV_STORE}/{concept_set_id}.request.json"

    # -- reading

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_dir(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel) if rel else self.root).type == pafs.FileType.Directory

    def is_link(self, rel: str = "") -> bool:
        """A symbolic link (only local folders have them): the pipeline never writes through one."""
        return self.local and os.path.islink(self.path(rel) if rel else self.root)

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read(rel))

    def size(self, rel: str) -> int:
        return self.fs.get_file_info(self.path(rel)).size

    def list(self, rel: str, suffix: str = "") -> list[str]:
        """Names in folder ``rel`` ending with ``suffix``, sorted (temporaries never listed)."""
        if not self.is_dir(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel)))
        names = (posixpath.basename(i.path) for i in infos)
        return sorted(n for n in names if n.endswith(suffix) and TMP_MARK not in n)

    def read_markers(self) -> dict[int, dict]:
        """Every readable done marker, by shard id (an unreadable one: its shard is redone)."""
        markers = {}
        for name in self.list(PROGRESS, ".json"):
            try:
                marker = self.read_json(f"{PROGRESS}/{name}")
                markers[int(marker["shard"])] = marker
            except (OSError, ValueError, KeyError):
                pass
        return markers

    def pending(self, n_shards: int, markers: Mapping[int, dict]) -> list[int]:
        """Shards not complete: no complete marker, or the marker's tar is gone."""
        return [n for n in range(n_shards)
                if markers.get(n, {}).get("status") != "complete" or not self.exists(self.shard_tar(n))]

    # -- writing

    def makedirs(self, rel: str = "") -> None:
        if rel and self.is_link(rel):
            raise OSError(f"{self.path(rel)} is a symbolic link; refusing to write through it")
        self.fs.create_dir(self.path(rel) if rel else self.root, recursive=True)

    def write(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically: a temporary name in the same folder, then a rename
        (on a local disk, flushed to the device first); on any failure nothing new is left."""
        folder, name = posixpath.split(rel)
        self.makedirs(folder)
        tmp = self.path(folder, temporary_name(name))
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            if self.local:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self.fs.move(tmp, self.path(rel))
        except BaseException:
            self._remove_quietly(tmp)
            raise

    def write_json(self, rel: str, data: Any, *, indent: int | None = None) -> None:
        self.write(rel, json.dumps(data, indent=indent, sort_keys=True, default=str).encode())

    def write_folder(self, rel: str, files: Mapping[str, bytes]) -> bool:
        """Write a folder of files whole: under a temporary name, then renamed. An existing folder
        is kept as it is (its name is its content's id). Returns True when written here."""
        if self.is_dir(rel):
            return False
        parent, name = posixpath.split(rel)
        self.makedirs(parent)
        tmp = posixpath.join(parent, temporary_name(name))
        try:
            self.fs.create_dir(self.path(tmp))
            for file_name, data in files.items():
                with self.fs.open_output_stream(self.path(tmp, file_name)) as f:
                    f.write(data)
            try:
                self.fs.move(self.path(tmp), self.path(rel))
            except OSError:
                if not self.is_dir(rel):  # not a concurrent writer of the same folder: a real error
                    raise
                return False
            return True
        finally:
            if self.exists(tmp):
                self.fs.delete_dir(self.path(tmp))

    def remove(self, rel: str) -> None:
        self._remove_quietly(self.path(rel))

    def remove_dir(self, rel: str) -> None:
        if self.is_dir(rel) and not self.is_link(rel):
            self.fs.delete_dir(self.path(rel))

    def _remove_quietly(self, full: str) -> None:
        try:
            if self.fs.get_file_info(full).type == pafs.FileType.File:
                self.fs.delete_file(full)
        except OSError:
            pass

    def write_shard(self, shard_id: int, tar: bytes, parquet: bytes, marker: dict, *,
                    faults: dict | None = None) -> None:
        """A shard's tar and parquet, then its marker last: the shard counts as done only once all
        three are there. On a failure, neither the tar nor the parquet stays under its final name."""
        try:
            self.write(self.shard_tar(shard_id), tar)
            fault_point("write.tar", faults)
            self.write(self.shard_parquet(shard_id), parquet)
            self.write(self.marker(shard_id), json.dumps(marker, sort_keys=True).encode())
        except BaseException:
            for rel in (self.shard_tar(shard_id), self.shard_parquet(shard_id)):
                self.remove(rel)
            raise

    def write_errors(self, errors: Sequence[Mapping[str, Any]]) -> None:
        """``errors.parquet``: one row per failed manifest row (see ``collect_errors``)."""
        table = pa.table({f.name: pa.array([e.get(f.name) for e in errors], f.type) for f in ERRORS_SCHEMA},
                         schema=ERRORS_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write(ERRORS_FILE, buf.getvalue())

    # -- the folder as a whole

    def prepare(self, identity: dict, *, overwrite: bool) -> None:
        """Make OUT ready for a run whose settings are ``identity``: OUT must be new, or hold a run of
        the same manifest and settings (resumed), or ``overwrite`` clears it. Then temporaries a
        killed run left are swept and ``_run.json`` is written."""
        if self.is_link():
            raise OutputRefused(f"{self.root} is a symbolic link; give the real output folder")
        links = [name for name in FOLDERS if self.is_link(name)]
        if links:
            raise OutputRefused(f"{self.root}: {', '.join(links)} are symbolic links; "
                                "the pipeline never writes through links")
        if self.exists(RUN_FILE):
            previous = self.read_json(RUN_FILE)
            if previous != identity:
                if not overwrite:
                    diffs = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
                    raise OutputRefused(
                        f"{self.root} holds the output of another manifest or other settings (differs in: "
                        f"{', '.join(diffs)}). Use another output folder, or --overwrite to replace it.")
                self.clear()
        elif self.exists(SHARDS) or self.exists(PROGRESS):
            if not overwrite:
                raise OutputRefused(f"{self.root} holds shards without a {RUN_FILE}; use --overwrite to replace them")
            self.clear()
        self.makedirs()
        self.sweep_temporaries()
        self.write_json(RUN_FILE, identity, indent=2)

    def clear(self) -> None:
        """Everything a run writes (other files in OUT are left alone)."""
        for name in FOLDERS:
            self.remove_dir(name)
        for name in FILES:
            self.remove(name)

    def sweep_temporaries(self) -> None:
        """Temporary files and folders an interrupted run left behind (never under a final name)."""
        for folder in ("", *FOLDERS):
            if not self.is_dir(folder) or (folder and self.is_link(folder)):
                continue
            for info in self.fs.get_file_info(pafs.FileSelector(self.path(folder) if folder else self.root)):
                name = posixpath.basename(info.path)
                if not (name.startswith(".") and TMP_MARK in name):
                    continue
                if info.type == pafs.FileType.Directory and not (self.local and os.path.islink(info.path)):
                    self.fs.delete_dir(info.path)
                else:
                    self._remove_quietly(info.path)


def collect_errors(problems: Sequence[Any], markers: Mapping[int, dict]) -> list[dict]:
    """The rows of ``errors.parquet``: one per failed manifest row, its first error (validation
    problems first, then shards in order) and every seed that failed at run time."""
    by_row: OrderedDict[Any, dict] = OrderedDict()
    for p in problems:
        by_row.setdefault(p.index, {"id": p.id, "row": p.index, "stage": "validate", "field": p.field,
                                    "reason": p.reason, "seeds": []})
    for n in sorted(markers):
        for e in markers[n].get("errors", []):
            entry = by_row.setdefault(e.get("row"), {"id": e.get("id"), "row": e.get("row"), "stage": e.get("stage"),
                                                     "field": e.get("field") or "", "reason": e.get("reason"),
                                                     "seeds": []})
            if e.get("seed") is not None:
                entry["seeds"].append(int(e["seed"]))
    return sorted(by_row.values(), key=lambda e: e["row"] if e["row"] is not None else -1)
