"""The model side of ``FluxFreeCustomGenerator``: a loaded diffusers ``FluxPipeline`` and what FreeCustom reads
from it (device, dtype, the fingerprints that identify cached K/V, default MRSA layers), the building blocks
both paths use (prompt and image encoding, guidance, the schedule) and the checks of a call."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .concept import ConceptRef, check_concepts
from .config import MRSAConfig
from .controlnet import ControlNetCalls, controlnet_names
from .flux_attention import default_mrsa, select_layers
from .flux_controlnet import check_flux_controlnet
from .flux_loading import check_flux_scheduler, flux_fingerprint, flux_timesteps
from .flux_reference import REFERENCE_POSITIONS
from .schedulers import scheduler_identity
from .topology import FLUX_GUIDANCE, FLUX_MAX_SEQUENCE_LENGTH, FLUX_SIZE, FLUX_STEPS

# FluxPipeline's defaults (FLUX.1 [dev]): 1024x1024, 28 steps, embedded guidance 3.5, T5 length 512
DEFAULT_STEPS, DEFAULT_SIZE, DEFAULT_GUIDANCE, DEFAULT_MAX_SEQUENCE_LENGTH = (
    FLUX_STEPS,
    FLUX_SIZE,
    FLUX_GUIDANCE,
    FLUX_MAX_SEQUENCE_LENGTH,
)


class FluxModel(ControlNetCalls):
    """A diffusers ``FluxPipeline`` (optionally with a FLUX ControlNet) as FreeCustom uses it."""

    family = "flux"

    def __init__(self, pipe, *, model_id: str | None = None, controlnet_id: str | list[str] | None = None):
        check_flux_scheduler(pipe.scheduler)
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        self.model_id = model_id or str(
            getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "")
        )
        if getattr(pipe, "controlnet", None) is not None:
            check_flux_controlnet(pipe.controlnet)
        self.controlnet_ids = controlnet_names(pipe, controlnet_id)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    @property
    def memory_format(self) -> str:
        """Always "contiguous" (no channels-last option on FLUX); for sample metadata, as on SD."""
        return "contiguous"

    @property
    def compiled(self) -> bool:
        return False

    @property
    def model_fingerprint(self) -> str:
        return flux_fingerprint(self.pipe)

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def scheduler_identity(self) -> dict:
        """See ``schedulers.scheduler_identity``."""
        return scheduler_identity(self.pipe.scheduler)

    def kv_identity(
        self,
        *,
        num_inference_steps: int,
        height: int,
        width: int,
        guidance_scale: float,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        reference_positions: str = "same",
    ) -> dict:
        """What reference K/V depend on besides the concepts: checked on every cached use.

        The references run with the generation's embedded guidance, so on FLUX.1 [dev] it is part of
        the identity; [schnell] has no guidance input (recorded as None).
        """
        return {
            "model": self.model_fingerprint,
            "family": "flux",
            "dtype": str(self.dtype).removeprefix("torch."),
            "scheduler": self.scheduler_identity(),
            "num_inference_steps": int(num_inference_steps),
            "height": int(height),
            "width": int(width),
            "guidance_scale": float(guidance_scale) if self.guidance_embeds else None,
            "max_sequence_length": int(max_sequence_length),
            "reference_positions": reference_positions,
        }

    def layer_names(self, mrsa: MRSAConfig | None = None) -> tuple[str, ...]:
        return select_layers(self.transformer, mrsa or self.default_mrsa())

    def default_mrsa(self, **overrides) -> MRSAConfig:
        """FreeCus's vital layers (``flux_attention.default_blocks``) with the paper's other defaults."""
        return default_mrsa(self.transformer, **overrides)

    # ---- building blocks ----------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], max_sequence_length: int):
        """(T5 embeddings (B, T, D), pooled CLIP (B, P), text ids (T, 3)): FluxPipeline's own encode_prompt."""
        return self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=max_sequence_length
        )

    def encode_images(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
        """(VAE posterior mean - shift_factor) x scaling_factor of images resized (Lanczos): (N, C, h, w)."""
        vae = self.pipe.vae
        latents = []
        for image in images:  # one at a time: a peak of one image's activations
            image = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
            latents.append(vae.encode(x.to(self.device, vae.dtype)).latent_dist.mean)
        z = torch.cat(latents)
        return ((z - vae.config.shift_factor) * vae.config.scaling_factor).to(self.dtype)

    def guidance_tensor(self, guidance_scale: float, batch: int) -> torch.Tensor | None:
        if not self.guidance_embeds:
            return None
        return torch.full([1], guidance_scale, device=self.device, dtype=torch.float32).expand(batch)

    def _timesteps(self, num_inference_steps: int, height: int, width: int):
        h, w = self.latent_hw(height, width)
        return flux_timesteps(self.pipe.scheduler, num_inference_steps, (h // 2) * (w // 2), self.device)

    # ---- checks -----------------------------------------------------------------------------
    def _check_call(self, *, height, width, num_inference_steps, reference_positions=None, mrsa=None) -> None:
        f = self.vae_scale_factor * 2  # 8x VAE, then 2x2 patches
        if not (isinstance(height, int) and isinstance(width, int)) or height <= 0 or width <= 0:
            raise ValueError(f"height={height!r}, width={width!r}: must be positive integers")
        if height % f or width % f:
            raise ValueError(f"height={height}, width={width}: both must be multiples of {f} on FLUX")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: must be an integer >= 1")
        if reference_positions is not None and reference_positions not in REFERENCE_POSITIONS:
            raise ValueError(
                f"reference_positions={reference_positions!r}: expected one of {REFERENCE_POSITIONS}"
            )
        if mrsa is not None:
            if mrsa.style_fidelity < 1.0:
                raise ValueError(
                    f"MRSAConfig.style_fidelity={mrsa.style_fidelity}: FLUX.1 is guidance-distilled and has no "
                    "unconditional branch for style_fidelity to blend on; leave it at 1"
                )
            if mrsa.mask_mode != "bias":
                raise ValueError(f"MRSAConfig.mask_mode={mrsa.mask_mode!r}: FLUX supports 'bias' only")
            if mrsa.start_step >= num_inference_steps:
                raise ValueError(
                    f"MRSAConfig.start_step={mrsa.start_step}: the schedule has only {num_inference_steps} steps"
                )

    @staticmethod
    def _check_concepts(concepts) -> list[ConceptRef]:
        return check_concepts(concepts, plain="FLUX")
