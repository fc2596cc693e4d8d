"""FreeCustomGenerator: Stable Diffusion with multi-reference self-attention, references cached per concept set.

The two halves of FreeCustom:
  reference path  z'_0 = E(I_i) (posterior mean x scaling); each step z'_t = add_noise(z'_0, eps_t, t)
                  runs through the UNet with the concept prompts; self-attention K/V are captured at
                  the selected layers (and the pass stops there). Nothing in it depends on the
                  generated image, so ``prepare_references`` runs it once per concept set.
  synthesis path  the normal denoising loop, with MRSA at the selected layers using those K/V.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .attention import MRSAState, install_persistent, mrsa_installed
from .attention_maps import AttentionMaps
from .concept import ConceptRef, check_concepts
from .conditioning import TextCond, encode_text, is_sdxl
from .config import DEFAULT_NEGATIVE_PROMPT, MRSAConfig
from .controlnet import ControlInput, ControlNetCalls, controlnet_names, load_controlnet, with_controlnet
from .families import LABELS, checkpoint_family, generator_class, load_refusals
from .kv import ReferenceKV, ReferenceKVError
from .layers import default_blocks, select_layers
from .loading import load_pipeline
from .reference import ReferencePath
from .schedulers import check_exact, scheduler_identity, step_params, step_without_target
from .sdxl import is_sdxl_checkpoint, load_sdxl_pipeline
from .weights import weights_fingerprint

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "latent")


class FreeCustomGenerator(ControlNetCalls):
    """FreeCustom over a diffusers Stable Diffusion 1.5 or SDXL pipeline, optionally with ControlNet(s):
    the release's DDIM by default, or any scheduler of ``schedulers.EXACT_SCHEDULERS``."""

    def __init__(self, pipe, *, model_id: str | None = None, controlnet_id: str | list[str] | None = None):
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        self.model_id = model_id or str(
            getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "")
        )
        self.controlnet_ids = controlnet_names(pipe, controlnet_id)

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

    def enable_compile(self, **compile_kwargs) -> None:
        """``torch.compile`` the UNet (``compile_kwargs`` go to ``nn.Module.compile``, e.g. ``mode="max-autotune"``).

        MRSA processors are installed once on every self-attention layer (plain attention outside a
        FreeCustom call) so that calls never swap modules under the compiled graph. The reference
        pass stays eager, so cached K/V are the same as without compiling; the denoising loop runs
        compiled kernels, whose fusions round differently: images equal the eager ones within
        float rounding, not bit for bit (recorded in sample metadata as ``compiled``). The first
        calls compile (minutes for SD1.5 on a GPU); a new reference-token count recompiles once and
        then stays dynamic.
        """
        if self.compiled:
            return
        install_persistent(self.pipe.unet)
        self.pipe.unet.compile(**compile_kwargs)
        self._compiled = True

    @property
    def compiled(self) -> bool:
        return getattr(self, "_compiled", False)

    def enable_channels_last(self) -> None:
        """UNet and VAE weights in channels-last memory format (faster convolutions on recent GPUs).

        The same arithmetic through other convolution kernels: images equal the default layout's to
        within floating-point rounding, not bit for bit. Recorded in ``kv_identity`` (cached K/V
        are reused only under the same layout) and so in every sample's metadata.
        """
        self.pipe.unet.to(memory_format=torch.channels_last)
        self.pipe.vae.to(memory_format=torch.channels_last)

    @classmethod
    def from_pipe(
        cls, pipe, *, model_id: str | None = None, controlnet_id: str | list[str] | None = None
    ) -> FreeCustomGenerator:
        """Wrap an already loaded ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or their
        ControlNet pipelines (weights shared, not copied). controlnet_id: names for the metadata (default:
        each ControlNet's ``_name_or_path``)."""
        return cls(pipe, model_id=model_id, controlnet_id=controlnet_id)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def unet(self):
        return self.pipe.unet

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def memory_format(self) -> str:
        """ "channels_last" or "contiguous": the UNet's convolution weight layout."""
        w = self.pipe.unet.conv_in.weight
        return (
            "channels_last"
            if not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
            else "contiguous"
        )

    @property
    def is_sdxl(self) -> bool:
        return is_sdxl(self.pipe)

    @property
    def family(self) -> str:
        """The model family: ``"sdxl"`` or ``"sd"`` (SD1.x/2.x); subclasses name theirs (``"blip"``)."""
        return "sdxl" if self.is_sdxl else "sd"

    @property
    def default_size(self) -> int:
        """The UNet's trained size: 512 for SD1.5, 1024 for SDXL (``sample_size`` x the VAE factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def default_mrsa(self) -> MRSAConfig:
        """The paper's defaults, with this topology's default blocks (SD1.5: (5, 6); SDXL: (3, 4))."""
        return MRSAConfig(blocks=default_blocks(self.unet))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def model_fingerprint(self) -> str:
        """Identity of the weights as they are now (LoRA adapters and their scales included), see ``weights``."""
        return weights_fingerprint(self.pipe)

    def scheduler_identity(self) -> dict:
        """See ``schedulers.scheduler_identity``."""
        return scheduler_identity(self.pipe.scheduler)

    def kv_identity(
        self, *, num_inference_steps: int, height: int, width: int, control: dict | None = None
    ) -> dict:
        """What reference K/V depend on besides the concepts: checked on every cached use.

        control: ``ControlInput.identity()`` when the references go through ControlNet
        (``control_references``): ControlNet, control image, scale and steps; absent otherwise.
        """
        identity = {
            "model": self.model_fingerprint,
            "dtype": str(self.dtype).removeprefix("torch."),
            "memory_format": self.memory_format,
            "scheduler": self.scheduler_identity(),
            "num_inference_steps": int(num_inference_steps),
            "height": int(height),
            "width": int(width),
        }
        if control is not None:
            identity["control"] = control
        return identity

    def layer_names(self, mrsa: MRSAConfig | None = None) -> tuple[str, ...]:
        return select_layers(self.unet, mrsa or self.default_mrsa())

    # ---- building blocks ----------------------------------------------------------------------
    def encode_prompts(
        self, prompts: list[str], negative_prompt: str | list[str], *, cfg: bool
    ) -> torch.Tensor:
        """Text embeddings, ``[negative..., prompts...]`` when ``cfg`` (diffusers' own encode_prompt)."""
        negatives = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        cond, uncond = self.pipe.encode_prompt(list(prompts), self.device, 1, cfg, negative_prompt=negatives)
        return torch.cat([uncond, cond]) if cfg else cond

    def encode_text(
        self, prompts: list[str], negative_prompt: str | list[str], *, cfg: bool, height: int, width: int
    ) -> TextCond:
        """The UNet's text conditioning, ``[negative..., prompts...]`` when ``cfg`` (SDXL: with pooled
        embeddings and ``add_time_ids``)."""
        negatives = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        return encode_text(
            self.pipe, list(prompts), negatives, cfg=cfg, height=height, width=width, device=self.device
        )

    def encode_targets(
        self, prompts: list[str], negative_prompt: str | list[str], *, cfg: bool, height: int, width: int
    ) -> TextCond:
        """The targets' conditioning in the denoising loop: ``encode_text``, unless a subclass conditions
        its targets differently from its references (BLIP-Diffusion's subject embedding)."""
        return self.encode_text(prompts, negative_prompt, cfg=cfg, height=height, width=width)

    def encode_images(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
        """VAE posterior mean x scaling factor of images resized (Lanczos) to ``height x width``: (N, C, h, w)."""
        arrays = []
        for image in images:
            image = image.convert("RGB") if image.mode != "RGB" else image
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.LANCZOS)
            arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, H, W)
        vae = self.pipe.vae
        # one image at a time: the same latents as one batch, a peak of one image's activations (not N)
        latents = torch.cat(
            [vae.encode(x[i : i + 1].to(self.device, vae.dtype)).latent_dist.mean for i in range(len(x))]
        )
        return (latents * vae.config.scaling_factor).to(self.dtype)

    def _timesteps(self, num_inference_steps: int):
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        scheduler = copy.deepcopy(self.pipe.scheduler)
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, self.device)
        return scheduler, timesteps

    # ---- checks -----------------------------------------------------------------------------
    def _check_call(self, *, height: int, width: int, num_inference_steps: int) -> None:
        f = self.vae_scale_factor
        if not (isinstance(height, int) and isinstance(width, int)) or height <= 0 or width <= 0:
            raise ValueError(f"height={height!r}, width={width!r}: must be positive integers")
        if height % f or width % f:
            raise ValueError(f"height={height}, width={width}: both must be multiples of {f}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: must be an integer >= 1")

    @staticmethod
    def _check_concepts(concepts) -> list[ConceptRef]:
        return check_concepts(concepts, plain="Stable Diffusion")

    def _check_mrsa_steps(self, mrsa: MRSAConfig, n_steps: int) -> None:
        if mrsa.start_step >= n_steps:
            raise ValueError(
                f"MRSAConfig.start_step={mrsa.start_step}: the schedule has only {n_steps} steps, MRSA would never run"
            )

    # ---- the reference path, once per concept set --------------------------------------------
    @torch.inference_mode()
    def prepare_references(
        self,
        concepts: Sequence[ConceptRef],
        *,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        reference_seed: int = 0,
        mrsa: MRSAConfig | None = None,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        storage: str | torch.device = "cpu",
        pin_memory: bool | None = None,
        control_image=None,
        controlnet_conditioning_scale=1.0,
        control_guidance_start=0.0,
        control_guidance_end=1.0,
    ) -> ReferenceKV:
        """Run the reference path once and keep only what MRSA will read (in-mask tokens, used branches).

        height, width: None is the model's size (512 SD1.5, 1024 SDXL). mrsa: None is
        ``default_mrsa()``.
        control_image (with a ControlNet): the release's ``control_references``: the references get the
        ControlNet residuals of this one control image (per ControlNet), with the same scale and steps
        as the targets; the K/V then hold the control identity and serve only ``generate`` calls with
        ``control_references=True`` and that control image. Without it (default) the references skip
        ControlNet and the K/V serve any control image.

        storage: where the K/V of all steps are kept. "cpu" (default; page-locked when the model is on
        CUDA) leaves the GPU holding one step at a time here and two in ``generate``; pass the model's
        device to keep them there instead. Each step is written into a preallocated buffer as it is
        captured, so the K/V are never held twice.
        pin_memory: page-lock host storage (None: when the model is on CUDA). Pinned blocks stay cached
        by PyTorch after they are freed; a caller that only saves the K/V (the pipeline's reference
        stage) passes False and leaves no page-locked memory behind; ``kv.pin_memory()`` pins later.
        """
        concepts = self._check_concepts(concepts)
        height, width = height or self.default_size, width or self.default_size
        self._check_call(height=height, width=width, num_inference_steps=num_inference_steps)
        check_exact(self.pipe.scheduler)
        mrsa = mrsa or self.default_mrsa()
        layers = select_layers(self.unet, mrsa)
        control = self.control_input(
            control_image,
            1,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end,
        )
        scheduler, timesteps = self._timesteps(num_inference_steps)
        self._check_mrsa_steps(mrsa, len(timesteps))
        storage = torch.device(storage)
        pin = storage.type == "cpu" and self.device.type == "cuda" and pin_memory is not False
        active = [i for i in range(len(timesteps)) if mrsa.is_active(i)]
        state = MRSAState(mrsa, layers)
        buffers: dict[str, dict[str, torch.Tensor]] = {}  # attr -> layer -> (S, heads, Lr, d)
        bias: dict[str, torch.Tensor] = {}
        with mrsa_installed(self.unet, state):
            ref = ReferencePath(
                self,
                concepts,
                height=height,
                width=width,
                scheduler=scheduler,
                reference_seed=reference_seed,
                mrsa=mrsa,
                negative_prompt=negative_prompt,
                with_uncond=mrsa.needs_uncond_references,
                state=state,
                control=control,
            )
            # the loop's scheduler calls at every step on a placeholder latent: the reference path
            # then sees, step by step, the scheduler state a denoising loop would give it
            placeholder = torch.zeros(
                (1, self.unet.config.in_channels, *ref.latent_hw), device=self.device, dtype=self.dtype
            )
            for i, t in enumerate(timesteps):
                kv = ref.step(i, t)
                step_without_target(scheduler, t, placeholder)
                if kv is None:
                    continue
                pos = active.index(i)
                for name in layers:
                    for attr in ("k", "v", "k_uncond", "v_uncond"):
                        x = getattr(kv[name], attr)
                        if x is None:
                            continue
                        if name not in buffers.setdefault(attr, {}):
                            buffers[attr][name] = torch.empty(
                                (len(active), *x.shape), dtype=x.dtype, device=storage, pin_memory=pin
                            )
                        buffers[attr][name][pos].copy_(x, non_blocking=pin)
                    if kv[name].bias is not None and name not in bias:
                        bias[name] = kv[name].bias.to(storage)
        if pin:
            torch.cuda.current_stream(self.device).synchronize()  # the last device-to-host copies

        meta = self.kv_identity(
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            control=control.identity() if control is not None else None,
        )
        meta.update(
            model_id=self.model_id,
            reference_seed=int(reference_seed),
            mrsa=mrsa.to_dict(),
            layers=list(layers),
            negative_prompt=negative_prompt if mrsa.needs_uncond_references else None,
            concepts=[
                {
                    "prompt": c.prompt,
                    "weight": c.weight,
                    "image_digest": c.image_digest(),
                    "mask_digest": c.mask_digest(),
                }
                for c in concepts
            ],
            tokens={name: ref.tokens[name] for name in layers},
            dense_nbytes=sum(ref.dense_bytes_per_step.values()) * len(active),
        )
        return ReferenceKV(
            meta=meta,
            steps=tuple(active),
            k=buffers["k"],
            v=buffers["v"],
            bias=bias,
            k_uncond=buffers.get("k_uncond", {}),
            v_uncond=buffers.get("v_uncond", {}),
        )

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
