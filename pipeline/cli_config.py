"""``run --config FILE`` and ``run --print-config``: a run's options kept in a YAML or TOML file.

A config file is a flat mapping of ``run``'s options by their long names, ``num_inference_steps`` and
``num-inference-steps`` alike (``--`` may lead), the manifest and ``out`` included::

    model: /models/sd15
    kv-cache: /mnt/shared/kv
    num_inference_steps: 30
    reuse: [/mnt/renders/2026-06-01]      # a repeatable option: a list (or one value)
    score: true

Where a setting comes from, the first that has it wins: (1) the command line, (2) the
``FREECUSTOM_*`` environment variables, (3) the config file, (4) the built-in defaults. That is
click's order for a command's ``default_map``, which the file's values become (the ``--config``
option is eager, so it is read before any other option). ``--print-config`` prints the effective
settings in the same form, ready to save as a config file.
"""

from __future__ import annotations

import difflib
import enum
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# options that say how the command runs, not what the run is: never read from nor printed to a file
NOT_SETTINGS = frozenset({"config", "print_config", "verbose", "quiet", "help"})


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a ``.toml`` file, or in a YAML file (any other name)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.endswith(".toml") else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"not valid {'TOML' if path.endswith('.toml') else 'YAML'}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping of option names to values, got {type(data).__name__}")
    return data


def option_name(key: str) -> str:
    """``--num-inference-steps``, ``num-inference-steps`` -> ``num_inference_steps``."""
    return str(key).strip().lstrip("-").replace("-", "_")


def config_defaults(command: typer.core.TyperCommand, data: dict[str, Any]) -> dict[str, Any]:
    """The file's values as ``command``'s default_map, keyed by parameter name. An unknown key, a key
    given twice (``a-b`` and ``a_b``) or a list for a single-valued option is a ValueError naming it."""
    params = {p.name: p for p in command.params if p.name not in NOT_SETTINGS}
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        name = option_name(key)
        param = params.get(name)
        if param is None:
            close = (
                difflib.get_close_matches(name, list(params), n=1, cutoff=0.6)
                or [
                    p
                    for p in params
                    if name in p.split("_")  # "steps" -> num_inference_steps
                ][:1]
            )
            suggestion = close[0].replace("_", "-") if close and "-" in str(key) else (close or [None])[0]
            hint = f"; did you mean {suggestion!r}?" if close else ""
            raise ValueError(f"unknown option {key!r}{hint}")
        if name in defaults:
            raise ValueError(f"option {key!r} is given twice")
        many = getattr(param, "multiple", False) or param.nargs == -1
        if isinstance(value, list) and not many:
            raise ValueError(f"option {key!r} takes one value, got a list")
        if value is None:
            continue  # null: the built-in default
        defaults[name] = (value if isinstance(value, list) else [value]) if many else value
    return defaults


def load_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """The eager ``--config`` callback: the file's values become the command's defaults."""
    if value is None or ctx.resilient_parsing:
        return value
    try:
        defaults = config_defaults(ctx.command, read_config_file(str(value)))
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"{value}: {e}", ctx=ctx, param=param) from e
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def effective_config(ctx: typer.Context) -> str:
    """The command's settings as parsed (command line > environment > file > defaults), as YAML in
    the command's option order; unset options (no default) as null."""
    names = [p.name for p in ctx.command.params if p.name not in NOT_SETTINGS and p.name in ctx.params]
    settings = {name: _plain(ctx.params[name]) for name in names}
    return yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)


ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        is_eager=True,
        callback=load_config,
        help="YAML or TOML file of options by long name; command line and env win.",
    ),
]
PrintConfig = Annotated[
    bool,
    typer.Option("--print-config", help="Print the effective settings as a config file and exit."),
]
