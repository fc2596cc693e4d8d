"""The parameter set: how a manifest row is rendered (``GenParams``), its rules and the run's defaults.

A parameter set is the run's defaults with a row's overrides applied. It is the one record the
rest of the pipeline reads: the engine's arguments (``reference_kwargs``, ``generate_kwargs``),
what a concept set's reference K/V depend on (``reference_params``), a sample's metadata
(``sample_meta``) and its row form for Ray (``to_row`` / ``from_row``) all come from here, so
no module copies its fields by hand. Torch-free (``freecustom_core.config`` imports no engine).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from freecustom_core.config import DEFAULT_NEGATIVE_PROMPT, MASK_MODES, MRSAConfig

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_HEIGHT",
    "DEFAULT_NEGATIVE_PROMPT",
    "DEFAULT_STEPS",
    "DEFAULT_WEIGHT",
    "DEFAULT_WIDTH",
    "FIELD_NAMES",
    "MAX_INT64",
    "GenParams",
    "Limits",
    "is_finite_number",
    "is_int",
    "lora_problems",
    "normalize_loras",
    "param_problems",
]

# The run's defaults (the authors' release), defined once: GenParams' defaults and the CLI's options.
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_STEPS = 50
DEFAULT_HEIGHT = 512
DEFAULT_WIDTH = 512
DEFAULT_WEIGHT = 3.0  # a concept's MRSA weight when the manifest leaves it null
MAX_INT64 = 2**63  # seeds and reference_seed lie in [0, 2**63)


@dataclass(frozen=True)
class Limits:
    """Sanity limits of a run: anything beyond them is refused by row, not attempted."""

    max_side: int = 2048  # height and width, pixels
    max_steps: int = 1000  # num_inference_steps
    max_concepts: int = 8  # concepts per row
    max_prompt_chars: int = 10_000  # prompt, concept prompts, negative_prompt

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{f.name} must be an integer >= 1, got {value!r}")
        if self.max_side < 64:
            raise ValueError(f"Limits.max_side must be >= 64, got {self.max_side}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an int to Python, never a valid count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool), neither NaN nor infinite."""
    return _is_number(value) and math.isfinite(value)


def _side_problem(name: str, value: Any, limits: Limits | None) -> str | None:
    if not is_int(value):
        return f"{name} must be an integer, got {value!r}"
    if value < 64:
        return f"{name} {value} is below 64 pixels"
    if value % 8:
        return (
            f"{name} {value} is not a multiple of 8 (the VAE downsamples by 8); try {max(64, value // 8 * 8)}"
        )
    if limits is not None and value > limits.max_side:
        return f"{name} {value} is over the limit of {limits.max_side} pixels (Limits.max_side)"
    return None


def _int_list_problem(name: str, value: Any) -> str | None:
    if not isinstance(value, (list, tuple)):
        return f"{name} must be a list of integers, got {value!r}"
    if not value:
        return f"{name} is empty; omit it to use the run's default"
    if any(not is_int(v) for v in value):
        return f"{name} must hold integers only (no nulls), got {list(value)}"
    if any(v < 0 for v in value):
        return f"{name} holds a negative block index: {list(value)}"
    if len(set(value)) != len(value):
        return f"{name} holds duplicates: {list(value)}"
    return None


def _str_list_problem(name: str, value: Any) -> str | None:
    if not isinstance(value, (list, tuple)):
        return f"{name} must be a list of layer names, got {value!r}"
    if not value:
        return f"{name} is empty; omit it to use mrsa_blocks"
    if any(not isinstance(v, str) or not v.strip() for v in value):
        return f"{name} must hold non-empty layer names (no nulls), got {list(value)}"
    if len(set(value)) != len(value):
        return f"{name} holds duplicates: {list(value)}"
    return None


NOT_SAFETENSORS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def lora_problems(value: Any) -> list[tuple[str, str]]:
    """``loras``: a list of ``{path, scale}`` (or ``[path, scale]``) items; scale null means 1.0."""
    if not isinstance(value, (list, tuple)):
        return [("loras", f"must be a list of {{path, scale}} structs, got {value!r}")]
    problems = []
    paths = []
    for i, item in enumerate(value):
        if isinstance(item, Mapping):
            path, scale = item.get("path"), item.get("scale")
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            path, scale = item
        else:
            problems.append((f"loras[{i}]", f"must be a {{path, scale}} struct, got {item!r}"))
            continue
        if not isinstance(path, str) or not path.strip():
            problems.append((f"loras[{i}].path", f"must be a LoRA file, folder or hub id, got {path!r}"))
        elif path.lower().endswith(NOT_SAFETENSORS):
            problems.append((f"loras[{i}].path", f"{path!r}: LoRA weights are read from safetensors only"))
        else:
            paths.append(path)
        if scale is not None and not is_finite_number(scale):
            problems.append((f"loras[{i}].scale", f"scale {scale!r} must be a finite number (null: 1.0)"))
    duplicated = sorted({p for p in paths if paths.count(p) > 1})
    if duplicated:
        problems.append(("loras", f"the same LoRA is listed twice: {duplicated}; give it once with its scale"))
    return problems


def normalize_loras(value: Any) -> tuple[tuple[str, float], ...]:
    """``loras`` as ``((path, scale), ...)`` from structs or pairs (valid per ``lora_problems``)."""
    out = []
    for item in value or ():
        path, scale = (item.get("path"), item.get("scale")) if isinstance(item, Mapping) else item
        out.append((str(path), 1.0 if scale is None else float(scale)))
    return tuple(out)


def param_problems(values: Mapping[str, Any], limits: Limits | None = None) -> list[tuple[str, str]]:
    """Every problem of a set of generation parameters, as (field, reason) pairs.

    ``values`` has GenParams' fields (a GenParams' ``asdict`` with a row's overrides applied).
    Rules that depend on the run's ``limits`` (max side, max steps, prompt length) are skipped
    when ``limits`` is None.
    """
    problems: list[tuple[str, str]] = []

    def check(name: str, problem: str | None) -> None:
        if problem:
            problems.append((name, problem))

    negative = values["negative_prompt"]
    if not isinstance(negative, str):
        check("negative_prompt", f"must be a string, got {negative!r}")
    elif limits is not None and len(negative) > limits.max_prompt_chars:
        check("negative_prompt", f"{len(negative)} characters, over the limit of {limits.max_prompt_chars}")

    guidance = values["guidance_scale"]
    if not is_finite_number(guidance) or guidance < 0:
        check(
            "guidance_scale",
            f"guidance_scale {guidance!r} must be a finite number >= 0 (default {DEFAULT_GUIDANCE_SCALE})",
        )

    steps = values["num_inference_steps"]
    steps_ok = is_int(steps) and steps >= 1 and (limits is None or steps <= limits.max_steps)
    if not steps_ok:
        top = limits.max_steps if limits is not None else "max_steps"
        check("num_inference_steps", f"num_inference_steps {steps!r} is outside [1, {top}]")

    check("height", _side_problem("height", values["height"], limits))
    check("width", _side_problem("width", values["width"], limits))

    ref_seed = values["reference_seed"]
    if not is_int(ref_seed) or not 0 <= ref_seed < MAX_INT64:
        check("reference_seed", f"reference_seed {ref_seed!r} is outside [0, 2**63)")

    fidelity = values["style_fidelity"]
    if not is_finite_number(fidelity) or not 0 <= fidelity <= 1:
        check("style_fidelity", f"style_fidelity {fidelity!r} is outside [0, 1]")

    mode = values["mask_mode"]
    if mode not in MASK_MODES:
        check("mask_mode", f"unknown mask_mode {mode!r}; use one of {list(MASK_MODES)}")

    if not isinstance(values["null_ref_prompts"], bool):
        check("null_ref_prompts", f"must be true or false, got {values['null_ref_prompts']!r}")

    start, end = values["start_step"], values["end_step"]
    if not is_int(start) or start < 0:
        check("start_step", f"start_step {start!r} must be an integer >= 0")
    elif end is None and steps_ok and start >= steps:
        check("start_step", f"start_step {start} must be below num_inference_steps {steps}")
    if end is not None:
        if not is_int(end) or end < 1:
            check("end_step", f"end_step {end!r} must be an integer >= 1 (or null: all steps)")
        elif steps_ok and end > steps:
            check("end_step", f"end_step {end} is past num_inference_steps {steps}")
        elif is_int(start) and start >= end:
            check("start_step", f"start_step {start} must be below end_step {end}")

    check("mrsa_blocks", _int_list_problem("mrsa_blocks", values["mrsa_blocks"]))
    if values["mrsa_layers"] is not None:
        check("mrsa_layers", _str_list_problem("mrsa_layers", values["mrsa_layers"]))
    problems.extend(lora_problems(values["loras"]))
    return problems


@dataclass(frozen=True)
class GenParams:
    """How a row is rendered: the run's defaults (the paper's), with the row's overrides applied.

    ``end_step`` None means "through the last step". MRSA (multi-reference self-attention)
    runs in ``mrsa_blocks`` (attention-bearing UNet blocks numbered down 0..2, mid 3, up 4..6
    for SD1.5: the paper's (5, 6) are the last two up blocks), or, when ``mrsa_layers`` is
    given, in exactly those named layers. Validated on construction (limit-free rules; the
    run's ``Limits`` are applied by the manifest's validation).

    Every field is a manifest override column of the same name. Adding one touches three modules:

    1. here: the field, its rule in ``param_problems``, and its place in ``reference_params``
       (if the reference K/V depend on it; only when it differs from its default, so existing
       concept-set ids stay), ``reference_kwargs`` / ``generate_kwargs`` (the engine argument it
       feeds) and ``sample_meta``, as each applies;
    2. ``pipeline/manifest.py``: its Arrow type in ``OVERRIDE_TYPES`` (everything else in
       ``pipeline/`` derives the override names from there);
    3. ``freecustom_core``: the engine argument (``MRSAConfig`` or ``FreeCustomGenerator``).
    """

    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    num_inference_steps: int = DEFAULT_STEPS
    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH
    reference_seed: int = 0
    style_fidelity: float = 1.0
    mask_mode: str = "bias"
    start_step: int = 0
    end_step: int | None = None
    null_ref_prompts: bool = False
    mrsa_blocks: tuple[int, ...] = (5, 6)
    mrsa_layers: tuple[str, ...] | None = None
    # LoRA adapters active while rendering: ((path or hub id, scale), ...); the manifest's ``loras``
    # column is ``list<struct{path, scale}>``, ``run --lora PATH_OR_ID[:SCALE]`` the run's default
    loras: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not lora_problems(self.loras):
            object.__setattr__(self, "loras", normalize_loras(self.loras))
        if isinstance(self.mrsa_blocks, list):
            object.__setattr__(self, "mrsa_blocks", tuple(self.mrsa_blocks))
        if isinstance(self.mrsa_layers, list):
            object.__setattr__(self, "mrsa_layers", tuple(self.mrsa_layers))
        for name in ("guidance_scale", "style_fidelity"):
            if is_int(getattr(self, name)):
                object.__setattr__(self, name, float(getattr(self, name)))
        problems = param_problems(dataclasses.asdict(self))
        if problems:
            raise ValueError("invalid GenParams: " + "; ".join(f"{f}: {r}" for f, r in problems))

    def with_overrides(self, overrides: Mapping[str, Any]) -> GenParams:
        """A copy with the non-null values of ``overrides`` (manifest column -> value) applied."""
        unknown = sorted(set(overrides) - set(FIELD_NAMES))
        if unknown:
            raise ValueError(f"not GenParams fields: {unknown}; known: {list(FIELD_NAMES)}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    # -- the engine's view

    def mrsa_config(self) -> MRSAConfig:
        """The engine's MRSA configuration of these parameters."""
        return MRSAConfig(
            blocks=self.mrsa_blocks,
            layers=self.mrsa_layers,
            start_step=self.start_step,
            end_step=self.end_step,
            mask_mode=self.mask_mode,
            style_fidelity=self.style_fidelity,
            null_ref_prompts=self.null_ref_prompts,
        )

    def mrsa_dict(self) -> dict:
        """``mrsa_config().to_dict()``, computed once per distinct parameter set (rows share few).

        The dict is shared by every caller: read it, never mutate it (copy first).
        """
        return _mrsa_dict(self)

    def reference_params(self) -> dict:
        """What a concept set's reference K/V depend on besides the concepts themselves.

        Hashed into concept-set ids that name existing output folders: its keys and values must
        not change (a new field enters only when it is not at its default). The negative prompt
        enters only when the unconditional references are used.
        """
        return {
            "num_inference_steps": self.num_inference_steps,
            "height": self.height,
            "width": self.width,
            "reference_seed": self.reference_seed,
            "mrsa": self.mrsa_dict(),
            "negative_prompt": self.negative_prompt if self.style_fidelity < 1 else None,
            **({"loras": [list(item) for item in self.loras]} if self.loras else {}),
        }

    def loras_list(self) -> list[dict]:
        """``loras`` as the manifest writes them: ``[{"path", "scale"}, ...]``."""
        return [{"path": path, "scale": scale} for path, scale in self.loras]

    def reference_kwargs(self, family: str = "sd") -> dict:
        """Keyword arguments of the generator's ``prepare_references`` from these parameters.

        The negative prompt is read only when ``style_fidelity < 1``; an empty one falls back to
        the default there, as the reference K/V stored under ``reference_params`` were computed.
        ``family`` ``"flux"`` (``FluxFreeCustomGenerator``): no negative prompt, the references run
        with the embedded guidance.
        """
        kwargs = {
            "num_inference_steps": self.num_inference_steps,
            "height": self.height,
            "width": self.width,
            "reference_seed": self.reference_seed,
            "mrsa": self.mrsa_config(),
        }
        if family == "flux":
            return dict(kwargs, guidance_scale=self.guidance_scale)
        negative = self.reference_params()["negative_prompt"]
        if family == "blip":  # its default is the empty one (the release's BLIP pipeline): no fallback
            return dict(kwargs, negative_prompt=negative or "")
        return dict(kwargs, negative_prompt=negative or DEFAULT_NEGATIVE_PROMPT)

    def kv_identity_kwargs(self, family: str = "sd") -> dict:
        """Keyword arguments of the generator's ``kv_identity`` (what cached K/V are checked against)."""
        kwargs = {"num_inference_steps": self.num_inference_steps, "height": self.height, "width": self.width}
        return dict(kwargs, guidance_scale=self.guidance_scale) if family == "flux" else kwargs

    def generate_kwargs(self, family: str = "sd") -> dict:
        """Keyword arguments of the generator's ``generate`` from these parameters (``family`` as in
        ``reference_kwargs``: FLUX takes no negative prompt)."""
        kwargs = {
            "num_inference_steps": self.num_inference_steps,
            "height": self.height,
            "width": self.width,
            "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
        }
        if family == "flux":
            del kwargs["negative_prompt"]
        return kwargs

    def sample_meta(self) -> dict:
        """The parameter part of a sample's metadata (its JSON bytes depend on these keys and values).

        ``"mrsa"`` is the shared ``mrsa_dict()``: do not mutate it.
        """
        return {
            "negative_prompt": self.negative_prompt,
            "guidance_scale": self.guidance_scale,
            "num_inference_steps": self.num_inference_steps,
            "height": self.height,
            "width": self.width,
            "reference_seed": self.reference_seed,
            "mrsa": self.mrsa_dict(),
            **({"loras": self.loras_list()} if self.loras else {}),
        }

    # -- as a row

    def to_row(self) -> dict:
        """Every field, JSON-safe (tuples as lists); ``from_row`` reads it back exactly."""
        row = {}
        for name in FIELD_NAMES:
            value = getattr(self, name)
            row[name] = list(value) if isinstance(value, tuple) else value
        row["loras"] = [list(item) for item in self.loras]
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> GenParams:
        """The parameter set of a ``to_row`` dict, or of a row as Ray hands it over.

        Lists may arrive as numpy arrays and scalars as numpy scalars; a null that Ray turned into
        float NaN reads as None in the fields that may be null. Other keys of ``row`` are ignored.
        Raises ``ValueError`` naming missing fields, or the rules a value breaks.
        """
        missing = [name for name in FIELD_NAMES if name not in row]
        if missing:
            raise ValueError(f"not a GenParams row: missing {missing}")
        values = {}
        for name in FIELD_NAMES:
            value = _plain(row[name])
            if name in _NULLABLE and isinstance(value, float) and value != value:
                value = None
            values[name] = value
        return cls(**values)


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(GenParams))
"""GenParams' fields, in order: the names of the manifest's override columns."""

_NULLABLE = frozenset(f.name for f in dataclasses.fields(GenParams) if f.default is None)


@functools.lru_cache(maxsize=4096)
def _mrsa_dict(params: GenParams) -> dict:
    return params.mrsa_config().to_dict()


def _plain(value: Any) -> Any:
    """A Python value for a numpy scalar or array (``tolist``), lists element by element."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
