"""The release's BLIP-Diffusion FreeCustom pipeline, in batch: the oracle for ``BlipDiffusionFreeCustom``.

``pipelines/pipeline_blip_diffusion_freecustom.py`` of the authors' release is diffusers'
``BlipDiffusionPipeline.__call__`` with FreeCustom's batch: ``[target, ref_1..ref_N]`` per CFG branch,
the target's text ``encode_prompt(query_embeds, _build_prompt(prompt, category))``, the references'
``encode_prompt(query_embeds, source_prompt)`` (``subject_references=True``; this project's default
encodes the concept prompts without the subject: ``ctx_embeddings=None``), the negative prompt
without context for every row. Everything else (re-noised references, MRSA at the selected layers,
the step on the target only) is ``tests/oracle.py``'s ``release_generate``, which this module feeds
through ``ReleaseBlipText``: the BLIP pipeline's own components and methods, in the shape of the SD
pipeline ``release_generate`` reads (``unet``, ``vae``, ``scheduler``, ``encode_prompt``).
"""

from __future__ import annotations

import torch

from tests.oracle import release_generate


class ReleaseBlipText:
    """A ``BlipDiffusionPipeline`` seen through SD's ``encode_prompt``: row 0 is the target, the rest references."""

    def __init__(self, pipe, subject_image, category, *, subject_references: bool, prompt_reps: int = 20):
        self.pipe, self.unet, self.vae, self.scheduler = pipe, pipe.unet, pipe.vae, pipe.scheduler
        self.subject_references = subject_references
        self.prompt_reps = prompt_reps
        self.category = category
        pixels = pipe.image_processor.preprocess(
            subject_image.convert("RGB"),
            image_mean=pipe.config.mean,
            image_std=pipe.config.std,
            return_tensors="pt",
        )["pixel_values"]
        self.query = pipe.get_query_embeddings(pixels, [category])  # (1, Q, D)

    def _no_context(self, texts):
        ids = self.pipe.tokenizer(
            texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        ).input_ids
        return self.pipe.text_encoder(input_ids=ids, ctx_embeddings=None)[0]

    def encode_prompt(self, prompts, device, num_images_per_prompt, cfg, negative_prompt):
        pipe = self.pipe
        target = pipe._build_prompt([prompts[0]], [self.category], 1.0, self.prompt_reps)
        rows = [pipe.encode_prompt(self.query, target, device)]
        for source_prompt in prompts[1:]:
            if self.subject_references:
                rows.append(pipe.encode_prompt(self.query, [source_prompt], device))
            else:
                rows.append(self._no_context([source_prompt]))
        cond = torch.cat(rows)
        uncond = self._no_context(list(negative_prompt)) if cfg else None
        return cond, uncond


@torch.no_grad()
def release_blip_generate(
    pipe, layers, concepts, prompt, seed, *, subject_image, category, subject_references=False, **kwargs
):
    """One target, the release's BLIP-Diffusion way; the final latent (1, C, h, w)."""
    text = ReleaseBlipText(pipe, subject_image, category, subject_references=subject_references)
    return release_generate(text, layers, concepts, prompt, seed, **kwargs)
