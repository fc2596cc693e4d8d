"""Multi-reference self-attention as a diffusers attention processor.

``MRSAProcessor`` is ``AttnProcessor2_0`` with one marked change: in its MRSA step the keys and
values of the generated image are concatenated with the references' and a per-key logit bias
goes to ``scaled_dot_product_attention``. The same processor, in ``capture`` mode, runs the
reference path: plain self-attention that hands its keys/values to a sink.

All state (mode, current step's reference K/V, batch layout) lives in one ``MRSAState`` given to
the processors at construction: nothing is counted, nothing travels through
``cross_attention_kwargs``, so a skipped or repeated call cannot shift layers or steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import MRSAConfig


@dataclass
class LayerKV:
    """Reference keys/values of one layer at one step, ready for attention.

    k, v: (heads, Lr, d) reference tokens of all concepts, concatenated (bias mode: only in-mask
        tokens; scale mode: every token, keys pre-multiplied by w_i * M_i).
    bias: (Lr,) additive logit bias (bias mode: w_i on kept tokens), None in scale mode.
    k_uncond, v_uncond: the same for the unconditional branch, only when style_fidelity < 1.
    """

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None = None
    k_uncond: torch.Tensor | None = None
    v_uncond: torch.Tensor | None = None


class StopReferencePass(Exception):
    """Raised after the last selected layer has been captured: the rest of the UNet is not needed."""


class MRSAState:
    """Shared by every MRSA processor of one UNet for one generation call."""

    def __init__(self, mrsa: MRSAConfig, layers: tuple[str, ...]):
        self.mrsa = mrsa
        self.layers = layers
        self.mode = "off"  # "off" | "mrsa" | "capture"
        self.kv: dict[str, LayerKV] = {}
        self.cfg = True  # the batch is [uncond..., cond...]
        self.sink: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None
        self.stop_after: str | None = layers[-1] if layers else None
        # set only when attention maps are asked for: each MRSA call then also adds its conditional
        # branch's attention mass per concept (``attention_maps.AttentionMaps``); None changes nothing
        self.maps = None


OFF = MRSAState(MRSAConfig(), ())  # what persistent processors read between calls: plain attention


class StateSlot:
    """The state persistent MRSA processors read (compiled UNets): each call puts its own in ``current``."""

    def __init__(self):
        self.current: MRSAState = OFF


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # (B, L, C) -> (B, heads, L, C / heads)
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _with_references(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ref: torch.Tensor,
    v_ref: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """softmax(Q [K, K_ref]^T / sqrt(d) + [0, bias]) [V, V_ref] for a batch sharing one reference set."""
    b = q.shape[0]
    k_ref = k_ref.unsqueeze(0).expand(b, -1, -1, -1)  # (heads, Lr, d) -> (B, heads, Lr, d)
    v_ref = v_ref.unsqueeze(0).expand(b, -1, -1, -1)
    keys = torch.cat([k, k_ref], dim=2)  # (B, heads, L + Lr, d)
    values = torch.cat([v, v_ref], dim=2)
    mask = None
    if bias is not None:
        own = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        mask = torch.cat([own, bias.to(q.dtype)]).view(1, 1, 1, -1)  # (1, 1, 1, L + Lr)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class MRSAProcessor:
    """``AttnProcessor2_0`` whose self-attention becomes MRSA while ``state.mode == "mrsa"``."""

    def __init__(self, state: MRSAState | StateSlot, name: str):
        self._state = state
        self.name = name

    @property
    def state(self) -> MRSAState:
        s = self._state
        return s.current if isinstance(s, StateSlot) else s

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key = attn.to_k(context)  # (B, L, C)
        value = attn.to_v(context)
        heads = attn.heads

        q, k, v = _heads(query, heads), _heads(key, heads), _heads(value, heads)  # (B, heads, L, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        state = self.state
        if state.mode == "capture" and state.sink is not None and self.name in state.layers:
            state.sink(self.name, k, v)

        layer_kv = state.kv.get(self.name) if state.mode == "mrsa" else None
        if layer_kv is None or encoder_hidden_states is not None or attention_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        else:
            # ---- the one change against AttnProcessor2_0: multi-reference self-attention ----
            out = self._mrsa(q, k, v, layer_kv)
        out = out.transpose(1, 2).reshape(batch_size, -1, heads * q.shape[-1]).to(q.dtype)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor

        if state.mode == "capture" and self.name == state.stop_after:
            raise StopReferencePass()
        return out

    def _mrsa(self, q, k, v, kv: LayerKV) -> torch.Tensor:
        sf = self.state.mrsa.style_fidelity
        n_u = q.shape[0] // 2 if self.state.cfg else 0  # rows [0, n_u) unconditional, [n_u, B) conditional
        if self.state.maps is not None:
            self.state.maps.add(self.name, q[n_u:], k[n_u:], kv.k, kv.bias)
        if not self.state.cfg:
            return _with_references(q, k, v, kv.k, kv.v, kv.bias)
        out_c = _with_references(q[n_u:], k[n_u:], v[n_u:], kv.k, kv.v, kv.bias)
        qu, ku, vu = q[:n_u], k[:n_u], v[:n_u]
        if sf >= 1.0:
            out_u = F.scaled_dot_product_attention(qu, ku, vu)
        else:
            out_u = _with_references(qu, ku, vu, kv.k_uncond, kv.v_uncond, kv.bias)
            if sf > 0.0:
                out_u = (1.0 - sf) * out_u + sf * F.scaled_dot_product_attention(qu, ku, vu)
        return torch.cat([out_u, out_c], dim=0)


def install_persistent(unet) -> StateSlot:
    """MRSA processors on every ``attn1`` layer for good, reading a shared slot (plain attention while
    it holds ``OFF``): a compiled UNet then sees the same modules on every call and never recompiles
    because processors were swapped. ``mrsa_installed`` uses the slot instead of installing."""
    slot = getattr(unet, "_freecustom_slot", None)
    if slot is not None:
        return slot
    slot = StateSlot()
    processors = dict(unet.attn_processors)
    for key in processors:
        if key.endswith(".attn1.processor"):
            processors[key] = MRSAProcessor(slot, key.removesuffix(".processor"))
    unet.set_attn_processor(processors)
    unet._freecustom_slot = slot
    return slot


@contextlib.contextmanager
def mrsa_installed(unet, state: MRSAState):
    """Install MRSA processors on ``state.layers`` by name; always restore the UNet's own processors.

    On a UNet with persistent processors (``install_persistent``) the call's state goes into their
    slot instead, and the slot is emptied afterwards.
    """
    slot = getattr(unet, "_freecustom_slot", None)
    if slot is not None:
        if slot.current is not OFF:
            raise RuntimeError("this UNet is already in a FreeCustom call (one call at a time per generator)")
        slot.current = state
        try:
            yield state
        finally:
            slot.current = OFF
        return
    saved = unet.attn_processors
    processors = dict(saved)
    for name in state.layers:
        key = f"{name}.processor"
        if key not in processors:
            raise ValueError(f"{name!r} is not an attention layer of this UNet")
        processors[key] = MRSAProcessor(state, name)
    unet.set_attn_processor(processors)
    try:
        yield state
    finally:
        unet.set_attn_processor(saved)
