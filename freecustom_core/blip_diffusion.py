"""FreeCustom on BLIP-Diffusion: the subject embedding in the target's prompt, MRSA on the UNet.

diffusers' ``BlipDiffusionPipeline`` conditions its UNet on a text encoder (``ContextCLIPTextModel``)
into whose token embeddings a Q-Former's query embeddings of a *subject image* and its category are
spliced (at ``ctx_begin_pos``). The authors' release (``pipelines/pipeline_blip_diffusion_freecustom.py``)
keeps that for the target and adds FreeCustom's reference half: the references run in the same UNet
batch with their *source prompt*, and MRSA at the selected self-attention layers lets the target
attend to them. Here the two halves are the ones of ``FreeCustomGenerator`` (same ``ReferencePath``,
``MRSAProcessor``, ``ReferenceKV``); only the text conditioning differs:

  target       BLIP's prompt ``"a {category} {prompt}, "`` x ``prompt_reps``, the subject's query
               embeddings spliced in (``BlipDiffusionPipeline.encode_prompt``); negative prompt through
               the plain text encoder (no context), as diffusers does.
  references   the release's ``encode_prompt(query_embeds, source_prompt)`` with ``source_prompt=""``
               (default): the empty prompt (``default_mrsa()`` has ``null_ref_prompts=True``) with the
               subject's query embeddings spliced in; the K/V then hold the subject's identity and
               serve only calls with that subject. ``subject_references=False`` runs each concept's
               prompt (``null_ref_prompts=False``) through the text encoder without context instead:
               K/V per concept set only, as for SD1.5.

The release pipeline's other defaults are this module's too: the checkpoint's own scheduler
(``"checkpoint"``: PNDM for ``Salesforce/blipdiffusion``; ``scheduler="release"`` is the SD script's
DDIM) and the empty negative prompt (``neg_prompt=""``; ``DEFAULT_NEGATIVE_PROMPT`` is the SD script's).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .concept import ConceptRef
from .conditioning import TextCond
from .config import MRSAConfig
from .generator import FreeCustomGenerator
from .kv import ReferenceKV
from .layers import default_blocks
from .schedulers import CHECKPOINT_SCHEDULER, check_exact, resolve_scheduler

# diffusers' BlipDiffusionPipeline defaults
PROMPT_STRENGTH = 1.0
PROMPT_REPS = 20
# the release's BlipDiffusionFreeCustomPipeline.__call__ defaults (neg_prompt="", source_prompt="")
BLIP_NEGATIVE_PROMPT = ""
BLIP_SCHEDULER = CHECKPOINT_SCHEDULER


@dataclass(frozen=True)
class BlipSubject:
    """The subject BLIP-Diffusion puts into the target's prompt.

    image: the subject image (any size; the pipeline's ``BlipImageProcessor`` resizes it).
    category: the subject's category in that image (``source_subject_category``, e.g. "dog").
    target_category: the word the target prompt names it by (None: ``category``).
    """

    image: Image.Image
    category: str
    target_category: str | None = None
    prompt_strength: float = PROMPT_STRENGTH
    prompt_reps: int = PROMPT_REPS

    def __post_init__(self):
        if not isinstance(self.image, Image.Image):
            raise TypeError(f"subject_image: expected a PIL image, got {type(self.image).__name__}")
        if not isinstance(self.category, str) or not self.category.strip():
            raise ValueError(f"subject_category={self.category!r}: must be a non-empty string (e.g. 'dog')")
        if self.target_category is not None and not str(self.target_category).strip():
            raise ValueError(f"target_subject_category={self.target_category!r}: must be non-empty or None")
        if int(self.prompt_strength * self.prompt_reps) < 1:
            raise ValueError(
                f"prompt_strength={self.prompt_strength} x prompt_reps={self.prompt_reps}: the target prompt "
                "would be repeated 0 times"
            )

    @property
    def target(self) -> str:
        return self.target_category or self.category

    def identity(self) -> dict:
        """What reference K/V computed with this subject (``subject_references``) depend on."""
        image = self.image.convert("RGB")
        h = hashlib.sha256(f"{image.size}".encode())
        h.update(np.ascontiguousarray(np.asarray(image)).tobytes())
        return {"image_digest": h.hexdigest(), "category": self.category}


@functools.cache
def qformer_class():
    """diffusers' ``Blip2QFormerModel`` made to run on transformers 5.

    diffusers' (deprecated) Q-Former is written against transformers 4: it calls two
    ``PreTrainedModel`` helpers transformers 5 removed (``invert_attention_mask``, ``get_head_mask``)
    and calls transformers' ``Blip2QFormerAttention`` with the old positional signature
    ``(hidden, mask, head_mask, encoder_hidden, encoder_mask)``, expecting a tuple back. This subclass
    adds the helpers as transformers 4 defined them and gives each layer's attention modules the old
    calling convention (same weights and state-dict keys; head masks and KV caches are not supported).
    """
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerAttention

    class LegacyCallAttention(Blip2QFormerAttention):
        def forward(
            self,
            hidden_states,
            attention_mask=None,
            head_mask=None,
            encoder_hidden_states=None,
            encoder_attention_mask=None,
            output_attentions=False,
            past_key_value=None,
        ):
            if head_mask is not None or past_key_value is not None or output_attentions:
                raise ValueError("the Q-Former runs without head masks, KV caches or attention outputs")
            out = super().forward(
                hidden_states,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
            )
            return (out, None)  # (output, present key/value) as transformers 4 returned it

    class QFormer(Blip2QFormerModel):
        def __init__(self, config):
            super().__init__(config)
            config.qformer_config._attn_implementation = "eager"  # what the transformers 4 code computed
            for layer in self.encoder.layer:
                for name in ("attention", "crossattention"):
                    module = getattr(layer, name, None)
                    if module is not None:
                        module.__class__ = LegacyCallAttention

        def invert_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
            mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]  # (B, 1, 1 or Lq, Lk)
            mask = mask.to(self.dtype)
            return (1.0 - mask) * torch.finfo(self.dtype).min

        def get_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
            if head_mask is not None:
                raise ValueError("head_mask is not supported")
            return [None] * num_hidden_layers

    QFormer.__name__ = QFormer.__qualname__ = "Blip2QFormerModel"
    return QFormer


def load_blip_diffusion_pipeline(
    id_or_folder: str, *, torch_dtype: torch.dtype | None = None, scheduler=None, revision: str | None = None
):
    """A diffusers ``BlipDiffusionPipeline`` (hub id or folder, safetensors only) with FreeCustom's sampler.

    Each component is loaded by its class from its subfolder and the pipeline built from them:
    ``model_index.json`` names the Q-Former, context text encoder and image processor in a library
    this diffusers no longer exports them from, which ``BlipDiffusionPipeline.from_pretrained`` refuses.
    scheduler: None or ``"checkpoint"`` (default, as the release's BLIP pipeline samples) is the scheduler
    the checkpoint ships (``scheduler/scheduler_config.json``'s class and config); otherwise as
    ``FreeCustomGenerator.from_pretrained`` (``"release"``: the SD script's DDIM).
    """
    import diffusers
    from diffusers import AutoencoderKL, BlipDiffusionPipeline, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import CLIPTokenizer

    path = os.fspath(id_or_folder)
    if os.path.isfile(path):
        raise ValueError(
            f"model={path!r}: BLIP-Diffusion loads from a diffusers folder or hub id, not a single file"
        )
    if scheduler is not None and not isinstance(scheduler, str):
        check_exact(scheduler)
    dtype = torch_dtype or torch.float32
    index = BlipDiffusionPipeline.load_config(path, revision=revision)
    if index.get("_class_name") != "BlipDiffusionPipeline":
        raise ValueError(
            f"model={path!r}: model_index.json names {index.get('_class_name')!r}, not a BlipDiffusionPipeline"
        )
    weights = dict(revision=revision, use_safetensors=True, dtype=dtype)
    scheduler = BLIP_SCHEDULER if scheduler is None else scheduler
    config = DDIMScheduler.load_config(path, subfolder="scheduler", revision=revision)
    shipped = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(shipped, type) and issubclass(shipped, diffusers.SchedulerMixin)):
        if scheduler == CHECKPOINT_SCHEDULER:
            raise ValueError(
                f"model={path!r}: its scheduler {config.get('_class_name')!r} is no diffusers scheduler; "
                "give scheduler= a spec (e.g. 'PNDMScheduler')"
            )
        shipped = DDIMScheduler  # only its config is read
    pipe = BlipDiffusionPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
        text_encoder=ContextCLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weights),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights),
        scheduler=shipped.from_config(config),
        qformer=qformer_class().from_pretrained(path, subfolder="qformer", **weights),
        image_processor=BlipImageProcessor.from_pretrained(
            path, subfolder="image_processor", revision=revision
        ),
        ctx_begin_pos=index.get("ctx_begin_pos", 2),
        mean=index.get("mean"),
        std=index.get("std"),
    )
    pipe.text_encoder.eval()
    pipe.qformer.eval()
    pipe.scheduler = resolve_scheduler(scheduler, pipe.scheduler)
    return pipe


class BlipDiffusionFreeCustom(FreeCustomGenerator):
    """FreeCustom over a diffusers ``BlipDiffusionPipeline``: ``generate(..., subject_image=, subject_category=)``.

    Everything but the text conditioning is ``FreeCustomGenerator``'s (reference path, MRSA layers and
    defaults, cached ``ReferenceKV``, batching, determinism contract). One call at a time per instance.
    """

    family = "blip"

    def __init__(self, pipe, *, model_id: str | None = None):
        super().__init__(pipe, model_id=model_id)
        self._reference_subject: BlipSubject | None = None  # the references' (subject_references=True)
        self._call_subject: BlipSubject | None = None  # the subject of the running generate

    @classmethod
    def from_pretrained(
        cls,
        id_or_folder: str,
        *,
        torch_dtype: torch.dtype | None = None,
        device=None,
        scheduler=None,
        revision: str | None = None,
        **kwargs,
    ) -> BlipDiffusionFreeCustom:
        """Load a BLIP-Diffusion checkpoint (diffusers folder or hub id, safetensors only).

        scheduler: None (default) samples with the scheduler the checkpoint ships, as the release's BLIP
        pipeline does; ``"release"`` is the SD script's DDIM; else as ``FreeCustomGenerator.from_pretrained``.
        """
        if kwargs:
            raise TypeError(f"BlipDiffusionFreeCustom.from_pretrained: unsupported options {sorted(kwargs)}")
        pipe = load_blip_diffusion_pipeline(
            id_or_folder, torch_dtype=torch_dtype, scheduler=scheduler, revision=revision
        )
        pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(pipe, model_id=str(id_or_folder) + (f"@{revision}" if revision else ""))

    def default_mrsa(self, **overrides) -> MRSAConfig:
        """The release BLIP pipeline's: the paper's defaults on this UNet's default blocks, references
        with the empty source prompt (``null_ref_prompts=True``); ``overrides`` replace fields."""
        return MRSAConfig(**{"blocks": default_blocks(self.unet), "null_ref_prompts": True, **overrides})

    # ---- text conditioning ----------------------------------------------------------------------
    def query_embeddings(self, subject: BlipSubject) -> torch.Tensor:
        """The Q-Former's subject embedding of (image, category): (1, num_query_tokens, D)."""
        pipe = self.pipe
        pixels = pipe.image_processor.preprocess(
            subject.image.convert("RGB"),
            image_mean=pipe.config.mean,
            image_std=pipe.config.std,
            return_tensors="pt",
        )["pixel_values"]
        return pipe.get_query_embeddings(pixels.to(self.device, pipe.qformer.dtype), [subject.category])

    def _plain_text(self, texts: list[str]) -> torch.Tensor:
        """Texts through the context text encoder without context: how diffusers encodes the negative prompt."""
        pipe = self.pipe
        ids = pipe.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=pipe.text_encoder.text_model.config.max_position_embeddings,
            return_tensors="pt",
        ).input_ids
        return pipe.text_encoder(input_ids=ids.to(self.device), ctx_embeddings=None)[0]

    def _with_subject(self, texts: list[str], subject: BlipSubject) -> torch.Tensor:
        """Texts with the subject's query embeddings spliced in (``BlipDiffusionPipeline.encode_prompt``)."""
        query = self.query_embeddings(subject)  # (1, Q, D)
        return self.pipe.encode_prompt(query.expand(len(texts), -1, -1), texts, self.device)

    def target_prompts(self, prompts: Sequence[str], subject: BlipSubject) -> list[str]:
        """BLIP-Diffusion's target prompt: ``"a {target_category} {prompt}"`` repeated, comma-joined."""
        return self.pipe._build_prompt(
            prompts=list(prompts),
            tgt_subjects=[subject.target] * len(prompts),
            prompt_strength=subject.prompt_strength,
            prompt_reps=subject.prompt_reps,
        )

    def encode_text(
        self, prompts: list[str], negative_prompt: str | list[str], *, cfg: bool, height: int, width: int
    ) -> TextCond:
        """The references' conditioning (``ReferencePath``): their prompts, with the subject only under
        ``subject_references``; ``[negative..., prompts...]`` when ``cfg``."""
        return self._conditioning(list(prompts), negative_prompt, self._reference_subject, cfg=cfg)

    def encode_targets(
        self, prompts: list[str], negative_prompt: str | list[str], *, cfg: bool, height: int, width: int
    ) -> TextCond:
        """The targets' conditioning: BLIP's prompt with the running ``generate``'s subject spliced in."""
        subject = self._call_subject
        if subject is None:
            return self.encode_text(prompts, negative_prompt, cfg=cfg, height=height, width=width)
        return self._conditioning(self.target_prompts(prompts, subject), negative_prompt, subject, cfg=cfg)

    def _conditioning(self, prompts, negative_prompt, subject, *, cfg: bool) -> TextCond:
        negatives = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        cond = self._with_subject(prompts, subject) if subject is not None else self._plain_text(prompts)
        if cfg:
            cond = torch.cat([self._plain_text(negatives).to(cond.dtype), cond])
        return TextCond(cond.to(self.dtype))

    def encode_prompts(self, prompts, negative_prompt, *, cfg: bool) -> torch.Tensor:
        """The references' text embeddings (no subject), ``[negative..., prompts...]`` when ``cfg``."""
        return self.encode_text(list(prompts), negative_prompt, cfg=cfg, height=0, width=0).embeds

    def kv_identity(
        self,
        *,
        num_inference_steps: int,
        height: int,
        width: int,
        control: dict | None = None,
        subject_image: Image.Image | None = None,
        subject_category: str | None = None,
    ) -> dict:
        """``FreeCustomGenerator.kv_identity`` plus ``blip_subject``: the subject the references saw
        (``subject_image`` and ``subject_category`` as given to ``prepare_references``; else the running
        call's, ``subject_references``), None when they saw none."""
        identity = super().kv_identity(
            num_inference_steps=num_inference_steps, height=height, width=width, control=control
        )
        subject = self._reference_subject
        if subject_image is not None:
            subject = BlipSubject(subject_image, subject_category)
        identity["blip_subject"] = subject.identity() if subject is not None else None
        return identity

    @contextlib.contextmanager
    def _reference_conditioning(self, subject: BlipSubject | None):
        self._reference_subject = subject
        try:
            yield
        finally:
            self._reference_subject = None

    # ---- the two halves -------------------------------------------------------------------------
    def prepare_references(
        self,
        concepts: Sequence[ConceptRef],
        *,
        subject_image: Image.Image | None = None,
        subject_category: str | None = None,
        negative_prompt: str = BLIP_NEGATIVE_PROMPT,
        **kwargs,
    ) -> ReferenceKV:
        """``FreeCustomGenerator.prepare_references``; with ``subject_image`` and ``subject_category`` the
        references are conditioned on that subject too, as ``generate``'s default (``subject_references``)
        needs them; without, they serve ``generate(..., subject_references=False)``."""
        if (subject_image is None) != (subject_category is None):
            raise ValueError("prepare_references: give both subject_image and subject_category, or neither")
        subject = BlipSubject(subject_image, subject_category) if subject_image is not None else None
        with self._reference_conditioning(subject):
            return super().prepare_references(concepts, negative_prompt=negative_prompt, **kwargs)

    @torch.inference_mode()
    def generate(
        self,
        prompts: str | Sequence[str],
        seeds: int | Sequence[int],
        references: ReferenceKV | Sequence[ConceptRef] | None = None,
        *,
        subject_image: Image.Image,
        subject_category: str,
        target_subject_category: str | None = None,
        prompt_strength: float = PROMPT_STRENGTH,
        prompt_reps: int = PROMPT_REPS,
        subject_references: bool | None = None,
        negative_prompt: str = BLIP_NEGATIVE_PROMPT,
        mrsa: MRSAConfig | None = None,
        **kwargs,
    ):
        """One image per (prompt, seed) of the subject in ``subject_image`` (category ``subject_category``).

        references: None (plain BLIP-Diffusion), a ReferenceKV or a list of ConceptRef, as in
        ``FreeCustomGenerator.generate`` (whose keyword arguments pass through, ControlNet's aside;
        ``mrsa`` None is ``default_mrsa()``, whose references take the empty prompt).
        subject_references: None (default) is True with references, as the release builds them: the
        references' prompts get the subject embedding too, and cached K/V must come from
        ``prepare_references(..., subject_image=, subject_category=)`` with the same subject. False: the
        references' prompts without the subject (K/V per concept set only).
        negative_prompt: the release BLIP pipeline's ``""`` by default.
        """
        for name in ("control_image", "control_references"):
            if kwargs.get(name):
                raise ValueError(f"{name}: BlipDiffusionFreeCustom has no ControlNet")
        subject = BlipSubject(
            subject_image, subject_category, target_subject_category, prompt_strength, prompt_reps
        )
        if subject_references and references is None:
            raise ValueError("subject_references=True: needs references (None renders plain BLIP-Diffusion)")
        subject_references = references is not None if subject_references is None else subject_references
        with self._reference_conditioning(subject if subject_references else None):
            self._call_subject = subject
            try:
                return super().generate(
                    prompts, seeds, references, negative_prompt=negative_prompt, mrsa=mrsa, **kwargs
                )
            finally:
                self._call_subject = None

    def _decode(self, latents: torch.Tensor, output_type: str) -> list:
        if output_type == "latent":
            return [latents]
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        image = self.pipe.image_processor.postprocess(
            image, output_type="np" if output_type == "np" else "pil"
        )
        return [image] if output_type == "np" else list(image)
