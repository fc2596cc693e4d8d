"""The reference half of FreeCustom for one concept set: encoded once, re-noised and captured per step.

z'_0 = E(I_i) (posterior mean x scaling); each step z'_t = add_noise(z'_0, eps_t, t) runs through the
UNet with the concept prompts; self-attention K/V are captured at the selected layers (and the pass
stops there). With ``control`` (the release's ControlNet structure, ``control_references=True``) the
references also get the ControlNet residuals of the target's control image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .attention import LayerKV, MRSAState, StopReferencePass
from .concept import MASK_THRESHOLD, ConceptRef, ConceptTooSmallError
from .config import MRSAConfig
from .layers import token_grid

if TYPE_CHECKING:
    from .controlnet import ControlInput
    from .generator import FreeCustomGenerator


class ReferencePath:
    """The reference half for one concept set: encoded once, re-noised and captured per step."""

    def __init__(
        self,
        gen: FreeCustomGenerator,
        concepts: Sequence[ConceptRef],
        *,
        height: int,
        width: int,
        scheduler,
        reference_seed: int,
        mrsa: MRSAConfig,
        negative_prompt: str,
        with_uncond: bool,
        state: MRSAState,
        control: ControlInput | None = None,
    ):
        self.gen, self.state, self.mrsa = gen, state, mrsa
        # the loop's scheduler, live: add_noise and scale_model_input see the state the loop sees at
        # each step (KDPM2's and Heun's input scaling depends on their stepping history)
        self.scheduler = scheduler
        self.prompts = [c.prompt for c in concepts]
        self.reference_seed = reference_seed
        self.with_uncond = with_uncond
        self.n = len(concepts)
        self.latent_hw = (height // gen.vae_scale_factor, width // gen.vae_scale_factor)
        self.z0 = gen.encode_images([c.image for c in concepts], height, width)  # (N, C, h, w)
        masks = [torch.from_numpy(c.mask_array())[None, None] for c in concepts]
        self.masks = torch.cat(
            [F.interpolate(m, size=(height, width), mode="nearest") for m in masks]
        )  # (N, 1, H, W)
        self.weights = torch.tensor([c.weight for c in concepts], dtype=torch.float32)
        prompts = [""] * self.n if mrsa.null_ref_prompts else [c.prompt for c in concepts]
        self.text = gen.encode_text(prompts, negative_prompt, cfg=with_uncond, height=height, width=width)
        self.n_steps = len(scheduler.timesteps)
        self.control = control.repeated(self.n) if control is not None else None
        self._grids: dict[int, tuple] = {}
        self.tokens: dict[str, list[int]] = {}  # layer -> in-mask tokens per concept
        self.grids: dict[str, tuple[int, int]] = {}  # layer -> its token grid (h, w)
        self.dense_bytes_per_step: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        self.noise_generator = torch.Generator("cpu").manual_seed(self.reference_seed)

    def _grid(self, n_tokens: int):
        """Per token count: gather index of in-mask tokens (bias) or key scale (scale), and the bias."""
        if n_tokens not in self._grids:
            gh, gw = token_grid(n_tokens, self.latent_hw)
            inside = F.interpolate(self.masks, size=(gh, gw), mode="nearest") >= MASK_THRESHOLD
            inside = inside.view(self.n, n_tokens)  # (N, L)
            device, dtype = self.gen.device, self.gen.dtype
            counts = inside.sum(dim=1)
            index = inside.reshape(-1).nonzero().squeeze(1).to(device)  # (Lr,) into N * L
            bias = torch.repeat_interleave(self.weights, counts).to(device, dtype)  # (Lr,)
            scale = (inside.float() * self.weights[:, None]).reshape(-1).to(device, dtype)  # (N * L,)
            self._grids[n_tokens] = (index, bias, scale, counts.tolist())
        return self._grids[n_tokens]

    def _gather(self, name: str, k: torch.Tensor, v: torch.Tensor) -> LayerKV:
        # k, v: (Bref, heads, L, d), rows [uncond refs (N)], cond refs (N)
        n, (_, heads, length, d) = self.n, k.shape
        index, bias, scale, counts = self._grid(length)
        self.tokens[name] = counts
        self.grids[name] = token_grid(length, self.latent_hw)
        branches = 2 if self.with_uncond else 1
        self.dense_bytes_per_step[name] = branches * 2 * n * heads * length * d * k.element_size()

        def flat(x):  # (N, heads, L, d) -> (heads, N * L, d)
            return x.transpose(0, 1).reshape(heads, n * length, d)

        def keep(x, is_key: bool):
            if self.mrsa.mask_mode == "bias":
                return flat(x).index_select(1, index)  # (heads, Lr, d)
            return flat(x) * scale.view(1, -1, 1) if is_key else flat(x)

        kv = LayerKV(
            k=keep(k[-n:], True), v=keep(v[-n:], False), bias=bias if self.mrsa.mask_mode == "bias" else None
        )
        if self.with_uncond:
            kv.k_uncond, kv.v_uncond = keep(k[:n], True), keep(v[:n], False)
        return kv

    def step(self, i: int, t: torch.Tensor) -> dict[str, LayerKV] | None:
        """Reference K/V at step i (None when MRSA is inactive). Draws the step's noise either way.

        Called before the loop's own ``scale_model_input`` at step i, on the scheduler as the loop has
        left it after step i - 1.
        """
        noise = torch.randn(self.z0.shape, generator=self.noise_generator)  # (N, C, h, w), CPU fp32
        if not self.mrsa.is_active(i):
            return None
        z_t = self.scheduler.add_noise(self.z0, noise.to(self.z0.device, self.z0.dtype), t.reshape(1))
        x = self.scheduler.scale_model_input(z_t, t)
        if self.with_uncond:
            x = torch.cat([x, x])
        captured: dict[str, LayerKV] = {}
        state = self.state
        state.mode, state.sink = (
            "capture",
            lambda name, k, v: captured.__setitem__(name, self._gather(name, k, v)),
        )
        # eager even when the UNet is compiled: the capture pass stops half-way (an exception) and
        # writes into Python containers; it runs once per concept set, not per image
        eager = torch.compiler.set_stance("force_eager") if self.gen.compiled else contextlib.nullcontext()
        branches = 2 if self.with_uncond else 1
        try:
            with eager:
                residuals = {}
                if self.control is not None:
                    residuals = self.control.residuals(i, self.n_steps, x, t, self.text, branches=branches)
                self.gen.unet(x, t, **self.text.unet_kwargs(), **residuals, return_dict=False)
        except StopReferencePass:
            pass
        finally:
            state.mode, state.sink = "off", None
        self._check_every_concept_seen()
        return captured

    def _check_every_concept_seen(self) -> None:
        """Refuse a concept with no token in any MRSA layer: it would silently do nothing.

        A concept missing from some layers only (a small mask vanishes first from the coarsest grid)
        still acts through the others, as in the release; ``ReferenceKV.meta["tokens"]`` has the counts.
        """
        finest = max(self.grids, key=lambda name: self.grids[name][0] * self.grids[name][1])
        gh, gw = self.grids[finest]
        for i in range(self.n):
            if all(counts[i] == 0 for counts in self.tokens.values()):
                raise ConceptTooSmallError(
                    f"concepts[{i}] ({self.prompts[i]!r}): its mask covers no token of any MRSA layer, "
                    f"not even the {gh}x{gw} grid of {finest} (the finest); it would have no effect. "
                    "Enlarge the mask, generate at a larger size, or leave the concept out",
                    index=i,
                )
