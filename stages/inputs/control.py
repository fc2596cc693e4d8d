"""A row's ControlNet input: the ``control`` / ``controls`` columns as validated, and its condition images.

``RowControl`` holds one ``ControlEntry`` per ControlNet of the run (``--controlnet``, in option
order): where the control image is, its type (``canny``: the edge map is computed with the run's
thresholds; ``none``: the image already is the condition), the conditioning scale and the active
fraction of the schedule. ``references`` is the release's mode (``control_references``): the
references go through ControlNet with this row's condition, so the row's reference K/V (and its
concept-set id) depend on the condition. ``load_condition`` reads the image like a concept image
(``stages.inputs.read``) and gives the exact image fed to ControlNet.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..errors import RowError
from .concepts import FAST_PNG_LEVEL, image_from_png, image_to_png
from .read import InputSettings, image_digest, load_image

__all__ = ["CANNY_HIGH", "CANNY_LOW", "CONTROL_FIELDS", "CONTROL_TYPES", "ControlEntry", "ControlSettings", "RowControl",
           "condition_kwargs", "entry_problems", "load_condition",
           "reference_condition"]

CONTROL_TYPES = ("canny", "none")
CONTROL_FIELDS = ("image", "type", "scale", "start", "end")
# freecustom_core.controlnet.CANNY_LOW / CANNY_HIGH (not imported here: that module loads torch)
CANNY_LOW = 100.0
CANNY_HIGH = 200.0


@dataclass(frozen=True)
class ControlSettings:
    """A run's ControlNet options as validation needs them. ``controlnet``: the ``--controlnet`` ids (empty:
    none); None when unknown (``validate`` outside a run: only the structs themselves are checked)."""

    controlnet: tuple[str, ...] | None = None
    canny: tuple[float, float] = (CANNY_LOW, CANNY_HIGH)
    references: bool = False


@dataclass(frozen=True)
class ControlEntry:
    """One ControlNet's input for a row. ``image``: as written; ``image_path``: resolved (path or URI).
    ``canny``: the run's (low, high) thresholds for type ``canny``, None for ``none``."""

    image: str
    image_path: str
    type: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    canny: tuple[float, float] | None = None

    def source(self) -> dict:
        """Where the condition came from, for a sample's metadata."""
        out = {"image": self.image_path, "type": self.type}
        if self.canny is not None:
            out["canny_low"], out["canny_high"] = self.canny
        return out


@dataclass(frozen=True)
class RowControl:
    """A row's ControlNet input, one entry per ControlNet. ``column``: ``control`` or ``controls`` (how
    the manifest gave it: errors name ``control.image`` or ``controls[1].image``)."""

    entries: tuple[ControlEntry, ...]
    references: bool = False
    column: str = "control"

    def field(self, k: int, name: str) -> str:
        return f"control.{name}" if self.column == "control" else f"controls[{k}].{name}"

    def steering(self) -> tuple:
        """What one engine call needs its targets to share: scale and steps per ControlNet, the mode."""
        return (tuple((e.scale, e.start, e.end) for e in self.entries), self.references)

    def engine_kwargs(self) -> dict:
        """``generate`` / ``prepare_references`` keyword arguments besides the image, one value per net."""
        return {"controlnet_conditioning_scale": [e.scale for e in self.entries],
                "control_guidance_start": [e.start for e in self.entries],
                "control_guidance_end": [e.end for e in self.entries]}

    def to_row(self) -> dict:
        """JSON-safe; ``from_row`` reads it back exactly."""
        return {"entries": [dict(dataclasses.asdict(e), canny=list(e.canny) if e.canny else None) for e in self.entries],
                "references": self.references, "column": self.column}

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | None) -> RowControl | None:
        if not row:
            return None
        entries = tuple(ControlEntry(**dict(e, canny=tuple(e["canny"]) if e.get("canny") else None))
                        for e in row["entries"])
        return cls(entries=entries, references=bool(row["references"]), column=row.get("column", "control"))


def load_condition(control: RowControl, k: int, settings: InputSettings) -> Image.Image:
    """The RGB image ControlNet ``k`` gets for this row: the canny map of the control image, or the image
    itself (type ``none``). A file that cannot be read is a ``RowError`` on ``control.image``."""
    from freecustom_core.controlnet import canny  # torch: loaded where the model is

    entry = control.entries[k]
    where = control.field(k, "image")
    loaded = load_image(entry.image_path, base_dir=None, settings=settings, field=where)
    if entry.type == "none":
        return loaded.image
    if entry.type == "canny":
        return canny(loaded.image, *entry.canny)
    raise RowError(control.field(k, "type"), f"unknown control type {entry.type!r}")


def reference_condition(control: RowControl, controlnet: list[str], settings: InputSettings) -> tuple[str, dict, list]:
    """A concept group's condition when its references go through ControlNet: ``(JSON for the reference
    request, its identity for the concept-set id, [(caption, image)] for the previews)``. The identity
    holds the ControlNet ids, each condition's content digest, scales and steps."""
    images = [load_condition(control, k, settings) for k in range(len(control.entries))]
    identity = {"controlnet": list(controlnet), "image_digests": [image_digest(im) for im in images],
                **control.engine_kwargs()}
    text = json.dumps({"png": [base64.b64encode(image_to_png(im, level=FAST_PNG_LEVEL)).decode() for im in images],
                       **control.engine_kwargs()}, sort_keys=True)
    captions = [f"control {k} ({e.type}): {e.image}" for k, e in enumerate(control.entries)]
    return text, identity, list(zip(captions, images, strict=True))


def condition_kwargs(text: str) -> dict:
    """``prepare_references`` keyword arguments of a ``reference_condition`` JSON (one image per net)."""
    data = json.loads(text)
    images = [image_from_png(base64.b64decode(b)) for b in data.pop("png")]
    return {"control_image": images[0] if len(images) == 1 else images, **data}


def entry_problems(value: Any, *, where: str) -> list[tuple[str, str]]:
    """The static problems of one ``{image, type, scale, start, end}`` struct (files are checked apart)."""
    if not isinstance(value, Mapping):
        return [(where, f"must be a struct {{image, type, scale, start, end}}, got {value!r}")]
    problems = []
    image = value.get("image")
    if not isinstance(image, str) or not image.strip():
        problems.append((f"{where}.image", "missing: the control image (a path, URI or URL; for no layout, a "
                         "blank image with type none)"))
    kind = value.get("type")
    if kind not in CONTROL_TYPES:
        problems.append((f"{where}.type", f"unknown control type {kind!r}; use one of {list(CONTROL_TYPES)} "
                         "(canny: the edge map is computed from the image; none: the image is the condition)"))
    numbers = {}
    for name, default in (("scale", 1.0), ("start", 0.0), ("end", 1.0)):
        v = value.get(name)
        v = default if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            problems.append((f"{where}.{name}", f"{name} {v!r} must be a finite number (null: {default})"))
        else:
            numbers[name] = float(v)
    for name in ("start", "end"):
        if name in numbers and not 0.0 <= numbers[name] <= 1.0:
            problems.append((f"{where}.{name}", f"{name} {numbers[name]} is outside [0, 1] (a fraction of the "
                             "schedule)"))
    if "start" in numbers and "end" in numbers and 0 <= numbers["start"] <= 1 and 0 <= numbers["end"] <= 1 \
            and numbers["start"] >= numbers["end"]:
        problems.append((f"{where}.start", f"start {numbers['start']} must be below end {numbers['end']}"))
    return problems
