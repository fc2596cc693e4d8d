"""The files of a manifest: one Parquet file, a folder, a glob or a prefix of them, local or on object
storage (``ManifestSource``, one ``ManifestPart`` per file, hive partitions read from ``key=value``
folders), read whole (``read_manifest``) and the folder its relative paths resolve against
(``manifest_base_dir``). Schema and conforming: ``pipeline.manifest``."""


from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.manifest import ManifestError, conform_table
from stages.inputs.read import is_uri
from stages.output.locations import stream_sha256

__all__ = ["ManifestPart", "ManifestSource", "manifest_base_dir", "read_manifest"]


def read_manifest(path: str) -> pa.Table:
    """Read a whole manifest (a Parquet file, a folder, a glob or a prefix of them) and conform it: for
    tools and tests on small manifests; a run plans file by file (``pipeline.part_plan``).

    Raises ``ManifestError`` when nothing is there, a file is not Parquet or unreadable, the manifest
    is empty, or its schema does not fit (see ``conform_table``).
    """
    table = ManifestSource.open(path).read()
    # decoding leaves freed buffers in Arrow's allocator (about 2x the table); hand them back, or the
    # driver keeps them for the whole run
    pa.default_memory_pool().release_unused()
    return table


def manifest_base_dir(path: str) -> str:
    """The folder relative input paths resolve against: a manifest file's folder, a manifest folder
    itself, a glob's folder before its first wildcard (a local path or a URI)."""
    if _WILDCARD.search(path):
        return _fixed_uri(path) if is_uri(path) else _fixed_folder(os.path.abspath(path))
    if is_uri(path):
        return path.rstrip("/") if path.endswith("/") else path.rsplit("/", 1)[0]
    return os.path.abspath(path) if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))

# --------------------------------------------------------------------------- the files of a manifest

PIECE_ROWS = 131_072  # a file of more rows is planned in pieces of this many (``pieces``)


def pieces(num_rows: int, size: int | None = None) -> list[tuple[int, int] | None]:
    """A file's planning pieces: ``[None]`` (the whole file) up to ``size`` rows (``PIECE_ROWS``), else
    row ranges ``[start, stop)`` of ``size`` rows (the last one shorter). Fixed by the row count alone, so
    the same file always gives the same pieces whatever its row groups."""
    size = size or PIECE_ROWS
    if num_rows <= size:
        return [None]
    return [(start, min(start + size, num_rows)) for start in range(0, num_rows, size)]


def _read_rows(parquet: pq.ParquetFile, columns: list[str] | None, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of a Parquet file: the row groups that hold them, sliced."""
    groups, offset, first = [], 0, None
    for i in range(parquet.metadata.num_row_groups):
        n = parquet.metadata.row_group(i).num_rows
        if offset < stop and offset + n > start:
            groups.append(i)
            first = offset if first is None else first
        offset += n
    return parquet.read_row_groups(groups, columns=columns).slice(start - (first or 0), stop - start)

_WILDCARD = re.compile(r"[*?\[]")
_PARTITION = re.compile(r"^([^=/]+)=(.*)$")


@dataclass(frozen=True)
class ManifestPart:
    """One Parquet file of a manifest: ``name`` relative to the manifest's root (posix), ``location``
    what any process opens it by (a local absolute path or a URI), its ``size`` and hive partition
    values (``(column, value)`` pairs from ``key=value`` folders)."""

    name: str
    location: str
    size: int
    partitions: tuple[tuple[str, str], ...] = ()
    rows: tuple[int, int] | None = None  # a piece of the file: its rows [start, stop) (None: every row)

    def digest(self) -> str:
        """sha256 of the file's bytes, read in chunks (memory stays flat whatever its size)."""
        return stream_sha256(*_filesystem(self.location))

    def open(self) -> pq.ParquetFile:
        fs, path = _filesystem(self.location)
        try:
            return pq.ParquetFile(fs.open_input_file(path))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ManifestError(f"{self.location}: not a readable Parquet file ({exc})") from None

    def with_partitions(self, table: pa.Table) -> pa.Table:
        """``table`` (rows of this file) with its hive partition columns appended, as strings."""
        for column, value in self.partitions:
            if column in table.column_names:
                raise ManifestError(f"{self.location}: column {column!r} is both in the file and a hive "
                                    f"partition folder ({column}={value}); rename one of them")
            table = table.append_column(pa.field(column, pa.string()), pa.array([value] * table.num_rows, pa.string()))
        return table

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The file's rows (with partition columns), conformed to the manifest schema; a piece's rows
        only (``rows``: the row groups that hold them are read, then sliced). A file without rows is an
        empty table (``ManifestSource.read`` and a run's layout refuse a manifest without any)."""
        parquet = self.open()
        try:
            table = parquet.read(columns=columns) if self.rows is None else _read_rows(parquet, columns, *self.rows)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ManifestError(f"{self.location}: not a readable Parquet file ({exc})") from None
        if columns is not None:
            return table
        return conform_table(self.with_partitions(table), source=self.location, allow_empty=True)


@dataclass(frozen=True)
class ManifestSource:
    """A manifest argument resolved to its parts, sorted by name. ``root``: what relative input paths
    and part names are relative to."""

    spec: str
    root: str
    parts: tuple[ManifestPart, ...]

    @classmethod
    def open(cls, spec: str) -> ManifestSource:
        """List the parts of ``spec``; ``ManifestError`` when it names nothing readable."""
        spec = os.fspath(spec)
        try:
            fs, path = _filesystem(spec)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ManifestError(f"{spec}: cannot open the manifest ({exc})") from None
        uri_prefix = _uri_prefix(spec, path)
        if _WILDCARD.search(path):
            root = _fixed_folder(path)
            found = [(info, posixpath.relpath(info.path, root)) for info in _list(fs, root, spec)]
            pattern = posixpath.relpath(path, root)
            files = [(i, rel) for i, rel in found if _glob_match(rel, pattern)]
        else:
            try:
                info = fs.get_file_info(path)
            except (pa.ArrowException, OSError) as exc:
                raise ManifestError(f"{spec}: cannot open the manifest ({exc})") from None
            if info.type == pafs.FileType.NotFound:
                raise ManifestError(f"{spec}: manifest not found")
            if info.type == pafs.FileType.File:
                root = posixpath.dirname(path)
                files = [(info, posixpath.basename(path))]
            else:
                root = path.rstrip("/")
                files = [(i, rel) for i, rel in ((i, posixpath.relpath(i.path, root)) for i in _list(fs, root, spec))
                         if rel.endswith(".parquet")]
        files = [(i, rel) for i, rel in files if not _hidden(rel)]
        if not files:
            raise ManifestError(f"{spec}: not a readable Parquet file or folder (no *.parquet file found)")
        parts = tuple(sorted((ManifestPart(name=rel, location=uri_prefix + i.path, size=i.size,
                                           partitions=_partitions(rel)) for i, rel in files), key=lambda p: p.name))
        return cls(spec=spec, root=uri_prefix + root, parts=parts)

    @property
    def base_dir(self) -> str:
        """The folder relative input paths resolve against (a local path or a URI)."""
        return self.root

    def digests(self, threads: int = 8) -> dict[str, str]:
        """Part name -> sha256 of its bytes, a few files at a time."""
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(self.parts)))) as pool:
            return dict(zip((p.name for p in self.parts), pool.map(ManifestPart.digest, self.parts), strict=True))

    def read(self) -> pa.Table:
        """Every part's rows in one table (parts in name order): for tools on small manifests; a run
        streams part by part instead."""
        tables = [p.read() for p in self.parts]
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ManifestError(f"{self.spec}: its files have incompatible schemas ({exc})") from None
        return conform_table(table, source=self.spec)


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        fs, path = pafs.FileSystem.from_uri(location.rstrip("/") if not _WILDCARD.search(location) else
                                            _fixed_uri(location))
        if _WILDCARD.search(location):  # from_uri cannot parse a pattern: keep the pattern's tail
            path = path.rstrip("/") + "/" + location[len(_fixed_uri(location)):].lstrip("/")
        return fs, path
    return pafs.LocalFileSystem(), os.path.abspath(location)


def _fixed_uri(location: str) -> str:
    """A URI up to the folder before its first wildcard."""
    return location[: _WILDCARD.search(location).start()].rsplit("/", 1)[0]


def _uri_prefix(spec: str, path: str) -> str:
    """What turns a filesystem path back into something any process opens: ``s3://`` etc., or nothing."""
    if not is_uri(spec):
        return ""
    scheme = spec.split("://", 1)[0]
    return f"{scheme}://"


def _fixed_folder(path: str) -> str:
    return path[: _WILDCARD.search(path).start()].rsplit("/", 1)[0] or "/"


def _list(fs: pafs.FileSystem, root: str, spec: str) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{spec}: cannot list the manifest's files ({exc})") from None
    return [i for i in infos if i.type == pafs.FileType.File]


def _hidden(rel: str) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def _glob_match(rel: str, pattern: str) -> bool:
    """``fnmatch`` per path segment (``*`` stays inside a folder); ``**`` matches any number of folders."""
    if "**" in pattern:
        return fnmatch.fnmatchcase(rel, pattern.replace("**/", "*").replace("**", "*"))
    names, parts = rel.split("/"), pattern.split("/")
    return len(names) == len(parts) and all(fnmatch.fnmatchcase(n, p) for n, p in zip(names, parts, strict=True))


def _partitions(rel: str) -> tuple[tuple[str, str], ...]:
    out = []
    for folder in rel.split("/")[:-1]:
        match = _PARTITION.match(folder)
        if match:
            out.append((urllib.parse.unquote(match.group(1)), urllib.parse.unquote(match.group(2))))
    return tuple(out)

