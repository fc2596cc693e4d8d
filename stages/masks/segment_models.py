"""The segmentation models: SAM and a zero-shot detector, built, loaded safely and run on batches.

Weights load only from safetensors or ``torch.load(weights_only=True)``: a pickled payload that
is not plain tensors is refused. ``sam_logits`` and ``detect_best`` run one batch of images
through SAM and the detector; ``run_batched`` cuts a list into such batches and, when one
fails, splits it in halves so that the error lands on the single input that causes it.
torch, segment_anything and transformers are imported where they are used, so that importing
this module (and the CLI) stays fast.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DETECTOR_TYPES",
    "SAM_ARCHS",
    "SamArch",
    "build_sam",
    "detect_best",
    "load_detector",
    "load_sam",
    "load_state_dict_safely",
    "run_batched",
    "sam_logits",
]

DETECTOR_TYPES = ("owlv2", "owlvit")
URL_SCHEMES = ("http://", "https://", "file://")


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


# --------------------------------------------------------------------------- loading


def load_state_dict_safely(source: str, *, cache_dir: str | None = None) -> dict:
    """A plain ``{name: tensor}`` state dict from a path or URL, never unpickling objects.

    ``.safetensors`` through ``safetensors.torch.load_file``; anything else through
    ``torch.load(weights_only=True)``, which refuses pickled classes and code. URLs
    (``http(s)://``, ``file://``) are downloaded once into ``cache_dir``. Raises ValueError
    naming the file and the reason when the payload is not plain tensors.
    """
    import pickle

    import torch

    if source.startswith(URL_SCHEMES):
        path = _fetch(source, cache_dir)
    elif "://" in source:  # object storage (s3://, gs://, ...): through pyarrow.fs, cached the same way
        path = _fetch_object(source, cache_dir)
    else:
        path = source
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


# Seconds a checkpoint download may wait for the server (to connect, then for each read): a server that
# accepts and never answers fails the load instead of holding its actor for ever
DOWNLOAD_TIMEOUT_S = 60.0


def _fetch(url: str, cache_dir: str | None) -> str:
    """Download ``url`` once (a temporary file, renamed when whole) and return the local path."""
    import urllib.request

    import torch

    folder = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(url.split("?", 1)[0].rstrip("/")) or "checkpoint"
    local = os.path.join(folder, f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}")
    if not os.path.isfile(local):
        partial = f"{local}.{os.getpid()}.tmp"
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
            os.replace(partial, local)
        except OSError as exc:  # URLError, a timeout, a full disk
            raise ValueError(f"checkpoint {url!r}: download failed: {exc}") from exc
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return local


def _fetch_object(uri: str, cache_dir: str | None) -> str:
    """Copy an object-store checkpoint once into the local cache (temp file, then rename)."""
    import pyarrow.fs as pafs
    import torch

    folder = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(uri.rstrip("/")) or "checkpoint"
    local = os.path.join(folder, f"{hashlib.sha256(uri.encode()).hexdigest()[:12]}-{name}")
    if not os.path.isfile(local):
        try:
            filesystem, path = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as exc:
            raise ValueError(f"checkpoint {uri!r}: cannot open: {exc}") from exc
        tmp = f"{local}.tmp-{os.getpid()}"
        try:
            with filesystem.open_input_stream(path) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, local)
        except FileNotFoundError:
            raise ValueError(f"checkpoint {uri!r}: no such object") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
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


def load_sam(checkpoint: str, model_type: str, *, arch: SamArch, device, cache_dir: str | None = None):
    """SAM with weights from ``checkpoint``, on ``device``, in eval mode.

    vit_b/l/h are built by upstream ``sam_model_registry`` (with ``checkpoint=None``: its own
    loader uses an unrestricted ``torch.load``), ``custom`` by ``build_sam(arch)``; the weights
    come from ``load_state_dict_safely`` and must match the architecture exactly. Errors name
    the ``SegmentConfig`` fields these values come from.
    """
    from segment_anything import sam_model_registry

    state = load_state_dict_safely(checkpoint, cache_dir=cache_dir)
    sam = build_sam(arch) if model_type == "custom" else sam_model_registry[model_type](checkpoint=None)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"SegmentConfig.sam_checkpoint={checkpoint!r} does not fit sam_model_type="
            f"{model_type!r}: {str(exc).splitlines()[0]}"
        ) from exc
    return sam.to(device).eval()


def load_detector(source: str, *, device):
    """An OWLv2 / OWL-ViT detector and its processor from a hub id or folder (safetensors only)."""
    from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

    model_type = AutoConfig.from_pretrained(source).model_type
    if model_type not in DETECTOR_TYPES:
        raise ValueError(
            f"SegmentConfig.detector={source!r} is a {model_type!r} model; supported: {DETECTOR_TYPES}"
        )
    processor = AutoProcessor.from_pretrained(source)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(source, use_safetensors=True)
    return model.to(device).eval(), processor


# --------------------------------------------------------------------------- running


def sam_logits(
    sam,
    images: Sequence[Image.Image],
    boxes: Sequence[np.ndarray | None],
    points: Sequence[np.ndarray | None],
    *,
    device,
) -> list[tuple[np.ndarray, float]]:
    """SAM mask logits (H, W) float32 and predicted IoU for one prompt per image: a box ((4,)
    pixels), foreground points ((N, 2) pixels), or both.

    The same computation as ``SamPredictor.set_image`` + ``predict`` (tested against it),
    with the image encoder run once on the whole batch. Box prompts and several points
    ask for one mask; a single point asks for three and keeps the best predicted IoU.
    """
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide

    transform = ResizeLongestSide(sam.image_encoder.img_size)
    inputs, input_sizes = [], []
    for image in images:
        resized = transform.apply_image(np.asarray(image.convert("RGB")))  # (h, w, 3) uint8, long side = S
        tensor = torch.as_tensor(resized, device=device).permute(2, 0, 1).contiguous()  # (3, h, w)
        input_sizes.append(tuple(tensor.shape[-2:]))
        inputs.append(sam.preprocess(tensor[None])[0])  # (3, S, S) normalised, padded
    out = []
    with torch.inference_mode():
        embeddings = sam.image_encoder(torch.stack(inputs))  # (B, C, S/16, S/16)
        for b, (image, box, pts) in enumerate(zip(images, boxes, points, strict=True)):
            original_size = (image.height, image.width)
            point_prompt = box_prompt = None
            multimask = False
            if pts is not None:
                coords = transform.apply_coords(pts, original_size)  # (N, 2)
                coords_t = torch.as_tensor(coords, dtype=torch.float, device=device)[None]  # (1, N, 2)
                labels_t = torch.ones(coords_t.shape[:2], dtype=torch.int, device=device)  # (1, N)
                point_prompt = (coords_t, labels_t)
                multimask = len(pts) == 1
            if box is not None:
                scaled = transform.apply_boxes(box[None], original_size)  # (1, 4)
                box_prompt = torch.as_tensor(scaled, dtype=torch.float, device=device)  # (1, 4)
            sparse, dense = sam.prompt_encoder(points=point_prompt, boxes=box_prompt, masks=None)
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


def detect_best(
    detector,
    processor,
    images: Sequence[Image.Image],
    texts: Sequence[str],
    *,
    score_threshold: float,
    device,
) -> list[tuple[np.ndarray, float] | str]:
    """Per image, the detector's best box for its text, (x0, y0, x1, y1) float64 pixels clipped
    to the image, and its score (sigmoid, in [0, 1]); or, when there is none above
    ``score_threshold`` or it is degenerate, the reason."""
    import torch

    inputs = processor(text=[[t] for t in texts], images=list(images), return_tensors="pt", truncation=True)
    inputs = inputs.to(device)
    with torch.inference_mode():
        outputs = detector(**inputs)  # logits (B, P, 1), pred_boxes (B, P, 4)
    sizes = [(im.height, im.width) for im in images]
    # threshold 0: every box; the best one is compared with score_threshold below
    found = processor.post_process_grounded_object_detection(outputs, threshold=0.0, target_sizes=sizes)
    results: list[tuple[np.ndarray, float] | str] = []
    for image, text, det in zip(images, texts, found, strict=True):
        scores = det["scores"].float().cpu()  # (K,)
        if scores.numel() == 0:
            results.append(f"detector found no {text!r}")
            continue
        best = int(torch.argmax(scores))
        score = float(scores[best])
        if not score > score_threshold:
            results.append(
                f"detector found no {text!r} above score_threshold={score_threshold} (best score {score:.3f})"
            )
            continue
        box = det["boxes"][best].float().cpu().numpy().astype(np.float64)  # (4,) x0 y0 x1 y1
        box = np.clip(box, 0.0, [image.width, image.height, image.width, image.height])
        if box[2] - box[0] < 1.0 or box[3] - box[1] < 1.0:
            results.append(
                f"detector's best box for {text!r} is degenerate after clipping to the "
                f"image: {np.round(box, 1).tolist()}"
            )
            continue
        results.append((box, score))
    return results


def run_batched(
    fn: Callable[[list], list], items: list, batch_size: int, on_error: Callable[[Any, Exception], Any]
) -> list:
    """``fn`` over chunks of ``items``, one output per item; a failing chunk is split in halves
    and retried, so an error (out of memory, one bad input) ends up on the single item that
    causes it, as ``on_error(item, exc)``."""
    out: list = []
    for start in range(0, len(items), batch_size):
        out.extend(_run_chunk(fn, items[start : start + batch_size], on_error))
    return out


def _run_chunk(fn, chunk: list, on_error) -> list:
    try:
        return fn(chunk)
    except Exception as exc:  # noqa: BLE001 - turned into per-item errors below
        if len(chunk) == 1:
            return [on_error(chunk[0], exc)]
        _free_accelerator_memory()
        half = len(chunk) // 2
        return _run_chunk(fn, chunk[:half], on_error) + _run_chunk(fn, chunk[half:], on_error)


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
