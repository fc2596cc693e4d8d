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


def build_tiny_sd15(folder: str | Path, *, seed: int = 0, real_sd15_unet: bool = False) -> Path:
    """Build, save (safetensors) and return the folder of a random-weight SD1.5-topology pipeline."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tiny_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)

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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=512,
        **vae_kw,
    )
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
