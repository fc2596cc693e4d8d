"""Copy-paste context composites: show an isolated object (a hat, a product) *in context*.

The paper's finding: a hat alone is a poor reference, a hat pasted onto a head is a good one,
and plain copy-paste is enough. Each concept with a ``context`` is cut out with its mask and
pasted onto a *carrier* (another concept of the set, or an image given by path) at an anchor
relative to the carrier's mask box; ``stages.masks.paste.make_composite`` does one paste (its module
docstring has the geometry).

Concept sets (``resolve_concept_set``): every concept with a ``context`` is pasted onto its
carrier; all objects with the same carrier are pasted in concept order into one *scene*
(later pastes cover earlier ones) anchored on the carrier's original mask box. Each object's
reference becomes the scene, with its mask the part of it still visible. When the carrier is
a concept of the set, its reference becomes the scene too, with its mask minus what the
objects now cover: every reference of the scene is then the same picture with disjoint masks,
and MRSA sees the carrier and the objects in one consistent arrangement. (Updating the
carrier's mask on its *original* image instead would drop visible, unoccluded carrier pixels
for nothing, and leaving the carrier's reference untouched is the paper's manual practice but
wastes the context.) A carrier given by path is only a backdrop: its mask anchors the paste.
Chains (pasting onto a concept that is itself pasted) are refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base import RowStage
from ..errors import RowError
from ..inputs.concepts import ConceptSpec, ResolvedConcept
from ..inputs.control import RowControl, reference_condition
from ..inputs.read import InputSettings, image_digest, load_image, mask_digest
from ..inputs.subject import RowSubject
from ..output.folder import OutputFolder
from .identity import concept_set_id
from .paste import RECIPE_VERSION, make_composite
from .previews import write_previews
from .segment import MASK_POLICIES, MaskItem, SegmentConfig, Segmenter

__all__ = ["CompositeConfig", "CompositeStage", "IDENTITY_KEYS", "resolve_concept_set"]

STAGE = "composite"


# --------------------------------------------------------------------------- concept sets


def resolve_concept_set(
    resolved: Sequence[ResolvedConcept],
    specs: Sequence[ConceptSpec],
    *,
    load_carrier: Callable[[str, int], ResolvedConcept] | None = None,
) -> list[ResolvedConcept]:
    """The references of a concept set after copy-paste context (see the module docstring).

    ``resolved[i]`` is concept i with its own image and mask; ``specs[i].context`` says where
    to paste it. ``load_carrier(path, i)`` loads a carrier given by path (image and mask) for
    concept i. Concepts without context and not used as carriers are returned unchanged.
    Raises ``RowError`` with ``concepts[i]...`` fields.
    """
    n = len(specs)
    if len(resolved) != n:
        raise ValueError(f"resolve_concept_set: {len(resolved)} resolved concepts for {n} specs")

    # 1. group the objects by carrier, refusing bad references
    scenes: dict[tuple[str, int | str], list[int]] = {}
    for i, spec in enumerate(specs):
        if spec.context is None:
            continue
        onto = spec.context.onto
        where = f"concepts[{i}].context.onto"
        if isinstance(onto, (int, np.integer)) and not isinstance(onto, bool):
            onto = int(onto)
            if not 0 <= onto < n:
                raise RowError(where, f"concept index {onto} is out of range (the set has {n} concepts)")
            if onto == i:
                raise RowError(where, "a concept cannot be pasted onto itself")
            if specs[onto].context is not None:
                raise RowError(
                    where,
                    f"concept {onto} is itself pasted onto another carrier; chains are not supported "
                    "(paste both onto the same carrier)",
                )
            key: tuple[str, int | str] = ("concept", onto)
        elif isinstance(onto, str) and onto.strip():
            key = ("image", onto)
        else:
            raise RowError(where, f"expected a concept index or an image path, got {onto!r}")
        scenes.setdefault(key, []).append(i)

    # 2. one scene per carrier
    final = list(resolved)
    for (kind, ref), objects in scenes.items():
        if kind == "concept":
            carrier = resolved[ref]
            carrier_ref: dict[str, Any] = {"concept": ref}
        else:
            if load_carrier is None:
                raise RowError(
                    f"concepts[{objects[0]}].context.onto", "carrier images given by path need a loader"
                )
            carrier = load_carrier(ref, objects[0])
            carrier_ref = {"concept": None}
        carrier_ref |= {
            "image_digest": carrier.image_digest,
            "mask_digest": carrier.mask_digest,
            "mask_source": carrier.mask_source,
        }

        scene = carrier.image
        visible: dict[int, np.ndarray] = {}  # object index -> its still visible pasted region
        recipes = []
        for i in objects:
            ctx, obj = specs[i].context, resolved[i]
            try:
                scene, pasted, _, recipe = make_composite(
                    obj.image,
                    obj.mask,
                    scene,
                    carrier.mask,
                    anchor=ctx.anchor,
                    scale=ctx.scale,
                    soft_edge=ctx.soft_edge,
                )
            except RowError as err:
                raise err.with_prefix(f"concepts[{i}]") from None
            for k in visible:
                visible[k] &= ~pasted  # later pastes cover earlier ones
            visible[i] = pasted
            recipes.append({"concept": i, "object_image_digest": obj.image_digest, **recipe})

        scene_recipe = {"version": RECIPE_VERSION, "carrier": carrier_ref, "objects": recipes}
        scene_digest = image_digest(scene)
        for i in objects:
            if not visible[i].any():
                later = [k for k in objects if k > i]
                raise RowError(
                    f"concepts[{i}].mask", f"fully covered by the object(s) pasted after it: {later}"
                )
            obj = resolved[i]
            extra = {
                **obj.extra,
                "source_image_digest": obj.image_digest,
                "source_mask_source": obj.mask_source,
            }
            if kind == "image":
                extra["carrier_path"] = carrier.image_path or ref
            final[i] = ResolvedConcept(
                image=scene,
                mask=visible[i],
                prompt=obj.prompt,
                weight=obj.weight,
                mask_source="composite",
                image_digest=scene_digest,
                mask_digest=mask_digest(visible[i]),
                image_path=obj.image_path,
                composite={"role": "object", "concept": i, **scene_recipe},
                extra=extra,
            )
        if kind == "concept":
            covered = np.logical_or.reduce([visible[i] for i in objects])
            carrier_mask = carrier.mask & ~covered
            if not carrier_mask.any():
                raise RowError(
                    f"concepts[{ref}].mask", f"the carrier is fully covered by the objects {objects}"
                )
            final[ref] = ResolvedConcept(
                image=scene,
                mask=carrier_mask,
                prompt=carrier.prompt,
                weight=carrier.weight,
                mask_source="composite",
                image_digest=scene_digest,
                mask_digest=mask_digest(carrier_mask),
                image_path=carrier.image_path,
                composite={"role": "carrier", "concept": ref, **scene_recipe},
                extra={
                    **carrier.extra,
                    "source_image_digest": carrier.image_digest,
                    "source_mask_source": carrier.mask_source,
                },
            )
    return final


def concept_rows(
    final: Sequence[ResolvedConcept], original: Sequence[ResolvedConcept], original_rows: Sequence[Mapping]
) -> list[dict]:
    """``final`` (``resolve_concept_set(original, ...)``) as rows, each PNG encoded once: a concept the
    composite left as it was (the same object as in ``original``) keeps the image and mask bytes of its
    row in ``original_rows``, and the concepts that share a composite scene share its encoding. On the
    authors' photos (up to 2680x2680) encoding was most of the stage's time."""
    scenes: dict[int, bytes] = {}  # id(image) -> its PNG; every image is alive in ``final`` meanwhile
    rows = []
    for concept in final:
        k = next((k for k, o in enumerate(original) if o is concept), None)
        if k is not None:
            row = concept.to_row(image_png=original_rows[k]["image_png"], mask_png=original_rows[k]["mask_png"])
        else:
            row = concept.to_row(image_png=scenes.get(id(concept.image)))
        scenes.setdefault(id(concept.image), row["image_png"])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class CompositeConfig:
    """carrier_mask_policy: the mask of a carrier image given by path, when it has no alpha
    channel: ``whole_image`` (default: the whole picture is the carrier) or ``fail``.
    tile_size: pixels per contact-sheet tile."""

    carrier_mask_policy: str = "whole_image"
    tile_size: int = 256

    def __post_init__(self):
        if self.carrier_mask_policy not in MASK_POLICIES:
            raise ValueError(
                f"CompositeConfig.carrier_mask_policy={self.carrier_mask_policy!r}: expected one of {MASK_POLICIES}"
            )
        if not (isinstance(self.tile_size, int) and 32 <= self.tile_size <= 2048):
            raise ValueError(f"CompositeConfig.tile_size={self.tile_size!r}: must be an int in [32, 2048]")


IDENTITY_KEYS = ("model_id", "height", "width", "num_inference_steps", "reference_seed", "mrsa")


class CompositeStage(RowStage):
    """Row stage after ``SegmentStage``: context composites, the concept-set id, previews.

    Input: ``SegmentStage``'s output (``concepts``, ``resolved``, ``base_dir``, error columns),
    and optionally ``params`` and/or ``identity`` columns (dicts or JSON strings with the row's
    generation settings: ``IDENTITY_KEYS``, optional ``negative_prompt`` and ``extra``), merged
    in that order over ``identity_defaults`` (e.g. ``{"model_id": ...}``) to compute the
    concept-set id. Output: ``resolved`` replaced by the final references (same encoding),
    ``concept_set_id`` (None when no identity is known) and ``preview_dir`` (None without
    ``out_dir`` or id); errors in the error columns. A non-empty ``control`` column (a group whose
    references go through ControlNet, ``shards.concept_group_rows``) adds its condition to the id and
    the previews, and gives ``control_condition`` (``control.reference_condition``'s JSON). A non-empty
    ``blip_subject`` column (a group whose references get its BLIP-Diffusion subject) adds the subject's
    digest and category to the id and gives ``subject_condition`` (``RowSubject.reference_condition``'s JSON).
    """

    stage = STAGE
    columns = {"resolved": [], "concept_set_id": None, "preview_dir": None, "control_condition": "",
               "subject_condition": ""}

    def __init__(
        self,
        config: CompositeConfig = CompositeConfig(),
        *,
        out_dir: str | os.PathLike | None = None,
        identity_defaults: Mapping[str, Any] | None = None,
        input_settings: InputSettings | None = None,
    ):
        self.config = config
        self.output = OutputFolder(out_dir) if out_dir is not None else None
        self.identity_defaults = dict(identity_defaults or {})
        self.input_settings = input_settings or InputSettings()
        # no SAM, no detector: carriers by path get alpha, else carrier_mask_policy
        self.segmenter = Segmenter(SegmentConfig(mask_policy=config.carrier_mask_policy))

    def row(self, batch: Mapping[str, Any], i: int, out: dict[str, list]) -> None:
        specs = [ConceptSpec.from_row(d) for d in batch["concepts"][i]]
        original_rows = list(batch["resolved"][i])
        original = [ResolvedConcept.from_row(d) for d in original_rows]
        base_dir = batch["base_dir"][i] if "base_dir" in batch else None
        final = resolve_concept_set(
            original, specs, load_carrier=lambda path, k: self._load_carrier(path, k, base_dir)
        )
        out["resolved"][i] = rows = concept_rows(final, original, original_rows)

        identity = self._identity(batch, i)
        if identity is None:
            return
        extra = dict(identity.get("extra") or {})
        if identity.get("negative_prompt") is not None:  # it shapes the unconditional reference K/V
            extra["negative_prompt"] = identity["negative_prompt"]
        control_previews = ()
        control = batch["control"][i] if "control" in batch else None
        if control:  # the references go through ControlNet: the K/V depend on the condition
            spec = json.loads(control)
            text, extra["control"], control_previews = reference_condition(
                RowControl.from_row(spec), spec["controlnet"], self.input_settings
            )
            out["control_condition"][i] = text
        subject = RowSubject.from_row(json.loads(batch["blip_subject"][i] or "null")) if "blip_subject" in batch else None
        if subject is not None:  # the references get the subject: the K/V depend on its pixels and category
            out["subject_condition"][i], extra["blip_subject"] = subject.reference_condition(self.input_settings)
        set_id = concept_set_id(final, **{k: identity[k] for k in IDENTITY_KEYS}, extra=extra or None)
        out["concept_set_id"][i] = set_id
        if self.output is not None:
            out["preview_dir"][i] = write_previews(
                self.output, set_id, final, original, tile_size=self.config.tile_size, control=control_previews,
                rows=rows,
            )

    def _identity(self, batch: Mapping[str, Any], row: int) -> dict | None:
        """``identity_defaults`` updated by the row's ``params`` then ``identity`` (dicts or JSON)."""
        identity = dict(self.identity_defaults)
        for column in ("params", "identity"):
            value = batch[column][row] if column in batch else None
            if value is None or (isinstance(value, str) and not value):
                continue
            if isinstance(value, (str, bytes)):
                value = json.loads(value)
            identity.update({k: v for k, v in dict(value).items() if v is not None})
        if not identity:
            return None
        missing = [k for k in IDENTITY_KEYS if k not in identity]
        if missing:
            raise RowError("params", f"missing {missing} to compute the concept-set id")
        return identity

    def _load_carrier(self, path: str, i: int, base_dir) -> ResolvedConcept:
        where = f"concepts[{i}].context.onto"
        loaded = load_image(
            path, base_dir=str(base_dir) if base_dir else None, settings=self.input_settings, field=where
        )
        item = MaskItem(image=loaded.image, field=where, alpha=loaded.alpha)
        result = self.segmenter.resolve_masks([item])[0]
        if isinstance(result, RowError):
            raise result
        return ResolvedConcept(
            image=loaded.image,
            mask=result.mask,
            prompt="",
            weight=0.0,
            mask_source=result.source,
            image_digest=loaded.digest,
            mask_digest=mask_digest(result.mask),
            image_path=loaded.path,
        )
