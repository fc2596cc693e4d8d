"""The reference half of FreeCustom on FLUX.1 for one concept set: encoded once, re-noised and captured per step.

z'_0 = (E(I_i) - shift) x scaling (posterior mean); each step z'_t = scale_noise(z'_0, t, eps_t), the
flow-matching forward process ``(1 - sigma_t) z'_0 + sigma_t eps_t`` of the loop's own scheduler,
with eps_t one ``(N, C, h, w)`` draw of ``Generator(reference_seed)`` per step (drawn on every step,
active or not). The references run through the transformer with their concept prompts and the
generation's guidance; the image-token keys/values of the selected layers, after RoPE, are captured
and the pass stops after the last of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .attention import LayerKV, StopReferencePass
from .concept import MASK_THRESHOLD, ConceptRef, ConceptTooSmallError
from .config import MRSAConfig
from .flux_attention import FluxMRSAState

if TYPE_CHECKING:
    from .flux import FluxFreeCustomGenerator

# Where the references' image tokens sit in RoPE's grid.
#   "same"    at the positions they have in their own grid, the target's (FreeCus; the default)
#   "shifted" one image width to the right (OminiControl's offset for non-aligned conditions)
REFERENCE_POSITIONS = ("same", "shifted")


def image_ids(grid: tuple[int, int], *, shifted: bool = False, device=None, dtype=None) -> torch.Tensor:
    """FLUX's RoPE ids of an image grid, ``(gh * gw, 3)``: (0, row, column), row-major; shifted: column + gw."""
    gh, gw = grid
    ids = torch.zeros(gh, gw, 3)
    ids[..., 1] = torch.arange(gh)[:, None]
    ids[..., 2] = torch.arange(gw)[None, :] + (gw if shifted else 0)
    return ids.reshape(gh * gw, 3).to(device=device, dtype=dtype)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FLUX's 2x2 patches, row-major (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The inverse of ``pack``: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, c4 = tokens.shape
    h, w = latent_hw
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, c4 // 4, h, w)


class FluxReferencePath:
    """The reference half for one concept set on FLUX: encoded once, re-noised and captured per step."""

    def __init__(
        self,
        gen: FluxFreeCustomGenerator,
        concepts: Sequence[ConceptRef],
        *,
        height: int,
        width: int,
        scheduler,
        reference_seed: int,
        mrsa: MRSAConfig,
        guidance_scale: float,
        max_sequence_length: int,
        reference_positions: str,
        state: FluxMRSAState,
    ):
        self.gen, self.state, self.mrsa = gen, state, mrsa
        self.scheduler = scheduler  # the loop's, live: scale_noise reads its step index
        self.prompts = [c.prompt for c in concepts]
        self.reference_seed = reference_seed
        self.n = len(concepts)
        self.latent_hw = gen.latent_hw(height, width)
        self.grid = (self.latent_hw[0] // 2, self.latent_hw[1] // 2)
        self.z0 = gen.encode_images([c.image for c in concepts], height, width)  # (N, C, h, w)
        masks = torch.cat(
            [
                F.interpolate(
                    torch.from_numpy(c.mask_array())[None, None], size=(height, width), mode="nearest"
                )
                for c in concepts
            ]
        )  # (N, 1, H, W)
        inside = F.interpolate(masks, size=self.grid, mode="nearest") >= MASK_THRESHOLD
        inside = inside.view(self.n, -1)  # (N, L)
        self.counts = inside.sum(dim=1).tolist()
        for i, count in enumerate(self.counts):
            if count == 0:
                raise ConceptTooSmallError(
                    f"concepts[{i}] ({self.prompts[i]!r}): its mask covers no token of the {self.grid[0]}x"
                    f"{self.grid[1]} image-token grid of FLUX at {height}x{width}; it would have no effect. "
                    "Enlarge the mask, generate at a larger size, or leave the concept out",
                    index=i,
                )
        weights = torch.tensor([c.weight for c in concepts], dtype=torch.float32)
        self.index = inside.reshape(-1).nonzero().squeeze(1).to(gen.device)  # (Lr,) into N * L
        self.bias = torch.repeat_interleave(weights, inside.sum(dim=1)).to(gen.device, gen.dtype)  # (Lr,)
        prompts = [""] * self.n if mrsa.null_ref_prompts else self.prompts
        self.embeds, self.pooled, self.text_ids = gen.encode_prompts(prompts, max_sequence_length)
        self.img_ids = image_ids(
            self.grid, shifted=reference_positions == "shifted", device=gen.device, dtype=self.text_ids.dtype
        )
        self.guidance = gen.guidance_tensor(guidance_scale, self.n)
        self.dense_bytes_per_step: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        self.noise_generator = torch.Generator("cpu").manual_seed(self.reference_seed)

    def _gather(self, name: str, k: torch.Tensor, v: torch.Tensor) -> LayerKV:
        # k, v: (N, heads, L, d), the references' image tokens after RoPE -> in-mask tokens (heads, Lr, d)
        n, heads, length, d = k.shape
        self.dense_bytes_per_step[name] = 2 * n * heads * length * d * k.element_size()

        def keep(x):
            return x.transpose(0, 1).reshape(heads, n * length, d).index_select(1, self.index)

        return LayerKV(k=keep(k), v=keep(v), bias=self.bias)

    def step(self, i: int, t: torch.Tensor) -> dict[str, LayerKV] | None:
        """Reference K/V at step i (None when MRSA is inactive). Draws the step's noise either way.

        Called before the loop's transformer call at step i, on the scheduler as the loop has left it
        after step i - 1.
        """
        noise = torch.randn(self.z0.shape, generator=self.noise_generator)  # (N, C, h, w), CPU fp32
        if not self.mrsa.is_active(i):
            return None
        z_t = self.scheduler.scale_noise(self.z0, t.reshape(1), noise.to(self.z0.device, self.z0.dtype))
        captured: dict[str, LayerKV] = {}
        state = self.state
        state.mode, state.sink = (
            "capture",
            lambda name, k, v: captured.__setitem__(name, self._gather(name, k, v)),
        )
        try:
            self.gen.transformer(
                hidden_states=pack(z_t),
                timestep=t.expand(self.n).to(z_t.dtype) / 1000,
                guidance=self.guidance,
                pooled_projections=self.pooled,
                encoder_hidden_states=self.embeds,
                txt_ids=self.text_ids,
                img_ids=self.img_ids,
                return_dict=False,
            )
        except StopReferencePass:
            pass
        finally:
            state.mode, state.sink = "off", None
        return captured
