"""A tiny random-weight BLIP-Diffusion, built from the tiny SD1.5 and saved with ``save_pretrained``.

Components as diffusers' ``BlipDiffusionPipeline`` expects them: the tiny SD1.5's UNet, VAE and CLIP
tokenizer, the scheduler ``Salesforce/blipdiffusion`` ships (SD1.5's PNDM config: PLMS steps,
``steps_offset=1``), a ``ContextCLIPTextModel`` of the same size as its text encoder, a
``Blip2QFormerModel`` (one vision layer on 28² images, one Q-Former layer, 4 query tokens of the
text encoder's width) with a BERT word-piece tokenizer written here, and a ``BlipImageProcessor``
at 28². Nothing is downloaded.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

BERT_WORDS = ["a", "red", "blue", "green", "cube", "hat", "dog", "cat", "toy", "on", "the", "grass"]


def write_tiny_bert_tokenizer(folder: Path) -> int:
    """A BERT word-piece vocabulary (special tokens, letters, a few words); returns its size."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS + letters + ["##" + x for x in letters]
    )
    vocab = list(dict.fromkeys(vocab))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return len(vocab)


def build_tiny_blip_diffusion(folder: str | Path, *, seed: int = 0) -> Path:
    """Build, save (safetensors) and return the folder of a random-weight BLIP-Diffusion pipeline."""
    import torch
    from diffusers import BlipDiffusionPipeline, PNDMScheduler, StableDiffusionPipeline
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config

    from pipeline.tiny_model import build_tiny_sd15

    folder = Path(folder)
    bert = folder.parent / f"{folder.name}-bert-tokenizer"  # the Q-Former's config names this folder
    bert_vocab = write_tiny_bert_tokenizer(bert)
    with tempfile.TemporaryDirectory() as tmp:
        sd = StableDiffusionPipeline.from_pretrained(build_tiny_sd15(Path(tmp) / "sd", seed=seed))
    text_config = sd.text_encoder.config
    width = text_config.hidden_size
    torch.manual_seed(seed + 10)
    text_encoder = ContextCLIPTextModel(text_config)
    torch.manual_seed(seed + 11)
    qformer = Blip2QFormerModel(
        Blip2Config(
            vision_config=dict(
                hidden_size=16,
                intermediate_size=24,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
                hidden_act="quick_gelu",
            ),
            qformer_config=dict(
                vocab_size=bert_vocab + 1,  # + the [DEC] token the Q-Former adds
                hidden_size=width,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=37,
                max_position_embeddings=64,
                cross_attention_frequency=1,
                encoder_hidden_size=16,
            ),
            num_query_tokens=4,
            tokenizer=str(bert),
        )
    )
    qformer.eval()
    # transformers 5 does not initialise the Q-Former's vision tower (diffusers' own modules): weights near
    # 0 would make the query embeddings ignore the image. Every matrix ~ N(0, 1/fan_in), vectors small.
    with torch.no_grad():
        for name, p in qformer.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
            elif "norm" in name.lower() and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.1)
    image_processor = BlipImageProcessor(size={"height": 28, "width": 28})
    pipe = BlipDiffusionPipeline(
        tokenizer=sd.tokenizer,
        text_encoder=text_encoder,
        vae=sd.vae,
        unet=sd.unet,
        scheduler=PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            set_alpha_to_one=False,
            skip_prk_steps=True,
            steps_offset=1,
        ),
        qformer=qformer,
        image_processor=image_processor,
        ctx_begin_pos=2,
        mean=[0.48145466, 0.4578275, 0.40821073],
        std=[0.26862954, 0.26130258, 0.27577711],
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
