"""Locations: a local path or a URI read as a ``pyarrow.fs`` filesystem and path, refused with a clear
message when it is not one (``open_location``), one file read from anywhere (``read_location``), a
file's location inside a folder's (``join_location``), and its sha256 read as a stream (``stream_sha256``)."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from urllib.parse import quote

import pyarrow as pa
import pyarrow.fs as pafs

from .storage_check import storage_error

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
READ_ONLY_SCHEMES = ("hf", "http", "https")
HASH_CHUNK = 1 << 20  # read at a time per file (several files hashed at once): memory, not speed


def stream_sha256(fs: pafs.FileSystem, path: str) -> str:
    """The sha256 of a file, read as a stream in ``HASH_CHUNK`` pieces (memory stays flat whatever its size)."""
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def open_location(location: str, *, option: str, writable: bool = True) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a local path or a URI, or ``ValueError`` naming ``option``.

    Refused: a scheme ``pyarrow.fs`` does not know (``ftp://``, ``foo://``), a URI with one slash
    (``s3:/bucket``: a typo, never taken as a local folder named ``s3:``), and, for outputs, schemes
    that are read-only.
    """
    location = os.fspath(location)
    match = _SCHEME.match(location)
    if not match or (len(match.group(1)) == 1 and os.name == "nt"):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    scheme = match.group(1).lower()
    if not location[match.end():].startswith("//"):
        raise ValueError(f"{option} {location!r}: not a URI ({scheme}: needs two slashes, e.g. {scheme}://bucket/path) "
                         "and not a local path")
    if writable and scheme in READ_ONLY_SCHEMES:
        raise ValueError(f"{option} {location!r}: {scheme}:// is read-only here")
    try:
        filesystem, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise ValueError(f"{option} {location!r}: unsupported storage ({e}); use a local path or a URI such as "
                         "s3://bucket/path, gs://bucket/path") from None
    except OSError as e:  # s3:// without ?region=: pyarrow asks AWS for the bucket's region
        raise storage_error(option, location, e) from None
    return filesystem, path.rstrip("/")


def _split_query(location: str) -> tuple[str, str]:
    """A URI's part before its query and fragment (``?region=...``, ``#...``), and those."""
    cut = min((i for i in (location.find("?"), location.find("#")) if i >= 0), default=len(location))
    return location[:cut], location[cut:]


def folder_location(location: str) -> str:
    """A folder's URI without slashes ending its path (``s3://b/o/?region=r`` -> ``s3://b/o?region=r``)."""
    base, tail = _split_query(location)
    return base.rstrip("/") + tail


def join_location(location: str, rel: str) -> str:
    """The location of ``rel`` (a ``/``-separated relative path) inside folder ``location``: a local path
    joined, or a URI with ``rel`` joined onto its path and its query (``?region=...``,
    ``?endpoint_override=...``) and fragment kept after it (``s3://b/out?region=r`` + ``a/b.json`` ->
    ``s3://b/out/a/b.json?region=r``), ``rel`` percent-encoded as ``open_location`` decodes it."""
    location = os.fspath(location)
    match = _SCHEME.match(location)
    if not match or not location[match.end() :].startswith("//"):
        return posixpath.join(location, rel)
    base, tail = _split_query(location)
    return f"{base.rstrip('/')}/{quote(rel.lstrip('/'), safe='/')}{tail}"


def read_location(location: str, *, option: str = "file") -> bytes:
    """The bytes of one file, a local path or a URI (``option``: what an error names it by)."""
    filesystem, path = open_location(location, option=option, writable=False)
    with filesystem.open_input_stream(path) as f:
        return f.read()
