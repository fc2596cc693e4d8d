"""A row's BLIP-Diffusion subject, checked without a model: the ``blip_subject`` column or the run's default.

One self-contained check per row (``check_subject``). With a BLIP-Diffusion ``--model`` every row needs a
subject: its own ``blip_subject`` struct, which wins, or the run's ``--blip-subject``/``--blip-category``.
With any other model a row's ``blip_subject`` is refused (the subject would be silently ignored).
Problems name the field (``blip_subject.image``, ``blip_subject.category``); the image is resolved and
probed like a concept image (relative to the manifest or ``--root``, URIs, URLs, ``--allow-root``, limits).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.validate_concepts import ConceptChecker, Fail
from stages.inputs.subject import COLUMN, RowSubject, SubjectSettings, subject_problems
from stages.reference.family import ModelFamily

__all__ = ["check_subject"]

OPTION = "--blip-subject"


def check_subject(row: Mapping[str, Any], *, family: ModelFamily, settings: SubjectSettings, files: ConceptChecker,
                  fail: Fail) -> tuple[bool, RowSubject | None]:
    """``(ok, the row's RowSubject or None)``; every problem reported through ``fail``."""
    value = row.get(COLUMN)
    if family.name != "blip":
        if value is not None:
            fail(COLUMN, f"the model is no BLIP-Diffusion checkpoint ({family.class_name or 'StableDiffusionPipeline'}), "
                         "so the subject would be ignored; leave the column null")
            return False, None
        return True, None
    column = COLUMN
    if value is None:
        if settings.default is None:
            fail(COLUMN, "missing: a BLIP-Diffusion model needs each row's subject; give the row a blip_subject "
                         "{image, category, target_category} or the run --blip-subject IMAGE --blip-category WORD")
            return False, None
        value, column = settings.default, OPTION
    problems = subject_problems(value, where=column)
    for field, reason in problems:
        fail(field if column == COLUMN else COLUMN, reason if column == COLUMN else f"{OPTION}: {reason}")
    if problems:
        return False, None
    where = f"{COLUMN}.image" if column == COLUMN else COLUMN
    path = files.image_file(value["image"], where, fail)
    if path is None:
        return False, None
    return True, RowSubject(image=value["image"], image_path=path, category=value["category"],
                            target_category=value.get("target_category"), references=settings.references,
                            column=column)
