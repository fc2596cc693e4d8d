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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .concept import ConceptRef, check_concepts
from .config import MRSAConfig
from .controlnet import ControlInput, ControlNetCalls, controlnet_names
from .flux_attention import FluxMRSAState, default_mrsa, flux_mrsa_installed, select_layers
from .flux_controlnet import FluxControl, check_flux_controlnet, load_flux_controlnet, with_flux_controlnet
from .flux_loading import check_flux_scheduler, flux_fingerprint, flux_timesteps, load_flux_pipeline
from .flux_reference import REFERENCE_POSITIONS, FluxReferencePath, image_ids, pack, unpack
from .kv import ReferenceKV, ReferenceKVError
from .schedulers import scheduler_identity
from .topology import FLUX_GUIDANCE, FLUX_MAX_SEQUENCE_LENGTH, FLUX_SIZE, FLUX_STEPS

OUTPUT_TYPES = ("pil", "np", "latent")
# FluxPipeline's defaults (FLUX.1 [dev]): 1024x1024, 28 steps, embedded guidance 3.5, T5 length 512
DEFAULT_STEPS, DEFAULT_SIZE, DEFAULT_GUIDANCE, DEFAULT_MAX_SEQUENCE_LENGTH = (
    FLUX_STEPS,
    FLUX_SIZE,
    FLUX_GUIDANCE,
    FLUX_MAX_SEQUENCE_LENGTH,
)


def _refuse_negative_prompt(negative_prompt) -> None:
    if negative_prompt:
        raise ValueError(
            "negative_prompt: does not apply to a FLUX.1 model (FluxFreeCustomGenerator): FLUX.1 is "
            "guidance-distilled (no unconditional branch); leave it out"
        )


class FluxFreeCustomGenerator(ControlNetCalls):
    """FreeCustom over a diffusers ``FluxPipeline``; the API of ``FreeCustomGenerator`` where FLUX allows it."""

    family = "flux"

    def __init__(self, pipe, *, model_id: str | None = None, controlnet_id: str | list[str] | None = None):
        check_flux_scheduler(pipe.scheduler)
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        self.model_id = model_id or str(
            getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "")
        )
        if getattr(pipe, "controlnet", None) is not None:
            check_flux_controlnet(pipe.controlnet)
        self.controlnet_ids = controlnet_names(pipe, controlnet_id)

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

    # ---- properties ---------------------------------------------------------------------------
    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    @property
    def memory_format(self) -> str:
        """Always "contiguous" (no channels-last option on FLUX); for sample metadata, as on SD."""
        return "contiguous"

    @property
    def compiled(self) -> bool:
        return False

    @property
    def model_fingerprint(self) -> str:
        return flux_fingerprint(self.pipe)

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def scheduler_identity(self) -> dict:
        """See ``schedulers.scheduler_identity``."""
        return scheduler_identity(self.pipe.scheduler)

    def kv_identity(
        self,
        *,
        num_inference_steps: int,
        height: int,
        width: int,
        guidance_scale: float,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        reference_positions: str = "same",
    ) -> dict:
        """What reference K/V depend on besides the concepts: checked on every cached use.

        The references run with the generation's embedded guidance, so on FLUX.1 [dev] it is part of
        the identity; [schnell] has no guidance input (recorded as None).
        """
        return {
            "model": self.model_fingerprint,
            "family": "flux",
            "dtype": str(self.dtype).removeprefix("torch."),
            "scheduler": self.scheduler_identity(),
            "num_inference_steps": int(num_inference_steps),
            "height": int(height),
            "width": int(width),
            "guidance_scale": float(guidance_scale) if self.guidance_embeds else None,
            "max_sequence_length": int(max_sequence_length),
            "reference_positions": reference_positions,
        }

    def layer_names(self, mrsa: MRSAConfig | None = None) -> tuple[str, ...]:
        return select_layers(self.transformer, mrsa or self.default_mrsa())

    def default_mrsa(self, **overrides) -> MRSAConfig:
        """FreeCus's vital layers (``flux_attention.default_blocks``) with the paper's other defaults."""
        return default_mrsa(self.transformer, **overrides)

    # ---- building blocks ----------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], max_sequence_length: int):
        """(T5 embeddings (B, T, D), pooled CLIP (B, P), text ids (T, 3)): FluxPipeline's own encode_prompt."""
        return self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=max_sequence_length
        )

    def encode_images(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
        """(VAE posterior mean - shift_factor) x scaling_factor of images resized (Lanczos): (N, C, h, w)."""
        vae = self.pipe.vae
        latents = []
        for image in images:  # one at a time: a peak of one image's activations
            image = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
            latents.append(vae.encode(x.to(self.device, vae.dtype)).latent_dist.mean)
        z = torch.cat(latents)
        return ((z - vae.config.shift_factor) * vae.config.scaling_factor).to(self.dtype)

    def guidance_tensor(self, guidance_scale: float, batch: int) -> torch.Tensor | None:
        if not self.guidance_embeds:
            return None
        return torch.full([1], guidance_scale, device=self.device, dtype=torch.float32).expand(batch)

    def _timesteps(self, num_inference_steps: int, height: int, width: int):
        h, w = self.latent_hw(height, width)
        return flux_timesteps(self.pipe.scheduler, num_inference_steps, (h // 2) * (w // 2), self.device)

    # ---- checks -----------------------------------------------------------------------------
    def _check_call(self, *, height, width, num_inference_steps, reference_positions=None, mrsa=None) -> None:
        f = self.vae_scale_factor * 2  # 8x VAE, then 2x2 patches
        if not (isinstance(height, int) and isinstance(width, int)) or height <= 0 or width <= 0:
            raise ValueError(f"height={height!r}, width={width!r}: must be positive integers")
        if height % f or width % f:
            raise ValueError(f"height={height}, width={width}: both must be multiples of {f} on FLUX")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: must be an integer >= 1")
        if reference_positions is not None and reference_positions not in REFERENCE_POSITIONS:
            raise ValueError(
                f"reference_positions={reference_positions!r}: expected one of {REFERENCE_POSITIONS}"
            )
        if mrsa is not None:
            if mrsa.style_fidelity < 1.0:
                raise ValueError(
                    f"MRSAConfig.style_fidelity={mrsa.style_fidelity}: FLUX.1 is guidance-distilled and has no "
                    "unconditional branch for style_fidelity to blend on; leave it at 1"
                )
            if mrsa.mask_mode != "bias":
                raise ValueError(f"MRSAConfig.mask_mode={mrsa.mask_mode!r}: FLUX supports 'bias' only")
            if mrsa.start_step >= num_inference_steps:
                raise ValueError(
                    f"MRSAConfig.start_step={mrsa.start_step}: the schedule has only {num_inference_steps} steps"
                )

    @staticmethod
    def _check_concepts(concepts) -> list[ConceptRef]:
        return check_concepts(concepts, plain="FLUX")

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
