"""FluxFreeCustomGenerator: FreeCustom's multi-reference self-attention on FLUX.1, references cached per concept set.

The same two halves as ``generator.FreeCustomGenerator`` (Stable Diffusion), on a diffusers
``FluxPipeline`` (``FluxTransformer2DModel``, CLIP + T5 encoders, ``FlowMatchEulerDiscreteScheduler``):
  reference path  (``flux_reference``) the reference latents re-noised each step by the scheduler's
                  forward process (``scale_noise``), run with the concept prompts; image-token K/V
                  captured after RoPE at the selected attention layers, the pass stopped after the
                  last. Nothing in it depends on the generated image: ``prepare_references`` runs it
                  once per concept set into a ``ReferenceKV`` (same file format as SD).
  synthesis path  FluxPipeline's denoising loop, with MRSA (``flux_attention``) at the selected
                  layers: the target's text and image queries attend to its own keys plus each
                  concept's in-mask image tokens, with logit bias +w_i.

FLUX.1 [dev] and [schnell] are guidance-distilled: one transformer pass per step, guidance (dev only)
an input embedding, no unconditional branch and no negative prompt. ``style_fidelity`` blends MRSA
with plain self-attention on the unconditional branch of classifier-free guidance, so it has nothing
to act on here: values below 1 are refused rather than silently ignored.

With a FLUX ControlNet (``from_pretrained(..., controlnet=ID)`` or ``from_pipe`` of a
``FluxControlNetPipeline``) the targets get ``FluxControlNetPipeline``'s residuals (``flux_controlnet``);
the references skip ControlNet, so cached K/V serve any control image.

The loaded pipeline, its identities, encoders and checks are ``flux_model.FluxModel``; here: loading,
the reference path and the synthesis path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .concept import ConceptRef
from .config import MRSAConfig
from .controlnet import ControlInput
from .flux_attention import FluxMRSAState, flux_mrsa_installed, select_layers
from .flux_controlnet import FluxControl, load_flux_controlnet, with_flux_controlnet
from .flux_loading import load_flux_pipeline
from .flux_model import DEFAULT_GUIDANCE, DEFAULT_MAX_SEQUENCE_LENGTH, DEFAULT_SIZE, DEFAULT_STEPS, FluxModel
from .flux_reference import FluxReferencePath, image_ids, pack, unpack
from .kv import ReferenceKV, ReferenceKVError

OUTPUT_TYPES = ("pil", "np", "latent")


def _refuse_negative_prompt(negative_prompt) -> None:
    if negative_prompt:
        raise ValueError(
            "negative_prompt: does not apply to a FLUX.1 model (FluxFreeCustomGenerator): FLUX.1 is "
            "guidance-distilled (no unconditional branch); leave it out"
        )


class FluxFreeCustomGenerator(FluxModel):
    """FreeCustom over a diffusers ``FluxPipeline``; the API of ``FreeCustomGenerator`` where FLUX allows it."""

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        id_or_folder: str,
        *,
        torch_dtype: torch.dtype | None = None,
        device=None,
        revision: str | None = None,
        controlnet: str | Sequence[str] | None = None,
        **kwargs,
    ) -> FluxFreeCustomGenerator:
        """Load a diffusers FLUX.1 checkpoint (hub id or local folder in the ``FLUX.1-dev`` layout), safetensors only.

        A single ``.safetensors`` file goes through ``FluxTransformer2DModel.from_single_file`` with the
        other components from ``kwargs["config"]`` (a hub id or folder of the diffusers layout).
        controlnet: a ``FluxControlNetModel`` hub id or folder, or a list of them
        (``FluxMultiControlNetModel``), loaded in ``torch_dtype``; ``generate`` then takes ``control_image``.
        """
        pipe = load_flux_pipeline(id_or_folder, torch_dtype=torch_dtype, revision=revision, **kwargs)
        if controlnet is not None:
            pipe = with_flux_controlnet(
                pipe, load_flux_controlnet(controlnet, torch_dtype=torch_dtype or torch.float32)
            )
        pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        name = str(id_or_folder) + (f"@{revision}" if revision else "")
        return cls(pipe, model_id=name, controlnet_id=controlnet)

    @classmethod
    def from_pipe(
        cls, pipe, *, model_id: str | None = None, controlnet_id: str | list[str] | None = None
    ) -> FluxFreeCustomGenerator:
        """Wrap an already loaded ``FluxPipeline`` or ``FluxControlNetPipeline`` (weights shared, not copied).
        controlnet_id: names for the metadata (default: each ControlNet's ``_name_or_path``)."""
        return cls(pipe, model_id=model_id, controlnet_id=controlnet_id)

    # ---- the reference path, once per concept set --------------------------------------------
    @torch.inference_mode()
    def prepare_references(
        self,
        concepts: Sequence[ConceptRef],
        *,
        num_inference_steps: int = DEFAULT_STEPS,
        height: int = DEFAULT_SIZE,
        width: int = DEFAULT_SIZE,
        guidance_scale: float = DEFAULT_GUIDANCE,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        reference_seed: int = 0,
        mrsa: MRSAConfig | None = None,
        reference_positions: str = "same",
        storage: str | torch.device = "cpu",
        pin_memory: bool | None = None,
        negative_prompt: str | None = None,
    ) -> ReferenceKV:
        """Run the reference path once and keep only what MRSA reads (in-mask image tokens of the selected layers).

        The K/V of all steps go to ``storage`` (host memory by default); ``generate`` copies one step at a
        time to the device. ``guidance_scale`` and ``max_sequence_length`` must be the generation's.
        pin_memory: page-lock host storage (None: when the model is on CUDA), as ``FreeCustomGenerator``.
        negative_prompt: refused when given (``FreeCustomGenerator``'s keyword, which FLUX.1 has no use for).
        """
        _refuse_negative_prompt(negative_prompt)
        concepts = self._check_concepts(concepts)
        mrsa = mrsa or self.default_mrsa()
        self._check_call(
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            reference_positions=reference_positions,
            mrsa=mrsa,
        )
        layers = select_layers(self.transformer, mrsa)
        scheduler, timesteps = self._timesteps(num_inference_steps, height, width)
        h, w = self.latent_hw(height, width)
        state = FluxMRSAState(mrsa, layers, (h // 2) * (w // 2))
        active = [i for i in range(len(timesteps)) if mrsa.is_active(i)]
        storage = torch.device(storage)
        pin = storage.type == "cpu" and self.device.type == "cuda" and pin_memory is not False
        buffers: dict[str, dict[str, torch.Tensor]] = {"k": {}, "v": {}}  # attr -> layer -> (S, heads, Lr, d)
        bias: dict[str, torch.Tensor] = {}
        with flux_mrsa_installed(self.transformer, state):
            ref = FluxReferencePath(
                self,
                concepts,
                height=height,
                width=width,
                scheduler=scheduler,
                reference_seed=reference_seed,
                mrsa=mrsa,
                guidance_scale=guidance_scale,
                max_sequence_length=max_sequence_length,
                reference_positions=reference_positions,
                state=state,
            )
            # the loop's scheduler step on a placeholder: scale_noise then reads the step index the loop has
            placeholder = torch.zeros(
                (1, state.image_tokens, 4 * self.pipe.vae.config.latent_channels),
                device=self.device,
                dtype=self.dtype,
            )
            for i, t in enumerate(timesteps):
                kv = ref.step(i, t)
                scheduler.step(torch.zeros_like(placeholder), t, placeholder, return_dict=False)
                if kv is None:
                    continue
                pos = active.index(i)
                for name in layers:
                    for attr in ("k", "v"):
                        x = getattr(kv[name], attr)
                        if name not in buffers[attr]:
                            buffers[attr][name] = torch.empty(
                                (len(active), *x.shape), dtype=x.dtype, device=storage, pin_memory=pin
                            )
                        buffers[attr][name][pos].copy_(x)
                    bias.setdefault(name, kv[name].bias.to(storage))
        meta = self.kv_identity(
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
            reference_positions=reference_positions,
        )
        meta.update(
            model_id=self.model_id,
            reference_seed=int(reference_seed),
            mrsa=mrsa.to_dict(),
            layers=list(layers),
            negative_prompt=None,
            concepts=[
                {
                    "prompt": c.prompt,
                    "weight": c.weight,
                    "image_digest": c.image_digest(),
                    "mask_digest": c.mask_digest(),
                }
                for c in concepts
            ],
            tokens={name: ref.counts for name in layers},
            dense_nbytes=sum(ref.dense_bytes_per_step.values()) * len(active),
        )
        return ReferenceKV(meta=meta, steps=tuple(active), k=buffers["k"], v=buffers["v"], bias=bias)

    # ---- the synthesis path --------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: str | Sequence[str],
        seeds: int | Sequence[int],
        references: ReferenceKV | Sequence[ConceptRef] | None = None,
        *,
        num_inference_steps: int = DEFAULT_STEPS,
        height: int = DEFAULT_SIZE,
        width: int = DEFAULT_SIZE,
        guidance_scale: float = DEFAULT_GUIDANCE,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        negative_prompt: str | None = None,
        output_type: str = "pil",
        batch_size: int | None = None,
        reference_seed: int | None = None,
        mrsa: MRSAConfig | None = None,
        reference_positions: str | None = None,
        control_image=None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        control_references: bool = False,
    ):
        """Generate one image per (prompt, seed), batched through the transformer.

        references: None (plain FLUX, identical to ``FluxPipeline`` with one CPU generator per seed), a
            ReferenceKV (cached path: ``mrsa``, ``reference_seed`` and ``reference_positions`` may be left
            out; given, they must be the K/V's), or a list of ConceptRef (inline path: ``reference_seed``
            None is 0, ``mrsa`` None is ``default_mrsa()``, ``reference_positions`` None is "same").
        Target i starts from ``randn((1, C, h, w), generator=Generator("cpu").manual_seed(seeds[i]))`` in the
        model's dtype (``FluxPipeline``'s ``randn_tensor``), so its image does not depend on its batch.
        Returns a list of PIL images, an (n, H, W, 3) float array, or an (n, C, h, w) latent tensor (unpacked).

        control_image (with a FLUX ControlNet): one PIL image for every prompt or one per prompt; with
            several ControlNets a list of such entries, one per ControlNet. ``controlnet_conditioning_scale``,
            ``control_guidance_start`` / ``_end`` (fractions of the schedule) as in ``FluxControlNetPipeline``,
            one value or one per ControlNet. With references=None the images are ``FluxControlNetPipeline``'s
            for the same seeds (its VAE sample of the control image is drawn from the target's generator
            before the initial latent, here too). The references skip ControlNet; ``control_references=True``
            is refused on FLUX (see ``flux_controlnet``).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        if len(prompts) == 1 and len(seeds) > 1:
            prompts = prompts * len(seeds)
        if not seeds or len(prompts) != len(seeds):
            raise ValueError(
                f"prompts ({len(prompts)}) and seeds ({len(seeds)}) must be non-empty and of equal length"
            )
        for s in seeds:
            if not isinstance(s, (int, np.integer)) or not 0 <= int(s) < 2**63:
                raise ValueError(f"seeds: {s!r} is not an integer in [0, 2**63)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: expected one of {OUTPUT_TYPES}")
        _refuse_negative_prompt(negative_prompt)
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale!r}: must be finite")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
        if control_references:
            raise ValueError(
                "control_references=True: not supported on FLUX. FluxControlNetPipeline encodes the control image "
                "as a VAE posterior sample drawn from each target's seed, so the references would need K/V per "
                "seed (no cache); they skip ControlNet instead (the default), and their K/V serve any control image"
            )
        control = self.control_input(
            control_image,
            len(prompts),
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end,
        )
        if isinstance(references, ReferenceKV):
            self._check_cached(references, mrsa, reference_seed, reference_positions)
            references.check_fits(
                self.kv_identity(
                    num_inference_steps=num_inference_steps,
                    height=height,
                    width=width,
                    guidance_scale=guidance_scale,
                    max_sequence_length=max_sequence_length,
                    reference_positions=references.meta["reference_positions"],
                )
            )
            mrsa, reference_positions = references.mrsa, references.meta["reference_positions"]
        elif references is not None:
            references = self._check_concepts(references)
            mrsa = mrsa or self.default_mrsa()
            reference_seed = 0 if reference_seed is None else int(reference_seed)
            reference_positions = reference_positions or "same"
        self._check_call(
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            reference_positions=reference_positions,
            mrsa=mrsa if references is not None else None,
        )
        call = dict(
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
            reference_seed=reference_seed,
            mrsa=mrsa,
            references=references,
            reference_positions=reference_positions,
        )
        batch_size = batch_size or min(len(prompts), 8)
        results = []
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            chunk_control = control.rows(chunk) if control is not None else None
            latents = self._denoise(prompts[chunk], seeds[chunk], control=chunk_control, **call)
            results.append(self._decode(unpack(latents, self.latent_hw(height, width)), output_type))
        if output_type == "latent":
            return torch.cat(results)
        if output_type == "np":
            return np.concatenate(results)
        return [image for chunk in results for image in chunk]

    @staticmethod
    def _check_cached(kv: ReferenceKV, mrsa, reference_seed, reference_positions) -> None:
        if mrsa is not None and mrsa != kv.mrsa:
            raise ReferenceKVError(
                f"mrsa={mrsa} differs from the one the reference K/V were computed with ({kv.mrsa})"
            )
        if reference_seed is not None and int(reference_seed) != kv.reference_seed:
            raise ReferenceKVError(
                f"reference_seed={reference_seed} differs from the one the reference K/V were computed with "
                f"({kv.reference_seed})"
            )
        cached = kv.meta.get("reference_positions")
        if reference_positions is not None and reference_positions != cached:
            raise ReferenceKVError(
                f"reference_positions={reference_positions!r} differs from the K/V's ({cached!r})"
            )

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type)

    def _denoise(
        self,
        prompts,
        seeds,
        *,
        num_inference_steps,
        height,
        width,
        guidance_scale,
        max_sequence_length,
        reference_seed,
        mrsa,
        references,
        reference_positions,
        control: ControlInput | None = None,
    ) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        device, dtype = self.device, self.dtype
        # 1. prompts
        # (B, T, D), (B, P), (T, 3)
        embeds, pooled, text_ids = self.encode_prompts(prompts, max_sequence_length)
        # 2. initial latents, one CPU generator per target (FluxPipeline.prepare_latents with a generator list)
        h, w = self.latent_hw(height, width)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        controlnet = None
        if control is not None:  # 2a. control conditions first: their VAE samples advance the generators
            controlnet = FluxControl(control)
            controlnet.prepare(range(len(seeds)), generators, height, width)
        channels = self.transformer.config.in_channels // 4
        latents = pack(
            randn_tensor((len(seeds), channels, h, w), generator=generators, device=device, dtype=dtype)
        )
        img_ids = image_ids((h // 2, w // 2), device=device, dtype=text_ids.dtype)
        # 3. timesteps (a private scheduler copy) and embedded guidance
        scheduler, timesteps = self._timesteps(num_inference_steps, height, width)
        guidance = self.guidance_tensor(guidance_scale, len(seeds))
        # 4. MRSA state, processors installed for this call only
        layers = select_layers(self.transformer, mrsa) if references is not None else ()
        state = FluxMRSAState(mrsa or MRSAConfig(), layers, (h // 2) * (w // 2))
        inline = None
        if references is not None and not isinstance(references, ReferenceKV):
            inline = FluxReferencePath(
                self,
                references,
                height=height,
                width=width,
                scheduler=scheduler,
                reference_seed=reference_seed,
                mrsa=mrsa,
                guidance_scale=guidance_scale,
                max_sequence_length=max_sequence_length,
                reference_positions=reference_positions,
                state=state,
            )
        with flux_mrsa_installed(self.transformer, state):
            # 5. denoising loop
            for i, t in enumerate(timesteps):
                if inline is not None:
                    layer_kv = inline.step(i, t)
                elif references is not None:
                    # one step's K/V copied to the device (asynchronously from pinned memory)
                    layer_kv = references.at_step(i, device, dtype, non_blocking=True)
                else:
                    layer_kv = None
                state.kv, state.mode = layer_kv or {}, "mrsa" if layer_kv else "off"
                timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
                residuals = {}
                if controlnet is not None:  # the targets' ControlNet residuals; the references have none
                    residuals = controlnet.residuals(
                        i,
                        len(timesteps),
                        latents,
                        timestep,
                        guidance_scale,
                        (embeds, pooled, text_ids),
                        img_ids,
                    )
                noise_pred = self.transformer(
                    hidden_states=latents,
                    timestep=timestep,
                    guidance=guidance,
                    pooled_projections=pooled,
                    encoder_hidden_states=embeds,
                    txt_ids=text_ids,
                    img_ids=img_ids,
                    return_dict=False,
                    **residuals,
                )[0]
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            state.mode, state.kv = "off", {}
        return latents
