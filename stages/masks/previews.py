"""Reference previews: what a concept set's references and masks look like, for people to check.

Per concept set, a folder of the output (``OutputFolder.references(concept_set_id)``) with, per
concept, ``{i:02d}_reference.png`` (the final reference), ``{i:02d}_mask.png`` (0 / 255) and
``{i:02d}_overlay.png`` (the mask tinted on the reference), and ``contact_sheet.png`` (a row per
concept: original reference, mask overlay, composite). PNGs are encoded as ``stages.inputs.concepts``
encodes rows (``FAST_PNG_LEVEL``, no metadata): the same concept set gives the same bytes, and the
reference and mask files are the bytes of the concepts' rows when the caller has them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..inputs.concepts import FAST_PNG_LEVEL, ResolvedConcept, image_to_png, mask_to_png
from ..output.folder import OutputFolder
from .paste import round_half_up

__all__ = ["contact_sheet", "fit_caption", "overlay", "preview_files", "write_previews"]

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
OVERLAY_COLOURS = (
    (255, 64, 64),
    (64, 160, 255),
    (64, 220, 96),
    (255, 200, 0),
    (200, 96, 255),
    (0, 220, 220),
)


def overlay(image: Image.Image, mask: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    """The image with the mask tinted 50 % in ``colour`` (integer arithmetic)."""
    rgb = np.array(image.convert("RGB"), dtype=np.uint16)  # (H, W, 3)
    tint = (rgb + np.asarray(colour, dtype=np.uint16)) // 2
    out = np.where(np.asarray(mask, dtype=bool)[..., None], tint, rgb).astype(np.uint8)
    return Image.fromarray(out)


def fit_caption(caption: str, max_chars: int) -> str:
    """``caption`` in at most ``max_chars`` characters, cut at a word boundary with ``...`` (a single word
    longer than that is cut inside, with ``...``)."""
    if len(caption) <= max_chars:
        return caption
    room = max(1, max_chars - 3)
    cut = caption[: room + 1].rsplit(" ", 1)[0] if " " in caption[: room + 1] else caption[:room]
    return cut[:room].rstrip(" ,;:") + "..."


def _tile(image: Image.Image | None, caption: str, size: int) -> Image.Image:
    tile = Image.new("RGB", (size, size + 16), (40, 40, 40))
    if image is not None:
        thumb = image.convert("RGB")
        scale = min(size / thumb.width, size / thumb.height)
        thumb = thumb.resize(
            (max(1, round_half_up(thumb.width * scale)), max(1, round_half_up(thumb.height * scale))),
            Image.Resampling.LANCZOS,
        )
        tile.paste(thumb, ((size - thumb.width) // 2, 16 + (size - thumb.height) // 2))
    ImageDraw.Draw(tile).text((3, 2), fit_caption(caption, size // 6), fill=(235, 235, 235))
    return tile


def contact_sheet(
    resolved: Sequence[ResolvedConcept], original: Sequence[ResolvedConcept], size: int,
    control: Sequence[tuple[str, Image.Image]] = (),
) -> Image.Image:
    """Rows: concepts. Columns: original reference, mask overlay on the final reference,
    composite (the final reference when it is a composite, else empty). ``control``: (caption,
    condition image) per ControlNet when the references went through ControlNet: a last row."""
    tiles = []
    for i, (final, orig) in enumerate(zip(resolved, original, strict=True)):
        colour = OVERLAY_COLOURS[i % len(OVERLAY_COLOURS)]
        is_composite = final.composite is not None
        tiles.append(
            [
                _tile(orig.image, f"{i} reference: {orig.prompt}", size),
                _tile(overlay(final.image, final.mask, colour), f"{i} mask ({final.mask_source})", size),
                _tile(final.image if is_composite else None, f"{i} composite" if is_composite else "-", size),
            ]
        )
    for start in range(0, len(control), 3):
        shown = [_tile(image, caption, size) for caption, image in control[start : start + 3]]
        tiles.append(shown + [_tile(None, "-", size)] * (3 - len(shown)))
    tile_w, tile_h = tiles[0][0].size
    sheet = Image.new("RGB", (3 * tile_w + 4 * 4, len(tiles) * tile_h + (len(tiles) + 1) * 4), (20, 20, 20))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            sheet.paste(tile, (4 + c * (tile_w + 4), 4 + r * (tile_h + 4)))
    return sheet


def preview_files(
    resolved: Sequence[ResolvedConcept], original: Sequence[ResolvedConcept], *, tile_size: int = 256,
    control: Sequence[tuple[str, Image.Image]] = (),
    rows: Sequence[Mapping] | None = None,
) -> dict[str, bytes]:
    """The preview folder's files, by name, as PNG bytes; with ``control`` (caption, condition image per
    ControlNet) also ``control_{k}.png``. ``rows``: ``resolved`` as rows (``ResolvedConcept.to_row``),
    whose PNGs the reference and mask files are (not encoded again)."""
    files = {}
    for k, (_, image) in enumerate(control):
        files[f"control_{k}.png"] = image_to_png(image, level=FAST_PNG_LEVEL)
    for i, concept in enumerate(resolved):
        colour = OVERLAY_COLOURS[i % len(OVERLAY_COLOURS)]
        if rows is not None:
            files[f"{i:02d}_reference.png"] = bytes(rows[i]["image_png"])
            files[f"{i:02d}_mask.png"] = bytes(rows[i]["mask_png"])
        else:
            files[f"{i:02d}_reference.png"] = image_to_png(concept.image, level=FAST_PNG_LEVEL)
            files[f"{i:02d}_mask.png"] = mask_to_png(concept.mask, level=FAST_PNG_LEVEL)
        files[f"{i:02d}_overlay.png"] = image_to_png(overlay(concept.image, concept.mask, colour), level=FAST_PNG_LEVEL)
    files["contact_sheet.png"] = image_to_png(contact_sheet(resolved, original, tile_size, control), level=FAST_PNG_LEVEL)
    return files


def write_previews(
    output: OutputFolder,
    concept_set_id: str,
    resolved: Sequence[ResolvedConcept],
    original: Sequence[ResolvedConcept],
    *,
    tile_size: int = 256,
    control: Sequence[tuple[str, Image.Image]] = (),
    rows: Sequence[Mapping] | None = None,
) -> str:
    """Write the concept set's preview folder into ``output`` and return its path. ``control``, ``rows``:
    see ``preview_files`` (a concept set whose references went through ControlNet; ``resolved`` as rows).

    The folder is written whole (``OutputFolder.write_folder``: complete or absent); an existing
    one (same id = same content) is kept as it is, and nothing is drawn for it.
    """
    if not _SAFE_ID.match(concept_set_id):
        raise ValueError(f"concept_set_id={concept_set_id!r}: expected [A-Za-z0-9_-]{{1,128}}")
    if len(resolved) != len(original) or not resolved:
        raise ValueError(f"write_previews: {len(resolved)} resolved vs {len(original)} original concepts")
    folder = OutputFolder.references(concept_set_id)
    if not output.is_dir(folder):
        output.write_folder(folder, preview_files(resolved, original, tile_size=tile_size, control=control,
                                                         rows=rows))
    return output.path(folder)
