"""ControlNet for FreeCustom: loading, the per-call control input, and the canny map.

The release (``pipelines/pipeline_controlnet_freecustom.py``) runs ControlNet on its whole batch
``[target, ref_1..ref_N]`` with the target's control image, so the references' K/V depend on it.
Here the references skip ControlNet by default (their K/V stay per concept set, reused across
control images); ``control_references=True`` reproduces the release, and the K/V then name the
control image they were computed with (``ControlInput.identity``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .weights import config_json

# The thresholds of diffusers' and ControlNet's canny examples (lllyasviel/sd-controlnet-canny).
CANNY_LOW = 100
CANNY_HIGH = 200


# ---- loading ------------------------------------------------------------------------------------
def load_nets(ids: str | Sequence[str], model_class, *, torch_dtype: torch.dtype, **kwargs) -> tuple:
    """``(names, models, single)``: ControlNets of ``model_class`` from one id or folder (``single``) or a
    list, safetensors only (for SD's ``ControlNetModel`` and FLUX's ``FluxControlNetModel`` alike)."""
    single = isinstance(ids, (str, bytes)) or hasattr(ids, "__fspath__")
    names = [str(ids)] if single else [str(i) for i in ids]
    if not names:
        raise ValueError("controlnet: an empty list; pass None for no ControlNet")
    models = [model_class.from_pretrained(name, torch_dtype=torch_dtype, use_safetensors=True, **kwargs)
              for name in names]
    return names, models, single


def load_controlnet(ids: str | Sequence[str], *, torch_dtype: torch.dtype, **kwargs):
    """A ``ControlNetModel`` (one id or folder) or ``MultiControlNetModel`` (a list), safetensors only."""
    from diffusers import ControlNetModel, MultiControlNetModel

    names, nets, single = load_nets(ids, ControlNetModel, torch_dtype=torch_dtype, **kwargs)
    for name, net in zip(names, nets, strict=True):
        if net.config.global_pool_conditions:
            raise ValueError(
                f"controlnet {name!r}: global_pool_conditions (guess mode) ControlNets are not supported"
            )
    return nets[0] if single else MultiControlNetModel(nets)


def with_controlnet(pipe, controlnet):
    """The ControlNet pipeline sharing ``pipe``'s components (SD1.5 or SDXL, from the pipeline's class)."""
    from diffusers import (
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
    )

    cls = (
        StableDiffusionXLControlNetPipeline
        if isinstance(pipe, StableDiffusionXLPipeline)
        else StableDiffusionControlNetPipeline
    )
    expected, optional = cls._get_signature_keys(cls)
    components = {k: v for k, v in pipe.components.items() if k in expected or k in optional}
    components.setdefault("feature_extractor", None)
    if "requires_safety_checker" in optional:
        components["requires_safety_checker"] = False
    if "add_watermarker" in optional:
        components["add_watermarker"] = False
    out = cls(**components, controlnet=controlnet)
    out.set_progress_bar_config(disable=True)
    return out


def nets(controlnet) -> list:
    """The ControlNets of a pipeline's ``controlnet`` (one or a ``MultiControlNetModel``)."""
    return list(controlnet.nets) if hasattr(controlnet, "nets") else [controlnet]


def controlnet_fingerprint(controlnet) -> str:
    """Identity of the ControlNet weights: configs and a strided sample of every tensor (16 hex digits)."""
    h = hashlib.sha256()
    for net in nets(controlnet):
        h.update(config_json(net.config).encode())
        for name, tensor in net.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 16)][:16].float().cpu().numpy()
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode() + sample.tobytes())
    return h.hexdigest()[:16]


def image_digest(image: Image.Image) -> str:
    """Content digest of a control image (mode, size, pixels), 16 hex digits."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(np.asarray(image).tobytes())
    return h.hexdigest()[:16]


# ---- the control input of one call --------------------------------------------------------------
def _per_net(value, n_nets: int, name: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n_nets
    if len(values) != n_nets:
        raise ValueError(f"{name}={value!r}: {len(values)} values for {n_nets} ControlNets")
    out = []
    for v in values:
        if not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ValueError(f"{name}={value!r}: expected finite numbers")
        out.append(float(v))
    return out


class ControlInput:
    """The ControlNet side of one call: condition images per target, scale and active steps per net.

    images: ``images[net][row]``, PIL images, one per batch row (uncond/cond rows are added in ``condition``).
    """

    def __init__(self, pipe, images: list[list[Image.Image]], *, scale, start, end, ids: list[str]):
        n = len(nets(pipe.controlnet))
        self.pipe = pipe
        self.images = images
        self.scale = _per_net(scale, n, "controlnet_conditioning_scale")
        self.start = _per_net(start, n, "control_guidance_start")
        self.end = _per_net(end, n, "control_guidance_end")
        self.ids = ids
        for s, e in zip(self.start, self.end, strict=True):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(
                    f"control_guidance_start={s}, control_guidance_end={e}: need 0 <= start < end <= 1"
                )
        self.digests = [[image_digest(im) for im in row] for row in images]
        self._tensors: dict = {}

    @classmethod
    def from_call(cls, pipe, control_image, n_targets: int, **kw) -> ControlInput:
        """Normalise ``control_image``: one image or one per target; with several ControlNets a list
        with one such entry per net (as diffusers' ``MultiControlNetModel``)."""
        n = len(nets(pipe.controlnet))
        if n > 1 and (not isinstance(control_image, (list, tuple)) or len(control_image) != n):
            raise ValueError(f"control_image: {n} ControlNets need a list of {n} entries, one per ControlNet")
        per_net = list(control_image) if n > 1 else [control_image]
        images = []
        for k, entry in enumerate(per_net):
            row = list(entry) if isinstance(entry, (list, tuple)) else [entry]
            where = f"control_image[{k}]" if n > 1 else "control_image"
            if len(row) == 1:
                row = row * n_targets
            if len(row) != n_targets:
                raise ValueError(
                    f"{where}: {len(row)} images for {n_targets} prompts; give one or one per prompt"
                )
            for i, im in enumerate(row):
                if not isinstance(im, Image.Image):
                    raise TypeError(f"{where}[{i}]: expected a PIL image, got {type(im).__name__}")
            images.append([im.convert("RGB") for im in row])
        return cls(pipe, images, **kw)

    def rows(self, index: slice | list[int]) -> ControlInput:
        """The same control for a subset of targets (a batch chunk)."""
        rows = range(len(self.images[0]))[index] if isinstance(index, slice) else index
        images = [[per[i] for i in rows] for per in self.images]
        return ControlInput(self.pipe, images, scale=self.scale, start=self.start, end=self.end, ids=self.ids)

    def repeated(self, n_rows: int) -> ControlInput:
        """One target's control for ``n_rows`` rows (the references with ``control_references``)."""
        if any(len(set(d)) != 1 for d in self.digests):
            raise ValueError(
                "control_references=True needs one control image for the whole call (per ControlNet): the "
                "references get the target's control residuals; call once per control image"
            )
        images = [[per[0]] * n_rows for per in self.images]
        return ControlInput(self.pipe, images, scale=self.scale, start=self.start, end=self.end, ids=self.ids)

    def identity(self) -> dict:
        """What reference K/V computed through ControlNet depend on (one control image per net)."""
        return {
            "controlnet": list(self.ids),
            "controlnet_fingerprint": controlnet_fingerprint(self.pipe.controlnet),
            "image_digests": [d[0] for d in self.digests],
            "scale": list(self.scale),
            "start": list(self.start),
            "end": list(self.end),
        }

    def keep(self, i: int, n_steps: int) -> list[float]:
        """Per net, 1 while step i lies in [start, end] of the schedule, else 0 (diffusers' rule)."""
        return [
            1.0 - float(i / n_steps < s or (i + 1) / n_steps > e)
            for s, e in zip(self.start, self.end, strict=True)
        ]

    def _condition(self, height: int, width: int, branches: int, device, dtype) -> list[torch.Tensor]:
        key = (height, width, branches)
        if key not in self._tensors:
            processor = self.pipe.control_image_processor
            self._tensors[key] = [
                torch.cat(
                    [processor.preprocess(per, height=height, width=width).to(torch.float32)] * branches
                ).to(device, dtype)
                for per in self.images
            ]  # per net: (branches * B, 3, H, W)
        return self._tensors[key]

    def residuals(self, i: int, n_steps: int, x: torch.Tensor, t, text, *, branches: int) -> dict:
        """UNet keyword arguments with the ControlNet residuals at step i ({} while every net is off).

        x: the UNet's input (branches * B rows, after ``scale_model_input``); text: its ``TextCond``.
        """
        scales = [s * k for s, k in zip(self.scale, self.keep(i, n_steps), strict=True)]
        if not any(scales):
            return {}  # x + 0 * residual == x: skip the ControlNet pass
        controlnet = self.pipe.controlnet
        f = self.pipe.vae_scale_factor
        cond = self._condition(x.shape[-2] * f, x.shape[-1] * f, branches, x.device, controlnet.dtype)
        extra = {"added_cond_kwargs": text.added} if text.added is not None else {}
        down, mid = controlnet(
            x,
            t,
            encoder_hidden_states=text.embeds,
            controlnet_cond=cond if len(cond) > 1 else cond[0],
            conditioning_scale=scales if len(cond) > 1 else scales[0],
            return_dict=False,
            **extra,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def checked_control_input(
    pipe, ids: list[str], control_image, n_targets: int, *, scale=1.0, start=0.0, end=1.0
) -> ControlInput | None:
    """The checked ``ControlInput`` of a call (None without ``control_image``), any family's pipeline."""
    if control_image is None:
        return None
    if getattr(pipe, "controlnet", None) is None:
        raise ValueError(
            "control_image: this generator has no ControlNet; load it with from_pretrained(..., controlnet=ID)"
        )
    return ControlInput.from_call(pipe, control_image, n_targets, scale=scale, start=start, end=end, ids=ids)


def control_record(control: ControlInput | None, *, control_references: bool = False) -> dict | None:
    """What a sample's metadata says about ControlNet: ids, weights' fingerprint, each target's control
    image digest (per ControlNet, ``[net][target]``), scale, steps, and whether the references saw it."""
    if control is None:
        return None
    record = control.identity()
    record["image_digests"] = [list(d) for d in control.digests]
    record["control_references"] = bool(control_references)
    return record


def controlnet_names(pipe, given: str | Sequence[str] | None = None) -> list[str]:
    """The names of ``pipe``'s ControlNets for the metadata: ``given`` (one id or a list), else each net's
    ``_name_or_path``; [] without a ControlNet."""
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        return []
    if given is not None:
        return [given] if isinstance(given, str) else list(given)
    return [str(net.config.get("_name_or_path", "")) for net in nets(controlnet)]


class ControlNetCalls:
    """The ControlNet methods the SD and FLUX generators share (they set ``pipe`` and ``controlnet_ids``)."""

    pipe: Any
    controlnet_ids: list[str]

    @property
    def controlnet(self):
        """The pipeline's ControlNet (or multi-ControlNet), None without."""
        return getattr(self.pipe, "controlnet", None)

    def control_input(
        self,
        control_image,
        n_targets: int,
        *,
        controlnet_conditioning_scale=1.0,
        control_guidance_start=0.0,
        control_guidance_end=1.0,
    ) -> ControlInput | None:
        """The checked ControlNet input of a call (None without ``control_image``)."""
        return checked_control_input(
            self.pipe,
            self.controlnet_ids,
            control_image,
            n_targets,
            scale=controlnet_conditioning_scale,
            start=control_guidance_start,
            end=control_guidance_end,
        )

    def control_record(self, control: ControlInput | None, *, control_references: bool = False) -> dict | None:
        """What a sample's metadata says about ControlNet (``control_record``)."""
        return control_record(control, control_references=control_references)


# ---- the canny map ------------------------------------------------------------------------------
def canny(image: Image.Image, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> Image.Image:
    """Canny edges as an RGB image (white edges on black), as ``cv2.Canny(gray, low, high)`` defines them.

    Grey levels 0-255 (ITU-R 601 luma), 3x3 Sobel gradients, L1 magnitude ``|gx| + |gy|``,
    non-maximum suppression along the gradient direction (4 sectors), then hysteresis: pixels above
    ``high`` are edges, pixels above ``low`` are edges when 8-connected to one. Defaults 100 / 200
    are ControlNet's canny examples. No blur (as cv2.Canny; blur the image first for noisy photos).
    """
    from scipy import ndimage

    if not (0 <= low <= high):
        raise ValueError(f"canny thresholds low={low}, high={high}: need 0 <= low <= high")
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    gx = ndimage.sobel(gray, axis=1, mode="nearest")
    gy = ndimage.sobel(gray, axis=0, mode="nearest")
    mag = np.abs(gx) + np.abs(gy)
    # gradient sector: 0 horizontal, 45 diagonal, 90 vertical, 135 anti-diagonal
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    padded = np.pad(mag, 1)
    h, w = mag.shape

    def shifted(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    sectors = [
        ((angle < 22.5) | (angle >= 157.5), (0, 1)),
        ((angle >= 22.5) & (angle < 67.5), (1, 1)),
        ((angle >= 67.5) & (angle < 112.5), (1, 0)),
        ((angle >= 112.5) & (angle < 157.5), (1, -1)),
    ]
    peak = np.zeros_like(mag, dtype=bool)
    for sector, (dy, dx) in sectors:
        is_max = (mag > shifted(dy, dx)) & (mag >= shifted(-dy, -dx))
        peak |= sector & is_max
    candidates = peak & (mag > low)
    strong = peak & (mag > high)
    labels, n = ndimage.label(candidates, structure=np.ones((3, 3), dtype=bool))
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    edges = keep[labels]
    return Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")
