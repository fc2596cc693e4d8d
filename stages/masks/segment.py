"""Masks for concepts: a file, the alpha channel, SAM, or a text-grounded detector + SAM.

Every concept of a concept set gets a binary mask at its image's size and a recorded source.
The sources, in order of precedence, chosen per concept:

1. ``file``: the manifest's mask file (read by ``stages.inputs.read.load_mask``: 50 % threshold,
   nearest resize, aspect and empty checks);
2. ``alpha``: the image's alpha channel (``alpha >= 128``), when it is not fully opaque;
3. ``sam_box`` / ``sam_points``: segment-anything prompted by the manifest's ``box``
   ([x0, y0, x1, y1] pixels) or ``points`` ([[x, y], ...] pixels, all foreground);
4. ``detector``: a zero-shot detector from ``transformers`` (OWLv2, or OWL-ViT) finds the
   best box for the concept's ``label`` (else its ``prompt``), then SAM segments in that box;
5. ``SegmentConfig.mask_policy``: ``"fail"`` (default: a ``RowError`` on
   ``concepts[i].mask`` listing what was tried) or ``"whole_image"`` (source ``whole_image``).

Masks made by a model (SAM, detector) are cleaned (``stages.masks.morphology.clean_model_mask``: clip to
the prompt box, main components, small holes filled, optional dilation), then checked: empty
-> ``RowError``; more than ``max_mask_coverage`` of the image -> ``RowError``. Masks from a
file or the alpha channel are the user's own and are used as given.

``Segmenter`` loads SAM and the detector once (``stages.masks.segment_models``) and resolves many
masks with batched model calls; ``SegmentStage`` (``stages.masks.segment_stage``) is the row stage
that the Ray plan wraps (``map_batches``): one batch row is one concept set.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import RowError, describe
from ..inputs.concepts import ConceptSpec
from .morphology import check_box, check_points, clean_model_mask
from .segment_models import SAM_ARCHS, SamArch, detect_best, load_detector, load_sam, run_batched, sam_logits

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "MASK_FIXES",
    "MASK_POLICIES",
    "MaskItem",
    "MaskResult",
    "SamPrompt",
    "SegmentConfig",
    "Segmenter",
]

STAGE = "segment"
MASK_POLICIES = ("fail", "whole_image")
# what a user can do about a concept no mask source applies to (the run's error and validate's)
MASK_FIXES = ("give it a mask file (mask), an RGBA cut-out as its image (the alpha is the mask), box or points "
              "(with --sam-checkpoint) or a label (with --detector and --sam-checkpoint), or run with "
              "--mask-policy whole_image")
ALPHA_THRESHOLD = 128  # alpha >= 50 % is inside the concept


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SegmentConfig:
    """How masks are made. Frozen, validated on construction, ``to_dict()`` for metadata.

    sam_checkpoint: local path or ``http(s)://`` / ``file://`` URL of a SAM state dict
        (``.safetensors``, or a ``torch.save``d plain tensor dict such as Meta's
        ``sam_vit_b_01ec64.pth``); None: SAM off (box, points and detector sources unavailable).
    sam_model_type: ``vit_b`` | ``vit_l`` | ``vit_h`` (built by ``sam_model_registry``), or
        ``custom`` with ``sam_arch`` (a ``SamArch`` or a dict of its fields).
    detector: hub id or folder of an OWLv2 / OWL-ViT model (``Owlv2ForObjectDetection``);
        None: text-grounded masks off.
    score_threshold: the detector's best box must score above this (sigmoid score in [0, 1]).
    mask_policy: when no source applies: ``fail`` the concept's row, or use the ``whole_image``.
    dilate_px: dilate model-made masks by this many pixels (a disk), 0 = off.
    device: ``cuda`` / ``cpu`` / ``cuda:1``...; None: cuda if available, else cpu.
    """

    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_b"
    sam_arch: SamArch | None = None
    detector: str | None = None
    score_threshold: float = 0.1
    mask_policy: str = "fail"
    dilate_px: int = 0
    device: str | None = None
    sam_batch_size: int = 4
    detector_batch_size: int = 8
    box_margin: float = 0.1
    component_coverage: float = 0.9
    hole_area_frac: float = 0.02
    max_mask_coverage: float = 0.98
    cache_dir: str | None = None  # where URL checkpoints are kept; None: torch.hub's folder

    def __post_init__(self):
        if isinstance(self.sam_arch, Mapping):
            object.__setattr__(self, "sam_arch", SamArch(**self.sam_arch))
        if self.sam_model_type == "custom":
            if self.sam_arch is None:
                raise ValueError("SegmentConfig.sam_model_type='custom' needs sam_arch (a SamArch or dict)")
        elif self.sam_model_type not in SAM_ARCHS:
            raise ValueError(
                f"SegmentConfig.sam_model_type={self.sam_model_type!r}: expected one of "
                f"{(*SAM_ARCHS, 'custom')}"
            )
        elif self.sam_arch is not None:
            raise ValueError(
                f"SegmentConfig.sam_arch is only used with sam_model_type='custom' "
                f"(got sam_model_type={self.sam_model_type!r})"
            )
        if self.mask_policy not in MASK_POLICIES:
            raise ValueError(
                f"SegmentConfig.mask_policy={self.mask_policy!r}: expected one of {MASK_POLICIES}"
            )
        for name, lo, hi in (
            ("score_threshold", 0.0, 1.0),
            ("box_margin", 0.0, 1.0),
            ("component_coverage", 1e-6, 1.0),
            ("hole_area_frac", 0.0, 1.0),
            ("max_mask_coverage", 1e-6, 1.0),
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"SegmentConfig.{name}={value!r}: must be a number in [{lo}, {hi}]")
        if not (isinstance(self.dilate_px, int) and 0 <= self.dilate_px <= 64):
            raise ValueError(f"SegmentConfig.dilate_px={self.dilate_px!r}: must be an int in [0, 64]")
        for name in ("sam_batch_size", "detector_batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"SegmentConfig.{name}={getattr(self, name)!r}: must be an int >= 1")
        for name in ("sam_checkpoint", "detector", "device", "cache_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"SegmentConfig.{name}={value!r}: must be a non-empty string or None")

    @property
    def arch(self) -> SamArch:
        return self.sam_arch if self.sam_model_type == "custom" else SAM_ARCHS[self.sam_model_type]

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- requests and results


@dataclass(eq=False)
class MaskItem:
    """One concept's mask request. ``field`` prefixes error fields (``concepts[2]``).

    ``file_mask``: a mask already loaded from the manifest's mask file (bool (H, W)).
    ``alpha``: the image's alpha channel (uint8 (H, W)) or None.
    ``box``: [x0, y0, x1, y1] pixels; ``points``: [[x, y], ...] pixels (foreground clicks).
    ``text``: what the detector looks for (the concept's label, else its prompt), and ``text_field`` the
    field it came from (what a detector error names).
    ``mask_policy``: overrides ``SegmentConfig.mask_policy`` for this item (carriers).
    """

    image: Image.Image
    field: str = "concepts[0]"
    file_mask: np.ndarray | None = None
    alpha: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] | None = None
    text: str | None = None
    mask_policy: str | None = None
    text_field: str = "label"

    def __post_init__(self):
        if self.mask_policy not in (None, *MASK_POLICIES):
            raise ValueError(
                f"MaskItem.mask_policy={self.mask_policy!r}: expected None or one of {MASK_POLICIES}"
            )

    @classmethod
    def from_spec(
        cls,
        spec: ConceptSpec,
        image: Image.Image,
        *,
        index: int,
        alpha: np.ndarray | None = None,
        file_mask: np.ndarray | None = None,
    ) -> MaskItem:
        text = spec.label if spec.label else (spec.prompt or None)
        return cls(
            image=image,
            field=f"concepts[{index}]",
            file_mask=file_mask,
            alpha=alpha,
            box=spec.box,
            points=spec.points,
            text=text,
            text_field="label" if spec.label else "prompt",
        )


@dataclass(eq=False)
class MaskResult:
    """A resolved mask: bool (H, W) at the image's size, its source (``MASK_SOURCES``) and
    how it was made (``details``: prompt box, detector score, SAM's predicted IoU...)."""

    mask: np.ndarray
    source: str
    details: dict = field(default_factory=dict)


@dataclass(eq=False)
class SamPrompt:
    """One SAM prompt: a box or points (pixels of the original image), and where it came from."""

    index: int  # position in the items list
    source: str  # "sam_box" | "sam_points" | "detector"
    box: np.ndarray | None = None  # (4,) float, pixels, clipped to the image
    points: np.ndarray | None = None  # (N, 2) float, pixels
    details: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- the segmenter


class Segmenter:
    """Loads SAM and the detector once (only those configured) and resolves masks in batches."""

    def __init__(self, config: SegmentConfig = SegmentConfig()):
        self.config = config
        self.sam = None
        self.detector = None
        self.processor = None
        if config.sam_checkpoint is not None:
            self.sam = load_sam(
                config.sam_checkpoint,
                config.sam_model_type,
                arch=config.arch,
                device=self.device,
                cache_dir=config.cache_dir,
            )
        if config.detector is not None:
            self.detector, self.processor = load_detector(config.detector, device=self.device)

    @functools.cached_property
    def device(self):
        """The models' torch device; torch is imported only here, so a segmenter without models (masks
        from files and alpha, the CPU actors that resolve concept groups) never loads it."""
        import torch

        return torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # ---- public

    def resolve_masks(self, items: Sequence[MaskItem]) -> list[MaskResult | RowError]:
        """One ``MaskResult`` or ``RowError`` per item, in order; one item never fails another.

        Steps: 1. sources that need no model (file, alpha); 2. the detector, batched, for
        items with only a text; 3. SAM, batched, for box, points and detector boxes;
        4. post-processing and checks; 5. ``mask_policy`` for items no source applies to.
        """
        results: list[MaskResult | RowError | None] = [None] * len(items)
        sam_prompts: list[SamPrompt] = []
        detector_items: list[int] = []
        tried: dict[int, list[str]] = {}

        # 1. choose a source per item
        for i, item in enumerate(items):
            try:
                choice = self._choose_source(i, item, tried.setdefault(i, []))
            except RowError as err:
                results[i] = err
                continue
            if isinstance(choice, MaskResult):
                results[i] = choice
            elif isinstance(choice, SamPrompt):
                sam_prompts.append(choice)
            elif choice == "detector":
                detector_items.append(i)

        # 2. detector boxes (batched), then SAM inside them
        for i, found in zip(detector_items, self._detect([items[i] for i in detector_items]), strict=True):
            if isinstance(found, RowError):
                results[i] = found
            else:
                box, score = found
                sam_prompts.append(
                    SamPrompt(i, "detector", box=box, details={"box": box.tolist(), "score": score})
                )

        # 3. SAM (batched) and 4. post-processing
        for prompt, out in zip(sam_prompts, self._segment(items, sam_prompts), strict=True):
            item = items[prompt.index]
            if isinstance(out, RowError):
                results[prompt.index] = out
                continue
            mask, sam_iou = out
            try:
                mask = self._postprocess(mask, prompt, item.field)
            except RowError as err:
                results[prompt.index] = err
                continue
            results[prompt.index] = MaskResult(mask, prompt.source, {**prompt.details, "sam_iou": sam_iou})

        # 5. the policy for what is left
        for i, item in enumerate(items):
            if results[i] is None:
                results[i] = self._apply_policy(item, tried[i])
        return results  # type: ignore[return-value]

    # ---- 1. sources

    def _choose_source(self, i: int, item: MaskItem, tried: list[str]) -> MaskResult | SamPrompt | str | None:
        width, height = item.image.size
        if item.file_mask is not None:
            mask = np.asarray(item.file_mask, dtype=bool)
            if mask.shape != (height, width):
                raise RowError(
                    f"{item.field}.mask",
                    f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}",
                )
            if not mask.any():
                raise RowError(f"{item.field}.mask", "mask is empty")
            return MaskResult(mask, "file")
        tried.append("mask file (none given)")

        if item.alpha is not None:
            alpha = np.asarray(item.alpha)
            if alpha.shape != (height, width):
                raise RowError(f"{item.field}.image", f"alpha is {alpha.shape}, image is {width}x{height}")
            if (alpha == 255).all():
                tried.append("alpha channel (fully opaque)")
            else:
                mask = alpha >= ALPHA_THRESHOLD  # (H, W) bool
                if not mask.any():
                    raise RowError(
                        f"{item.field}.mask", "the image's alpha channel is (almost) fully transparent"
                    )
                return MaskResult(mask, "alpha")
        else:
            tried.append("alpha channel (image has none)")

        if item.box is not None or item.points is not None:
            if self.sam is None:
                tried.append("SAM box/points (given, but no sam_checkpoint configured)")
            elif item.box is not None:
                box = check_box(item.box, width, height, f"{item.field}.box")
                return SamPrompt(i, "sam_box", box=box, details={"box": box.tolist()})
            else:
                points = check_points(item.points, width, height, f"{item.field}.points")
                return SamPrompt(i, "sam_points", points=points, details={"points": points.tolist()})
        else:
            tried.append("SAM box/points (none given)")

        if self.detector is None:
            tried.append("detector (not configured)")
        elif not item.text:
            tried.append("detector (no label or prompt to look for)")
        elif self.sam is None:
            tried.append("detector (no sam_checkpoint configured to segment its box)")
        else:
            return "detector"
        return None

    def _apply_policy(self, item: MaskItem, tried: list[str]) -> MaskResult | RowError:
        policy = item.mask_policy or self.config.mask_policy
        if policy == "whole_image":
            width, height = item.image.size
            return MaskResult(np.ones((height, width), dtype=bool), "whole_image", {"tried": list(tried)})
        return RowError(
            f"{item.field}.mask",
            f"no mask source applies (mask_policy={policy!r}); tried: " + "; ".join(tried) + f". Fix: {MASK_FIXES}",
            stage=STAGE,
        )

    # ---- 2. detector

    def _detect(self, items: Sequence[MaskItem]) -> list[tuple[np.ndarray, float] | RowError]:
        """The best box (x0, y0, x1, y1 pixels, clipped) and score per item, or a RowError."""
        return run_batched(
            self._detect_batch,
            list(items),
            self.config.detector_batch_size,
            lambda item, exc: RowError(
                f"{item.field}.{item.text_field}", f"detector failed: {describe(exc)}", stage=STAGE
            ),
        )

    def _detect_batch(self, items: list[MaskItem]) -> list[tuple[np.ndarray, float] | RowError]:
        found = detect_best(
            self.detector,
            self.processor,
            [item.image for item in items],
            [item.text for item in items],
            score_threshold=self.config.score_threshold,
            device=self.device,
        )
        return [
            RowError(f"{item.field}.{item.text_field}", best, stage=STAGE) if isinstance(best, str) else best
            for item, best in zip(items, found, strict=True)
        ]

    # ---- 3. SAM

    def _segment(
        self, items: Sequence[MaskItem], prompts: list[SamPrompt]
    ) -> list[tuple[np.ndarray, float] | RowError]:
        """SAM's binary mask (H, W) and predicted IoU per prompt, images encoded in batches."""
        logits = run_batched(
            lambda batch: self.sam_logits([items[j.index].image for j in batch], batch),
            prompts,
            self.config.sam_batch_size,
            lambda prompt, exc: RowError(
                f"{items[prompt.index].field}.mask", f"SAM failed: {describe(exc)}", stage=STAGE
            ),
        )
        return [
            res if isinstance(res, RowError) else (res[0] > self.sam.mask_threshold, res[1]) for res in logits
        ]

    def sam_logits(
        self, images: Sequence[Image.Image], prompts: Sequence[SamPrompt]
    ) -> list[tuple[np.ndarray, float]]:
        """SAM mask logits (H, W) float32 and predicted IoU for one prompt per image
        (``stages.masks.segment_models.sam_logits``)."""
        boxes, points = [p.box for p in prompts], [p.points for p in prompts]
        return sam_logits(self.sam, images, boxes, points, device=self.device)

    # ---- 4. post-processing

    def _postprocess(self, mask: np.ndarray, prompt: SamPrompt, field_prefix: str) -> np.ndarray:
        cfg = self.config
        mask = clean_model_mask(
            mask,
            box=prompt.box,
            points=prompt.points,
            box_margin=cfg.box_margin,
            coverage=cfg.component_coverage,
            hole_area_frac=cfg.hole_area_frac,
            dilate_px=cfg.dilate_px,
        )
        made_by = "SAM in the detector's box" if prompt.source == "detector" else "SAM"
        if not mask.any():
            raise RowError(f"{field_prefix}.mask", f"{made_by} produced an empty mask", stage=STAGE)
        coverage = float(mask.mean())
        if coverage > cfg.max_mask_coverage:
            raise RowError(
                f"{field_prefix}.mask",
                f"{made_by} produced a mask covering {coverage:.1%} of the image (more than "
                f"max_mask_coverage={cfg.max_mask_coverage:.0%}): it did not single out the concept",
                stage=STAGE,
            )
        return mask
