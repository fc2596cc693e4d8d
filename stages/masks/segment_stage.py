"""Stage: masks for the concepts of each concept set (``SegmentStage``), around ``Segmenter``
(``stages.masks.segment``: the sources of a mask, in order of precedence, and how model masks are cleaned)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..base import RowStage
from ..errors import RowError
from ..inputs.concepts import ConceptSpec, ResolvedConcept
from ..inputs.read import InputSettings, load_image, load_mask, mask_digest
from .segment import STAGE, MaskItem, SegmentConfig, Segmenter

__all__ = ["SegmentStage"]


class SegmentStage(RowStage):
    """Row stage: load each concept set's images and resolve their masks.

    Input columns: ``key`` (str), ``concepts`` (list of ``ConceptSpec.to_row()``), ``base_dir``
    (str, folder relative paths resolve against), anything else (passed through). Output adds
    ``resolved`` (per row: a list of ``ResolvedConcept.to_row()``, PNG bytes, one per concept, in
    order; empty when the row failed) and the error columns. The masks of all rows in the batch
    are resolved together (batched model calls).
    """

    stage = STAGE
    columns = {"resolved": []}

    def __init__(self, config: SegmentConfig = SegmentConfig(), input_settings: InputSettings | None = None):
        self.config = config
        self.input_settings = input_settings or InputSettings()
        self.segmenter = Segmenter(config)

    def rows(self, batch: Mapping[str, Any], live: list[int], out: dict[str, list]) -> None:
        # 1. load every concept's image (and mask file) row by row; a failure ends that row only
        items: list[MaskItem] = []
        owners: list[tuple[int, int]] = []  # (row, concept index) per item
        loaded: dict[tuple[int, int], tuple[ConceptSpec, Any]] = {}
        for row in live:
            out["resolved"][row] = []
            try:
                row_items = self._load_row(batch, row, loaded)
            except Exception as exc:  # noqa: BLE001 - a bad input or a bug costs one row
                self.fail(out, row, exc)
                continue
            items.extend(row_items)
            owners.extend((row, i) for i in range(len(row_items)))

        # 2. masks for all rows at once
        results = self.segmenter.resolve_masks(items)

        # 3. per row: every concept resolved, or the first error in concept order
        for (row, i), result in zip(owners, results, strict=True):
            if self.failed(out, row):
                continue
            if isinstance(result, RowError):
                self.fail(out, row, result)
                continue
            spec, image = loaded[(row, i)]
            concept = ResolvedConcept(
                image=image.image,
                mask=result.mask,
                prompt=spec.prompt,
                weight=spec.weight,
                mask_source=result.source,
                image_digest=image.digest,
                mask_digest=mask_digest(result.mask),
                image_path=image.path,
                extra={"mask": result.details} if result.details else {},
            )
            out["resolved"][row].append(concept.to_row())

    def _load_row(self, batch: Mapping[str, Any], row: int, loaded: dict) -> list[MaskItem]:
        base_dir = batch["base_dir"][row] if "base_dir" in batch else None
        base_dir = str(base_dir) if base_dir else None
        concepts = list(batch["concepts"][row])
        if not concepts:
            raise RowError("concepts", "no concepts")
        items = []
        for i, raw in enumerate(concepts):
            spec = ConceptSpec.from_row(raw)
            image = load_image(
                spec.image_path or spec.image,
                base_dir=base_dir,
                settings=self.input_settings,
                field=f"concepts[{i}].image",
            )
            file_mask = None
            mask_path = spec.mask_path or spec.mask
            if mask_path:
                file_mask = load_mask(
                    mask_path,
                    image.image.size,
                    base_dir=base_dir,
                    settings=self.input_settings,
                    field=f"concepts[{i}].mask",
                )
            loaded[(row, i)] = (spec, image)
            items.append(
                MaskItem.from_spec(spec, image.image, index=i, alpha=image.alpha, file_mask=file_mask)
            )
        return items
