"""Tiny random-weight Stable Diffusion 1.5 *topology* for the demo, tests and benchmarks.

No weights can be downloaded in CI, so this module builds every component of an SD1.5
checkpoint (UNet with 4 down / mid / 4 up blocks and cross-attention in the same places,
a 4-level VAE with the 8x down-sampling factor, a CLIP text encoder, a byte-level BPE
tokenizer written from scratch, a DDIM scheduler) with tiny widths and seeded random
weights, and saves it with ``save_pretrained`` in safetensors. Everything downstream then
goes through the real ``from_pretrained`` loading code.

``real_sd15_unet=True`` builds the UNet and VAE at SD1.5's real widths (random weights)
for benchmarks that need realistic cost.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    # the GPT-2 / CLIP byte -> printable unicode table
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_tiny_tokenizer(folder: Path) -> int:
    """Write a CLIP byte-level BPE tokenizer (vocab.json + merges.txt); returns the vocab size.

    The vocab holds every byte symbol, with and without the end-of-word marker, plus a few
    merges of common letters so that tokenisation is not purely per character.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = [("a", "t</w>"), ("t", "h"), ("th", "e</w>"), ("i", "n"), ("o", "n</w>"), ("a", "n")]
    vocab_list += [a + b for a, b in merges]
    vocab_list += list(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)


def _tiny_tokenizer():
    """``(CLIPTokenizer, vocab size)`` of the tiny byte-level BPE vocabulary."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tiny_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77
        )
    return tokenizer, vocab_size


def _vae(**kwargs):
    """A 4-level ``AutoencoderKL`` (8x down-sampling, 4 latent channels) of the given widths."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        **kwargs,
    )


def build_tiny_sd15(folder: str | Path, *, seed: int = 0, real_sd15_unet: bool = False) -> Path:
    """Build, save (safetensors) and return the folder of a random-weight SD1.5-topology pipeline."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tokenizer, vocab_size = _tiny_tokenizer()

    if real_sd15_unet:
        unet_kw = dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, norm_num_groups=32)
        vae_kw = dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2)
        text_kw = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        cross_dim = 768
    else:
        unet_kw = dict(block_out_channels=(8, 8, 16, 16), attention_head_dim=2, norm_num_groups=4)
        vae_kw = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
        text_kw = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
        cross_dim = 32

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_dim,
        **unet_kw,
    )
    torch.manual_seed(seed + 1)
    vae = _vae(sample_size=512, **vae_kw)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            projection_dim=cross_dim,
            **text_kw,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_controlnet(
    model_folder: str | Path,
    folder: str | Path,
    *,
    seed: int = 0,
    conditioning_embedding_out_channels: tuple[int, ...] = (4, 8, 8, 8),
) -> Path:
    """A random-weight ControlNet for the tiny model in ``model_folder`` (SD1.5 or SDXL topology), saved
    in safetensors. ``ControlNetModel.from_unet`` copies the UNet's encoder; its zero convolutions
    (and the condition embedding's output conv) start at zero and would make every residual zero,
    so they are re-drawn from a seeded normal distribution: the ControlNet then changes the image.
    ``conditioning_embedding_out_channels=(16, 32, 96, 256)`` with a real-width UNet gives the
    architecture of ``lllyasviel/sd-controlnet-*`` (benchmarks)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_folder) / "unet")
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=conditioning_embedding_out_channels
    )
    g = torch.Generator().manual_seed(seed)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    zero_convs.append(controlnet.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    folder = Path(folder)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


# SDXL-base-1.0's architecture (stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/
# (CLIP ViT-L/14), text_encoder_2/ (OpenCLIP ViT-bigG/14) config.json), for ``build_tiny_sdxl(real_sdxl=True)``.
SDXL_BASE_UNET = dict(
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    norm_num_groups=32,
    addition_time_embed_dim=256,
)
SDXL_BASE_VAE = dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2)
SDXL_BASE_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
    hidden_act="quick_gelu",
)
SDXL_BASE_TEXT_2 = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)


def build_tiny_sdxl(folder: str | Path, *, seed: int = 0, real_sdxl: bool = False) -> Path:
    """Build, save (safetensors) and return the folder of a random-weight SDXL-topology pipeline.

    SDXL's topology at tiny widths: a UNet with down blocks (plain, cross-attention, cross-attention),
    1 / 2 / 10 transformer layers per attention block, mid block, mirrored up blocks, the ``text_time``
    added embedding (pooled text + 6 time ids); two CLIP text encoders (the second with projection)
    whose penultimate states concatenate to the cross-attention width; a 4-level VAE with SDXL's
    scaling factor; the checkpoint's Euler scheduler config (sample size 128: 1024² images).
    ``real_sdxl=True``: SDXL-base-1.0's real widths (``SDXL_BASE_*``; UNet 2.6 B parameters, about 13 GB
    in float32 with both text encoders) with random weights, for benchmarks; the tokenizer stays tiny.
    """
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    tokenizer, vocab_size = _tiny_tokenizer()
    hidden, projection, time_dim = 32, 32, 8
    tiny_text = dict(
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=projection,
        hidden_act="gelu",
    )
    unet_kw = dict(
        block_out_channels=(8, 16, 16),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(2, 2, 4),
        norm_num_groups=4,
        addition_time_embed_dim=time_dim,
    )
    vae_kw = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
    # the second encoder wider than the first, as in SDXL (768 / 1280): diffusers' single-file loader tells
    # the two apart by width
    text_kw, text_2_kw = tiny_text, dict(tiny_text, hidden_size=48)
    if real_sdxl:
        unet_kw, vae_kw, text_kw, text_2_kw = SDXL_BASE_UNET, SDXL_BASE_VAE, SDXL_BASE_TEXT, SDXL_BASE_TEXT_2
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True,
        # the two encoders' penultimate states concatenated; text_time: 6 time ids + the pooled projection
        cross_attention_dim=text_kw["hidden_size"] + text_2_kw["hidden_size"],
        addition_embed_type="text_time",
        projection_class_embeddings_input_dim=6 * unet_kw["addition_time_embed_dim"]
        + text_2_kw["projection_dim"],
        **unet_kw,
    )
    torch.manual_seed(seed + 1)
    vae = _vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True, **vae_kw)
    ids = dict(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**ids, **text_kw))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **text_2_kw))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
