"""FLUX.1 ControlNet for FreeCustom: loading, and the residuals of ``FluxControlNetPipeline`` per target.

The ControlNet (``FluxControlNetModel``, or ``FluxMultiControlNetModel`` for several) is a separate
transformer: it reads the target's packed latents, the control condition, timestep, guidance and
prompt embeddings, and returns one residual per double-stream and single-stream block that
``FluxTransformer2DModel`` adds to the image stream after that block
(``controlnet_block_samples`` / ``controlnet_single_block_samples``). The residuals are per row and
touch only the image tokens' hidden states between blocks: MRSA's attention (and the references'
K/V) is not involved, so the targets get them exactly as ``FluxControlNetPipeline.__call__``
computes them and the references skip ControlNet (their K/V stay per concept set, reused across
control images).

The control condition, as ``FluxControlNetPipeline`` builds it:
  InstantX layout (no ``input_hint_block``): the control image preprocessed by the pipeline's
      ``image_processor`` at the generation size, VAE-encoded as a *sample* of the posterior drawn
      from the target's own generator, ``(z - shift_factor) * scaling_factor``, packed in 2x2
      patches. The draw comes before the initial latent's, so it advances the target's generator
      (once per ControlNet, in order), as in diffusers.
  XLabs layout (``input_hint_block``, ``conditioning_embedding_channels``): the preprocessed pixels;
      the residuals are then repeated over the transformer's blocks (``controlnet_blocks_repeat``).
The images, scales and the ``[start, end]`` window per net are ``controlnet.ControlInput``'s.

``control_references=True`` (the SD release's references through ControlNet) is refused on FLUX:
the control latent is a posterior sample from the target's seed, so there is no seed-independent
control input the references could share; per-seed reference K/V would defeat the cache, and a
different latent (the posterior mean) would be a structure no release defines.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .controlnet import ControlInput, load_nets, nets
from .flux_reference import pack


def load_flux_controlnet(ids: str | Sequence[str], *, torch_dtype: torch.dtype, **kwargs):
    """A ``FluxControlNetModel`` (one id or folder) or ``FluxMultiControlNetModel`` (a list), safetensors only."""
    from diffusers import FluxControlNetModel, FluxMultiControlNetModel

    names, loaded, single = load_nets(ids, FluxControlNetModel, torch_dtype=torch_dtype, **kwargs)
    controlnet = loaded[0] if single else FluxMultiControlNetModel(loaded)
    check_flux_controlnet(controlnet, names)
    return controlnet


def check_flux_controlnet(controlnet, names: Sequence[str] | None = None) -> None:
    """Refuse what this engine does not drive: ControlNet-Union (``num_mode``: needs a control mode per
    image) and a mix of InstantX and XLabs layouts (diffusers reads the layout of the first net only)."""
    members = nets(controlnet)
    names = list(names) if names is not None else [str(n.config.get("_name_or_path", "")) for n in members]
    for name, net in zip(names, members, strict=True):
        if net.config.get("num_mode") is not None:
            raise ValueError(
                f"controlnet {name!r}: ControlNet-Union (num_mode={net.config['num_mode']}) needs a control_mode "
                "per image, which FreeCustom does not pass; use a single-condition FLUX ControlNet"
            )
    if len({net.input_hint_block is None for net in members}) > 1:
        raise ValueError(
            f"controlnet {names}: InstantX-style (VAE latent) and XLabs-style (input_hint_block) ControlNets "
            "cannot be mixed: FluxControlNetPipeline prepares every control image by the first net's layout"
        )


def with_flux_controlnet(pipe, controlnet):
    """The ``FluxControlNetPipeline`` sharing ``pipe``'s components (a ``FluxPipeline``)."""
    from diffusers import FluxControlNetPipeline

    expected, optional = FluxControlNetPipeline._get_signature_keys(FluxControlNetPipeline)
    components = {k: v for k, v in pipe.components.items() if k in expected or k in optional}
    components.pop("controlnet", None)
    out = FluxControlNetPipeline(**components, controlnet=controlnet)
    out.set_progress_bar_config(disable=True)
    return out


class FluxControl:
    """The ControlNet side of one FLUX call: ``ControlInput`` (images, scales, window) plus its conditions.

    ``prepare`` builds the control condition of each net for a batch of targets (drawing from their
    generators, see the module docstring); ``residuals`` runs the ControlNet at one step.
    """

    def __init__(self, control: ControlInput):
        self.control = control
        self.controlnet = control.pipe.controlnet
        first = nets(self.controlnet)[0]
        self.latent_condition = first.input_hint_block is None  # InstantX: VAE latents; XLabs: pixels
        self.blocks_repeat = not self.latent_condition
        self.guidance_embeds = bool(first.config.guidance_embeds)
        self.conditions: list[torch.Tensor] = []

    def prepare(
        self, rows: Sequence[int], generators: Sequence[torch.Generator], height: int, width: int
    ) -> None:
        """Conditions of targets ``rows`` (one generator each), per net: (B, L, 4C) latents or (B, 3, H, W) pixels.

        One target at a time: a target's condition does not depend on its batch.
        """
        pipe = self.control.pipe
        vae = pipe.vae
        device = pipe.transformer.device
        self.conditions = []
        for per_net in self.control.images:  # net order: each net's draw advances the generators
            per_row = []
            for row, generator in zip(rows, generators, strict=True):
                x = pipe.image_processor.preprocess(per_net[row], height=height, width=width)
                x = x.to(device=device, dtype=vae.dtype)  # (1, 3, H, W)
                if self.latent_condition:
                    z = vae.encode(x).latent_dist.sample(generator)  # retrieve_latents(..., generator)
                    x = pack((z - vae.config.shift_factor) * vae.config.scaling_factor)  # (1, L, 4C)
                per_row.append(x)
            self.conditions.append(torch.cat(per_row))

    def residuals(
        self, i: int, n_steps: int, latents, timestep, guidance_scale: float, text, img_ids
    ) -> dict:
        """Transformer keyword arguments with the ControlNet residuals at step i ({} while every net is off).

        latents: the packed (B, L, 4C) latents; timestep: the transformer's (B,) input (t / 1000);
        text: (T5 embeddings, pooled, text ids).
        """
        control = self.control
        scales = [s * k for s, k in zip(control.scale, control.keep(i, n_steps), strict=True)]
        if not any(scales):
            return {}  # the residuals would be 0 * r: the transformer's output is the same without them
        embeds, pooled, text_ids = text
        b = latents.shape[0]
        guidance = (
            torch.tensor([guidance_scale], device=latents.device).expand(b) if self.guidance_embeds else None
        )
        multi = hasattr(self.controlnet, "nets")
        modes = [torch.full((b,), -1, device=latents.device, dtype=torch.long)] * len(scales)
        block, single = self.controlnet(
            hidden_states=latents,
            controlnet_cond=self.conditions if multi else self.conditions[0],
            controlnet_mode=modes if multi else None,
            conditioning_scale=scales if multi else scales[0],
            timestep=timestep,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )
        return {
            "controlnet_block_samples": block,
            "controlnet_single_block_samples": single,
            "controlnet_blocks_repeat": self.blocks_repeat,
        }
