"""Finding and reading input images and masks: paths, bytes, decoded images, masks. No Ray.

Used twice: by ``validate`` (cheap static checks: ``probe_image``, ``load_mask``) and by
reference preparation (``load_image``, ``load_mask``). Every failure is a ``RowError`` that
names the manifest field and says what is wrong with which file, so a bad input costs one
row, never the run.

The steps, in order:

1. ``resolve_path``: relative paths against ``--root`` or the manifest's folder; URIs
   (``s3://``, ``gs://``, ``file://``...) kept for ``pyarrow.fs``, ``http(s)://`` URLs for
   ``stages.inputs.http``; ``--allow-root`` enforced.
2. ``read_bytes``: the whole file, with transient ``OSError``s retried a bounded number of times;
   an ``http(s)://`` URL through ``stages.inputs.http.fetch`` (link-local addresses refused, redirects
   bounded and checked, a size limit and a timeout).
3. ``stages.inputs.decode.decode_image``: a full decode under a pixel limit (decompression bombs), EXIF
   orientation applied, every mode brought to 8-bit RGB, or RGBA when the image has an alpha channel.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from ..errors import RowError
from .decode import DEFAULT_MAX_PIXELS, decode_image, probe_size
from .http import HTTP_TIMEOUT_S, MAX_DOWNLOAD_BYTES, FetchRefused, fetch, is_http_url, normalise_url

__all__ = [
    "InputSettings",
    "LoadedImage",
    "image_digest",
    "is_uri",
    "load_image",
    "load_mask",
    "mask_digest",
    "probe_image",
    "read_bytes",
    "resolve_path",
]

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# errnos that no retry can fix: the file is not there, not a file, or not ours to read.
_PERMANENT_ERRNOS = frozenset(
    {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ELOOP}
)
_T = TypeVar("_T")


@dataclass(frozen=True)
class InputSettings:
    """How inputs are found and read; one per run, shared by validation and reference prep.

    ``root``: folder relative paths resolve against (``--root``); without it, the manifest's
    folder. ``allow_roots``: when non-empty, every input must lie under one of these folders
    (or URI prefixes), after symlinks are resolved (``--allow-root``). ``max_pixels``: images
    with more pixels are refused as decompression bombs. ``read_retries`` / ``retry_backoff_s``:
    transient read errors are retried this many times, waiting ``backoff * 2**attempt``.
    ``http_timeout``: seconds one attempt at an ``http(s)://`` download may take, redirects
    included. ``max_download_bytes``: an ``http(s)://`` download stops there and the row fails.
    """

    root: str | None = None
    allow_roots: tuple[str, ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS
    read_retries: int = 3
    retry_backoff_s: float = 0.2
    http_timeout: float = HTTP_TIMEOUT_S
    max_download_bytes: int = MAX_DOWNLOAD_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow_roots", tuple(self.allow_roots))
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.read_retries < 0:
            raise ValueError(f"read_retries must be >= 0, got {self.read_retries}")
        if not self.retry_backoff_s >= 0:
            raise ValueError(f"retry_backoff_s must be >= 0, got {self.retry_backoff_s}")
        if not (self.http_timeout > 0 and math.isfinite(self.http_timeout)):
            raise ValueError(f"http_timeout must be a finite number of seconds > 0, got {self.http_timeout}")
        if self.max_download_bytes < 1:
            raise ValueError(f"max_download_bytes must be >= 1, got {self.max_download_bytes}")
        for allowed in self.allow_roots:
            if not allowed:
                raise ValueError("allow_roots holds an empty path; give folders or URI prefixes")
            if is_http_url(allowed):
                normalise_url(allowed)  # ValueError naming what is wrong with it


@dataclass
class LoadedImage:
    """A decoded input image.

    ``image``: 8-bit RGB, EXIF orientation applied (colour under transparent pixels is kept as
    stored). ``alpha``: uint8 (H, W), or None when the image has no alpha channel or it is
    fully opaque. ``digest``: sha256 of the decoded pixels and size (and alpha), so the same
    picture in another file format or under another name has the same digest. ``path``: the
    resolved path or URI it was read from.
    """

    image: Image.Image
    alpha: np.ndarray | None
    digest: str
    path: str


# --------------------------------------------------------------------------- paths


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (read with ``pyarrow.fs``), False for a local path."""
    return bool(_URI.match(path))


def _normalise_uri(uri: str) -> str:
    """``scheme://a/b/../c`` -> ``scheme://a/c``, so a prefix check cannot be fooled by ``..``.

    ``http(s)://`` URLs go through ``stages.inputs.http.normalise_url`` (query kept, host lower-cased,
    ``%2e`` decoded; ``ValueError`` for a URL without a host or with credentials).
    """
    if is_http_url(uri):
        return normalise_url(uri)
    scheme, rest = uri.split("://", 1)
    if rest.strip("/"):
        rest = posixpath.normpath(rest)  # keeps the leading "/" of file:///abs
    return f"{scheme}://{rest}"


def _file_uri_to_local(uri: str) -> str:
    return unquote(urlparse(uri).path)


def _local_part(path: str) -> str | None:
    """The local path of a local path or ``file://`` URI; None for a remote URI."""
    if not is_uri(path):
        return path
    return _file_uri_to_local(path) if path.startswith("file://") else None


def _under(path: str, root: str) -> bool:
    """Is ``path`` (absolute, normalised) ``root`` itself or inside it?"""
    return root == os.sep or path == root or path.startswith(root + os.sep)


def _outside_roots(resolved: str, settings: InputSettings) -> str | None:
    """Why ``resolved`` is refused by ``settings.allow_roots``, or None (allowed, or no roots).

    Local paths compare after ``os.path.realpath`` on both sides, so a symlink cannot lead
    outside; remote URIs (``http(s)://`` included) compare as normalised prefixes against URI
    roots only: a local root never admits a URI. An http(s) redirect target is checked the same way.
    """
    if not settings.allow_roots:
        return None
    local = _local_part(resolved)
    if local is None:
        uri = _normalise_uri(resolved)
        for allowed in settings.allow_roots:
            root = _normalise_uri(allowed).rstrip("/") if _local_part(allowed) is None else None
            if root and (uri == root or uri.startswith(root + "/")):
                return None
        return f"{resolved} is outside the allowed roots {list(settings.allow_roots)}"
    real = os.path.realpath(local)
    for allowed in settings.allow_roots:
        allowed_local = _local_part(allowed)
        if allowed_local is not None and _under(real, os.path.realpath(allowed_local)):
            return None
    shown = real if real == os.path.abspath(local) else f"{local} (a link to {real})"
    return f"{shown} is outside the allowed roots {list(settings.allow_roots)}"


def resolve_path(
    path: str, *, base_dir: str | None, settings: InputSettings = InputSettings(), field: str = "image"
) -> str:
    """Where the manifest's ``path`` points: an absolute local path or a URI.

    Relative paths resolve against ``settings.root`` if set, else ``base_dir`` (the manifest's
    folder, a local path or a URI), else the working directory. URIs are kept for
    ``pyarrow.fs`` or ``stages.inputs.http`` (``..`` in them normalised; an http(s) URL without a host
    or with credentials is a ``RowError``). With ``settings.allow_roots`` the result,
    symlinks resolved, must lie under one of them, else ``RowError(field, "... outside the
    allowed roots ...")``.
    """
    if not isinstance(path, str) or not path.strip():
        raise RowError(field, f"path is empty ({path!r})")
    if "\x00" in path:
        raise RowError(field, f"path contains a NUL byte: {path!r}")
    base = settings.root if settings.root is not None else base_dir
    try:
        if is_uri(path):
            resolved = _normalise_uri(path)
        elif os.path.isabs(path):
            resolved = os.path.abspath(path)
        elif base and is_uri(base):
            resolved = _normalise_uri(base.rstrip("/") + "/" + path)
        else:
            resolved = os.path.abspath(os.path.join(base or os.getcwd(), path))
    except ValueError as exc:  # an http(s) URL without a host, with credentials, a bad port
        raise RowError(field, str(exc)) from exc
    problem = _outside_roots(resolved, settings)
    if problem:
        raise RowError(field, problem)
    return resolved


# --------------------------------------------------------------------------- bytes


def _is_transient(exc: OSError) -> bool:
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    return exc.errno not in _PERMANENT_ERRNOS


def _read_local(path: str) -> bytes:
    """One attempt at reading a local file. A seam: fault tests replace it to inject errors."""
    with open(path, "rb") as fh:
        return fh.read()


def _read_uri(uri: str) -> bytes:
    """One attempt at reading a URI through ``pyarrow.fs``. A seam, like ``_read_local``."""
    try:
        fs, inner = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # ArrowInvalid for unknown schemes, ArrowNotImplementedError, ...
        raise _Permanent(f"cannot open URI {uri}: {exc}") from exc
    try:
        info = fs.get_file_info(inner)
    except OSError:
        raise  # ArrowIOError and friends: maybe transient, retried
    except Exception as exc:  # ArrowInvalid: a malformed path; no retry fixes that
        raise _Permanent(f"cannot read {uri}: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(errno.ENOENT, "no such file", uri)
    if info.type == pafs.FileType.Directory:
        raise IsADirectoryError(errno.EISDIR, "is a directory", uri)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def _read_http(url: str, settings: InputSettings) -> bytes:
    """One attempt at an ``http(s)://`` download (``stages.inputs.http.fetch``). A seam, like ``_read_local``."""
    return fetch(
        url,
        timeout=settings.http_timeout,
        max_bytes=settings.max_download_bytes,
        check_target=lambda target: _outside_roots(target, settings),
    )


class _Permanent(Exception):
    """A read failure that retrying cannot fix (bad URI scheme, ...)."""


def _with_retries(attempt: Callable[[], _T], *, settings: InputSettings, what: str, field: str) -> _T:
    """Run ``attempt`` and retry transient ``OSError``s ``settings.read_retries`` times."""
    last: OSError | None = None
    for n in range(settings.read_retries + 1):
        if n:
            time.sleep(settings.retry_backoff_s * 2 ** (n - 1))
        try:
            return attempt()
        except FileNotFoundError as exc:
            raise RowError(field, f"file not found: {what}") from exc
        except IsADirectoryError as exc:
            raise RowError(field, f"is a directory, not a file: {what}") from exc
        except NotADirectoryError as exc:
            raise RowError(field, f"file not found (a parent is not a folder): {what}") from exc
        except PermissionError as exc:
            raise RowError(field, f"permission denied: {what}") from exc
        except (_Permanent, FetchRefused) as exc:
            raise RowError(field, str(exc)) from exc
        except OSError as exc:
            if not _is_transient(exc):
                raise RowError(field, f"cannot read {what}: {exc}") from exc
            last = exc
    attempts = settings.read_retries + 1
    raise RowError(field, f"cannot read {what} after {attempts} attempt{'s' * (attempts != 1)}: {last}")


def read_bytes(path: str, *, settings: InputSettings = InputSettings(), field: str = "image") -> bytes:
    """The whole content of a resolved local path or URI.

    A missing path, a directory, an unreadable file or an empty (0 bytes) one is a
    ``RowError`` naming ``field``; transient ``OSError``s (I/O errors, timeouts: anything but
    not-found / is-a-directory / permission) are retried ``settings.read_retries`` times with
    exponential backoff, then become a ``RowError``. An ``http(s)://`` URL: a 4xx, a refused
    address, a body over ``settings.max_download_bytes`` or too many redirects fail at once; 5xx,
    timeouts and dropped connections are retried.
    """
    local = _local_part(path)
    if is_http_url(path):
        data = _with_retries(lambda: _read_http(path, settings), settings=settings, what=path, field=field)
    elif local is None:
        data = _with_retries(lambda: _read_uri(path), settings=settings, what=path, field=field)
    else:
        data = _with_retries(lambda: _read_local(local), settings=settings, what=path, field=field)
    if not data:
        raise RowError(field, f"file is empty (0 bytes): {path}")
    return data


# --------------------------------------------------------------------------- images


def _decode_file(resolved: str, settings: InputSettings, field: str) -> Image.Image:
    """``read_bytes`` + ``decode_image``, with the file named in any decoding error."""
    data = read_bytes(resolved, settings=settings, field=field)
    try:
        return decode_image(data, max_pixels=settings.max_pixels, field=field)
    except RowError as exc:
        raise RowError(field, f"{exc.reason}: {resolved}") from exc


def image_digest(image: Image.Image, alpha: np.ndarray | None = None) -> str:
    """sha256 of an image's decoded RGB pixels and size (and its alpha channel, when given)."""
    rgb = image.convert("RGB")
    h = hashlib.sha256()
    h.update(f"rgb:{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    if alpha is not None:
        h.update(b"alpha:")
        h.update(np.asarray(alpha, dtype=np.uint8).tobytes())
    return h.hexdigest()


def load_image(
    path: str, *, base_dir: str | None, settings: InputSettings = InputSettings(), field: str = "image"
) -> LoadedImage:
    """Resolve, read and decode one input image; alpha kept apart (None when fully opaque)."""
    resolved = resolve_path(path, base_dir=base_dir, settings=settings, field=field)
    im = _decode_file(resolved, settings, field)
    alpha = None
    if im.mode == "RGBA":
        alpha_arr = np.asarray(im.getchannel("A"))
        alpha = None if bool((alpha_arr == 255).all()) else alpha_arr.copy()
        im = im.convert("RGB")
    return LoadedImage(image=im, alpha=alpha, digest=image_digest(im, alpha), path=resolved)


# --------------------------------------------------------------------------- masks


def _mask_level(im: Image.Image) -> np.ndarray:
    """The 8-bit level a mask is thresholded on: alpha for an alpha-only mask, else luminance.

    An "alpha-only" mask has an alpha channel that is not fully opaque over a constant colour
    (a PNG whose shape lives in its transparency). Anything else is read by its luminance.
    """
    if im.mode == "RGBA":
        rgba = np.asarray(im)
        alpha = rgba[..., 3]
        colour = rgba[..., :3].reshape(-1, 3)
        if not (alpha == 255).all() and (colour == colour[0]).all():
            return alpha
        return np.asarray(im.convert("RGB").convert("L"))
    return np.asarray(im.convert("L"))


def _aspect_problem(mask_size: tuple[int, int], image_size: tuple[int, int], tolerance: float) -> str | None:
    (mw, mh), (iw, ih) = mask_size, image_size
    mask_aspect, image_aspect = mw / mh, iw / ih
    diff = abs(mask_aspect - image_aspect) / image_aspect
    if diff <= tolerance:
        return None
    return (
        f"mask is {mw}x{mh} (aspect {mask_aspect:.3f}) but its image is {iw}x{ih} (aspect "
        f"{image_aspect:.3f}): aspect ratios differ by {diff:.1%} (tolerance {tolerance:.1%}); "
        "a mask must cover the same picture"
    )


def load_mask(
    path: str,
    image_size: tuple[int, int],
    *,
    base_dir: str | None,
    settings: InputSettings = InputSettings(),
    field: str = "mask",
    aspect_tolerance: float = 0.02,
) -> np.ndarray:
    """A mask file as a bool (H, W) array at ``image_size`` = (W, H).

    Any mode is accepted. An alpha-only PNG is read by its alpha, anything else by its
    luminance; a pixel is "in" at >= 50 % of full scale (so a JPEG-compressed grey mask keeps
    its anti-aliased edge and loses its noise). A mask of another size but the same aspect
    ratio (within ``aspect_tolerance``, relative) is resized with NEAREST; another aspect
    ratio, or an empty mask, is a ``RowError`` naming ``field``.
    """
    resolved = resolve_path(path, base_dir=base_dir, settings=settings, field=field)
    im = _decode_file(resolved, settings, field)
    problem = _aspect_problem(im.size, image_size, aspect_tolerance)
    if problem:
        raise RowError(field, problem)
    level = _mask_level(im)  # (h, w) uint8
    if not (level >= 128).any():
        raise RowError(field, f"mask is empty (no pixel >= 50 %): {resolved}")
    if im.size != tuple(image_size):
        level = np.asarray(Image.fromarray(level).resize(tuple(image_size), Image.Resampling.NEAREST))
    mask = level >= 128  # (H, W) bool
    if not mask.any():
        raise RowError(
            field, f"mask is empty after resizing {im.width}x{im.height} to {image_size[0]}x{image_size[1]}"
        )
    return mask


def mask_digest(mask: np.ndarray) -> str:
    """sha256 of a bool mask's shape and packed bits: equal masks, equal digests."""
    h = hashlib.sha256()
    h.update(f"mask:{mask.shape[0]}x{mask.shape[1]}:".encode())
    h.update(np.packbits(np.asarray(mask, dtype=bool), axis=None).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- probing


def probe_image(
    path: str, *, base_dir: str | None, settings: InputSettings = InputSettings(), field: str = "image"
) -> tuple[int, int]:
    """(width, height) as the image will be seen (EXIF orientation applied), checked cheaply.

    For ``validate``: the path resolves and is allowed, the file exists and is not empty, and
    ``stages.inputs.decode.probe_size`` finds the header, the size and the data complete (no full decode).
    """
    resolved = resolve_path(path, base_dir=base_dir, settings=settings, field=field)
    data = read_bytes(resolved, settings=settings, field=field)
    try:
        return probe_size(data, max_pixels=settings.max_pixels, field=field)
    except RowError as exc:
        raise RowError(field, f"{exc.reason}: {resolved}") from exc
