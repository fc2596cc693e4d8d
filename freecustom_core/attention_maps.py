"""Attention maps: how much of the generated image's attention goes to each concept's reference tokens.

MRSA runs through ``scaled_dot_product_attention``, which returns no weights. When maps are asked
for (``generate(..., attention_maps=True)``), every MRSA layer call on the conditional branch also
computes, per target and query token,

    mass_i = sum over the kept reference tokens j of concept i of softmax(Q [K, K_ref]^T / sqrt(d) + [0, bias])_j

with the same keys, bias and 1/sqrt(d) normaliser as MRSA; the softmax denominator includes the
image's own keys, so the masses of all concepts plus the image's own share sum to 1. "Kept" tokens:
in ``mask_mode="bias"`` the concept's in-mask tokens (the only ones MRSA sees); in ``"scale"`` all
of the concept's tokens (out-of-mask ones take part with logit 0). The mass is averaged over the
heads, each layer's (h_l, w_l) map is resized (bilinear) to the latent grid (H/8, W/8), and the maps
are averaged with equal weight over every MRSA layer and every active step. Values are in [0, 1].
Only one layer's attention matrix exists at a time (queries in chunks), and nothing of this runs
when maps are not asked for: the default path is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .heatmap import maps_image  # noqa: F401 - the maps' drawing, importable from here too
from .layers import token_grid

_CHUNK_ELEMENTS = 2**26  # attention weights computed at once (256 MiB in float32)


def concept_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    k_ref: torch.Tensor,
    bias: torch.Tensor | None,
    segments: list[int],
) -> torch.Tensor:
    """Attention mass per concept and query token, averaged over heads: (B, N, L).

    q, k: (B, heads, L, d) the image's queries and keys; k_ref: (heads, Lr, d) the references' kept
    keys, concept after concept with ``segments[i]`` tokens each; bias: (Lr,) or None.
    """
    b, heads, length, d = q.shape
    if sum(segments) != k_ref.shape[1]:
        raise ValueError(f"segments {segments} do not add up to the {k_ref.shape[1]} reference tokens")
    edges = np.cumsum([0, *segments]).tolist()
    scale = d**-0.5
    out = torch.empty(b, len(segments), length, dtype=torch.float32, device=q.device)
    k_ref = k_ref.float()
    keys_len = length + k_ref.shape[1]
    step = max(1, _CHUNK_ELEMENTS // (heads * keys_len))
    for row in range(b):
        keys = torch.cat([k[row].float(), k_ref], dim=1)  # (heads, L + Lr, d)
        for start in range(0, length, step):
            qc = q[row, :, start : start + step].float()  # (heads, l, d)
            logits = qc @ keys.transpose(1, 2) * scale  # (heads, l, L + Lr)
            if bias is not None:
                logits[..., length:] += bias.float()
            weights = logits.softmax(dim=-1)[..., length:]  # (heads, l, Lr): the references' share
            for i in range(len(segments)):
                mass = weights[..., edges[i] : edges[i + 1]].sum(dim=-1)  # (heads, l)
                out[row, i, start : start + step] = mass.mean(dim=0)
    return out


class AttentionMaps:
    """Accumulates per-target, per-concept attention mass over MRSA layer calls (conditional branch).

    ``tokens`` (layer -> in-mask token count per concept) and ``mask_mode`` are set by the
    generator before the loop; ``add`` is called by ``MRSAProcessor``; ``result`` averages.
    """

    def __init__(self, n_targets: int, latent_hw: tuple[int, int]):
        self.n_targets = n_targets
        self.latent_hw = latent_hw
        self.tokens: dict[str, list[int]] = {}
        self.mask_mode = "bias"
        self._sum: torch.Tensor | None = None  # (B, N, h, w)
        self.calls = 0

    def segments(self, layer: str, n_ref_tokens: int) -> list[int]:
        counts = list(self.tokens[layer])
        if self.mask_mode == "bias":
            return counts
        return [n_ref_tokens // len(counts)] * len(counts)  # scale mode: every token of every concept

    def add(self, layer: str, q: torch.Tensor, k: torch.Tensor, k_ref: torch.Tensor, bias) -> None:
        """One MRSA layer call: q, k (B, heads, L, d) of the conditional rows; k_ref, bias as MRSA uses them."""
        mass = concept_mass(q, k, k_ref, bias, self.segments(layer, k_ref.shape[1]))  # (B, N, L)
        gh, gw = token_grid(q.shape[2], self.latent_hw)
        grid = mass.view(mass.shape[0], mass.shape[1], gh, gw)
        if (gh, gw) != tuple(self.latent_hw):
            grid = F.interpolate(grid, size=self.latent_hw, mode="bilinear", align_corners=False)
        grid = grid.cpu()
        self._sum = grid if self._sum is None else self._sum + grid
        self.calls += 1

    def result(self) -> torch.Tensor:
        """(B, N, h, w) float32 on the CPU: the mean over every layer call so far."""
        if self._sum is None:
            raise RuntimeError("no MRSA layer ran: no attention map to return")
        return (self._sum / self.calls).clamp_(0.0, 1.0)
