"""A tiny random-weight FLUX.1 *topology* pipeline, saved with ``save_pretrained`` and loaded back for real.

Every component of a ``black-forest-labs/FLUX.1-dev`` checkpoint, at toy widths: a
``FluxTransformer2DModel`` with double-stream (``transformer_blocks``) and single-stream
(``single_transformer_blocks``) blocks, guidance embedding and 3-axis RoPE; a 4-level VAE with
FLUX's 8x factor, ``shift_factor`` and ``scaling_factor``; a CLIP text encoder (pooled output)
with a byte-level BPE tokenizer and a T5 encoder with a Unigram tokenizer, both written here; a
``FlowMatchEulerDiscreteScheduler`` with dynamic shifting as FLUX.1-dev ships it. No weights are
downloaded: tests and benchmarks load the folder through ``FluxPipeline.from_pretrained``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.tiny_model import write_tiny_tokenizer

T5_SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123456789.,'-"


def _t5_tokenizer():
    """A T5 (Unigram) tokenizer over single letters and a few words: every prompt tokenizes."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in T5_SYMBOLS] + [("\u2581" + c, -3.5) for c in T5_SYMBOLS]
    vocab += [(w, -1.0) for w in ("\u2581a", "\u2581the", "\u2581on", "\u2581dog", "\u2581hat", "\u2581cube")]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_flux(
    folder: str | Path,
    *,
    seed: int = 0,
    guidance_embeds: bool = True,
    num_layers: int = 2,
    num_single_layers: int = 4,
    heads: int = 2,
    head_dim: int = 8,
    axes_dims_rope: tuple[int, int, int] = (2, 2, 4),
) -> Path:
    """Build, save (safetensors) and return the folder of a random-weight FLUX.1-topology pipeline.

    ``guidance_embeds=False`` is FLUX.1-schnell's layout (no guidance input). Benchmarks pass wider
    ``heads`` / ``head_dim`` (``axes_dims_rope`` must add up to ``head_dim``).
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tiny_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77
        )
    tokenizer_2 = _t5_tokenizer()

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x a 2x2 patch
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=axes_dims_rope,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            projection_dim=32,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_flux_controlnet(
    folder: str | Path,
    *,
    seed: int = 0,
    guidance_embeds: bool = True,
    num_layers: int = 1,
    num_single_layers: int = 2,
    xlabs: bool = False,
) -> Path:
    """Build, save (safetensors) and return the folder of a random-weight ``FluxControlNetModel`` for
    ``build_tiny_flux``'s transformer (same widths, RoPE axes and embeddings).

    The InstantX layout by default (the control image VAE-encoded and packed); ``xlabs=True`` the XLabs
    layout (an ``input_hint_block`` reading pixels, 2x2 patches, residuals repeated over the blocks).
    The modules diffusers zero-initialises (the residual projections, ``controlnet_x_embedder``) get
    random weights too, so that the residuals are not all zero and the tests can see them.
    """
    import torch
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed + 10)
    net = FluxControlNetModel(
        patch_size=2 if xlabs else 1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=0 if xlabs else num_single_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
        conditioning_embedding_channels=4 if xlabs else None,
    )
    with torch.no_grad():
        zeroed = [net.controlnet_x_embedder, *net.controlnet_blocks, *net.controlnet_single_blocks]
        if net.input_hint_block is not None:
            zeroed.append(net.input_hint_block.conv_out)
        for module in zeroed:
            torch.nn.init.normal_(module.weight, std=0.2)
            torch.nn.init.normal_(module.bias, std=0.05)
    net.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
