"""The output folder: every read and write of it (the names in it: ``stages.output.layout``).

Every file the pipeline writes into OUT goes through ``OutputFolder``, which works on a ``pyarrow.fs``
filesystem: a local folder, or any URI
``pyarrow.fs.FileSystem.from_uri`` resolves (``s3://``, ``gs://``, ``abfs://``...; credentials from
the environment as pyarrow reads them). Writes never leave a torn file under a final name: on a
local disk a file is written under a hidden temporary name (``.NAME.tmp-XXXXXXXX``), flushed and
renamed (temporaries a killed run left are swept at the next start); on object storage, where
there is no rename, each object is one whole PUT (or a completed multipart upload). A shard's
marker, written last, names the size and sha256 of its tar and Parquet objects (and of its rejected
tar and Parquet when it has any), and a shard counts as done only when all are there with that size
and sha256 (checked when a run resumes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import ErrorRecord
from ..faults import fault_point
from .layout import (
    ERRORS_FILE,
    ERRORS_SCHEMA,
    FILES,
    FOLDERS,
    KV_STORE,
    MARKED_FILES,
    PLAN,
    PROBE_PREFIX,
    PROGRESS,
    REFERENCES,
    REJECTED,
    RUN_FILE,
    SCORES,
    SHARDS,
    TMP_MARK,
    shard_name,
    temporary_name,
)
from .locations import folder_location, join_location, open_location, stream_sha256


class OutputRefused(Exception):
    """OUT cannot take this run (it holds another run's output, or links): the run cannot start."""


def file_record(data: bytes) -> dict:
    """What a marker says of a file it vouches for."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class OutputFolder:
    """One output folder on a ``pyarrow.fs`` filesystem (local disk when none is given).

    Paths given to its methods are relative to the folder (``shards/00000.tar``); the layout
    helpers (``shard_tar`` ...) build them.
    """

    def __init__(self, location: str | os.PathLike, filesystem: pafs.FileSystem | None = None, *,
                 option: str = "-o/--out"):
        """``location``: a local path or a URI (see ``open_location``); with ``filesystem``, a path on it."""
        if filesystem is None:
            filesystem, root = open_location(os.fspath(location), option=option)
        else:
            root = os.fspath(location)
        self.fs = filesystem
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        # what other processes open it from: the URI as given, query included (local: its absolute path)
        self.location = self.root if self.local else folder_location(os.fspath(location))
        self._made: set[str] = set()  # folders made on a non-local filesystem

    def __repr__(self) -> str:
        return f"OutputFolder({self.location!r})"

    def __str__(self) -> str:
        return self.location

    def uri(self, rel: str) -> str:
        """What another process opens ``rel`` by (a local path, or a URI on the same storage: ``rel`` joined
        onto the URI's path, its query kept at the end, so ``open_location`` reads the same options)."""
        return join_location(self.location, rel) if not self.local else self.path(rel)

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
    def rejected_tar(shard_id: int) -> str:
        return MARKED_FILES["rejected_tar"](shard_id)

    @staticmethod
    def rejected_parquet(shard_id: int) -> str:
        return MARKED_FILES["rejected_parquet"](shard_id)

    @staticmethod
    def marker(shard_id: int) -> str:
        return f"{PROGRESS}/{shard_name(shard_id)}.json"

    @staticmethod
    def plan_file(name: str) -> str:
        return f"{PLAN}/{name}"

    @staticmethod
    def open_file(location: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem and path of a file another process named by ``uri``."""
        return open_location(location, option="file", writable=False)

    @staticmethod
    def references(concept_set_id: str) -> str:
        return f"{REFERENCES}/{concept_set_id}"

    @staticmethod
    def kv_request(concept_set_id: str) -> str:
        return f"{KV_STORE}/{concept_set_id}.request.json"

    @staticmethod
    def reuse_index() -> str:
        """``--reuse``: where the previous outputs' samples are, by record (run-scoped, like the K/V store)."""
        return f"{KV_STORE}/reuse-index.json"

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
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
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

    def pending(self, n_shards: int, markers: Mapping[int, dict], *, verify: bool = True) -> list[int]:
        """Shards not done: no complete marker, or a file it vouches for missing, of another size or
        (``verify``) of another sha256 (markers written before they named their files: the tar must
        exist). Hashing reads every marked shard back, a few threads at a time (object storage
        answers in parallel); a run reads them only when it resumes."""
        return self.pending_of(range(n_shards), markers, verify=verify)

    def pending_of(self, shard_ids: Sequence[int], markers: Mapping[int, dict], *, verify: bool = True) -> list[int]:
        """``pending`` over these shard ids (a manifest's files number their shards apart)."""
        done = set(self.pending_done(shard_ids, markers, verify=verify))
        return [n for n in shard_ids if n not in done]

    def pending_done(self, shard_ids: Sequence[int], markers: Mapping[int, dict], *, verify: bool = True) -> list[int]:
        marked = [n for n in shard_ids if self._sized(n, markers.get(n))]
        if verify and marked:
            with ThreadPoolExecutor(max_workers=min(8, len(marked))) as pool:
                intact = dict(zip(marked, pool.map(lambda n: self._intact(n, markers[n]), marked), strict=True))
            marked = [n for n in marked if intact[n]]
        return marked

    def _sized(self, shard_id: int, marker: Mapping | None) -> bool:
        if not marker or marker.get("status") != "complete":
            return False
        files = marker.get("files")
        if not files:
            return self.exists(self.shard_tar(shard_id))
        kinds = [k for k in MARKED_FILES if k in files]
        infos = self.fs.get_file_info([self.path(MARKED_FILES[k](shard_id)) for k in kinds])
        return all(i.type == pafs.FileType.File and i.size == files[k]["size"]
                   for i, k in zip(infos, kinds, strict=True))

    def _intact(self, shard_id: int, marker: Mapping) -> bool:
        files = marker.get("files")
        if not files:
            return True  # nothing to check against (markers of older versions)
        for kind in (k for k in MARKED_FILES if k in files):
            try:
                if self.sha256(MARKED_FILES[kind](shard_id)) != files[kind].get("sha256"):
                    return False
            except OSError:
                return False
        return True

    def sha256(self, rel: str) -> str:
        """The sha256 of a file, read as a stream (a shard need not fit in memory twice)."""
        return stream_sha256(self.fs, self.path(rel))

    # -- writing

    def makedirs(self, rel: str = "") -> None:
        if not self.local:
            # object storage needs no folders (a key's prefix is one); other filesystems (a subtree of a
            # local disk, HDFS) do: ask once per folder, and let stores that cannot make one say so
            if rel not in self._made:
                with contextlib.suppress(OSError, NotImplementedError):
                    self.fs.create_dir(self.path(rel) if rel else self.root, recursive=True)
                self._made.add(rel)
            return
        if rel and self.is_link(rel):
            raise OSError(f"{self.path(rel)} is a symbolic link; refusing to write through it")
        self.fs.create_dir(self.path(rel) if rel else self.root, recursive=True)

    def write(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` whole: on a local disk under a temporary name in the same folder,
        flushed, then renamed; on object storage as one object (one PUT, or a multipart upload that
        completes only with the last byte). On any failure nothing new is left under ``rel``."""
        if not self.local:
            self.makedirs(posixpath.dirname(rel))
            with self.fs.open_output_stream(self.path(rel)) as f:
                f.write(data)
            return
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
        """Write a folder of files whole: under a temporary name, then renamed (on object storage:
        file by file, the last one of ``files`` last, and a folder counts as there once its last
        file is). An existing folder is kept as it is (its name is its content's id). Returns True
        when written here."""
        if not self.local:
            last = posixpath.join(rel, list(files)[-1])
            if self.exists(last):
                return False
            for file_name, data in files.items():
                self.write(posixpath.join(rel, file_name), data)
            return True
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
                    faults: dict | None = None, rejected: tuple[bytes, bytes] | None = None) -> dict:
        """A shard's tar and parquet (and, with ``rejected``, its rejected tar and parquet), then its
        marker last, naming every file's size and sha256: the shard counts as done only once all are
        there. Returns the marker written. On a failure, none of them stays under its final name."""
        contents = {"tar": tar, "parquet": parquet}
        if rejected is not None:
            contents.update(rejected_tar=rejected[0], rejected_parquet=rejected[1])
        marker = dict(marker, files={k: file_record(v) for k, v in contents.items()})
        try:
            for kind, data in contents.items():
                self.write(MARKED_FILES[kind](shard_id), data)
                if kind == "tar":
                    fault_point("write.tar", faults)
            if rejected is None:  # none left from an earlier attempt at this shard
                self.remove(self.rejected_tar(shard_id))
                self.remove(self.rejected_parquet(shard_id))
            self.write(self.marker(shard_id), json.dumps(marker, sort_keys=True).encode())
        except BaseException:
            for kind in MARKED_FILES:
                self.remove(MARKED_FILES[kind](shard_id))
            raise
        return marker

    def write_errors(self, errors: Sequence[Mapping[str, Any]]) -> None:
        """``errors.parquet``: one row per failed manifest row (see ``collect_errors``)."""
        table = pa.table({f.name: pa.array([e.get(f.name) for e in errors], f.type) for f in ERRORS_SCHEMA},
                         schema=ERRORS_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write(ERRORS_FILE, buf.getvalue())

    def write_errors_stream(self, tables: Iterable[pa.Table]) -> int:
        """``errors.parquet`` from tables of its rows (``ERRORS_SCHEMA``), written as they come (one file's
        errors at a time in memory); whole or not at all, as ``write``: on a local disk under a temporary
        name, then renamed; on object storage (no rename, and a stream closed after an exception would
        still store what it got) into a local temporary file first, stored as one object only once every
        table is in it. Returns the rows written."""
        if not self.local:
            with tempfile.TemporaryDirectory(prefix="freecustom-errors-") as staging:
                staged = os.path.join(staging, ERRORS_FILE)
                rows = _write_parquet_stream(pafs.LocalFileSystem(), staged, tables)
                self.makedirs(posixpath.dirname(ERRORS_FILE))
                with pa.memory_map(staged) as source, self.fs.open_output_stream(self.path(ERRORS_FILE)) as f:
                    f.write(source.read_buffer())  # one call: nothing of Python's runs between the bytes
            return rows
        target = self.path(temporary_name(ERRORS_FILE))
        try:
            rows = _write_parquet_stream(self.fs, target, tables)
            self.fs.move(target, self.path(ERRORS_FILE))
        except BaseException:
            self._remove_quietly(target)
            raise
        return rows

    # -- the folder as a whole

    def prepare(self, identity: dict, *, overwrite: bool, growing: tuple[str, ...] = (),
                recorded_since: tuple[str, ...] = ()) -> dict | None:
        """Make OUT ready for a run whose settings are ``identity``: OUT must be new, or hold a run of
        the same settings (resumed), or ``overwrite`` clears it. Keys in ``growing`` may differ (the
        manifest's files: the caller reconciles them). Then temporaries a killed run left are swept
        and ``_run.json`` is written (the previous values of ``growing`` kept). Keys in ``recorded_since``
        are ones an earlier version did not write: a ``_run.json`` without them is the same run, and
        gets them now. Returns the previous
        ``_run.json`` when the run goes on from it, else None."""
        if self.is_link():
            raise OutputRefused(f"{self.root} is a symbolic link; give the real output folder")
        links = [name for name in FOLDERS if self.is_link(name)]
        if links:
            raise OutputRefused(f"{self.root}: {', '.join(links)} are symbolic links; "
                                "the pipeline never writes through links")
        previous = None
        if self.exists(RUN_FILE):
            previous = self.read_json(RUN_FILE)
            diffs = sorted(k for k in set(previous) | set(identity)
                           if k not in growing and previous.get(k) != identity.get(k)
                           and not (k in recorded_since and k not in previous))
            if diffs:
                if not overwrite:
                    raise OutputRefused(
                        f"{self.root} holds the output of another manifest or other settings (differs in: "
                        f"{', '.join(diffs)}; {'; '.join(_was_now(k, previous.get(k), identity.get(k)) for k in diffs)}). "
                        "Use another output folder, or --overwrite to replace it.")
                self.clear()
                previous = None
        elif self.exists(SHARDS) or self.exists(PROGRESS):
            if not overwrite:
                raise OutputRefused(f"{self.root} holds shards without a {RUN_FILE}; use --overwrite to replace them")
            self.clear()
        self.makedirs()
        self.sweep_temporaries()
        kept = {k: previous[k] for k in growing if previous and k in previous}
        self.write_json(RUN_FILE, dict(identity, **kept), indent=2)
        return previous

    def shard_ids_present(self) -> set[int]:
        """The shard numbers that have a tar or Parquet file in ``shards/`` or ``rejected/``."""
        names = self.list(SHARDS) + self.list(REJECTED)
        return {int(n.split(".", 1)[0]) for n in names if n.split(".", 1)[0].isdigit()}

    def remove_shard(self, shard_id: int) -> None:
        """Shard ``shard_id``'s marker first (it no longer counts as done), then every file of it."""
        self.remove(self.marker(shard_id))
        for kind in MARKED_FILES:
            self.remove(MARKED_FILES[kind](shard_id))
        self.remove(f"{SCORES}/{shard_name(shard_id)}.parquet")

    def clear(self) -> None:
        """Everything a run writes (other files in OUT are left alone)."""
        for name in FOLDERS:
            self.remove_dir(name)
        for name in FILES:
            self.remove(name)

    def sweep_temporaries(self) -> None:
        """Temporary files and folders an interrupted run left behind (never under a final name; object
        storage has none)."""
        if not self.local:
            return
        for folder in ("", *FOLDERS):
            if not self.is_dir(folder) or (folder and self.is_link(folder)):
                continue
            for info in self.fs.get_file_info(pafs.FileSelector(self.path(folder) if folder else self.root)):
                name = posixpath.basename(info.path)
                stale_probe = not folder and name.startswith(PROBE_PREFIX)  # a killed run's (stages.output.probe)
                if not (name.startswith(".") and TMP_MARK in name) and not stale_probe:
                    continue
                if info.type == pafs.FileType.Directory and not (self.local and os.path.islink(info.path)):
                    self.fs.delete_dir(info.path)
                else:
                    self._remove_quietly(info.path)


def _write_parquet_stream(fs: pafs.FileSystem, path: str, tables: Iterable[pa.Table]) -> int:
    """Tables of ``ERRORS_SCHEMA`` written to one Parquet file as they come; returns the rows written."""
    rows = 0
    with fs.open_output_stream(path) as stream, pq.ParquetWriter(stream, ERRORS_SCHEMA) as writer:
        for table in tables:
            if table.num_rows:
                writer.write_table(table)
                rows += table.num_rows
    return rows


def _was_now(key: str, was: Any, now: Any, width: int = 120) -> str:
    """``key`` and its two values as a refusal shows them (each cut to ``width`` characters); of two
    dicts, the entries that differ."""
    if isinstance(was, dict) and isinstance(now, dict):
        return "; ".join(_was_now(f"{key}.{k}", was.get(k), now.get(k), width)
                         for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k))

    def show(value):
        text = json.dumps(value, sort_keys=True, default=str)
        return text if len(text) <= width else text[: width - 3] + "..."

    return f"{key} was {show(was)}, now {show(now)}"


def collect_errors(problems: Iterable[ErrorRecord], markers: Mapping[int, dict]) -> list[dict]:
    """The rows of ``errors.parquet``: one per failed manifest row, its first error (validation
    problems first, then shards in order) and every seed that failed at run time."""
    by_row: OrderedDict[Any, dict] = OrderedDict()
    records = [*problems, *(ErrorRecord.from_row(e) for n in sorted(markers) for e in markers[n].get("errors", []))]
    for e in records:
        entry = by_row.setdefault(e.row, {"id": e.id, "row": e.row, "stage": e.stage, "field": e.field,
                                          "reason": e.reason, "seeds": []})
        if e.seed is not None:
            entry["seeds"].append(int(e.seed))
    return sorted(by_row.values(), key=lambda e: e["row"] if e["row"] is not None else -1)
