"""Test helpers: tiny random-weight variants of the base models users bring (pipeline/tiny_model.py builds SD1.5's).

- ``build_tiny_sd2``: SD2.x 768-v's topology in miniature: ``v_prediction``, linear projections in the
  transformer blocks, ``upcast_attention``, per-block head counts, a GELU text encoder, 768-pixel
  default size (``sample_size`` 96).
- ``write_random_lora``: a rank-2 LoRA with random weights on the UNet's attention projections,
  saved as safetensors by diffusers' ``save_lora_weights`` (what a trained LoRA file looks like).
- ``build_full_size_sd15_single_file``: SD1.5's real widths, small random weights, one LDM-layout file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from freecustom_core.loading import SD15_CONFIG
from pipeline.tiny_model import write_tiny_tokenizer
from tests.ldm_export import export_single_file


def build_tiny_sd2(folder: str | Path, *, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tiny_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77
        )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=96,  # 768 / 8
        layers_per_block=2,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(2, 2, 4, 4),  # SD2 gives heads per block: (5, 10, 20, 20)
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=4,
        cross_attention_dim=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=768,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=0,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            hidden_act="gelu",
            projection_dim=32,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
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


def write_random_lora(model_folder: str | Path, folder: str | Path, *, seed: int, std: float = 0.5,
                      text_encoder: bool = False) -> Path:
    """A random rank-2 LoRA for ``model_folder``'s UNet (and text encoder), saved by diffusers; returns the file."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    donor = StableDiffusionPipeline.from_pretrained(str(model_folder), safety_checker=None)
    donor.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    modules = [donor.unet]
    if text_encoder:  # peft itself: transformers 5's add_adapter wants peft >= 0.22 (diffusers' loader does not)
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]), donor.text_encoder)
        modules.append(donor.text_encoder)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * std)
    layers = {"unet_lora_layers": get_peft_model_state_dict(donor.unet)}
    if text_encoder:
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(donor.text_encoder)
    folder = Path(folder)
    StableDiffusionPipeline.save_lora_weights(folder, **layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def build_full_size_sd15_single_file(path: str | Path, *, seed: int = 0) -> Path:
    """SD1.5's real topology and widths (freecustom_core's shipped config), small random float16 weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(SD15_CONFIG, subfolder="unet")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG, subfolder="text_encoder"))
    parts = []
    for module in (unet, vae, text):
        module = module.to_empty(device="cpu").to(torch.float16)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02)
        parts.append(module)
    return export_single_file(SimpleNamespace(unet=parts[0], vae=parts[1], text_encoder=parts[2]), path)
