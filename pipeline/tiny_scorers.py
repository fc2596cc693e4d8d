"""Tiny random-weight scorer models (DINOv2, two CLIPs) built on disk, for the tests and the demo:
real transformers classes and processors, saved as safetensors and loaded back by ``from_pretrained``
like the paper's models (no weights can be downloaded here)."""

from __future__ import annotations

from pathlib import Path

from pipeline.tiny_model import write_tiny_tokenizer
from stages.scoring.score_models import ScoreModels

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_tiny_dino(folder: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8
    )
    Dinov2Model(config).save_pretrained(folder)
    # facebook/dinov2-base's processor: shortest edge, centre crop, ImageNet normalisation (here at 32 px)
    BitImageProcessor(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    ).save_pretrained(folder)
    return folder


def build_tiny_clip(folder: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_tiny_scorers(folder: str | Path, *, seed: int = 0) -> ScoreModels:
    """Three tiny models in ``folder`` (``dino``, ``clip-i``, ``clip-t``) and the ``ScoreModels`` naming them."""
    folder = Path(folder)
    return ScoreModels(
        dino=str(build_tiny_dino(folder / "dino", seed=seed)),
        clip_image=str(build_tiny_clip(folder / "clip-i", seed=seed + 1)),
        clip_text=str(build_tiny_clip(folder / "clip-t", seed=seed + 2)),
    )
