"""Decoding image bytes: a pixel limit against decompression bombs, EXIF orientation, every mode
brought to 8-bit RGB (or RGBA when the image has an alpha channel). No file access: the bytes come
from ``stages.inputs.read.read_bytes``. Every failure is a ``RowError`` naming the manifest field.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import RowError

__all__ = ["DEFAULT_MAX_PIXELS", "decode_image", "probe_size"]

DEFAULT_MAX_PIXELS = 64_000_000
SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees
# Image.MAX_IMAGE_PIXELS and the warnings filters are process-wide: change them under a lock.
_PIL_LIMIT_LOCK = threading.Lock()


def _open_limited(
    data: bytes, max_pixels: int, field: str, *, then: Callable[[Image.Image], object] | None = None
) -> Image.Image:
    """``Image.open`` (then ``then(im)``, e.g. a full load) with ``max_pixels`` as the limit.

    PIL checks ``Image.MAX_IMAGE_PIXELS`` itself, while parsing the header and, for GIF frames
    and TIFF tiles, while decoding. The global is set only for the duration, under a lock (so
    decodes in threads of one process take turns; Ray workers are processes), and PIL's
    warning (over the limit) and error (over twice the limit) both become a ``RowError``; our
    own check refuses anything over the limit right after the header is parsed.
    """
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            _check_pixels(im.size, max_pixels, field)
            if then is not None:
                then(im)
            return im
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            pixels = f"{found.group(1)} pixels" if found else "more pixels"
            raise RowError(field, f"decompression bomb: {pixels} is over max_pixels={max_pixels}") from exc
        except UnidentifiedImageError as exc:
            raise RowError(field, "not an image (no decoder recognises the file)") from exc
        except RowError:
            raise
        except Exception as exc:  # OSError "image file is truncated", SyntaxError, zlib errors...
            raise RowError(field, f"truncated or corrupt image: {exc}") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(size: tuple[int, int], max_pixels: int, field: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise RowError(field, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise RowError(
            field,
            f"decompression bomb: {width}x{height} = {width * height} pixels is over max_pixels={max_pixels}",
        )


def _exif_transpose(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF is common in the wild and not worth a row
        return im


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """uint16-range integers to uint8, rounding: 65535 -> 255, 32768 -> 128, 257 -> 1."""
    v = values.astype(np.uint32)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _grey_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale to 8-bit "L", scaled, never clipped.

    "I;16*": full scale 65535. "I": full scale 65535 when values lie in [0, 65535] (16-bit
    PNG/TIFF data), else the value range is stretched to [0, 255]. "F": [0, 1] is full scale
    when values lie in it, [0, 255] when they lie in that, else the range is stretched.
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        return Image.fromarray(_scale_16bit(arr))
    arr = arr.astype(np.float64)
    arr = np.where(np.isfinite(arr), arr, 0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if im.mode == "I" and lo >= 0 and hi <= 65535:
        return Image.fromarray(_scale_16bit(arr.astype(np.uint32)))
    if im.mode == "F" and lo >= 0 and hi <= 1:
        scaled = arr * 255.0
    elif lo >= 0 and hi <= 255:
        scaled = arr
    else:
        scaled = (arr - lo) * 255.0 / (hi - lo) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8))  # round half up


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """CMYK to RGB through the embedded ICC profile when there is one, else PIL's formula."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken profile: fall back to the plain conversion
            pass
    return im.convert("RGB")


def _colour_key(im: Image.Image) -> int | tuple[int, int, int] | None:
    """The tRNS colour key of a grey ("L", "1", "I", "I;16*") or "RGB" image, if it has one."""
    key = im.info.get("transparency")
    if im.mode == "RGB":
        ok = isinstance(key, tuple) and len(key) == 3 and all(isinstance(v, int) for v in key)
    else:
        ok = isinstance(key, int) and (im.mode in ("L", "1", "I") or im.mode.startswith("I;16"))
    return key if ok else None


def _key_alpha(values: np.ndarray, key: int | tuple[int, ...]) -> Image.Image:
    """An "L" alpha: 0 exactly where ``values`` (H, W) or (H, W, C) equal the key, 255 elsewhere."""
    hit = values == np.asarray(key)
    if hit.ndim == 3:
        hit = hit.all(axis=2)
    return Image.fromarray(np.where(hit, 0, 255).astype(np.uint8))


# PIL scales 2- and 4-bit grey PNG up to 8 bits (v * 85, v * 17) but keeps a tRNS key as stored.
_LOW_BIT_GREY_SCALE = {"L;2": 85, "L;4": 17}


def _load(im: Image.Image, data: bytes) -> None:
    """Decode every pixel, and put a PNG's tRNS colour key on the scale of the decoded pixels.

    PIL keeps the key as stored in the file: a 2- or 4-bit grey key is rescaled here to the
    8-bit levels PIL decodes the pixels to. 16-bit RGB is decoded to 8-bit "RGB" (rawmode
    "RGB;16B": the high byte of each sample), which no 16-bit key can be compared with, so
    its alpha is made here: the data decoded again with rawmode "RGB;16L" (which reads the
    other byte of each 2-byte sample) gives the low bytes, pixels are compared with the key at
    full 16 bits, and the 8-bit colours stay those of the first decode, as without a key.
    Other keys (8-bit RGB and grey, 16-bit grey, palette) are compared in ``_to_8bit``.
    """
    rawmode = im.tile[0].args if im.format == "PNG" and im.tile else None  # gone after load()
    im.load()
    key = _colour_key(im) if rawmode is not None else None
    if key is None:
        return
    if im.mode == "L" and rawmode in _LOW_BIT_GREY_SCALE:
        im.info["transparency"] = key * _LOW_BIT_GREY_SCALE[rawmode]
    elif im.mode == "RGB" and rawmode == "RGB;16B":
        low = Image.open(io.BytesIO(data))
        low.tile = [tile._replace(args="RGB;16L") for tile in low.tile]
        low.load()
        values = (np.asarray(im).astype(np.uint32) << 8) | np.asarray(low)
        im.putalpha(_key_alpha(values, key))  # the RGB bytes are unchanged
        del im.info["transparency"]


def _to_8bit(im: Image.Image, field: str) -> Image.Image:
    """Any PIL mode to "RGB", or "RGBA" when the image has an alpha channel or transparency.

    A tRNS colour key (palette index, grey level or RGB colour) becomes an alpha channel that
    is 0 exactly on the pixels of the key colour, compared before any 16->8 bit scaling.
    """
    mode = im.mode
    if mode == "RGBA" or (mode == "RGB" and _colour_key(im) is None):
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        rgb = _grey_to_8bit(im).convert("RGB")
        key = _colour_key(im)
        if key is not None:
            rgb.putalpha(_key_alpha(np.asarray(im), key))
        return rgb
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode in ("LA", "PA", "RGBa"):
        return im.convert("RGBA")
    if mode == "La":
        return im.convert("LA").convert("RGBA")
    if mode in ("P", "L", "RGB", "1") and "transparency" in im.info:
        return im.convert("RGBA")
    if mode == "P" and im.palette is not None and im.palette.mode == "RGBA":
        return im.convert("RGBA")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise RowError(field, f"unsupported image mode {mode!r}: {exc}") from exc


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, field: str = "image") -> Image.Image:
    """Decode ``data`` fully into an 8-bit "RGB" image, or "RGBA" if it has an alpha channel.

    Refused with a ``RowError`` naming ``field``: not an image, truncated or corrupt (the
    whole image is decoded, so a cut-off file cannot pass), more than ``max_pixels``
    pixels (a decompression bomb). EXIF orientation (EXIF, or XMP's ``tiff:Orientation``)
    is applied. CMYK, palette, grey, "1", 16-bit, 32-bit integer and float images become RGB
    (16-bit scaled, not clipped); LA, RGBA and any image with a tRNS colour key (palette,
    grey or RGB, 8- or 16-bit; alpha 0 exactly on the key colour) become RGBA.
    """
    im = _open_limited(data, max_pixels, field, then=lambda im: _load(im, data))
    im = _exif_transpose(im)
    return _to_8bit(im, field)


def probe_size(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, field: str = "image") -> tuple[int, int]:
    """(width, height) as the image will be seen (EXIF orientation applied), checked cheaply:
    the header parses, the size is under the pixel limit, and the data is complete. PNG is
    checked with ``verify()`` (every chunk and CRC, no decompression; decoded only when it carries
    EXIF or XMP, which may hold its orientation: ``_png_orientation``), JPEG is decoded at
    1/8 scale (which still reads every scan, so a truncated file fails), anything else is
    decoded. The orientation is the one ``decode_image`` applies, so the two sizes agree.
    """
    size, orientation = (0, 0), 1

    def check_complete(im: Image.Image) -> None:
        nonlocal size, orientation
        size = im.size  # before draft(), which shrinks it
        if im.format == "PNG":
            im.verify()  # every chunk and its CRC; the image is unusable afterwards
            orientation = _png_orientation(data)
            return
        if im.format == "JPEG":
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()
        orientation = _orientation(im)  # after the load, as decode_image reads it

    _open_limited(data, max_pixels, field, then=check_complete)
    width, height = size
    return (height, width) if _swaps_axes(orientation) else (width, height)


def _orientation(im: Image.Image) -> object:
    """The orientation ``ImageOps.exif_transpose`` will act on: EXIF 0x0112, else XMP's
    ``tiff:Orientation`` (PIL's ``getexif`` reads both). 1 (as stored) if the EXIF is malformed."""
    try:
        return im.getexif().get(0x0112, 1)
    except Exception:  # malformed EXIF: decode_image's _exif_transpose keeps the image as stored
        return 1


def _swaps_axes(orientation: object) -> bool:
    """Whether ``exif_transpose`` turns the image by 90 degrees: it looks the value up in a
    dict, so 6 and 6.0 turn it, "6" does not, an unhashable value fails (and is kept as stored)."""
    try:
        return orientation in SWAPS_AXES
    except TypeError:
        return False


# What may carry a PNG's orientation (an eXIf chunk, EXIF as a text chunk, XMP in a text chunk: a chunk's
# keyword is never compressed), before or after the image data
_PNG_ORIENTATION_MARKERS = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp")


def _png_orientation(data: bytes) -> object:
    """A PNG's orientation as decode_image finds it. Most PNGs carry none (1, without decoding
    pixels); one with EXIF or XMP is decoded, since PIL reads those chunks after the image data."""
    if not any(marker in data for marker in _PNG_ORIENTATION_MARKERS):
        return 1
    im = Image.open(io.BytesIO(data))
    im.load()
    return _orientation(im)
