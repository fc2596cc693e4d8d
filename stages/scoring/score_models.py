"""The quality scorers' models: which ones (``ScoreModels``, the paper's by default), loading them once
(safetensors only, on the GPU when there is one) and their batched features.

    dino        DINOv2 (``AutoModel``): mean of ``last_hidden_state`` over all tokens, CLS included
                (the authors' ``utils/eval``), after the model's own image processor
    clip_image  a ``CLIPModel``: its projected image embeddings (``get_image_features``)
    clip_text   a ``CLIPModel``: image and text embeddings for CLIPScore (one model when both name the same)

Every feature comes back L2-normalised (float32, on the CPU), so a cosine is a dot product.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_DINO_MODEL = "facebook/dinov2-base"
DEFAULT_CLIP_IMAGE_MODEL = "openai/clip-vit-base-patch16"
DEFAULT_CLIP_TEXT_MODEL = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class ScoreModels:
    """The scorers' models (Hub ids or local folders) and the batch size of one model call."""

    dino: str = DEFAULT_DINO_MODEL
    clip_image: str = DEFAULT_CLIP_IMAGE_MODEL
    clip_text: str = DEFAULT_CLIP_TEXT_MODEL
    batch_size: int = 16

    def __post_init__(self):
        for name in ("dino", "clip_image", "clip_text"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"ScoreModels.{name}={value!r}: expected a model id or folder")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"ScoreModels.batch_size={self.batch_size!r}: expected an integer >= 1")

    def identity(self) -> dict[str, str]:
        """What a score depends on (the batch size does not change a score)."""
        return {k: v for k, v in asdict(self).items() if k != "batch_size"}


def pick_device(device: str | None = None) -> str:
    """``device`` as given, else ``cuda`` when there is a GPU, else ``cpu``."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class ScoreModelSet:
    """The three models and their processors, loaded once (per actor) on ``device``."""

    def __init__(self, models: ScoreModels, device: str | None = None):
        from transformers import (
            AutoImageProcessor,
            AutoModel,
            CLIPImageProcessor,
            CLIPModel,
            CLIPProcessor,
        )
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no bar per model in job logs

        self.models = models
        self.device = pick_device(device)
        self.dino = AutoModel.from_pretrained(models.dino, use_safetensors=True).to(self.device).eval()
        self.dino_processor = AutoImageProcessor.from_pretrained(models.dino)
        self.clip_image = (
            CLIPModel.from_pretrained(models.clip_image, use_safetensors=True).to(self.device).eval()
        )
        self.clip_image_processor = CLIPImageProcessor.from_pretrained(models.clip_image)
        self.clip_text = (
            self.clip_image
            if models.clip_text == models.clip_image
            else CLIPModel.from_pretrained(models.clip_text, use_safetensors=True).to(self.device).eval()
        )
        self.clip_text_processor = CLIPProcessor.from_pretrained(models.clip_text)

    def _batched(self, items: list, encode) -> Any:
        import torch

        if not items:
            raise ValueError("no images to encode")
        parts = []
        with torch.inference_mode():
            for start in range(0, len(items), self.models.batch_size):
                feats = encode(items[start : start + self.models.batch_size]).float()  # (b, D)
                parts.append(torch.nn.functional.normalize(feats, dim=-1).cpu())
        return torch.cat(parts)  # (n, D)

    def _image_features(self, processor, forward, images: list) -> Any:
        def encode(chunk):
            pixels = processor(images=chunk, return_tensors="pt")["pixel_values"].to(
                self.device
            )  # (b, 3, H, W)
            return forward(pixels)

        return self._batched(images, encode)

    def dino_features(self, images: list) -> Any:
        """(n, D) normalised mean-pooled DINOv2 features of PIL RGB images."""

        def forward(pixels):
            return self.dino(pixel_values=pixels).last_hidden_state.mean(dim=1)  # (b, T, D) -> (b, D)

        return self._image_features(self.dino_processor, forward, images)

    def clip_image_features(self, images: list) -> Any:
        """(n, E) normalised CLIP image embeddings (the CLIP-I model)."""

        def forward(pixels):
            return self.clip_image.get_image_features(pixel_values=pixels).pooler_output

        return self._image_features(self.clip_image_processor, forward, images)

    def clip_t_image_features(self, images: list) -> Any:
        """(n, E) normalised image embeddings of the CLIP-T model."""

        def forward(pixels):
            return self.clip_text.get_image_features(pixel_values=pixels).pooler_output

        return self._image_features(self.clip_text_processor.image_processor, forward, images)

    def clip_t_text_features(self, texts: list[str]) -> Any:
        """(n, E) normalised text embeddings of the CLIP-T model; prompts longer than the text model's
        positions are truncated by the tokenizer (its end token kept)."""
        max_length = self.clip_text.config.text_config.max_position_embeddings

        def encode(chunk):
            tokens = self.clip_text_processor.tokenizer(
                list(chunk), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(self.device)
            return self.clip_text.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).pooler_output

        return self._batched(texts, encode)
