"""Multi-reference self-attention in FLUX.1's joint attention, and which attention layers get it.

``FluxMRSAProcessor`` is diffusers' ``FluxAttnProcessor`` with one marked change. FLUX joins the
text and image streams into one sequence ``[text (T), image (L)]`` before attention: a
double-stream block (``transformer_blocks.i.attn``) projects each stream with its own weights and
concatenates them, a single-stream block (``single_transformer_blocks.j.attn``) receives them
already joined. Either way, after RoPE, the layer's keys/values are ``(B, T + L, heads, d)`` with
the image tokens last. In MRSA mode the generated image's queries, text and image alike, attend to
``[K, K_1..K_N]`` with the logit bias of the SD engine (0 on its own tokens, ``+w_i`` on concept
i's in-mask image tokens, nothing else of the references: their text tokens and out-of-mask tokens
are pruned). In capture mode the layer runs as usual and hands its image-token keys/values, after
RoPE, to the state's sink; the pass stops after the last selected layer.

State is ``attention.MRSAState`` given at construction, as for SD: nothing is counted.
"""

from __future__ import annotations

import contextlib

import torch

from .attention import LayerKV, MRSAState, StopReferencePass, _with_references
from .config import MRSAConfig
from .topology import vital_blocks


def attention_layers(transformer) -> list[str]:
    """Every attention layer name in execution order: double-stream blocks, then single-stream blocks."""
    return [f"transformer_blocks.{i}.attn" for i in range(len(transformer.transformer_blocks))] + [
        f"single_transformer_blocks.{j}.attn" for j in range(len(transformer.single_transformer_blocks))
    ]


def default_blocks(transformer) -> tuple[int, ...]:
    """FreeCus's vital layers; for other depths (tiny test models), the layers at the same relative depth.

    A double-stream index i of FLUX.1's 19 maps to ``round(i * (D - 1) / 18)`` of D, a single-stream
    index j of 38 to ``D + round(j * (S - 1) / 37)``; duplicates collapse.
    """
    return vital_blocks(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks))


def default_mrsa(transformer, **overrides) -> MRSAConfig:
    """The FLUX default: ``MRSAConfig`` with ``blocks`` = FreeCus's vital layers (``default_blocks``)."""
    return MRSAConfig(blocks=default_blocks(transformer), **overrides)


def select_layers(transformer, mrsa: MRSAConfig) -> tuple[str, ...]:
    """``mrsa.layers`` by name, or ``mrsa.blocks`` as indices into ``attention_layers`` (FreeCus's numbering)."""
    order = attention_layers(transformer)
    if mrsa.layers is not None:
        unknown = [name for name in mrsa.layers if name not in order]
        if unknown:
            raise ValueError(
                f"MRSAConfig.layers: {unknown} are not attention layers of this FLUX transformer; valid names "
                f"look like {order[0]!r} or {order[-1]!r}"
            )
        chosen = set(mrsa.layers)
    else:
        bad = [b for b in mrsa.blocks if b >= len(order)]
        if bad:
            raise ValueError(
                f"MRSAConfig.blocks={mrsa.blocks}: on FLUX, blocks index the {len(order)} attention layers in "
                f"execution order (0..{len(order) - 1}: transformer_blocks, then single_transformer_blocks); "
                f"the default is FreeCus's vital layers {default_blocks(transformer)}"
            )
        chosen = {order[b] for b in mrsa.blocks}
    return tuple(name for name in order if name in chosen)


class FluxMRSAState(MRSAState):
    """``MRSAState`` plus the number of image tokens (the last ``image_tokens`` of the joint sequence)."""

    def __init__(self, mrsa: MRSAConfig, layers: tuple[str, ...], image_tokens: int):
        super().__init__(mrsa, layers)
        self.cfg = False  # guidance-distilled: one branch
        self.image_tokens = image_tokens


class FluxMRSAProcessor:
    """``FluxAttnProcessor`` whose joint attention becomes MRSA while ``state.mode == "mrsa"``."""

    def __init__(self, state: FluxMRSAState, name: str, backend=None):
        self.state = state
        self.name = name
        self._attention_backend = backend  # the replaced processor's (``set_attention_backend``)

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))  # (B, L, heads, d)
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        # double-stream blocks: the text stream's own projections, joined in front of the image's
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)  # (B, T + L, heads, d)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        state = self.state
        if state.mode == "capture" and state.sink is not None and self.name in state.layers:
            n = state.image_tokens  # the image tokens, after RoPE: (B, heads, L, d)
            state.sink(self.name, key[:, -n:].transpose(1, 2), value[:, -n:].transpose(1, 2))
            if self.name == state.stop_after:
                raise StopReferencePass()  # nothing after the last selected layer is needed

        layer_kv = state.kv.get(self.name) if state.mode == "mrsa" else None
        if layer_kv is None or attention_mask is not None:
            hidden_states = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=self._attention_backend,
            )
        else:
            # ---- the one change against FluxAttnProcessor: multi-reference self-attention ----
            hidden_states = self._mrsa(query, key, value, layer_kv)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)  # (B, T + L, heads * d)
        if encoder_hidden_states is not None:
            t = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states[:, :t], hidden_states[:, t:]
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    @staticmethod
    def _mrsa(query, key, value, kv: LayerKV) -> torch.Tensor:
        # (B, S, heads, d) -> (B, heads, S, d) for SDPA; the references' (heads, Lr, d) join every row's keys
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        return _with_references(q, k, v, kv.k, kv.v, kv.bias).transpose(1, 2)  # (B, S, heads, d)


@contextlib.contextmanager
def flux_mrsa_installed(transformer, state: FluxMRSAState):
    """Install MRSA processors on ``state.layers`` by name; always restore the transformer's own processors."""
    saved = transformer.attn_processors
    processors = dict(saved)
    for name in state.layers:
        key = f"{name}.processor"
        if key not in processors:
            raise ValueError(f"{name!r} is not an attention layer of this FLUX transformer")
        processors[key] = FluxMRSAProcessor(state, name, getattr(saved[key], "_attention_backend", None))
    transformer.set_attn_processor(processors)
    try:
        yield state
    finally:
        transformer.set_attn_processor(saved)
