"""What every command of the CLI shares: option types and closed choices, environment variables,
-v / -q, and how answers and errors are printed."""

from __future__ import annotations

import enum
import importlib.metadata
import json
import logging
import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.manifest import ManifestError
from pipeline.plan import NoGPU, NotShared
from pipeline.settings import DEVICES, DTYPES, IMAGE_FORMATS, REFERENCE_ACTORS
from stages.inputs.read import is_uri
from stages.masks.segment import MASK_POLICIES
from stages.masks.segment_models import SAM_ARCHS
from stages.output.folder import OutputRefused

PACKAGE = "freecustom-pipeline"
PROJECT_LOGGERS = ("freecustom_core", "stages", "pipeline")  # what -v turns to DEBUG and -q to ERROR
# options of `run` a user sets in every run -> the environment variable each falls back to
# (validate's --allow-root and customize's --model read theirs too)
ENV_VARS = {
    "model": "FREECUSTOM_MODEL",
    "kv_cache": "FREECUSTOM_KV_CACHE",
    "allow_root": "FREECUSTOM_ALLOW_ROOT",
    "max_workers": "FREECUSTOM_MAX_WORKERS",
    "gpus_per_worker": "FREECUSTOM_GPUS_PER_WORKER",
    "dtype": "FREECUSTOM_DTYPE",
    "device": "FREECUSTOM_DEVICE",
    "scheduler": "FREECUSTOM_SCHEDULER",
    "sam_checkpoint": "FREECUSTOM_SAM_CHECKPOINT",
    "sam_model_type": "FREECUSTOM_SAM_MODEL_TYPE",
    "detector": "FREECUSTOM_DETECTOR",
}


def choices(name: str, values) -> type[enum.Enum]:
    """A closed set of strings as an enum: typer lists it in --help and refuses others while parsing."""
    return enum.Enum(name, {v: v for v in values}, type=str)


Dtype = choices("Dtype", DTYPES)
Device = choices("Device", DEVICES)
# what makes a run refuse to start (exit 2): besides bad options, a bad manifest, a foreign OUT, no
# GPU within --gpu-wait, a local OUT some node does not see
REFUSALS = (ManifestError, OutputRefused, NoGPU, NotShared)
ImageFormat = choices("ImageFormat", IMAGE_FORMATS)
MaskPolicy = choices("MaskPolicy", MASK_POLICIES)
ReferenceActors = choices("ReferenceActors", REFERENCE_ACTORS)
SamModelType = choices("SamModelType", SAM_ARCHS)  # "custom" needs a SamArch: Python API only

Verbose = Annotated[
    bool, typer.Option("-v", "--verbose", help="Debug logging of the pipeline's own modules, on stderr.")
]
Quiet = Annotated[
    bool,
    typer.Option(
        "-q",
        "--quiet",
        help="Only errors and the command's answer: no progress, tables or notes.",
    ),
]
Passthrough = Annotated[
    list[str] | None,
    typer.Option(
        help="A manifest column to pass through to the shard Parquet although its name is close to a known "
        "column's (repeatable); columns named x_* always pass through.",
    ),
]
AsJson = Annotated[
    bool, typer.Option("--json", help="Answer with one JSON object on stdout, nothing else there.")
]

# --------------------------------------------------------------------------- help: panels, names

# `--help` groups a command's options into these panels (typer's rich_help_panel), in this order of
# first use; options without one (-v, -q, --config) stay in the first panel, "Options".
PANEL_INPUT = "Input"
PANEL_MODEL = "Model"
PANEL_GENERATION = "Generation"
PANEL_CONTROLNET = "ControlNet"
PANEL_QUALITY = "Quality"
PANEL_CLUSTER = "Cluster and storage"
PANEL_OUTPUT = "Output"
PANELS = (PANEL_INPUT, PANEL_MODEL, PANEL_GENERATION, PANEL_CONTROLNET, PANEL_QUALITY, PANEL_CLUSTER, PANEL_OUTPUT)


class _NoFlagType:
    """--help is a flag: no ``<bool>`` type beside it."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class Command(_NoFlagType, typer.core.TyperCommand):
    """A command whose help reads like a conventional CLI's: arguments by their upper-case names
    (``run [OPTIONS] MANIFEST``, ``[CASE]`` when optional) and flags without a ``<bool>`` type."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, typer.core.TyperArgument) and param.metavar is None:
                param.metavar = param.name.upper()
            elif getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""  # the type column stays empty: a flag takes no value

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = param.metavar + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class Group(_NoFlagType, typer.core.TyperGroup):
    """The app and its sub-apps (``manifest``): their flags without a type either."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""


class App(typer.Typer):
    """``typer.Typer`` of ``Group``s whose commands are ``Command``s (a command added later gets the
    same help)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, cls=kwargs.pop("cls", Group), **kwargs)

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or Command, **kwargs)


# Rich reads ":name:" as an emoji (IMAGE:MASK:PROMPT became IMAGE😷PROMPT); in help texts a colon
# between letters is written as this entity, which the Markdown renderer turns back into ":".
COLON = "&#58;"


# --------------------------------------------------------------------------- output and logging


class EchoHandler(logging.Handler):
    """Log records as lines on the current stderr (looked up per record: CliRunner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(self.format(record), err=True)


def set_voice(ctx: typer.Context, verbose: bool, quiet: bool) -> bool:
    """Apply -v / -q and return whether the command is quiet. Flags given before the command and
    after it add up (``ctx.meta`` is shared by the group's and the command's contexts)."""
    verbose = ctx.meta["freecustom.verbose"] = verbose or ctx.meta.get("freecustom.verbose", False)
    quiet = ctx.meta["freecustom.quiet"] = quiet or ctx.meta.get("freecustom.quiet", False)
    if verbose and quiet:
        raise typer.BadParameter("-v/--verbose and -q/--quiet exclude each other")
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, EchoHandler) for h in logger.handlers):
            handler = EchoHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
    return quiet


def say(message: str, quiet: bool, *, err: bool = False) -> None:
    """A line for a person (a note, a summary): -q drops it."""
    if not quiet:
        typer.echo(message, err=err)


def fail(message: str, code: int = 2, *, as_json: bool = False) -> None:
    if as_json:
        answer({"error": message})
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def answer(obj: Any) -> None:
    """The one JSON object of --json on stdout (one line)."""
    typer.echo(json.dumps(obj, sort_keys=True, default=str))


def path_or_uri(value: str) -> str:
    """A local path as ``Path`` spells it (``out/`` -> ``out``); ``s3://...`` and other URIs untouched."""
    return value if is_uri(value) else str(Path(value))


def print_version(value: bool) -> None:
    if value:
        try:
            version = importlib.metadata.version(PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown (not installed)"
        typer.echo(f"{PACKAGE} {version}")
        raise typer.Exit(0)


def parse_lora_option(spec: str) -> tuple[str, float]:
    """``--lora PATH_OR_ID[:SCALE]`` -> (path or hub id, scale); scale 1.0 when omitted. A local path
    becomes absolute (the model actors may run elsewhere)."""
    path, colon, scale_text = spec.rpartition(":")
    scale = 1.0
    if colon:
        try:
            scale = float(scale_text)
        except ValueError:
            path = spec  # a ':' inside the path or id, no scale
        else:
            if not math.isfinite(scale):
                raise ValueError(f"--lora {spec!r}: the scale must be a finite number")
    else:
        path = spec
    if not path.strip():
        raise ValueError(f"--lora {spec!r}: expected PATH_OR_ID[:SCALE], e.g. lora.safetensors:0.8")
    return (os.path.abspath(path) if os.path.exists(path) else path), scale
