"""MRSA configuration: the paper's defaults, validated on construction, JSON round-trippable."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# The release's negative prompt (configs/config_stable_diffusion.yaml of the authors' code).
DEFAULT_NEGATIVE_PROMPT = (
    "lowres, bad anatomy, text, error, cropped, worst quality, low quality, normal quality, "
    "jpeg artifacts, blurry"
)

MASK_MODES = ("bias", "scale")


@dataclass(frozen=True)
class MRSAConfig:
    """Where and how multi-reference self-attention (MRSA) replaces self-attention.

    blocks: the paper's block indices Psi, counting attention-bearing down blocks, then the
        mid block, then attention-bearing up blocks (SD1.5: 0-2 down, 3 mid, 4-6 up; the
        default (5, 6) is ``up_blocks.2`` and ``up_blocks.3``, the last six ``attn1``).
    layers: explicit self-attention layer names (``up_blocks.3.attentions.2.transformer_blocks.0.attn1``);
        when given, ``blocks`` is ignored.
    start_step, end_step: MRSA is active for denoising steps in ``[start_step, end_step)``;
        ``end_step=None`` means through the last step.
    mask_mode: ``"bias"`` (default, the release): logits get ``+w_i`` on reference-i tokens inside
        M_i and minus infinity outside. ``"scale"``: the paper's formula
        ``softmax((M_w * Q K'^T) / sqrt(d))`` with ``M_w = [1, w_1 M_1, ...]`` (tokens outside the
        mask get logit 0, so they still take part).
    style_fidelity: on the unconditional branch the output is
        ``(1 - style_fidelity) * MRSA + style_fidelity * self_attention``; 1 (default) means the
        unconditional branch never sees the references.
    null_ref_prompts: run the reference path with empty prompts instead of the concept prompts.
    """

    blocks: tuple[int, ...] = (5, 6)
    layers: tuple[str, ...] | None = None
    start_step: int = 0
    end_step: int | None = None
    mask_mode: str = "bias"
    style_fidelity: float = 1.0
    null_ref_prompts: bool = False

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if self.layers is not None:
            layers = tuple(str(name).removesuffix(".processor") for name in self.layers)
            object.__setattr__(self, "layers", layers)
            if not layers:
                raise ValueError("MRSAConfig.layers: an empty list selects no layer; pass None to use blocks")
        elif not self.blocks:
            raise ValueError("MRSAConfig.blocks: empty; give at least one block index or explicit layers")
        if any(b < 0 for b in self.blocks):
            raise ValueError(f"MRSAConfig.blocks={self.blocks}: block indices must be >= 0")
        if self.start_step < 0:
            raise ValueError(f"MRSAConfig.start_step={self.start_step}: must be >= 0")
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(
                f"MRSAConfig.end_step={self.end_step} must be greater than start_step={self.start_step}"
            )
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"MRSAConfig.mask_mode={self.mask_mode!r}: expected one of {MASK_MODES}")
        sf = float(self.style_fidelity)
        if not (math.isfinite(sf) and 0.0 <= sf <= 1.0):
            raise ValueError(f"MRSAConfig.style_fidelity={self.style_fidelity!r}: must be in [0, 1]")
        object.__setattr__(self, "style_fidelity", sf)
        object.__setattr__(self, "null_ref_prompts", bool(self.null_ref_prompts))

    def is_active(self, step: int) -> bool:
        return step >= self.start_step and (self.end_step is None or step < self.end_step)

    @property
    def needs_uncond_references(self) -> bool:
        """Unconditional reference K/V are used only when style_fidelity < 1."""
        return self.style_fidelity < 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MRSAConfig:
        d = dict(d)
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        d["blocks"] = tuple(d.get("blocks", (5, 6)))
        return cls(**d)
