"""Masks for concepts: a file, the alpha channel, SAM, or a text-grounded detector + SAM.

Every concept of a concept set gets a binary mask at its image's size and a recorded source.
The sources, in order of precedence, chosen per concept:

1. ``file``: the manifest's mask file (read by ``stages.inputs.load_mask``: 50 % threshold,
   nearest resize, aspect and empty checks);
2. ``alpha``: the image's alpha channel (``alpha >= 128``), when it is not fully opaque;
3. ``sam_box`` / ``sam_points``: segment-anything prompted by the manifest's ``box``
   ([x0, y0, x1, y1] pixels) or ``points`` ([[x, y], ...] pixels, all foreground);
4. ``detector``: a zero-shot detector from ``transformers`` (OWLv2, or OWL-ViT) finds the
   best box for the concept's ``label`` (else its ``prompt``), then SAM segments in that box;
5. ``SegmentConfig.mask_policy``: ``"fail"`` (default: a ``RowError`` on
   ``concepts[i].mask`` listing what was tried) or ``"whole_image"`` (source ``whole_image``).

Masks made by a model (SAM, detector) are post-processed, in this order:

- clip (box prompts only): pixels farther than ``box_margin`` x the box size outside the
  prompt box are dropped (SAM occasionally leaks into the background);
- components: connected components (8-connectivity) are ranked by their area inside the
  prompt box (box prompts) or by the number of prompt points they contain (point prompts);
  the smallest set of top-ranked components that together hold ``component_coverage`` of
  the mask's area inside the box is kept (point prompts: every component holding a point);
- holes: background components (4-connectivity) that do not touch the image border and are
  at most ``hole_area_frac`` x the mask's area are filled;
- dilation by ``dilate_px`` pixels (a Euclidean disk);
- checks: empty -> ``RowError``; more than ``max_mask_coverage`` of the image -> ``RowError``.

Masks from a file or the alpha channel are the user's own and are used as given.

``Segmenter`` loads SAM and the detector once and resolves many masks with batched model
calls; ``SegmentStage`` is the Ray-free callable class that the Ray plan wraps
(``map_batches``): one batch row is one concept set. Weights load only from safetensors or
``torch.load(weights_only=True)``: a pickled payload that is not plain tensors is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.concepts import ConceptSpec, ContextSpec, ResolvedConcept
from stages.errors import RowError

if TYPE_CHECKING:
    from PIL import Image

    from stages.inputs import InputSettings

__all__ = [
    "MASK_POLICIES",
    "SAM_ARCHS",
    "MaskItem",
    "MaskResult",
    "SamArch",
    "SamPrompt",
    "SegmentConfig",
    "SegmentStage",
    "Segmenter",
    "build_sam",
    "concept_spec_from_dict",
    "decode_resolved",
    "dilate",
    "encode_resolved",
    "fill_small_holes",
    "image_from_png",
    "image_to_png",
    "keep_main_components",
    "label_components",
    "load_detector",
    "load_sam",
    "load_state_dict_safely",
    "mask_from_png",
    "mask_to_png",
]

STAGE = "segment"
MASK_POLICIES = ("fail", "whole_image")
ALPHA_THRESHOLD = 128  # alpha >= 50 % is inside the concept
_DETECTOR_TYPES = ("owlv2", "owlvit")
_URL_SCHEMES = ("http://", "https://", "file://")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SamArch:
    """A SAM architecture (the arguments of ``segment_anything.build_sam._build_sam``).

    The presets in ``SAM_ARCHS`` equal upstream ``vit_b`` / ``vit_l`` / ``vit_h``; a custom
    one (``SegmentConfig(sam_model_type="custom", sam_arch=...)``) exists for tiny test models.
    """

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    def __post_init__(self):
        object.__setattr__(self, "encoder_global_attn_indexes", tuple(self.encoder_global_attn_indexes))
        for name in ("encoder_embed_dim", "encoder_depth", "encoder_num_heads", "image_size", "patch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SamArch.{name}={getattr(self, name)!r}: must be >= 1")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"SamArch.image_size={self.image_size} must be a multiple of patch_size={self.patch_size}"
            )
        if self.prompt_embed_dim % 8:
            raise ValueError(f"SamArch.prompt_embed_dim={self.prompt_embed_dim}: must be a multiple of 8")
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(
                f"SamArch.encoder_global_attn_indexes={self.encoder_global_attn_indexes}: "
                f"{bad} out of range for encoder_depth={self.encoder_depth}"
            )


SAM_ARCHS = {
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31)),
}


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
    ``text``: what the detector looks for (the concept's label, else its prompt).
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
        import torch

        self.config = config
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.sam = None
        self.detector = None
        self.processor = None
        if config.sam_checkpoint is not None:
            self.sam = load_sam(config, device=self.device)
        if config.detector is not None:
            self.detector, self.processor = load_detector(config.detector, device=self.device)

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
                box = _check_box(item.box, width, height, f"{item.field}.box")
                return SamPrompt(i, "sam_box", box=box, details={"box": box.tolist()})
            else:
                points = _check_points(item.points, width, height, f"{item.field}.points")
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
            f"no mask source applies (mask_policy={policy!r}); tried: " + "; ".join(tried),
            stage=STAGE,
        )

    # ---- 2. detector

    def _detect(self, items: Sequence[MaskItem]) -> list[tuple[np.ndarray, float] | RowError]:
        """The best box (x0, y0, x1, y1 pixels, clipped) and score per item, or a RowError."""
        return _run_batched(
            self._detect_batch,
            list(items),
            self.config.detector_batch_size,
            lambda item, exc: RowError(
                f"{item.field}.label", f"detector failed: {type(exc).__name__}: {exc}"
            ),
        )

    def _detect_batch(self, items: list[MaskItem]) -> list[tuple[np.ndarray, float] | RowError]:
        import torch

        images = [item.image for item in items]
        texts = [[item.text] for item in items]  # one query per image
        inputs = self.processor(text=texts, images=images, return_tensors="pt", truncation=True)
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            outputs = self.detector(**inputs)  # logits (B, P, 1), pred_boxes (B, P, 4)
        sizes = [(im.height, im.width) for im in images]
        # threshold 0: every box; the best one is compared with score_threshold below
        found = self.processor.post_process_grounded_object_detection(
            outputs, threshold=0.0, target_sizes=sizes
        )
        results: list[tuple[np.ndarray, float] | RowError] = []
        for item, det in zip(items, found, strict=True):
            field_name = f"{item.field}.label"
            scores = det["scores"].float().cpu()  # (K,)
            if scores.numel() == 0:
                results.append(RowError(field_name, f"detector found no {item.text!r}", stage=STAGE))
                continue
            best = int(torch.argmax(scores))
            score = float(scores[best])
            if not score > self.config.score_threshold:
                results.append(
                    RowError(
                        field_name,
                        f"detector found no {item.text!r} above score_threshold="
                        f"{self.config.score_threshold} (best score {score:.3f})",
                        stage=STAGE,
                    )
                )
                continue
            width, height = item.image.size
            box = det["boxes"][best].float().cpu().numpy().astype(np.float64)  # (4,) x0 y0 x1 y1
            box = np.clip(box, 0.0, [width, height, width, height])
            if box[2] - box[0] < 1.0 or box[3] - box[1] < 1.0:
                results.append(
                    RowError(
                        field_name,
                        f"detector's best box for {item.text!r} is degenerate after clipping to the "
                        f"image: {np.round(box, 1).tolist()}",
                        stage=STAGE,
                    )
                )
                continue
            results.append((box, score))
        return results

    # ---- 3. SAM

    def _segment(
        self, items: Sequence[MaskItem], prompts: list[SamPrompt]
    ) -> list[tuple[np.ndarray, float] | RowError]:
        """SAM's binary mask (H, W) and predicted IoU per prompt, images encoded in batches."""
        logits = _run_batched(
            lambda batch: self.sam_logits([items[j.index].image for j in batch], batch),
            prompts,
            self.config.sam_batch_size,
            lambda prompt, exc: RowError(
                f"{items[prompt.index].field}.mask", f"SAM failed: {type(exc).__name__}: {exc}"
            ),
        )
        out: list[tuple[np.ndarray, float] | RowError] = []
        for res in logits:
            if isinstance(res, RowError):
                out.append(res)
            else:
                logit_map, iou = res
                out.append((logit_map > self.sam.mask_threshold, iou))
        return out

    def sam_logits(
        self, images: Sequence[Image.Image], prompts: Sequence[SamPrompt]
    ) -> list[tuple[np.ndarray, float]]:
        """SAM mask logits (H, W) float32 and predicted IoU for one prompt per image.

        The same computation as ``SamPredictor.set_image`` + ``predict`` (tested against it),
        with the image encoder run once on the whole batch. Box prompts and several points
        ask for one mask; a single point asks for three and keeps the best predicted IoU.
        """
        import torch
        from segment_anything.utils.transforms import ResizeLongestSide

        sam = self.sam
        transform = ResizeLongestSide(sam.image_encoder.img_size)
        inputs, input_sizes = [], []
        for image in images:
            resized = transform.apply_image(
                np.asarray(image.convert("RGB"))
            )  # (h, w, 3) uint8, long side = S
            tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()  # (3, h, w)
            input_sizes.append(tuple(tensor.shape[-2:]))
            inputs.append(sam.preprocess(tensor[None])[0])  # (3, S, S) normalised, padded
        out = []
        with torch.inference_mode():
            embeddings = sam.image_encoder(torch.stack(inputs))  # (B, C, S/16, S/16)
            for b, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
                original_size = (image.height, image.width)
                points = boxes = None
                multimask = False
                if prompt.points is not None:
                    coords = transform.apply_coords(prompt.points, original_size)  # (N, 2)
                    coords_t = torch.as_tensor(coords, dtype=torch.float, device=self.device)[
                        None
                    ]  # (1, N, 2)
                    labels_t = torch.ones(coords_t.shape[:2], dtype=torch.int, device=self.device)  # (1, N)
                    points = (coords_t, labels_t)
                    multimask = len(prompt.points) == 1
                if prompt.box is not None:
                    box = transform.apply_boxes(prompt.box[None], original_size)  # (1, 4)
                    boxes = torch.as_tensor(box, dtype=torch.float, device=self.device)  # (1, 4)
                sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
                low_res, iou = sam.mask_decoder(
                    image_embeddings=embeddings[b : b + 1],  # (1, C, S/16, S/16)
                    image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                )  # low_res (1, M, 4S/16, 4S/16), iou (1, M)
                masks = sam.postprocess_masks(low_res, input_sizes[b], original_size)  # (1, M, H, W)
                best = int(torch.argmax(iou[0]))
                out.append((masks[0, best].float().cpu().numpy(), float(iou[0, best])))
        return out

    # ---- 4. post-processing

    def _postprocess(self, mask: np.ndarray, prompt: SamPrompt, field_prefix: str) -> np.ndarray:
        cfg = self.config
        height, width = mask.shape
        if prompt.box is not None:
            mask = mask & _box_region(prompt.box, (height, width), margin=cfg.box_margin)
        mask = keep_main_components(
            mask, box=prompt.box, points=prompt.points, coverage=cfg.component_coverage
        )
        mask = fill_small_holes(mask, max_area_frac=cfg.hole_area_frac)
        if cfg.dilate_px:
            mask = dilate(mask, cfg.dilate_px)
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


def _run_batched(
    fn: Callable[[list], list], items: list, batch_size: int, on_error: Callable[[Any, Exception], RowError]
) -> list:
    """``fn`` over chunks of ``items``; a failing chunk is split in halves and retried, so an
    error (out of memory, one bad input) ends up on the single item that causes it."""
    out: list = []
    for start in range(0, len(items), batch_size):
        out.extend(_run_chunk(fn, items[start : start + batch_size], on_error))
    return out


def _run_chunk(fn, chunk: list, on_error) -> list:
    try:
        return fn(chunk)
    except Exception as exc:  # noqa: BLE001 - turned into per-item errors below
        if len(chunk) == 1:
            err = on_error(chunk[0], exc)
            err.stage = err.stage or STAGE
            return [err]
        _free_accelerator_memory()
        half = len(chunk) // 2
        return _run_chunk(fn, chunk[:half], on_error) + _run_chunk(fn, chunk[half:], on_error)


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_box(box, width: int, height: int, field_name: str) -> np.ndarray:
    """A prompt box as (4,) float64 pixels, clipped to the image; RowError if unusable."""
    arr = np.asarray(box, dtype=np.float64).reshape(-1)
    if arr.shape != (4,) or not np.isfinite(arr).all():
        raise RowError(
            field_name, f"expected [x0, y0, x1, y1] in pixels, got {list(np.asarray(box).ravel())}"
        )
    x0, y0, x1, y1 = arr
    if not (x1 > x0 and y1 > y0):
        raise RowError(field_name, f"box {arr.tolist()} is empty or inverted (need x1 > x0 and y1 > y0)")
    clipped = np.clip(arr, 0.0, [width, height, width, height])
    if clipped[2] - clipped[0] < 1.0 or clipped[3] - clipped[1] < 1.0:
        raise RowError(field_name, f"box {arr.tolist()} lies outside the {width}x{height} image")
    return clipped


def _check_points(points, width: int, height: int, field_name: str) -> np.ndarray:
    """Prompt points as (N, 2) float64 pixels inside the image; RowError if unusable."""
    try:
        arr = np.asarray([[float(x), float(y)] for x, y in points], dtype=np.float64)  # (N, 2)
    except (TypeError, ValueError) as exc:
        raise RowError(field_name, f"expected [[x, y], ...] in pixels: {exc}") from exc
    if arr.size == 0:
        raise RowError(field_name, "no points given")
    inside = (arr[:, 0] >= 0) & (arr[:, 0] < width) & (arr[:, 1] >= 0) & (arr[:, 1] < height)
    if not np.isfinite(arr).all() or not inside.all():
        raise RowError(field_name, f"points {arr[~inside].tolist()} lie outside the {width}x{height} image")
    return arr


def _box_region(box: np.ndarray, shape: tuple[int, int], *, margin: float = 0.0) -> np.ndarray:
    """bool (H, W): pixels whose centres lie in ``box`` grown by ``margin`` x its size per side."""
    height, width = shape
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    xs = np.arange(width) + 0.5  # pixel centres
    ys = np.arange(height) + 0.5
    in_x = (xs >= x0 - dx) & (xs <= x1 + dx)  # (W,)
    in_y = (ys >= y0 - dy) & (ys <= y1 + dy)  # (H,)
    return in_y[:, None] & in_x[None, :]


# --------------------------------------------------------------------------- mask post-processing


def label_components(mask: np.ndarray, *, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a bool (H, W) mask: int32 labels (0 = background, 1..n), n.

    Run-length union-find, vectorised: each row's runs of True are found with ``np.diff``;
    runs in adjacent rows that touch (overlap, or also touch diagonally with 8-connectivity)
    are joined by repeated root hooking and pointer jumping. Labels are numbered in raster
    order of each component's first pixel.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity={connectivity}: expected 4 or 8")
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    labels = np.zeros((height, width), dtype=np.int32)
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # (H, W+1): +1 where a run starts, -1 one past where it ends
    rows, starts = np.nonzero(edges == 1)  # (R,), (R,) in raster order
    _, ends = np.nonzero(edges == -1)  # (R,) exclusive ends, same order
    n_runs = len(rows)
    if n_runs == 0:
        return labels, 0

    # Pairs (a, b) of runs, b in the row below a, that touch: b.start < a.end + k, b.end > a.start - k.
    k = 1 if connectivity == 8 else 0
    stride = width + 2  # > any column index, so row * stride + column is increasing in raster order
    start_keys = rows * stride + starts
    end_keys = rows * stride + ends
    below = (rows + 1) * stride
    lo = np.searchsorted(end_keys, below + starts - k, side="right")  # first b with b.end > a.start - k
    hi = np.searchsorted(start_keys, below + ends + k, side="left")  # first b with b.start >= a.end + k
    counts = np.maximum(hi - lo, 0)  # (R,)
    a_idx = np.repeat(np.arange(n_runs), counts)  # (P,)
    offsets = np.repeat(np.cumsum(counts) - counts, counts)  # (P,)
    b_idx = np.repeat(lo, counts) + (np.arange(len(a_idx)) - offsets)  # (P,)

    # Union-find on runs: hook the larger root under the smaller, then compress fully.
    parent = np.arange(n_runs)
    while len(a_idx):
        root_a, root_b = parent[a_idx], parent[b_idx]
        differ = root_a != root_b
        if not differ.any():
            break
        low, high = np.minimum(root_a, root_b)[differ], np.maximum(root_a, root_b)[differ]
        np.minimum.at(parent, high, low)
        while True:  # pointer jumping until every run points at its root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped

    _, run_label = np.unique(parent, return_inverse=True)  # roots are first runs: raster order kept
    lengths = ends - starts  # (R,)
    flat = np.repeat(rows * width + starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    labels.reshape(-1)[flat] = np.repeat(run_label.astype(np.int32) + 1, lengths)
    return labels, int(run_label.max()) + 1


def keep_main_components(
    mask: np.ndarray,
    *,
    box: np.ndarray | None = None,
    points: np.ndarray | None = None,
    coverage: float = 0.9,
) -> np.ndarray:
    """Keep the components that make up the object and drop stray specks.

    With ``points``: every component holding a prompt point (none holds one: the largest).
    Otherwise components are ranked by their area inside ``box`` (the whole image without a
    box) and the smallest top-ranked set holding ``coverage`` of that area is kept.
    """
    labels, n = label_components(mask)
    if n <= 1:
        return np.asarray(mask, dtype=bool)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # (n,)
    if points is not None:
        cols = np.clip(points[:, 0].astype(int), 0, mask.shape[1] - 1)
        rows = np.clip(points[:, 1].astype(int), 0, mask.shape[0] - 1)
        hit = np.unique(labels[rows, cols])
        keep = hit[hit > 0]
        if len(keep) == 0:
            keep = np.array([int(np.argmax(areas)) + 1])
        return np.isin(labels, keep)
    region = labels if box is None else np.where(_box_region(box, mask.shape), labels, 0)
    inside = np.bincount(region.ravel(), minlength=n + 1)[1:]  # (n,) area inside the box
    if inside.sum() == 0:  # nothing inside the box: the largest component
        return labels == int(np.argmax(areas)) + 1
    order = np.argsort(-inside, kind="stable")  # largest inside area first
    cumulative = np.cumsum(inside[order])
    n_keep = int(np.searchsorted(cumulative, coverage * cumulative[-1] - 1e-9)) + 1
    return np.isin(labels, order[:n_keep] + 1)


def fill_small_holes(mask: np.ndarray, *, max_area_frac: float) -> np.ndarray:
    """Fill background components (4-connectivity) that do not touch the image border and
    whose area is at most ``max_area_frac`` x the mask's area."""
    mask = np.asarray(mask, dtype=bool)
    if max_area_frac <= 0 or not mask.any():
        return mask
    holes, n = label_components(~mask, connectivity=4)
    if n == 0:
        return mask
    areas = np.bincount(holes.ravel(), minlength=n + 1)  # (n+1,), index 0 = the mask itself
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    small = areas <= max_area_frac * mask.sum()
    small[0] = False
    small[border] = False
    return mask | small[holes]


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a Euclidean disk of ``radius`` pixels (dx^2 + dy^2 <= r^2).

    The disk is a stack of horizontal segments of half-width ``isqrt(r^2 - dy^2)``; each
    horizontal dilation is a window sum over a row prefix sum, then shifted by ``dy``.
    """
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return mask
    height, width = mask.shape
    prefix = np.zeros((height, width + 1), dtype=np.int32)
    np.cumsum(mask, axis=1, out=prefix[:, 1:])  # (H, W+1): True pixels left of each column
    cols = np.arange(width)
    horizontal: dict[int, np.ndarray] = {}
    out = np.zeros_like(mask)
    for dy in range(-min(radius, height - 1), min(radius, height - 1) + 1):
        half = math.isqrt(radius * radius - dy * dy)
        if half not in horizontal:
            lo, hi = np.clip(cols - half, 0, width), np.clip(cols + half + 1, 0, width)
            horizontal[half] = prefix[:, hi] > prefix[:, lo]  # (H, W): a True pixel within +-half
        rows = horizontal[half]
        # out[y] |= rows[y + dy]
        if dy >= 0:
            out[: height - dy] |= rows[dy:]
        else:
            out[-dy:] |= rows[: height + dy]
    return out


# --------------------------------------------------------------------------- loading models


def load_state_dict_safely(source: str, *, cache_dir: str | None = None) -> dict:
    """A plain ``{name: tensor}`` state dict from a path or URL, never unpickling objects.

    ``.safetensors`` through ``safetensors.torch.load_file``; anything else through
    ``torch.load(weights_only=True)``, which refuses pickled classes and code. URLs
    (``http(s)://``, ``file://``) are downloaded once into ``cache_dir``. Raises ValueError
    naming the file and the reason when the payload is not plain tensors.
    """
    import pickle

    import torch

    path = _fetch(source, cache_dir) if source.startswith(_URL_SCHEMES) else source
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {source!r}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:
            raise ValueError(f"checkpoint {source!r}: not a valid safetensors file: {exc}") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as exc:
        raise ValueError(
            f"checkpoint {source!r}: refused: not a plain tensor checkpoint (torch.load with "
            f"weights_only=True failed: {str(exc).splitlines()[0]}); convert it to safetensors"
        ) from exc
    if isinstance(state, Mapping) and set(state) <= {"model", "state_dict"} and len(state) == 1:
        state = next(iter(state.values()))
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"checkpoint {source!r}: refused: expected a dict of name -> tensor")
    return dict(state)


def _fetch(url: str, cache_dir: str | None) -> str:
    """Download ``url`` once (temp file then rename, by ``torch.hub``) and return the local path."""
    import torch

    folder = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(url.split("?", 1)[0].rstrip("/")) or "checkpoint"
    local = os.path.join(folder, f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}")
    if not os.path.isfile(local):
        torch.hub.download_url_to_file(url, local, progress=False)
    return local


def build_sam(arch: SamArch):
    """A randomly initialised ``segment_anything.modeling.Sam`` of architecture ``arch``,
    built exactly as upstream ``_build_sam`` builds vit_b/l/h (in eval mode)."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    embedding_size = arch.image_size // arch.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def load_sam(config: SegmentConfig, *, device):
    """SAM with weights from ``config.sam_checkpoint``, on ``device``, in eval mode.

    vit_b/l/h are built by upstream ``sam_model_registry`` (with ``checkpoint=None``: its own
    loader uses an unrestricted ``torch.load``), ``custom`` by ``build_sam(config.sam_arch)``;
    the weights come from ``load_state_dict_safely`` and must match the architecture exactly.
    """
    from segment_anything import sam_model_registry

    state = load_state_dict_safely(config.sam_checkpoint, cache_dir=config.cache_dir)
    if config.sam_model_type == "custom":
        sam = build_sam(config.sam_arch)
    else:
        sam = sam_model_registry[config.sam_model_type](checkpoint=None)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"SegmentConfig.sam_checkpoint={config.sam_checkpoint!r} does not fit sam_model_type="
            f"{config.sam_model_type!r}: {str(exc).splitlines()[0]}"
        ) from exc
    return sam.to(device).eval()


def load_detector(source: str, *, device):
    """An OWLv2 / OWL-ViT detector and its processor from a hub id or folder (safetensors only)."""
    from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

    model_type = AutoConfig.from_pretrained(source).model_type
    if model_type not in _DETECTOR_TYPES:
        raise ValueError(
            f"SegmentConfig.detector={source!r} is a {model_type!r} model; supported: {_DETECTOR_TYPES}"
        )
    processor = AutoProcessor.from_pretrained(source)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(source, use_safetensors=True)
    return model.to(device).eval(), processor


# --------------------------------------------------------------------------- (de)serialisation


def image_to_png(image: Image.Image) -> bytes:
    """PNG bytes of an RGB image, deterministic (no metadata, fixed compression)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def image_from_png(data: bytes) -> Image.Image:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def mask_to_png(mask: np.ndarray) -> bytes:
    """PNG bytes ("L", 0 / 255) of a bool (H, W) mask."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def mask_from_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L")) >= 128  # (H, W) bool


def encode_resolved(concept: ResolvedConcept) -> dict:
    """A ``ResolvedConcept`` as a flat dict of bytes / str / float (crosses processes, Arrow)."""
    return {
        "image_png": image_to_png(concept.image),
        "mask_png": mask_to_png(concept.mask),
        "prompt": concept.prompt,
        "weight": float(concept.weight),
        "mask_source": concept.mask_source,
        "image_digest": concept.image_digest,
        "mask_digest": concept.mask_digest,
        "image_path": concept.image_path,
        "composite_json": None
        if concept.composite is None
        else json.dumps(concept.composite, sort_keys=True),
        "extra_json": json.dumps(concept.extra, sort_keys=True, default=_json_default),
    }


def decode_resolved(data: Mapping) -> ResolvedConcept:
    composite = data.get("composite_json")
    return ResolvedConcept(
        image=image_from_png(data["image_png"]),
        mask=mask_from_png(data["mask_png"]),
        prompt=str(data["prompt"]),
        weight=float(data["weight"]),
        mask_source=str(data["mask_source"]),
        image_digest=str(data["image_digest"]),
        mask_digest=str(data["mask_digest"]),
        image_path=str(data.get("image_path") or ""),
        composite=json.loads(composite) if composite else None,
        extra=json.loads(data.get("extra_json") or "{}"),
    )


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _plain(value):
    """numpy scalars / arrays (as Ray hands them over) to Python values; None stays None."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def concept_spec_from_dict(data: Mapping) -> ConceptSpec:
    """A ``ConceptSpec`` from ``dataclasses.asdict(spec)`` as it arrives in a Ray batch (numpy
    arrays for lists, numpy scalars). A context given in the manifest's form (``box`` for an
    explicit anchor box) is accepted too."""
    d = {k: _plain(v) for k, v in dict(data).items()}
    box = d.get("box")
    points = d.get("points")
    context = d.get("context")
    if isinstance(context, Mapping):
        c = {k: _plain(v) for k, v in context.items()}
        onto = c.get("onto")  # an int (concept index) or a str (carrier path) stays as it is
        anchor = c.get("anchor")
        if c.get("box") is not None and not anchor:
            anchor = c["box"]
        if isinstance(anchor, list):
            anchor = tuple(float(v) for v in anchor)
        kwargs: dict[str, Any] = {"onto": onto}
        if anchor is not None:
            kwargs["anchor"] = anchor
        if c.get("scale") is not None:
            kwargs["scale"] = float(c["scale"])
        if c.get("soft_edge") is not None:
            kwargs["soft_edge"] = int(c["soft_edge"])
        context = ContextSpec(**kwargs)
    return ConceptSpec(
        image=str(d.get("image") or ""),
        prompt=str(d.get("prompt") or ""),
        image_path=str(d.get("image_path") or ""),
        mask=d.get("mask"),
        mask_path=d.get("mask_path"),
        weight=3.0 if d.get("weight") is None else float(d["weight"]),
        box=None if box is None else tuple(float(v) for v in box),
        points=None if points is None else tuple((float(p[0]), float(p[1])) for p in points),
        label=d.get("label"),
        context=context,
    )


# --------------------------------------------------------------------------- the stage


def batch_len(batch: Mapping[str, Any]) -> int:
    """Rows in a Ray-format batch (a dict of equal-length columns)."""
    return len(next(iter(batch.values()))) if batch else 0


def to_column(values: list) -> np.ndarray:
    """A 1-D object array, element by element (``np.array`` would build 2-D from equal-length lists)."""
    arr = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        arr[i] = value
    return arr


def null_to_none(value: Any) -> Any:
    """``None`` for what Ray's numpy batches make of a null (a column null in every row of a block
    arrives as float NaN), else ``value``; the columns it is used on never hold a real NaN."""
    return None if isinstance(value, float) and value != value else value


def has_error(batch: Mapping[str, Any], row: int) -> bool:
    """Did an earlier stage already fail this row?"""
    if "error_reason" not in batch:
        return False
    return null_to_none(batch["error_reason"][row]) not in (None, "")


def passthrough(batch: Mapping[str, Any]) -> dict[str, list]:
    """The batch's columns as lists, with ``error_stage/field/reason`` present ("" = no error)."""
    n = batch_len(batch)
    out = {c: list(values) for c, values in batch.items()}
    for c in ("error_stage", "error_field", "error_reason"):
        out[c] = ["" if v is None else str(v) for v in out.get(c, [""] * n)]
    return out


def set_error(out: dict[str, list], row: int, err: RowError, stage: str) -> None:
    out["error_stage"][row] = err.stage or stage
    out["error_field"][row] = err.field
    out["error_reason"][row] = err.reason


class SegmentStage:
    """Ray-free batch stage: load each concept set's images and resolve their masks.

    Input columns: ``key`` (str), ``concepts`` (list of ``dataclasses.asdict(ConceptSpec)``),
    ``base_dir`` (str, folder relative paths resolve against), anything else (passed through).
    Output adds ``resolved`` (per row: a list of ``encode_resolved`` dicts, PNG bytes, one per
    concept, in order) and ``error_stage`` / ``error_field`` / ``error_reason`` ("" when the
    row succeeded; on an error ``resolved`` is empty). Rows that arrive with an error pass untouched.
    The masks of all rows in the batch are resolved together (batched model calls).
    """

    def __init__(self, config: SegmentConfig = SegmentConfig(), input_settings: InputSettings | None = None):
        from stages.inputs import InputSettings

        self.config = config
        self.input_settings = input_settings or InputSettings()
        self.segmenter = Segmenter(config)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        n = batch_len(batch)
        out = passthrough(batch)
        out["resolved"] = [[] for _ in range(n)]

        # 1. load every concept's image (and mask file) row by row; a failure ends that row only
        items: list[MaskItem] = []
        owners: list[tuple[int, int]] = []  # (row, concept index) per item
        loaded: dict[tuple[int, int], tuple[ConceptSpec, Any]] = {}
        for row in range(n):
            if has_error(batch, row):
                continue
            try:
                row_items = self._load_row(batch, row, loaded)
            except RowError as err:
                set_error(out, row, err, STAGE)
                continue
            except Exception as exc:  # noqa: BLE001 - a bug or odd input costs one row
                set_error(out, row, RowError("concepts", f"{type(exc).__name__}: {exc}"), STAGE)
                continue
            for i, item in enumerate(row_items):
                items.append(item)
                owners.append((row, i))

        # 2. masks for all rows at once
        results = self.segmenter.resolve_masks(items)

        # 3. per row: every concept resolved, or the first error in concept order
        from stages.inputs import mask_digest

        for (row, i), result in zip(owners, results, strict=True):
            if out["error_reason"][row]:
                continue
            if isinstance(result, RowError):
                set_error(out, row, result, STAGE)
                out["resolved"][row] = []
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
            out["resolved"][row].append(encode_resolved(concept))
        return {name: to_column(values) for name, values in out.items()}

    def _load_row(self, batch, row: int, loaded: dict) -> list[MaskItem]:
        from stages.inputs import load_image, load_mask

        base_dir = batch["base_dir"][row] if "base_dir" in batch else None
        base_dir = str(base_dir) if base_dir else None
        concepts = list(batch["concepts"][row])
        if not concepts:
            raise RowError("concepts", "no concepts")
        items = []
        for i, raw in enumerate(concepts):
            spec = concept_spec_from_dict(raw)
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
