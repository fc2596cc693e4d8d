"""stages.inputs.read and stages.inputs.decode: paths, bytes, decoding (modes, EXIF, bombs, truncation) and masks,
on real files."""

from __future__ import annotations

import errno
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from stages.errors import RowError
from stages.inputs import decode
from stages.inputs import read as inputs
from stages.inputs.decode import decode_image
from stages.inputs.read import (
    InputSettings,
    load_image,
    load_mask,
    mask_digest,
    probe_image,
    read_bytes,
    resolve_path,
)
from tests.conftest import sample_root

SAMPLES = sample_root()  # the real sample cases, or their synthetic copy (tests/samples.py)
FAST = InputSettings(retry_backoff_s=0.0)


def png_bytes(im: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming a huge image over a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_root_then_base_dir(tmp_path):
    assert resolve_path("a/b.png", base_dir=str(tmp_path), settings=FAST) == str(tmp_path / "a" / "b.png")
    rooted = InputSettings(root=str(tmp_path / "root"))
    assert resolve_path("b.png", base_dir="/elsewhere", settings=rooted) == str(tmp_path / "root" / "b.png")
    assert resolve_path("/abs/x/../y.png", base_dir=str(tmp_path)) == "/abs/y.png"


def test_uris_are_kept_and_relative_paths_join_a_uri_base():
    assert resolve_path("s3://bucket/a/../b.png", base_dir=None) == "s3://bucket/b.png"
    assert resolve_path("img/c.png", base_dir="gs://bucket/manifests") == "gs://bucket/manifests/img/c.png"


@pytest.mark.parametrize("bad", ["", "   ", "a\x00b"])
def test_empty_or_nul_paths_are_refused(bad):
    with pytest.raises(RowError) as err:
        resolve_path(bad, base_dir=None, field="concepts[0].image")
    assert err.value.field == "concepts[0].image"


def test_allow_roots_refuse_paths_outside_including_dotdot_and_symlinks(tmp_path):
    inside = tmp_path / "inside"
    inside.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", inside / "link.png")
    settings = InputSettings(allow_roots=(str(inside),))
    assert resolve_path("ok.png", base_dir=str(inside), settings=settings) == str(inside / "ok.png")
    for path in ("../secret.png", str(tmp_path / "secret.png"), "link.png"):
        with pytest.raises(RowError) as err:
            resolve_path(path, base_dir=str(inside), settings=settings, field="concepts[2].mask")
        assert err.value.field == "concepts[2].mask"
        assert "outside the allowed roots" in err.value.reason


def test_allow_roots_for_uris_compare_prefixes():
    settings = InputSettings(allow_roots=("s3://bucket/data",))
    assert (
        resolve_path("s3://bucket/data/x.png", base_dir=None, settings=settings) == "s3://bucket/data/x.png"
    )
    for uri in ("s3://bucket/data/../private/x.png", "s3://bucket/database/x.png", "gs://bucket/data/x.png"):
        with pytest.raises(RowError, match="outside the allowed roots"):
            resolve_path(uri, base_dir=None, settings=settings)
    with pytest.raises(RowError, match="outside the allowed roots"):  # local roots do not admit URIs
        resolve_path("s3://b/x.png", base_dir=None, settings=InputSettings(allow_roots=("/data",)))


def test_input_settings_are_validated():
    with pytest.raises(ValueError, match="max_pixels"):
        InputSettings(max_pixels=0)
    with pytest.raises(ValueError, match="read_retries"):
        InputSettings(read_retries=-1)


# --------------------------------------------------------------------------- bytes


def test_read_bytes_refusals_name_field_and_reason(tmp_path):
    empty = write(tmp_path / "empty.png", b"")
    cases = {
        str(tmp_path / "missing.png"): "file not found",
        str(tmp_path): "is a directory",
        empty: "file is empty (0 bytes)",
    }
    for path, reason in cases.items():
        with pytest.raises(RowError) as err:
            read_bytes(path, settings=FAST, field="concepts[0].image")
        assert err.value.field == "concepts[0].image"
        assert reason in err.value.reason
        assert path in err.value.reason


def test_transient_errors_are_retried_then_succeed(tmp_path, monkeypatch):
    path = write(tmp_path / "a.bin", b"data")
    calls = []
    real = inputs._read_local

    def flaky(p):
        calls.append(p)
        if len(calls) < 3:
            raise OSError(errno.EIO, "I/O error")
        return real(p)

    monkeypatch.setattr(inputs, "_read_local", flaky)
    assert read_bytes(path, settings=InputSettings(read_retries=3, retry_backoff_s=0)) == b"data"
    assert len(calls) == 3


def test_transient_errors_give_up_after_read_retries(tmp_path, monkeypatch):
    calls = []

    def broken(p):
        calls.append(p)
        raise OSError(errno.ETIMEDOUT, "timed out")

    monkeypatch.setattr(inputs, "_read_local", broken)
    with pytest.raises(RowError, match="after 3 attempts") as err:
        read_bytes(
            str(tmp_path / "x"), settings=InputSettings(read_retries=2, retry_backoff_s=0), field="mask"
        )
    assert err.value.field == "mask"
    assert len(calls) == 3


def test_permanent_errors_are_not_retried(tmp_path, monkeypatch):
    calls = []

    def denied(p):
        calls.append(p)
        raise PermissionError(errno.EACCES, "denied", p)

    monkeypatch.setattr(inputs, "_read_local", denied)
    with pytest.raises(RowError, match="permission denied"):
        read_bytes(str(tmp_path / "x"), settings=InputSettings(read_retries=5, retry_backoff_s=0))
    assert len(calls) == 1


def test_uri_reader_uses_pyarrow_fs(tmp_path):
    path = write(tmp_path / "a.bin", b"abc")
    assert inputs._read_uri(Path(path).as_uri()) == b"abc"
    with pytest.raises(FileNotFoundError):
        inputs._read_uri((tmp_path / "nope").as_uri())
    with pytest.raises(RowError, match="cannot open URI"):
        read_bytes("nosuchscheme://bucket/x.png", settings=FAST)
    assert read_bytes(Path(path).as_uri(), settings=FAST) == b"abc"  # file:// reads locally


# --------------------------------------------------------------------------- decoding


def test_cmyk_becomes_rgb():
    im = Image.new("CMYK", (4, 4), (255, 0, 0, 0))  # pure cyan
    out = decode_image(png_bytes(im, "JPEG", quality=100))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((1, 1))
    assert r < 10 and g > 245 and b > 245
    tiff = decode_image(png_bytes(Image.new("CMYK", (2, 2), (0, 0, 0, 0)), "TIFF"))
    assert tiff.getpixel((0, 0)) == (255, 255, 255)


def test_palette_and_grey_become_rgb():
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2])
    out = decode_image(png_bytes(pal))
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(3)] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grey = decode_image(png_bytes(Image.fromarray(np.array([[0, 77, 255]], np.uint8))))
    assert grey.mode == "RGB" and grey.getpixel((1, 0)) == (77, 77, 77)
    bilevel = decode_image(png_bytes(Image.new("1", (2, 2), 1)))
    assert bilevel.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_keeps_alpha():
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    pal.putdata([0, 1])
    pal.info["transparency"] = 1
    out = decode_image(png_bytes(pal, transparency=1))
    assert out.mode == "RGBA"
    assert out.getpixel((0, 0)) == (255, 0, 0, 255)
    assert out.getpixel((1, 0))[3] == 0
    rgba = Image.new("RGBA", (2, 1), (1, 2, 3, 0))
    rgba.putpixel((1, 0), (9, 9, 9, 255))
    quantized = rgba.quantize()  # "P" with an RGBA palette
    assert quantized.palette.mode == "RGBA"
    out = decode_image(png_bytes(quantized))
    assert out.mode == "RGBA" and out.getpixel((0, 0))[3] == 0 and out.getpixel((1, 0)) == (9, 9, 9, 255)


def test_16bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257, 32767, 32768, 65535]], dtype=np.uint16)
    out = decode_image(png_bytes(Image.fromarray(values)))  # PNG 16-bit opens as "I;16"
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0))[0] for x in range(5)] == [0, 1, 127, 128, 255]
    big_endian = Image.frombytes("I;16B", (5, 1), values.astype(">u2").tobytes())
    assert [decode._to_8bit(big_endian, "f").getpixel((x, 0))[0] for x in range(5)] == [0, 1, 127, 128, 255]


def test_32bit_int_and_float_images_are_scaled():
    as_int = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert as_int.mode == "I"
    out = decode_image(png_bytes(as_int, "TIFF"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    out = decode_image(png_bytes(as_float, "TIFF"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    wide = decode._to_8bit(Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32)), "f")
    assert [wide.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]  # stretched, not clipped


def test_la_and_rgba_keep_alpha():
    la = Image.new("LA", (2, 2), (200, 100))
    out = decode_image(png_bytes(la))
    assert out.mode == "RGBA" and out.getpixel((0, 0)) == (200, 200, 200, 100)
    rgba = Image.new("RGBA", (2, 2), (1, 2, 3, 4))
    assert decode_image(png_bytes(rgba)).getpixel((1, 1)) == (1, 2, 3, 4)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(samples: np.ndarray, bit_depth: int, colour_type: int, *before_idat: bytes) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB): ``samples`` (H, W) or (H, W, C),
    packed big-endian at ``bit_depth``, filter 0 on every row."""
    h, w = samples.shape[:2]
    if bit_depth == 16:
        rows = [samples[y].astype(">u2").tobytes() for y in range(h)]
    elif bit_depth == 8:
        rows = [samples[y].astype(np.uint8).tobytes() for y in range(h)]
    else:  # 1, 2 or 4 bits per sample
        rows = [
            np.packbits(np.unpackbits(samples[y].astype(np.uint8)[:, None], axis=1)[:, -bit_depth:]).tobytes()
            for y in range(h)
        ]
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + b"".join(before_idat)
        + png_chunk(b"IDAT", zlib.compress(b"".join(b"\0" + row for row in rows)))
        + png_chunk(b"IEND", b"")
    )


def assert_keyed(out: Image.Image, keyed: np.ndarray, plain: Image.Image) -> None:
    """RGBA, alpha 0 exactly on ``keyed`` and 255 elsewhere, colours those of the unkeyed decode."""
    assert out.mode == "RGBA"
    rgba = np.asarray(out)
    np.testing.assert_array_equal(rgba[..., 3], np.where(keyed, 0, 255))
    assert plain.mode == "RGB"
    np.testing.assert_array_equal(rgba[..., :3], np.asarray(plain))


def test_rgb_colour_key_becomes_alpha(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    key = np.array([0, 255, 0], np.uint8)
    keyed = rng.random((6, 9)) < 0.3
    pixels[keyed] = key
    pixels[~keyed & (rng.random((6, 9)) < 0.3)] = (0, 255, 1)  # one level off: kept opaque
    plain = decode_image(png_bytes(Image.fromarray(pixels)))
    data = png_bytes(Image.fromarray(pixels), transparency=(0, 255, 0))
    assert Image.open(io.BytesIO(data)).info["transparency"] == (0, 255, 0)  # tRNS really written
    assert_keyed(decode_image(data), keyed, plain)
    loaded = load_image(write(tmp_path / "key.png", data), base_dir=None)  # the key reaches the alpha mask
    assert loaded.alpha is not None
    np.testing.assert_array_equal(loaded.alpha, np.where(keyed, 0, 255))


@pytest.mark.parametrize("channels", [1, 3], ids=["grey", "rgb"])
def test_16bit_colour_key_is_compared_before_scaling(channels):
    rng = np.random.default_rng(4)
    shape = (7, 10) if channels == 1 else (7, 10, 3)
    samples = rng.integers(0, 65536, shape, dtype=np.uint16)
    key = np.array([4660, 43981, 65535][:channels], np.uint16)
    keyed = rng.random((7, 10)) < 0.3
    samples[keyed] = key if channels == 3 else key[0]
    near = ~keyed & (rng.random((7, 10)) < 0.3)
    samples[near] = key ^ 1 if channels == 3 else key[0] ^ 1  # the same 8-bit value, not the key
    colour_type = 0 if channels == 1 else 2
    plain = decode_image(raw_png(samples, 16, colour_type))
    trns = png_chunk(b"tRNS", struct.pack(f">{channels}H", *key))
    out = decode_image(raw_png(samples, 16, colour_type, trns))
    assert_keyed(out, keyed, plain)
    assert out.size == (10, 7)


@pytest.mark.parametrize("bit_depth", [2, 4])
def test_low_bit_grey_colour_key_is_compared_at_the_stored_depth(bit_depth):
    levels = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)  # stored levels; PIL decodes v * 85 or v * 17
    plain = decode_image(raw_png(levels, bit_depth, 0))
    out = decode_image(raw_png(levels, bit_depth, 0, png_chunk(b"tRNS", struct.pack(">H", 2))))
    assert_keyed(out, levels == 2, plain)


def test_exif_orientation_is_applied():
    # Stored 40x20 with a red block at the stored top-left; orientation 6 = "rotate 90 CW to view".
    stored = Image.new("RGB", (40, 20), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = png_bytes(stored, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data)
    assert out.size == (20, 40)
    r, g, b = out.getpixel((15, 4))  # the block is now at the top-right
    assert r > 200 and g < 60 and b < 60
    assert min(out.getpixel((4, 4))) > 200  # and no longer at the top-left


def test_probe_reports_the_oriented_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    path = write(tmp_path / "r.jpg", png_bytes(Image.new("RGB", (40, 20)), "JPEG", exif=exif.tobytes()))
    assert probe_image(path, base_dir=None) == (20, 40)
    assert probe_image(write(tmp_path / "p.png", png_bytes(Image.new("RGB", (7, 5)))), base_dir=None) == (
        7,
        5,
    )


def xmp_orientation(value: int, element: bool = False) -> bytes:
    tiff = f"<tiff:Orientation>{value}</tiff:Orientation>" if element else ""
    attribute = "" if element else f' tiff:Orientation="{value}"'
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/"{attribute}>{tiff}</rdf:Description>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()


def with_chunk(data: bytes, chunk: bytes, *, after_idat: bool) -> bytes:
    at = data.index(b"IEND" if after_idat else b"IDAT") - 4
    return data[:at] + chunk + data[at:]


XMP_KEY = b"XML:com.adobe.xmp\0"
XMP_CHUNKS = {  # the XMP packet as PIL's getexif (and so exif_transpose) finds it, in any text chunk
    "iTXt": lambda xmp: png_chunk(b"iTXt", XMP_KEY + b"\0\0\0\0" + xmp),
    "iTXt-compressed": lambda xmp: png_chunk(b"iTXt", XMP_KEY + b"\1\0\0\0" + zlib.compress(xmp)),
    "tEXt": lambda xmp: png_chunk(b"tEXt", XMP_KEY + xmp),
    "zTXt": lambda xmp: png_chunk(b"zTXt", XMP_KEY + b"\0" + zlib.compress(xmp)),
}


@pytest.mark.parametrize("after_idat", [False, True], ids=["before-IDAT", "after-IDAT"])
@pytest.mark.parametrize("kind", sorted(XMP_CHUNKS))
def test_probe_and_decode_agree_on_xmp_only_png_orientation(tmp_path, kind, after_idat):
    """Validation (probe_size) and the run (decode_image) see the same size: XMP orientation counts."""
    stored = png_bytes(Image.new("RGB", (40, 20), "red"))
    for value, element, size in ((6, False, (20, 40)), (8, True, (20, 40)), (3, False, (40, 20))):
        data = with_chunk(stored, XMP_CHUNKS[kind](xmp_orientation(value, element)), after_idat=after_idat)
        assert decode_image(data).size == size
        assert decode.probe_size(data) == size
        assert probe_image(write(tmp_path / "x.png", data), base_dir=None) == size


def exif_chunk(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()
    return png_chunk(b"eXIf", body[6:] if body.startswith(b"Exif\0\0") else body)


def test_png_probe_finds_orientation_after_the_image_data_and_decodes_no_plain_png(monkeypatch):
    stored = png_bytes(Image.new("RGB", (40, 20), "red"))
    cases = {
        "eXIf after IDAT": with_chunk(stored, exif_chunk(6), after_idat=True),
        "XMP after IDAT": with_chunk(stored, XMP_CHUNKS["iTXt"](xmp_orientation(6)), after_idat=True),
        "eXIf 1 and XMP 6": with_chunk(  # EXIF's orientation wins over XMP's, as in PIL's getexif
            with_chunk(stored, exif_chunk(1), after_idat=False),
            XMP_CHUNKS["iTXt"](xmp_orientation(6)),
            after_idat=True,
        ),
    }
    expected = {name: decode_image(data).size for name, data in cases.items()}
    assert expected == {"eXIf after IDAT": (20, 40), "XMP after IDAT": (20, 40), "eXIf 1 and XMP 6": (40, 20)}

    assert {name: decode.probe_size(data) for name, data in cases.items()} == expected

    def no_decoding(self):
        raise AssertionError("probe_size decoded the pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert decode.probe_size(stored) == (40, 20)  # no EXIF or XMP: headers and CRCs only


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_images_are_refused_by_decode_and_probe(tmp_path, fmt):
    rng = np.random.default_rng(0)
    data = png_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt)
    path = write(tmp_path / f"t.{fmt.lower()}", data[: len(data) // 2])
    for check in (
        lambda: probe_image(path, base_dir=None, field="concepts[0].image"),
        lambda: load_image(path, base_dir=None, field="concepts[0].image"),
    ):
        with pytest.raises(RowError) as err:
            check()
        assert err.value.field == "concepts[0].image"
        assert "truncated or corrupt" in err.value.reason
        assert path in err.value.reason


def test_png_with_a_bad_crc_is_refused_by_probe(tmp_path):
    data = bytearray(png_bytes(Image.new("RGB", (8, 8), (9, 9, 9))))
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF
    with pytest.raises(RowError, match="truncated or corrupt"):
        probe_image(write(tmp_path / "crc.png", bytes(data)), base_dir=None)


def test_not_an_image_is_refused(tmp_path):
    path = write(tmp_path / "notes.png", b"this is text, not pixels")
    with pytest.raises(RowError, match="not an image"):
        load_image(path, base_dir=None)


def test_decompression_bombs_are_refused_and_the_global_limit_restored(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(RowError, match="decompression bomb"):
        probe_image(write(tmp_path / "bomb.png", bomb_png()), base_dir=None, field="concepts[0].image")
    for side in (40, 33, 50):  # over 2x the limit (PIL error), between 1x and 2x (PIL warning), ours
        with pytest.raises(RowError, match="decompression bomb"):
            decode_image(png_bytes(Image.new("RGB", (side, side))), max_pixels=1_000)
    assert decode_image(png_bytes(Image.new("RGB", (31, 32))), max_pixels=1_000).size == (31, 32)
    small = InputSettings(max_pixels=1_000)  # the run's limit reaches the decoder
    big = write(tmp_path / "big.png", png_bytes(Image.new("RGB", (40, 40))))
    with pytest.raises(RowError, match="decompression bomb: .* max_pixels=1000"):
        load_image(big, base_dir=None, settings=small, field="concepts[0].image")
    with pytest.raises(RowError, match="decompression bomb: .* max_pixels=1000"):
        probe_image(big, base_dir=None, settings=small)
    assert Image.MAX_IMAGE_PIXELS == before


# --------------------------------------------------------------------------- load_image


def test_load_image_splits_alpha_and_digests_pixels(tmp_path):
    rgba = Image.new("RGBA", (6, 4), (10, 20, 30, 0))
    rgba.paste((10, 20, 30, 255), (1, 1, 4, 3))
    cut = load_image(write(tmp_path / "cut.png", png_bytes(rgba)), base_dir=None)
    assert cut.image.mode == "RGB" and cut.alpha is not None
    assert cut.alpha.dtype == np.uint8 and cut.alpha.shape == (4, 6)
    assert cut.alpha[2, 2] == 255 and cut.alpha[0, 0] == 0

    opaque = load_image(
        write(tmp_path / "opaque.png", png_bytes(Image.new("RGBA", (6, 4), (1, 2, 3, 255)))), base_dir=None
    )
    assert opaque.alpha is None
    same_as_bmp = load_image(
        write(tmp_path / "same.bmp", png_bytes(Image.new("RGB", (6, 4), (1, 2, 3)), "BMP")), base_dir=None
    )
    assert opaque.digest == same_as_bmp.digest  # decoded pixels, not file bytes
    assert (
        cut.digest
        != load_image(write(tmp_path / "flat.png", png_bytes(rgba.convert("RGB"))), base_dir=None).digest
    )
    assert same_as_bmp.path == str(tmp_path / "same.bmp")


# --------------------------------------------------------------------------- masks


def test_grey_mask_is_thresholded_at_half_scale(tmp_path):
    level = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    mask = load_mask(write(tmp_path / "m.png", png_bytes(Image.fromarray(level))), (4, 1), base_dir=None)
    assert mask.dtype == bool and mask.tolist() == [[False, False, True, True]]
    wide = np.array([[0, 32767, 32768, 65535]], dtype=np.uint16)
    mask16 = load_mask(write(tmp_path / "m16.png", png_bytes(Image.fromarray(wide))), (4, 1), base_dir=None)
    assert mask16.tolist() == [[False, False, True, True]]


def test_alpha_only_mask_uses_alpha_and_colour_mask_uses_luminance(tmp_path):
    alpha = np.zeros((4, 4, 4), np.uint8)
    alpha[1:3, 1:3, 3] = 255  # black everywhere, shape in the alpha channel
    mask = load_mask(write(tmp_path / "a.png", png_bytes(Image.fromarray(alpha))), (4, 4), base_dir=None)
    assert mask.sum() == 4 and mask[1, 1]
    la = Image.new("LA", (4, 4), (255, 0))
    la.paste((255, 255), (0, 0, 2, 4))
    assert load_mask(write(tmp_path / "la.png", png_bytes(la)), (4, 4), base_dir=None)[:, :2].all()
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (255, 255, 255)
    colour[0, 1] = (255, 0, 0)  # luminance 76: out
    colour[1, 0] = (0, 255, 0)  # luminance 150: in
    got = load_mask(write(tmp_path / "c.png", png_bytes(Image.fromarray(colour))), (2, 2), base_dir=None)
    assert got.tolist() == [[True, False], [True, False]]


def test_mask_of_another_size_with_the_same_aspect_is_resized_nearest(tmp_path):
    small = np.zeros((30, 40), np.uint8)
    small[6:18, 8:28] = 255
    mask = load_mask(write(tmp_path / "m.png", png_bytes(Image.fromarray(small))), (80, 60), base_dir=None)
    assert mask.shape == (60, 80)
    expected = np.asarray(Image.fromarray(small).resize((80, 60), Image.Resampling.NEAREST)) >= 128
    assert np.array_equal(mask, expected)
    assert mask[12:36, 16:56].all() and mask.sum() == 24 * 40


def test_mask_aspect_and_emptiness_are_refused(tmp_path):
    square = write(tmp_path / "sq.png", png_bytes(Image.new("L", (50, 50), 255)))
    with pytest.raises(RowError) as err:
        load_mask(square, (100, 60), base_dir=None, field="concepts[1].mask")
    assert err.value.field == "concepts[1].mask" and "aspect" in err.value.reason
    assert load_mask(square, (101, 100), base_dir=None).all()  # within the 2 % tolerance
    dark = write(tmp_path / "dark.png", png_bytes(Image.new("L", (8, 8), 127)))
    with pytest.raises(RowError, match=r"mask is empty \(no pixel >= 50 %\)"):
        load_mask(dark, (8, 8), base_dir=None)
    speck = np.zeros((64, 64), np.uint8)
    speck[1, 1] = 255
    with pytest.raises(RowError, match="empty after resizing"):
        load_mask(write(tmp_path / "speck.png", png_bytes(Image.fromarray(speck))), (8, 8), base_dir=None)


def test_mask_digest_depends_on_shape_and_bits():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    b[0, 0] = True
    assert mask_digest(a) == mask_digest(a.copy())
    assert mask_digest(a) != mask_digest(b)
    assert mask_digest(a) != mask_digest(np.zeros((2, 8), bool))


def _upstream_pairs() -> list[tuple[Path, Path]]:
    return sorted((m.parent.parent / "image" / m.name, m) for m in SAMPLES.glob("*/mask/*.jpg"))


@pytest.mark.parametrize(
    "image_path,mask_path", _upstream_pairs(), ids=lambda p: f"{p.parent.parent.name}/{p.name}"
)
def test_upstream_jpeg_masks_threshold_at_half_and_resize_nearest(image_path, mask_path):
    size = probe_image(str(image_path), base_dir=None)
    with Image.open(image_path) as im:
        assert size == ImageOps.exif_transpose(im).size
    mask = load_mask(str(mask_path), size, base_dir=None)
    with Image.open(mask_path) as raw:
        level = ImageOps.exif_transpose(raw).convert("L")
    expected = np.asarray(level.resize(size, Image.Resampling.NEAREST)) >= 128
    assert mask.shape == (size[1], size[0])
    assert np.array_equal(mask, expected)
    assert 0 < mask.mean() < 1
