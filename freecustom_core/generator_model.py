"""The model side of ``FreeCustomGenerator``: a loaded diffusers pipeline and what FreeCustom reads
from it (device, dtype, family, default size and MRSA layers, the fingerprints that identify cached K/V),
the building blocks both paths use (text and image encoding, the schedule) and the checks of a call."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .attention import install_persistent
from .concept import ConceptRef, check_concepts
from .conditioning import TextCond, encode_text, is_sdxl
from .config import MRSAConfig
from .controlnet import ControlNetCalls, controlnet_names
from .layers import default_blocks, select_layers
from .schedulers import scheduler_identity
from .weights import weights_fingerprint


class GeneratorModel(ControlNetCalls):
    """A diffusers Stable Diffusion 1.5 or SDXL pipeline (optionally with ControlNets) as FreeCustom uses it."""

    def __init__(self, pipe, *, model_id: str | None = None, controlnet_id: str | list[str] | None = None):
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        self.model_id = model_id or str(
            getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "")
        )
        self.controlnet_ids = controlnet_names(pipe, controlnet_id)


    def enable_compile(self, **compile_kwargs) -> None:
        """``torch.compile`` the UNet (``compile_kwargs`` go to ``nn.Module.compile``, e.g. ``mode="max-autotune"``).

        MRSA processors are installed once on every self-attention layer (plain attention outside a
        FreeCustom call) so that calls never swap modules under the compiled graph. The reference
        pass stays eager, so cached K/V are the same as without compiling; the denoising loop runs
        compiled kernels, whose fusions round differently: images equal the eager ones within
        float rounding, not bit for bit (recorded in sample metadata as ``compiled``). The first
        calls compile (minutes for SD1.5 on a GPU); a new reference-token count recompiles once and
        then stays dynamic.
        """
        if self.compiled:
            return
        install_persistent(self.pipe.unet)
        self.pipe.unet.compile(**compile_kwargs)
        self._compiled = True

    @property
    def compiled(self) -> bool:
        return getattr(self, "_compiled", False)

    def enable_channels_last(self) -> None:
        """UNet and VAE weights in channels-last memory format (faster convolutions on recent GPUs).

        The same arithmetic through other convolution kernels: images equal the default layout's to
        within floating-point rounding, not bit for bit. Recorded in ``kv_identity`` (cached K/V
        are reused only under the same layout) and so in every sample's metadata.
        """
        self.pipe.unet.to(memory_format=torch.channels_last)
        self.pipe.vae.to(memory_format=torch.channels_last)


    # ---- properties ---------------------------------------------------------------------------
    @property
    def unet(self):
        return self.pipe.unet

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def memory_format(self) -> str:
        """ "channels_last" or "contiguous": the UNet's convolution weight layout."""
        w = self.pipe.unet.conv_in.weight
        return (
            "channels_last"
            if not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
            else "contiguous"
        )

    @property
    def is_sdxl(self) -> bool:
        return is_sdxl(self.pipe)

    @property
    def family(self) -> str:
        """The model family: ``"sdxl"`` or ``"sd"`` (SD1.x/2.x); subclasses name theirs (``"blip"``)."""
        return "sdxl" if self.is_sdxl else "sd"

    @property
    def default_size(self) -> int:
        """The UNet's trained size: 512 for SD1.5, 1024 for SDXL (``sample_size`` x the VAE factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def default_mrsa(self) -> MRSAConfig:
        """The paper's defaults, with this topology's default blocks (SD1.5: (5, 6); SDXL: (3, 4))."""
        return MRSAConfig(blocks=default_blocks(self.unet))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def model_fingerprint(self) -> str:
        """Identity of the weights as they are now (LoRA adapters and their scales included), see ``weights``."""
        return weights_fingerprint(self.pipe)

    def scheduler_identity(self) -> dict:
        """See ``schedulers.scheduler_identity``."""
        return scheduler_identity(self.pipe.scheduler)

    def kv_identity(
        self, *, num_inference_steps: int, height: int, width: int, control: dict | None = None
    ) -> dict:
        """What reference K/V depend on besides the concepts: checked on every cached use.

        control: ``ControlInput.identity()`` when the references go through ControlNet
        (``control_references``): ControlNet, control image, scale and steps; absent otherwise.
        """
        identity = {
            "model": self.model_fingerprint,
            "dtype": str(self.dtype).removeprefix("torch."),
            "memory_format": self.memory_format,
            "scheduler": self.scheduler_identity(),
            "num_inference_steps": int(num_inference_steps),
            "height": int(height),
            "width": int(width),
        }
        if control is not None:
            identity["control"] = control
        return identity

    def layer_names(self, mrsa: MRSAConfig | None = None) -> tuple[str, ...]:
        return select_layers(self.unet, mrsa or self.default_mrsa())

    # ---- building blocks ----------------------------------------------------------------------
    def encode_prompts(
        self, prompts: list[str], negative_prompt: str | list[str], *, cfg: bool
    ) -> torch.Tensor:
        """Text embeddings, ``[negative..., prompts...]`` when ``cfg`` (diffusers' own encode_prompt)."""
        negatives = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        cond, uncond = self.pipe.encode_prompt(list(prompts), self.device, 1, cfg, negative_prompt=negatives)
        return torch.cat([uncond, cond]) if cfg else cond

    def encode_text(
        self, prompts: list[str], negative_prompt: str | list[str], *, cfg: bool, height: int, width: int
    ) -> TextCond:
        """The UNet's text conditioning, ``[negative..., prompts...]`` when ``cfg`` (SDXL: with pooled
        embeddings and ``add_time_ids``)."""
        negatives = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        return encode_text(
            self.pipe, list(prompts), negatives, cfg=cfg, height=height, width=width, device=self.device
        )

    def encode_targets(
        self, prompts: list[str], negative_prompt: str | list[str], *, cfg: bool, height: int, width: int
    ) -> TextCond:
        """The targets' conditioning in the denoising loop: ``encode_text``, unless a subclass conditions
        its targets differently from its references (BLIP-Diffusion's subject embedding)."""
        return self.encode_text(prompts, negative_prompt, cfg=cfg, height=height, width=width)

    def encode_images(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
        """VAE posterior mean x scaling factor of images resized (Lanczos) to ``height x width``: (N, C, h, w)."""
        arrays = []
        for image in images:
            image = image.convert("RGB") if image.mode != "RGB" else image
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.LANCZOS)
            arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, H, W)
        vae = self.pipe.vae
        # one image at a time: the same latents as one batch, a peak of one image's activations (not N)
        latents = torch.cat(
            [vae.encode(x[i : i + 1].to(self.device, vae.dtype)).latent_dist.mean for i in range(len(x))]
        )
        return (latents * vae.config.scaling_factor).to(self.dtype)

    def _timesteps(self, num_inference_steps: int):
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        scheduler = copy.deepcopy(self.pipe.scheduler)
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, self.device)
        return scheduler, timesteps

    # ---- checks -----------------------------------------------------------------------------
    def _check_call(self, *, height: int, width: int, num_inference_steps: int) -> None:
        f = self.vae_scale_factor
        if not (isinstance(height, int) and isinstance(width, int)) or height <= 0 or width <= 0:
            raise ValueError(f"height={height!r}, width={width!r}: must be positive integers")
        if height % f or width % f:
            raise ValueError(f"height={height}, width={width}: both must be multiples of {f}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: must be an integer >= 1")

    @staticmethod
    def _check_concepts(concepts) -> list[ConceptRef]:
        return check_concepts(concepts, plain="Stable Diffusion")

    def _check_mrsa_steps(self, mrsa: MRSAConfig, n_steps: int) -> None:
        if mrsa.start_step >= n_steps:
            raise ValueError(
                f"MRSAConfig.start_step={mrsa.start_step}: the schedule has only {n_steps} steps, MRSA would never run"
            )
