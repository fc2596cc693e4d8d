"""BLIP-Diffusion subjects per row: the ``blip_subject`` column (``struct{image, category, target_category}``)
or the run's ``--blip-subject IMAGE --blip-category WORD``, as one record (``RowSubject``). No Ray, no torch.

The subject image is read like a concept image (a path relative to the manifest or ``--root``, a
``pyarrow.fs`` URI or an http(s) URL; ``--allow-root``, pixel and download limits). A row's column wins
over the run's option. The subject shapes every target of its row (BLIP's prompt embedding), so rows
with different subjects never share an engine call; with ``references`` (the release's default: the
references' prompts get the subject too) the reference K/V depend on it as well, so it is part of the
concept group and of the concept-set id. A sample's metadata records it (``record``), digest included,
which ``--reuse`` compares with everything else.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .concepts import FAST_PNG_LEVEL, image_from_png, image_to_png
from .read import InputSettings, LoadedImage, load_image

COLUMN = "blip_subject"
FIELDS = ("image", "category", "target_category")


@dataclass(frozen=True)
class SubjectSettings:
    """The run's subject options: ``default`` (``{"image", "category", "target_category"}`` of
    ``--blip-subject``, None without) and whether the references get the subject (``references``)."""

    default: Mapping[str, Any] | None = None
    references: bool = True


@dataclass(frozen=True)
class RowSubject:
    """A row's BLIP-Diffusion subject. ``image``: as written (the manifest's cell or the option);
    ``image_path``: resolved (local path, URI or URL); ``column``: where it came from (``blip_subject``
    or ``--blip-subject``); ``references``: the references' prompts get it too (K/V per subject)."""

    image: str
    image_path: str
    category: str
    target_category: str | None = None
    references: bool = True
    column: str = COLUMN

    def to_row(self) -> dict:
        return {"image": self.image, "image_path": self.image_path, "category": self.category,
                "target_category": self.target_category, "references": self.references, "column": self.column}

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | None) -> RowSubject | None:
        if not row:
            return None
        return cls(image=row["image"], image_path=row["image_path"], category=row["category"],
                   target_category=row.get("target_category"), references=bool(row.get("references", True)),
                   column=row.get("column", COLUMN))

    def load(self, settings: InputSettings) -> LoadedImage:
        """The subject image, read like a concept image; a ``RowError`` on ``<column>.image`` when it cannot be."""
        where = f"{self.column}.image" if self.column == COLUMN else self.column
        return load_image(self.image_path, base_dir=None, settings=settings, field=where)

    def record(self, digest: str) -> dict:
        """A sample's ``blip_subject`` metadata: the subject as written, its pixels' digest, and whether the
        references saw it."""
        return {"image": self.image, "category": self.category, "target_category": self.target_category,
                "digest": digest, "references": self.references}

    def generate_kwargs(self, image) -> dict:
        """``BlipDiffusionFreeCustom.generate`` keyword arguments (``image``: the loaded subject image)."""
        return {"subject_image": image, "subject_category": self.category,
                "target_subject_category": self.target_category, "subject_references": self.references}

    def steering(self) -> list:
        """What targets of one engine call must share (``stages.generation.generate``'s batching key)."""
        return [self.image_path, self.category, self.target_category, self.references]

    def reference_condition(self, settings: InputSettings) -> tuple[str, dict]:
        """With ``references``: ``(JSON for the reference request, identity for the concept-set id)``."""
        loaded = self.load(settings)
        text = json.dumps({"png": base64.b64encode(image_to_png(loaded.image, level=FAST_PNG_LEVEL)).decode(), "category": self.category},
                          sort_keys=True)
        return text, {"digest": loaded.digest, "category": self.category}


def reference_kwargs(text: str) -> dict:
    """``prepare_references`` (and ``kv_identity``) keyword arguments of a ``reference_condition`` JSON."""
    data = json.loads(text)
    return {"subject_image": image_from_png(base64.b64decode(data["png"])), "subject_category": data["category"]}


def subject_problems(value: Any, where: str = COLUMN) -> list[tuple[str, str]]:
    """The static problems of one ``{image, category, target_category}`` struct (the file is checked apart)."""
    if not isinstance(value, Mapping):
        return [(where, f"must be a struct {{image, category, target_category}}, got {value!r}")]
    problems = []
    image, category, target = value.get("image"), value.get("category"), value.get("target_category")
    if not isinstance(image, str) or not image.strip():
        problems.append((f"{where}.image", "missing: the subject image (a path, URI or URL)"))
    if not isinstance(category, str) or not category.strip():
        problems.append((f"{where}.category", "missing: the subject's category in its image (e.g. 'dog')"))
    if target is not None and (not isinstance(target, str) or not target.strip()):
        problems.append((f"{where}.target_category", f"{target!r}: the word the prompt names the subject by, "
                                                     "or null for the category"))
    return problems
