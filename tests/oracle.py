"""An independent, in-batch implementation of the authors' release algorithm: the test oracle.

Written from the release (freecustom/mrsa.py, pipelines/pipeline_stable_diffusion_freecustom.py):
the target and its references share one UNet batch per branch, ``[target, ref_1..ref_N]``, the
references are re-noised from z'_0 at every step, and in the selected layers the target's
attention logits are computed with einsum over ``[K, K_1..K_N]`` plus the mask bias
(``finfo.min`` outside the masks). Deliberately naive: every image pays for all references, and
the attention matrices are materialised. Also the benchmarks' "release-style" baseline, so it runs
on the model's device and dtype (tensors it creates follow the query's).

ControlNet (``pipelines/pipeline_controlnet_freecustom.py``): ControlNet runs on the whole batch with
the target's control image (``prepare_image`` repeats it over ``[target, refs]`` and both CFG
branches), ``conditioning_scale`` times diffusers' keep rule per step, and its residuals go to the
UNet for every row. ``control_references=False`` (this project's default) zeroes the references'
residuals, which is the same as running them without ControlNet.

SDXL: the same batch, with the pipeline's own two-encoder ``encode_prompt`` and the added
conditions built here: pooled embeddings and time ids ``(h, w, 0, 0, h, w)`` for every row.

The scheduler is the pipeline's own, as ``from_pretrained`` leaves it (or ``scheduler=``): ``release_pipeline``
builds the pipeline the way the release does, ``from_pretrained(model, scheduler=DDIMScheduler(<its
literals>))``, so the release's sampler is whatever diffusers' ``__init__`` makes of that DDIM (the SD
pipeline rewrites steps_offset 0 to 1), never this project's constant.

One live scheduler does everything, as in the release's pipeline: the references' ``add_noise`` and
the batch's ``scale_model_input`` at each step, then ``step`` on the target (eta 0, the target's
generator for ancestral noise), so any state a scheduler keeps between steps is the loop's own.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# freecustom_stable_diffusion.py's and freecustom_controlnet.py's scheduler, literally
RELEASE_DDIM_KWARGS = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
)


def release_pipeline(model_dir, pipeline_class=None, **kwargs):
    """``pipeline_class.from_pretrained(model_dir, scheduler=DDIMScheduler(**RELEASE_DDIM_KWARGS), **kwargs)``:
    the release's construction (``StableDiffusionPipeline`` by default: the release's
    ``StableDiffusionFreeCustomPipeline`` subclasses it and adds only methods)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline_class = pipeline_class or StableDiffusionPipeline
    if pipeline_class is StableDiffusionPipeline:
        kwargs.setdefault("safety_checker", None)
        kwargs.setdefault("requires_safety_checker", False)
    return pipeline_class.from_pretrained(
        str(model_dir), scheduler=DDIMScheduler(**RELEASE_DDIM_KWARGS), **kwargs
    )


class ReleaseMRSA:
    def __init__(self, masks, weights, n_refs, style_fidelity, mask_mode="bias"):
        self.masks = masks  # (N, 1, H, W) binary float at the generation size
        self.weights = weights
        self.n_refs = n_refs
        self.style_fidelity = style_fidelity
        self.mask_mode = mask_mode
        self.active = False
        self.cfg = True


class ReleaseProcessor:
    def __init__(self, ctx: ReleaseMRSA):
        self.ctx = ctx

    def attn(self, q, k, v, scale, bias=None, key_scale=None):
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale
        if key_scale is not None:
            sim = sim * key_scale
        if bias is not None:
            sim = sim + bias
        return torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v)

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
    ):
        ctx = self.ctx
        b, n, _ = hidden_states.shape
        h = attn.heads

        def split(x):
            return x.view(b, n, h, -1).transpose(1, 2)  # (B, h, L, d)

        q, k, v = (
            split(attn.to_q(hidden_states)),
            split(attn.to_k(hidden_states)),
            split(attn.to_v(hidden_states)),
        )
        out = self.attn(q, k, v, attn.scale)  # plain self-attention for every row
        if ctx.active:
            group = 1 + ctx.n_refs
            gh = gw = None
            H, W = ctx.masks.shape[-2:]
            for scale_down in range(8):  # find this layer's grid
                hh, ww = int(np.ceil(H / 8 / 2**scale_down)), int(np.ceil(W / 8 / 2**scale_down))
                if hh * ww == n:
                    gh, gw = hh, ww
                    break
            grid = F.interpolate(ctx.masks, size=(gh, gw), mode="nearest").view(ctx.n_refs, n)
            weighted = grid * torch.tensor(ctx.weights, device=grid.device).view(-1, 1)
            own_bias = torch.zeros(n, device=q.device)
            if ctx.mask_mode == "bias":
                ref_bias = weighted.masked_fill(weighted == 0, torch.finfo(q.dtype).min)
                bias = torch.cat([own_bias, ref_bias.reshape(-1)]).to(q.dtype)
                key_scale = None
            else:
                bias = None
                key_scale = torch.cat([torch.ones(n, device=q.device), weighted.reshape(-1)]).to(q.dtype)
            branches = [0, group] if ctx.cfg else [0]
            for bi, start in enumerate(branches):
                own = slice(start, start + 1)
                k_cat = torch.cat(
                    [k[own]] + [k[start + 1 + r : start + 2 + r] for r in range(ctx.n_refs)], dim=2
                )
                v_cat = torch.cat(
                    [v[own]] + [v[start + 1 + r : start + 2 + r] for r in range(ctx.n_refs)], dim=2
                )
                mrsa = self.attn(q[own], k_cat, v_cat, attn.scale, bias, key_scale)
                is_uncond = ctx.cfg and bi == 0
                if is_uncond and ctx.style_fidelity > 0:
                    mrsa = (1 - ctx.style_fidelity) * mrsa + ctx.style_fidelity * out[own]
                out[own] = mrsa
        out = out.transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


@torch.no_grad()
def release_generate(
    pipe,
    layers,
    concepts,
    prompt,
    seed,
    *,
    num_inference_steps,
    height,
    width,
    guidance_scale=7.5,
    negative_prompt="",
    reference_seed=0,
    style_fidelity=1.0,
    null_ref_prompts=False,
    start_step=0,
    end_step=None,
    mask_mode="bias",
    control_image=None,
    controlnet_conditioning_scale=1.0,
    control_guidance_start=0.0,
    control_guidance_end=1.0,
    control_references=True,
    scheduler=None,
):
    """One target, the release way. Returns the final latent (1, C, h, w).

    scheduler: a copy of it steps (default: ``pipe.scheduler``); e.g. ``release_pipeline(...).scheduler``.
    control_image: a PIL image (a list, one per net, with a ``MultiControlNetModel``); needs ``pipe.controlnet``.
    """
    n = len(concepts)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    images = [
        np.asarray(c.image.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 127.5 - 1
        for c in concepts
    ]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device, pipe.vae.dtype)
    z0 = (pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor).to(dtype)
    masks = torch.cat(
        [
            (
                F.interpolate(
                    torch.from_numpy(c.mask_array())[None, None], size=(height, width), mode="nearest"
                )
                >= 0.5
            ).float()
            for c in concepts
        ]
    ).to(device)
    cfg = guidance_scale > 1
    ctx = ReleaseMRSA(masks, [c.weight for c in concepts], n, style_fidelity, mask_mode)
    ctx.cfg = cfg
    saved = pipe.unet.attn_processors
    procs = dict(saved)
    for name in layers:
        procs[f"{name}.processor"] = ReleaseProcessor(ctx)
    pipe.unet.set_attn_processor(procs)
    try:
        ref_prompts = [""] * n if null_ref_prompts else [c.prompt for c in concepts]
        prompts = [prompt] + ref_prompts
        negatives = [negative_prompt] * len(prompts)
        added = None
        if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                prompts, device=device, do_classifier_free_guidance=cfg, negative_prompt=negatives
            )
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.dtype, device=device)
            pooled = torch.cat([uncond_pooled, pooled]) if cfg else pooled
            added = {"text_embeds": pooled, "time_ids": time_ids.repeat(pooled.shape[0], 1)}
        else:
            cond, uncond = pipe.encode_prompt(prompts, device, 1, cfg, negative_prompt=negatives)
        embeds = torch.cat([uncond, cond]) if cfg else cond
        extra_unet = {"added_cond_kwargs": added} if added is not None else {}
        controlnet = getattr(pipe, "controlnet", None) if control_image is not None else None
        if controlnet is not None:
            multi = hasattr(controlnet, "nets")
            cn_images = [
                pipe.prepare_image(
                    image=im,
                    width=width,
                    height=height,
                    batch_size=1 + n,
                    num_images_per_prompt=1,
                    device=device,
                    dtype=controlnet.dtype,
                    do_classifier_free_guidance=cfg,
                )
                for im in (control_image if multi else [control_image])
            ]
            n_nets = len(cn_images)

            def per_net(x):
                return list(x) if isinstance(x, (list, tuple)) else [x] * n_nets

            cn_scale = per_net(controlnet_conditioning_scale)
            cn_start, cn_end = per_net(control_guidance_start), per_net(control_guidance_end)
            # 1 on the target's rows, 0 on the references' (when they skip ControlNet)
            rows = torch.tensor(
                ([1.0] + [float(control_references)] * n) * (2 if cfg else 1), device=device, dtype=dtype
            ).view(-1, 1, 1, 1)
        scheduler = copy.deepcopy(pipe.scheduler if scheduler is None else scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        own_gen = torch.Generator("cpu").manual_seed(seed)
        own = torch.randn((1, 4, height // f, width // f), generator=own_gen)
        own = (own * scheduler.init_noise_sigma).to(device, dtype)
        params = inspect.signature(scheduler.step).parameters
        extra = {k: v for k, v in (("eta", 0.0), ("generator", own_gen)) if k in params}
        ref_gen = torch.Generator("cpu").manual_seed(reference_seed)
        end = len(scheduler.timesteps) if end_step is None else end_step
        for i, t in enumerate(scheduler.timesteps):
            noise = torch.randn((n, 4, height // f, width // f), generator=ref_gen).to(device, dtype)
            refs = scheduler.add_noise(z0, noise, t.reshape(1))
            latents = torch.cat([own, refs])
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            ctx.active = start_step <= i < end
            residuals = {}
            if controlnet is not None:
                n_t = len(scheduler.timesteps)
                keep = [
                    1.0 - float(i / n_t < s or (i + 1) / n_t > e)
                    for s, e in zip(cn_start, cn_end, strict=True)
                ]
                scales = [s * k for s, k in zip(cn_scale, keep, strict=True)]
                down, mid = controlnet(
                    model_in,
                    t,
                    encoder_hidden_states=embeds,
                    controlnet_cond=cn_images if multi else cn_images[0],
                    conditioning_scale=scales if multi else scales[0],
                    return_dict=False,
                    **extra_unet,
                )
                residuals = {
                    "down_block_additional_residuals": [d * rows for d in down],
                    "mid_block_additional_residual": mid * rows,
                }
            pred = pipe.unet(
                model_in, t, encoder_hidden_states=embeds, return_dict=False, **extra_unet, **residuals
            )[0]
            if cfg:
                u, c = pred.chunk(2)
                pred_own = u[:1] + guidance_scale * (c[:1] - u[:1])
            else:
                pred_own = pred[:1]
            own = scheduler.step(pred_own, t, own, **extra, return_dict=False)[0]
        return own
    finally:
        pipe.unet.set_attn_processor(saved)
