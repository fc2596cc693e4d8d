"""The reference path of ``FreeCustomGenerator``: ``prepare_references``, run once per concept set.

Each concept's image is encoded once (z'_0, the posterior mean x scaling); each step re-noises it
(z'_t = add_noise(z'_0, eps_t, t)) and runs it through the UNet with the concept prompts, capturing the
self-attention K/V at the selected layers (the pass stops there). Nothing in it depends on the
generated image."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention import MRSAState, mrsa_installed
from .concept import ConceptRef
from .config import DEFAULT_NEGATIVE_PROMPT, MRSAConfig
from .generator_model import GeneratorModel
from .kv import ReferenceKV
from .layers import select_layers
from .reference import ReferencePath
from .schedulers import check_exact, step_without_target


class ReferencePreparation(GeneratorModel):
    """``GeneratorModel`` with the reference path: a concept set's K/V, to cache and reuse."""

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
