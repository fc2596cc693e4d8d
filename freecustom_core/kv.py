"""ReferenceKV: a concept set's reference keys/values, computed once, reused for every prompt and seed.

Layout (per selected layer, stacked over the active steps):
  k[layer], v[layer]: (S, heads, Lr, d)  reference tokens of every concept, concatenated
  bias[layer]:        (Lr,)              additive logit bias (``mask_mode="bias"`` only)
  k_uncond / v_uncond: same as k / v, for the unconditional branch (only when style_fidelity < 1)
``meta`` records everything the tensors depend on; ``check_fits`` refuses a use they do not fit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .attention import LayerKV
from .config import MRSAConfig

FORMAT = "freecustom-reference-kv"
FORMAT_VERSION = 1
_META_KEY = "freecustom_kv"


class ReferenceKVError(ValueError):
    """A ReferenceKV file is corrupt, truncated, of another format, or does not fit its use."""


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class ReferenceKV:
    meta: dict
    steps: tuple[int, ...]
    k: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    bias: dict[str, torch.Tensor] = field(default_factory=dict)
    k_uncond: dict[str, torch.Tensor] = field(default_factory=dict)
    v_uncond: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self._pos = {step: i for i, step in enumerate(self.steps)}

    # ---- what it is -------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.meta["layers"])

    @property
    def mrsa(self) -> MRSAConfig:
        return MRSAConfig.from_dict(self.meta["mrsa"])

    @property
    def reference_seed(self) -> int:
        return int(self.meta["reference_seed"])

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (what the cache costs)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    @property
    def dense_nbytes(self) -> int:
        """Bytes the same K/V would take with every reference token kept (no mask pruning)."""
        return int(self.meta["dense_nbytes"])

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, group in (
            ("k", self.k),
            ("v", self.v),
            ("bias", self.bias),
            ("ku", self.k_uncond),
            ("vu", self.v_uncond),
        ):
            for layer, t in group.items():
                out[f"{prefix}/{layer}"] = t
        return out

    # ---- use --------------------------------------------------------------------------------
    def at_step(
        self, step: int, device=None, dtype=None, *, non_blocking: bool = False
    ) -> dict[str, LayerKV] | None:
        """The K/V of every layer at denoising step ``step``; None when MRSA is inactive there.

        With ``device`` / ``dtype``, only this step's tensors are copied there (``non_blocking`` from
        pinned memory): the engine copies each step as it starts instead of holding every step on
        the GPU. The small bias vectors are moved once and kept.
        """
        pos = self._pos.get(step)
        if pos is None:
            return None

        def get(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype, non_blocking=non_blocking)

        return {
            layer: LayerKV(
                k=get(self.k[layer][pos]),
                v=get(self.v[layer][pos]),
                bias=self._bias_on(layer, device, dtype),
                k_uncond=get(self.k_uncond[layer][pos]) if layer in self.k_uncond else None,
                v_uncond=get(self.v_uncond[layer][pos]) if layer in self.v_uncond else None,
            )
            for layer in self.layers
        }

    def _bias_on(self, layer: str, device, dtype) -> torch.Tensor | None:
        bias = self.bias.get(layer)
        if bias is None or (device is None and dtype is None):
            return bias
        cache = self.__dict__.setdefault("_moved_bias", {})
        key = (layer, str(device), str(dtype))
        if key not in cache:
            cache[key] = bias.to(device=device, dtype=dtype)
        return cache[key]

    def _map(self, fn) -> ReferenceKV:
        def apply(group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: fn(t) for k, t in group.items()}

        return ReferenceKV(
            meta=self.meta,
            steps=self.steps,
            k=apply(self.k),
            v=apply(self.v),
            bias=apply(self.bias),
            k_uncond=apply(self.k_uncond),
            v_uncond=apply(self.v_uncond),
        )

    def to(self, device=None, dtype=None) -> ReferenceKV:
        """Every step moved (the engine does not need this: ``at_step`` moves one step at a time)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def pin_memory(self) -> ReferenceKV:
        """Host tensors in page-locked memory (fast, asynchronous copies to a GPU); unchanged without CUDA."""
        if not torch.cuda.is_available():
            return self
        return self._map(lambda t: t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t)

    @property
    def device(self) -> torch.device:
        return next(iter(self.k.values())).device

    def check_fits(self, expected: dict) -> None:
        """Refuse a use this K/V was not computed for (another model, scheduler, step count, size).

        K/V computed through ControlNet (``control`` in their identity) fit only a request that names a
        control too: plain references' identity has no ``control`` key.
        """
        if self.meta.get("control") is not None and "control" not in expected:
            raise ReferenceKVError(
                "these reference K/V were computed through ControlNet (control_references=True) for control "
                f"image {self.meta['control']['image_digests']}; pass control_references=True with that "
                "control image, or prepare references without control_image"
            )
        diffs = [
            f"{key}: cached {self.meta.get(key)!r} != requested {value!r}"
            for key, value in expected.items()
            if self.meta.get(key) != value
        ]
        if diffs:
            raise ReferenceKVError(
                "these reference K/V were computed for another setting and cannot be reused: "
                + "; ".join(diffs)
                + ". Recompute them with prepare_references() for this model and setting."
            )

    # ---- files ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write safetensors (temp file, then atomic rename); the header holds ``meta`` and a digest."""
        from safetensors.torch import save_file

        # bias vectors of layers on the same token grid share storage: clone them apart for safetensors
        tensors = {
            name: t.detach().cpu().clone() if name.startswith("bias/") else t.detach().contiguous().cpu()
            for name, t in self._tensors().items()
        }
        header = dict(self.meta, format=FORMAT, format_version=FORMAT_VERSION, steps=list(self.steps))
        header["tensor_digest"] = _tensor_digest(tensors)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(header, sort_keys=True)})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", verify: bool = True
    ) -> ReferenceKV:
        """Load and check a file written by ``save``; a corrupt or foreign file raises ReferenceKVError."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = json.loads((f.metadata() or {})[_META_KEY])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated / garbled files
            raise ReferenceKVError(
                f"{path}: not a readable reference K/V file ({type(e).__name__}: {e})"
            ) from e
        if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
            raise ReferenceKVError(
                f"{path}: format {header.get('format')!r} v{header.get('format_version')!r}, "
                f"expected {FORMAT!r} v{FORMAT_VERSION}"
            )
        if verify and _tensor_digest(tensors) != header.get("tensor_digest"):
            raise ReferenceKVError(f"{path}: tensor digest mismatch: the file is corrupt")
        steps = tuple(header.pop("steps"))
        header.setdefault("memory_format", "contiguous")  # files written before the layout was recorded
        for key in ("format", "format_version", "tensor_digest"):
            header.pop(key, None)
        groups: dict[str, dict[str, torch.Tensor]] = {"k": {}, "v": {}, "bias": {}, "ku": {}, "vu": {}}
        for name, t in tensors.items():
            prefix, _, layer = name.partition("/")
            if prefix not in groups:
                raise ReferenceKVError(f"{path}: unexpected tensor {name!r}")
            groups[prefix][layer] = t.to(device)
        missing = [
            layer for layer in header["layers"] if layer not in groups["k"] or layer not in groups["v"]
        ]
        bad = [layer for layer, t in groups["k"].items() if t.shape[0] != len(steps)]
        if missing or bad:
            raise ReferenceKVError(f"{path}: incomplete (missing layers {missing}, wrong step count {bad})")
        return cls(
            meta=header,
            steps=steps,
            k=groups["k"],
            v=groups["v"],
            bias=groups["bias"],
            k_uncond=groups["ku"],
            v_uncond=groups["vu"],
        )
