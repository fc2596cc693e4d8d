"""Text conditioning of one UNet batch, the same shape for SD1.5 and SDXL.

SD1.5: the CLIP text encoder's last hidden states. SDXL: both encoders' penultimate hidden states
concatenated, plus ``added_cond_kwargs`` (the second encoder's pooled embedding and the
``add_time_ids`` ``(height, width, 0, 0, height, width)``), exactly as diffusers'
``StableDiffusionXLPipeline.__call__`` builds them (no crop, original size = target size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextCond:
    """embeds: (B, T, D); added: SDXL's ``{"text_embeds": (B, P), "time_ids": (B, 6)}``, None for SD1.5."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.embeds}
        if self.added is not None:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs


def is_sdxl(pipe) -> bool:
    """An SDXL-family pipeline: a second text encoder and the ``text_time`` added embedding."""
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def encode_text(
    pipe, prompts: list[str], negatives: list[str], *, cfg: bool, height: int, width: int, device
) -> TextCond:
    """``[negative..., prompts...]`` when ``cfg``, else ``prompts``: the pipeline's own ``encode_prompt``."""
    if not is_sdxl(pipe):
        cond, uncond = pipe.encode_prompt(list(prompts), device, 1, cfg, negative_prompt=negatives)
        return TextCond(torch.cat([uncond, cond]) if cfg else cond)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        list(prompts),
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=cfg,
        negative_prompt=negatives,
    )
    if pipe.text_encoder_2 is None:
        projection_dim = int(pooled.shape[-1])
    else:
        projection_dim = pipe.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=cond.dtype, text_encoder_projection_dim=projection_dim
    )  # (1, 6)
    if cfg:
        cond, pooled = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])
    time_ids = time_ids.to(device).repeat(cond.shape[0], 1)  # (B, 6)
    return TextCond(cond.to(device), {"text_embeds": pooled.to(device), "time_ids": time_ids})
