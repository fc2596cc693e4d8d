"""An independent, in-batch implementation of multi-concept FreeCustom on FLUX.1: the test oracle.

The definition (issue 16): the references ride in the target's transformer batch, ``[target,
ref_1..ref_N]``, with their own concept prompts, re-noised each step by the scheduler's forward
process (``scale_noise``) from one ``(N, C, h, w)`` draw of ``Generator(reference_seed)``. In the
selected attention layers (double- and single-stream alike) the target row's queries, text and
image, attend to its own keys plus the references' image tokens (not their text tokens), after
RoPE, at the same grid positions as the target's, with the weighted bias (``+w_i`` inside M_i,
``finfo.min`` outside); the references attend as usual. Deliberately naive: every target pays for
every reference, attention matrices are materialised with einsum, nothing of the engine is used
(only diffusers' own pieces: the pipeline's encoders and schedule helpers, ``apply_rotary_emb``).

With ``control`` (one FLUX ControlNet): the target row gets the ControlNet residuals as
``FluxControlNetPipeline`` computes them (its control image VAE-sampled from the target's generator
before the initial latent, scaled by ``scale`` inside the ``[start, end]`` window, run on every step
even when the scale is 0); the reference rows get zero residuals (references skip ControlNet).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class InBatchMRSA:
    def __init__(self, ref_bias: torch.Tensor, n_refs: int, image_tokens: int):
        self.ref_bias = ref_bias  # (N * L,): w_i inside M_i, finfo.min outside
        self.n_refs = n_refs
        self.image_tokens = image_tokens
        self.active = False


class InBatchProcessor:
    """Joint attention of one FLUX attention layer, every row at once; MRSA for row 0 when active."""

    def __init__(self, ctx: InBatchMRSA):
        self.ctx = ctx

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        ctx = self.ctx
        b = hidden_states.shape[0]

        def split(x):  # (B, S, heads * d) -> (B, heads, S, d)
            return x.view(b, x.shape[1], -1, attn.head_dim).transpose(1, 2)

        q = attn.norm_q(split(attn.to_q(hidden_states)))
        k = attn.norm_k(split(attn.to_k(hidden_states)))
        v = split(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            q = torch.cat([attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states))), q], dim=2)
            k = torch.cat([attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states))), k], dim=2)
            v = torch.cat([split(attn.add_v_proj(encoder_hidden_states)), v], dim=2)
        q = apply_rotary_emb(q, image_rotary_emb)  # (B, heads, S, d), RoPE on sequence dim 2
        k = apply_rotary_emb(k, image_rotary_emb)
        scale = attn.head_dim**-0.5

        def attend(q_, k_, v_, bias=None):
            sim = torch.einsum("bhid,bhjd->bhij", q_, k_) * scale
            if bias is not None:
                sim = sim + bias
            return torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v_)

        out = attend(q, k, v)
        if ctx.active:
            n_img = ctx.image_tokens
            k_cat = torch.cat([k[:1]] + [k[1 + r : 2 + r, :, -n_img:] for r in range(ctx.n_refs)], dim=2)
            v_cat = torch.cat([v[:1]] + [v[1 + r : 2 + r, :, -n_img:] for r in range(ctx.n_refs)], dim=2)
            bias = torch.cat([torch.zeros(k.shape[2], device=q.device), ctx.ref_bias.to(q.device)]).to(
                q.dtype
            )
            out = torch.cat([attend(q[:1], k_cat, v_cat, bias), out[1:]])
        out = out.transpose(1, 2).reshape(b, out.shape[2], -1)
        if encoder_hidden_states is None:
            return out
        t = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, t:])), attn.to_add_out(out[:, :t])


@torch.no_grad()
def in_batch_generate(
    pipe,
    layers,
    concepts,
    prompt,
    seed,
    *,
    num_inference_steps,
    height,
    width,
    guidance_scale=3.5,
    max_sequence_length=32,
    reference_seed=0,
    null_ref_prompts=False,
    start_step=0,
    end_step=None,
    control=None,
):
    """One target with its references in one transformer batch. Returns its final latent (1, C, h, w).

    control: None, or dict(controlnet=FluxControlNetModel, image=PIL image, scale=, start=, end=).
    """
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    n = len(concepts)
    transformer, vae = pipe.transformer, pipe.vae
    device, dtype = transformer.device, transformer.dtype
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = height // f, width // f
    channels = transformer.config.in_channels // 4
    # references: VAE posterior mean, FLUX's shift and scale
    images = [
        np.asarray(c.image.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 127.5 - 1
        for c in concepts
    ]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device, vae.dtype)
    z0 = ((vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor).to(dtype)
    # masks on the image-token grid (h/2, w/2), the bias of each reference token
    bias = []
    for c in concepts:
        m = F.interpolate(torch.from_numpy(c.mask_array())[None, None], size=(height, width), mode="nearest")
        inside = (F.interpolate(m, size=(h // 2, w // 2), mode="nearest") >= 0.5).reshape(-1)
        bias.append(torch.where(inside, torch.tensor(float(c.weight)), torch.tensor(torch.finfo(dtype).min)))
    ctx = InBatchMRSA(torch.cat(bias), n, (h // 2) * (w // 2))
    saved = transformer.attn_processors
    procs = dict(saved)
    for name in layers:
        procs[f"{name}.processor"] = InBatchProcessor(ctx)
    transformer.set_attn_processor(procs)
    try:
        ref_prompts = [""] * n if null_ref_prompts else [c.prompt for c in concepts]
        embeds, pooled, text_ids = pipe.encode_prompt(
            [prompt] + ref_prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        own_gen = torch.Generator("cpu").manual_seed(seed)
        if control is not None:
            cond = _control_condition(pipe, control, own_gen, height, width)
        own = torch.randn((1, channels, h, w), generator=own_gen, dtype=dtype)
        own = FluxPipeline._pack_latents(own.to(device), 1, channels, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, text_ids.dtype)
        scheduler = copy.deepcopy(pipe.scheduler)
        mu = calculate_shift(
            own.shape[1],
            scheduler.config.base_image_seq_len,
            scheduler.config.max_image_seq_len,
            scheduler.config.base_shift,
            scheduler.config.max_shift,
        )
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((n + 1,), guidance_scale, device=device, dtype=torch.float32)
        ref_gen = torch.Generator("cpu").manual_seed(reference_seed)
        end = len(timesteps) if end_step is None else end_step
        for i, t in enumerate(timesteps):
            noise = torch.randn((n, channels, h, w), generator=ref_gen).to(device, dtype)
            refs = scheduler.scale_noise(z0, t[None], noise)
            batch = torch.cat([own, FluxPipeline._pack_latents(refs, n, channels, h, w)])
            ctx.active = start_step <= i < end
            residuals = {}
            if control is not None:
                residuals = _control_residuals(
                    control, cond, own, t, i, len(timesteps), guidance_scale, embeds, pooled, text_ids, img_ids, n
                )
            pred = transformer(
                hidden_states=batch,
                timestep=t.expand(n + 1).to(dtype) / 1000,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=img_ids,
                return_dict=False,
                **residuals,
            )[0]
            own = scheduler.step(pred[:1], t, own, return_dict=False)[0]
        return FluxPipeline._unpack_latents(own, height, width, f)
    finally:
        transformer.set_attn_processor(saved)


def _control_condition(pipe, control, generator, height, width):
    """FluxControlNetPipeline's control input for one target: pixels in [-1, 1] at the generation size, then
    (InstantX layout) a VAE posterior sample from the target's generator, shifted, scaled and packed."""
    from diffusers import FluxPipeline
    from diffusers.image_processor import VaeImageProcessor

    vae = pipe.vae
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    x = VaeImageProcessor(vae_scale_factor=f * 2).preprocess(control["image"], height=height, width=width)
    x = x.to(vae.device, vae.dtype)
    if control["controlnet"].input_hint_block is not None:
        return x
    z = vae.encode(x).latent_dist.sample(generator)
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    return FluxPipeline._pack_latents(z, 1, z.shape[1], z.shape[2], z.shape[3])


def _control_residuals(control, cond, own, t, i, n_steps, guidance_scale, embeds, pooled, text_ids, img_ids, n):
    """The target row's residuals at step i, zero rows for the n references."""
    net = control["controlnet"]
    on = not (i / n_steps < control["start"] or (i + 1) / n_steps > control["end"])
    guidance = torch.full((1,), guidance_scale, device=own.device) if net.config.guidance_embeds else None
    block, single = net(
        hidden_states=own,
        controlnet_cond=cond,
        conditioning_scale=control["scale"] * float(on),
        timestep=t.expand(1).to(own.dtype) / 1000,
        guidance=guidance,
        pooled_projections=pooled[:1],
        encoder_hidden_states=embeds[:1],
        txt_ids=text_ids,
        img_ids=img_ids,
        return_dict=False,
    )

    def pad(samples):
        if samples is None:
            return None
        return [torch.cat([r, torch.zeros((n, *r.shape[1:]), dtype=r.dtype, device=r.device)]) for r in samples]

    return {
        "controlnet_block_samples": pad(block),
        "controlnet_single_block_samples": pad(single),
        "controlnet_blocks_repeat": net.input_hint_block is not None,
    }
