"""The release's BLIP-Diffusion FreeCustom pipeline, in batch: the oracle for ``BlipDiffusionFreeCustom``.

``pipelines/pipeline_blip_diffusion_freecustom.py`` of the authors' release is diffusers'
``BlipDiffusionPipeline.__call__`` with FreeCustom's batch: ``[target, ref_1..ref_N]`` per CFG branch,
the target's text ``encode_prompt(query_embeds, _build_prompt(prompt, category))``, the references'
``encode_prompt(query_embeds, source_prompt)`` with the release's ``source_prompt=""``, the negative
prompt (release: ``neg_prompt=""``) without context for every row, and ``self.scheduler``: the
scheduler the checkpoint ships, used as loaded (``set_timesteps``, ``add_noise``, ``step``).
Everything else (re-noised references, MRSA at the selected layers, the step on the target only) is
``tests/oracle.py``'s ``release_generate``, which this module feeds through ``ReleaseBlipText``: the
BLIP pipeline's own components and methods, in the shape of the SD pipeline ``release_generate``
reads (``unet``, ``vae``, ``scheduler``, ``encode_prompt``).

Options beside the release (this project's alternatives): ``source_prompt=None`` gives each reference
its concept's prompt, ``subject_references=False`` encodes the references' prompts without the subject
(``ctx_embeddings=None``), ``scheduler=`` another scheduler instance.
"""

from __future__ import annotations

import torch

from tests.oracle import release_generate

# BlipDiffusionFreeCustomPipeline.__call__'s defaults in the release
RELEASE_SOURCE_PROMPT = ""
RELEASE_NEG_PROMPT = ""


class ReleaseBlipText:
    """A ``BlipDiffusionPipeline`` seen through SD's ``encode_prompt``: row 0 is the target, the rest references."""

    def __init__(
        self,
        pipe,
        subject_image,
        category,
        *,
        subject_references: bool = True,
        source_prompt: str | None = RELEASE_SOURCE_PROMPT,
        scheduler=None,
        prompt_reps: int = 20,
    ):
        self.pipe, self.unet, self.vae = pipe, pipe.unet, pipe.vae
        self.scheduler = pipe.scheduler if scheduler is None else scheduler
        self.subject_references = subject_references
        self.source_prompt = source_prompt
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
        for concept_prompt in prompts[1:]:
            source_prompt = concept_prompt if self.source_prompt is None else self.source_prompt
            if self.subject_references:
                rows.append(pipe.encode_prompt(self.query, source_prompt, device))
            else:
                rows.append(self._no_context([source_prompt]))
        cond = torch.cat(rows)
        uncond = self._no_context(list(negative_prompt)) if cfg else None
        return cond, uncond


@torch.no_grad()
def release_blip_generate(
    pipe,
    layers,
    concepts,
    prompt,
    seed,
    *,
    subject_image,
    category,
    subject_references=True,
    source_prompt=RELEASE_SOURCE_PROMPT,
    negative_prompt=RELEASE_NEG_PROMPT,
    scheduler=None,
    **kwargs,
):
    """One target, the release's BLIP-Diffusion way (its defaults unless told); the final latent (1, C, h, w)."""
    text = ReleaseBlipText(
        pipe,
        subject_image,
        category,
        subject_references=subject_references,
        source_prompt=source_prompt,
        scheduler=scheduler,
    )
    return release_generate(text, layers, concepts, prompt, seed, negative_prompt=negative_prompt, **kwargs)
