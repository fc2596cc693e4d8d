"""FreeCustomGenerator: Stable Diffusion with multi-reference self-attention, references cached per concept set.

The two halves of FreeCustom:
  reference path  z'_0 = E(I_i) (posterior mean x scaling); each step z'_t = add_noise(z'_0, eps_t, t)
                  runs through the UNet with the concept prompts; self-attention K/V are captured at
                  the selected layers (and the pass stops there). Nothing in it depends on the
                  generated image, so ``prepare_references`` runs it once per concept set.
  synthesis path  the normal denoising loop, with MRSA at the selected layers using those K/V.

Three modules, one class: ``generator_model.GeneratorModel`` (the loaded pipeline, its identities, the
encoders and checks), ``generator_references.ReferencePreparation`` (the reference path) and here
``FreeCustomGenerator`` (loading a checkpoint of any family, and the synthesis path).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from .attention import MRSAState, mrsa_installed
from .attention_maps import AttentionMaps
from .concept import ConceptRef
from .config import DEFAULT_NEGATIVE_PROMPT, MRSAConfig
from .controlnet import ControlInput, load_controlnet, with_controlnet
from .families import LABELS, checkpoint_family, generator_class, load_refusals
from .generator_references import ReferencePreparation
from .kv import ReferenceKV, ReferenceKVError
from .layers import select_layers
from .loading import load_pipeline
from .reference import ReferencePath
from .schedulers import check_exact, step_params
from .sdxl import is_sdxl_checkpoint, load_sdxl_pipeline

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "latent")


class FreeCustomGenerator(ReferencePreparation):
    """FreeCustom over a diffusers Stable Diffusion 1.5 or SDXL pipeline, optionally with ControlNet(s):
    the release's DDIM by default, or any scheduler of ``schedulers.EXACT_SCHEDULERS``."""

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        id_or_folder: str,
        *,
        torch_dtype: torch.dtype | None = None,
        device=None,
        scheduler=None,
        revision: str | None = None,
        channels_last: bool = False,
        compile: bool | dict = False,
        controlnet: str | Sequence[str] | None = None,
        **kwargs,
    ) -> FreeCustomGenerator:
        """Load a checkpoint of any family (hub id, local folder or single file), safetensors only, and
        return the generator of its family, as ``run --model`` reads it (``families.checkpoint_family``):

            gen = FreeCustomGenerator.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
            blip = FreeCustomGenerator.from_pretrained("Salesforce/blipdiffusion")  # a BlipDiffusionFreeCustom

        SD1.x/2.x and SDXL: this class; BLIP-Diffusion: ``BlipDiffusionFreeCustom`` (its ``generate`` also
        takes the subject); FLUX.1: ``FluxFreeCustomGenerator``. Each family class's own ``from_pretrained``
        loads that family only; so does this one called on a subclass. A loading option the checkpoint's
        family does not take is refused naming the family and the option (``ValueError``).

        Stable Diffusion 1.5 or SDXL checkpoints (hub id or local folder), safetensors only:

        A single ``.safetensors`` file in the original layout is read offline with ``config=`` a local
        diffusers config folder of its family (default: SD1.5's, shipped; an SDXL file needs one).
        SDXL is recognised by ``model_index.json`` (``StableDiffusionXLPipeline``; a single file's: its
        ``config`` folder's); its default size is 1024² and its default MRSA layers ``layers.default_blocks`` (3, 4).
        controlnet: a ControlNet hub id or folder, or a list of them (``MultiControlNetModel``), loaded
        in ``torch_dtype``; ``generate`` then takes ``control_image``.

        scheduler: None or ``"release"`` (default) is the authors' release: ``DDIMScheduler(beta_start=0.00085,
        beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)`` as the
        release's ``StableDiffusionPipeline`` leaves it (steps_offset 1: timesteps 981 ... 1 at 50 steps;
        ``schedulers.RELEASE_DDIM``), eta 0, with the checkpoint's ``prediction_type``; a spec ``"NAME"`` or
        ``"NAME:key=value,..."`` builds a diffusers scheduler from the checkpoint's scheduler config
        with those overrides (``schedulers.build_scheduler``); a scheduler instance is used as is.
        Schedulers with which cached K/V cannot be exact are refused (``UnsupportedSchedulerError``).
        channels_last: see ``enable_channels_last``. compile: True or ``nn.Module.compile`` keyword
        arguments, see ``enable_compile``.
        """
        if cls is FreeCustomGenerator:  # the one entry point: the family's class (a subclass loads as itself)
            family = cls._family_of(
                id_or_folder,
                revision,
                scheduler=scheduler,
                channels_last=channels_last,
                compile=compile,
                controlnet=controlnet,
                config=kwargs.get("config"),
            )
            if family == "blip":
                return generator_class(family).from_pretrained(
                    id_or_folder,
                    torch_dtype=torch_dtype,
                    device=device,
                    scheduler=scheduler,
                    revision=revision,
                    **kwargs,
                )
            if family == "flux":
                return generator_class(family).from_pretrained(
                    id_or_folder,
                    torch_dtype=torch_dtype,
                    device=device,
                    revision=revision,
                    controlnet=controlnet,
                    **kwargs,
                )
        sdxl = is_sdxl_checkpoint(str(id_or_folder), revision=revision, config=kwargs.get("config"))
        load = load_sdxl_pipeline if sdxl else load_pipeline
        pipe = load(id_or_folder, torch_dtype=torch_dtype, scheduler=scheduler, revision=revision, **kwargs)
        if controlnet is not None:
            pipe = with_controlnet(
                pipe, load_controlnet(controlnet, torch_dtype=torch_dtype or torch.float32)
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe.to(device)
        name = str(id_or_folder) + (f"@{revision}" if revision else "")
        gen = cls(pipe, model_id=name, controlnet_id=None if controlnet is None else controlnet)
        if channels_last:
            gen.enable_channels_last()
        if compile:
            gen.enable_compile(**({} if compile is True else dict(compile)))
        return gen

    @staticmethod
    def _family_of(id_or_folder, revision, **options) -> str:
        """The checkpoint's family; ``ValueError`` naming it and each loading option it does not take."""
        family, class_name = checkpoint_family(
            os.fspath(id_or_folder), options.get("config"), revision=revision
        )
        refused = load_refusals(family, **options)
        if refused:
            raise ValueError(
                f"model={os.fspath(id_or_folder)!r} is a {LABELS[family]} checkpoint ({class_name}): "
                + "; ".join(
                    f"{option}={options[option]!r} does not apply ({reason})" for option, reason in refused
                )
            )
        return family

    @classmethod
    def from_pipe(
        cls, pipe, *, model_id: str | None = None, controlnet_id: str | list[str] | None = None
    ) -> FreeCustomGenerator:
        """Wrap an already loaded ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or their
        ControlNet pipelines (weights shared, not copied). controlnet_id: names for the metadata (default:
        each ControlNet's ``_name_or_path``)."""
        return cls(pipe, model_id=model_id, controlnet_id=controlnet_id)

    # ---- the synthesis path --------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: str | Sequence[str],
        seeds: int | Sequence[int],
        references: ReferenceKV | Sequence[ConceptRef] | None = None,
        *,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        output_type: str = "pil",
        batch_size: int | None = None,
        reference_seed: int | None = None,
        mrsa: MRSAConfig | None = None,
        control_image=None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        control_references: bool = False,
        attention_maps: bool = False,
    ):
        """Generate one image per (prompt, seed), batched through the UNet.

        height, width: None is the model's size (512 SD1.5, 1024 SDXL).
        control_image (with a ControlNet): one PIL image for every prompt or one per prompt; with several
            ControlNets a list of such entries, one per ControlNet. ``controlnet_conditioning_scale``,
            ``control_guidance_start`` / ``_end`` (fractions of the schedule) as in diffusers, one value or
            one per ControlNet. The references skip ControlNet unless ``control_references=True`` (the
            release): then they get the residuals of the (single) control image too, and cached K/V must
            have been prepared with that control image (``prepare_references(control_image=...)``).

        references: None (plain Stable Diffusion), a ReferenceKV (cached path), or a list of
            ConceptRef (inline path: the reference path runs inside the loop once per step for the
            whole batch; uses ``reference_seed`` (None: 0) and ``mrsa``). Cached and inline agree.
            With a ReferenceKV, ``mrsa``, ``reference_seed`` and ``negative_prompt`` (when the K/V
            hold an unconditional branch) may be left out; given, they must be the K/V's. A cached
            ReferenceKV stays where it is (host memory by default) and each step's K/V are copied
            to the device as the step starts; on CUDA, ``kv.pin_memory()`` once makes those copies
            asynchronous (``prepare_references`` on a CUDA model already returns pinned K/V).
        Target i starts from ``randn((1, C, h, w), generator=Generator("cpu").manual_seed(seeds[i]))``,
        so its image does not depend on which other targets share its batch.
        Returns a list of PIL images, an (n, H, W, 3) float array, or an (n, C, h, w) latent tensor.

        attention_maps: also return, per target and concept, the attention mass the target's queries
            give that concept's reference tokens (conditional branch, mean over heads, MRSA layers and
            active steps; see ``attention_maps``): the call then returns ``(images, maps)`` with maps a
            float32 CPU tensor (n, N concepts, H/8, W/8) in [0, 1]. Needs references. Costs one extra
            attention-weight computation per MRSA layer call; without it nothing changes.
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
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale!r}: must be finite")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
        if attention_maps and references is None:
            raise ValueError(
                "attention_maps=True: needs references (plain Stable Diffusion has no MRSA to map)"
            )
        height, width = height or self.default_size, width or self.default_size
        self._check_call(height=height, width=width, num_inference_steps=num_inference_steps)
        control = self.control_input(
            control_image,
            len(prompts),
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end,
        )
        control_refs = self._check_control_references(control, control_references, references)

        if references is not None:
            check_exact(self.pipe.scheduler)
        if isinstance(references, ReferenceKV):
            references.check_fits(
                self.kv_identity(
                    num_inference_steps=num_inference_steps,
                    height=height,
                    width=width,
                    control=control_refs.identity() if control_refs is not None else None,
                )
            )
            if mrsa is not None and mrsa != references.mrsa:
                raise ReferenceKVError(
                    f"mrsa={mrsa} differs from the one the reference K/V were computed with ({references.mrsa})"
                )
            if reference_seed is not None and int(reference_seed) != references.reference_seed:
                raise ReferenceKVError(
                    f"reference_seed={reference_seed} differs from the one the reference K/V were computed with "
                    f"({references.reference_seed})"
                )
            if references.meta.get("negative_prompt") not in (None, negative_prompt):
                raise ReferenceKVError(
                    "negative_prompt differs from the one the unconditional reference K/V used"
                )
            mrsa = references.mrsa  # not moved as a whole: _denoise copies one step at a time to the device
        elif references is not None:
            references = self._check_concepts(references)
            mrsa = mrsa or self.default_mrsa()
            reference_seed = 0 if reference_seed is None else int(reference_seed)

        call = dict(
            control_refs=control_refs,
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            reference_seed=reference_seed,
            mrsa=mrsa,
            references=references,
        )
        batch_size = batch_size or self._auto_batch_size(len(prompts), height, width, guidance_scale > 1.0)
        results, maps = [], [] if attention_maps else None
        rows = list(range(len(prompts)))
        for start in range(0, len(prompts), batch_size):
            chunk = rows[start : start + batch_size]
            results.extend(self._run_with_oom_split(prompts, seeds, chunk, control, output_type, call, maps))
        if output_type == "latent":
            results = torch.cat(results)
        elif output_type == "np":
            results = np.concatenate(results)
        return results if maps is None else (results, torch.cat(maps))

    def _auto_batch_size(self, n: int, height: int, width: int, cfg: bool) -> int:
        """Targets per UNet batch: from free memory on CUDA (estimate; OOM still splits), else 8."""
        if self.device.type != "cuda":
            return min(n, 8)
        free, _ = torch.cuda.mem_get_info(self.device)
        per_target = (
            1.0e9
            * (height * width)
            / (512 * 512)
            * (torch.finfo(self.dtype).bits / 16)
            * (2 if cfg else 1)
            / 2
        )
        return max(1, min(n, 32, int(0.6 * free // per_target)))

    def _check_control_references(self, control, control_references: bool, references) -> ControlInput | None:
        """The references' control input (one target's, repeated) with ``control_references``, else None."""
        if not control_references:
            return None
        if control is None:
            raise ValueError("control_references=True: needs a control_image (and a ControlNet)")
        if references is None:
            raise ValueError("control_references=True: needs references (None renders plain ControlNet)")
        return control.repeated(1)

    def _run_with_oom_split(
        self, prompts, seeds, rows: list[int], control, output_type, call, maps=None
    ) -> list:
        """Targets ``rows`` of the call in one batch; halved on CUDA out-of-memory. With ``maps`` (a
        list), the batch's attention maps (B, N, h, w) are appended to it."""
        try:
            f = self.vae_scale_factor
            collector = (
                AttentionMaps(len(rows), (call["height"] // f, call["width"] // f))
                if maps is not None
                else None
            )
            latents = self._denoise(
                [prompts[i] for i in rows],
                [seeds[i] for i in rows],
                control=control.rows(rows) if control is not None else None,
                **call,
                **({"maps": collector} if collector is not None else {}),
            )
            decoded = self._decode(latents, output_type)
            if collector is not None:
                maps.append(collector.result())
            return decoded
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(rows) // 2
            logger.warning(
                "out of memory with a batch of %d targets; retrying as %d + %d",
                len(rows),
                half,
                len(rows) - half,
            )
            return self._run_with_oom_split(
                prompts, seeds, rows[:half], control, output_type, call, maps
            ) + self._run_with_oom_split(prompts, seeds, rows[half:], control, output_type, call, maps)

    def _decode(self, latents: torch.Tensor, output_type: str) -> list:
        if output_type == "latent":
            return [latents]
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        image = self.pipe.image_processor.postprocess(
            image, output_type=output_type, do_denormalize=[True] * len(image)
        )
        return [image] if output_type == "np" else list(image)

    def _denoise(
        self,
        prompts,
        seeds,
        *,
        num_inference_steps,
        height,
        width,
        guidance_scale,
        negative_prompt,
        reference_seed,
        mrsa,
        references,
        control,
        control_refs,
        maps: AttentionMaps | None = None,
    ) -> torch.Tensor:
        device, dtype = self.device, self.dtype
        cfg = guidance_scale > 1.0
        branches = 2 if cfg else 1
        # 1. prompts
        text = self.encode_targets(
            prompts, negative_prompt, cfg=cfg, height=height, width=width
        )  # (2B or B, T, D)
        # 2. timesteps (a private scheduler copy: the pipeline's own is never mutated)
        scheduler, timesteps = self._timesteps(num_inference_steps)
        # 3. initial latents, one CPU generator per target (the determinism contract)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        shape = (
            1,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)
        latents = latents * scheduler.init_noise_sigma
        params = step_params(scheduler)
        extra = {k: v for k, v in (("eta", 0.0), ("generator", generators)) if k in params}
        # 4. MRSA state, processors installed for this call only
        layers = select_layers(self.unet, mrsa) if references is not None else ()
        state = MRSAState(mrsa or MRSAConfig(), layers)
        state.cfg = cfg
        installed = mrsa_installed(self.unet, state) if references is not None else contextlib.nullcontext()
        with installed:
            inline = None
            if references is not None and not isinstance(references, ReferenceKV):
                self._check_mrsa_steps(mrsa, len(timesteps))
                inline = ReferencePath(
                    self,
                    references,
                    height=height,
                    width=width,
                    scheduler=scheduler,
                    reference_seed=reference_seed,
                    mrsa=mrsa,
                    negative_prompt=negative_prompt,
                    with_uncond=cfg and mrsa.needs_uncond_references,
                    state=state,
                    control=control_refs,
                )
            if maps is not None:  # 4b. attention maps, only when asked for (see attention_maps)
                maps.tokens = inline.tokens if inline is not None else references.meta["tokens"]
                maps.mask_mode = mrsa.mask_mode
                state.maps = maps
            # 5. denoising loop
            for i, t in enumerate(timesteps):
                if inline is not None:
                    layer_kv = inline.step(i, t)
                elif references is not None:
                    # one step's K/V copied to the device (asynchronously from pinned host memory, ordered
                    # before this step's kernels on the same stream); the device never holds every step
                    layer_kv = references.at_step(i, device, dtype, non_blocking=True)
                else:
                    layer_kv = None
                state.kv = layer_kv or {}
                state.mode = "mrsa" if layer_kv else "off"
                x = torch.cat([latents] * 2) if cfg else latents
                x = scheduler.scale_model_input(x, t)
                residuals = {}
                if control is not None:
                    residuals = control.residuals(i, len(timesteps), x, t, text, branches=branches)
                noise_pred = self.unet(x, t, **text.unet_kwargs(), **residuals, return_dict=False)[0]
                if cfg:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            state.mode, state.kv = "off", {}
        return latents
