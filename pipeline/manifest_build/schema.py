"""The build spec's YAML with line numbers, and its schema (``SPEC_SCHEMA``) checked before anything is read.

The YAML is composed into nodes (``yaml.SafeLoader``: data only, no python tags) and turned into
plain values while every key path's line is remembered, so each error names the file, the line
and the key path: ``spec.yaml:12: pools.products.columns.imgae: unknown key (expected one of ...)``.
The schema is data: a mapping of key -> ``Field``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["SPEC_SCHEMA", "BuildError", "Field", "Located", "check", "dotted", "load_yaml"]


class BuildError(Exception):
    """The build cannot go on: the message names the spec line and key, or the feed row. Exit 2."""


# --------------------------------------------------------------------------- YAML with lines


@dataclass
class Located:
    """Plain values of a YAML document and the line (1-based) of every key path in it."""

    value: Any
    lines: dict[tuple, int]
    source: str

    def where(self, path: tuple) -> str:
        """``spec.yaml:12: pools.products.image`` for a key path (the nearest known line)."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return f"{self.source}:{self.lines[path[:n]]}: {dotted(path)}"
        return f"{self.source}: {dotted(path)}"  # pragma: no cover - the root always has a line


def dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_yaml(text: str, source: str) -> Located:
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise BuildError(f"{source}: not valid YAML: {exc}") from None
        if node is None:
            raise BuildError(f"{source}: the spec is empty")
        lines: dict[tuple, int] = {}

        def walk(node: yaml.Node, path: tuple) -> Any:
            lines.setdefault(path, node.start_mark.line + 1)
            if isinstance(node, yaml.MappingNode):
                out: dict[Any, Any] = {}
                for key_node, value_node in node.value:
                    key = loader.construct_object(key_node, deep=True)
                    if not isinstance(key, str):
                        raise BuildError(
                            f"{source}:{key_node.start_mark.line + 1}: {dotted(path)}: key {key!r} is not text"
                        )
                    if key in out:
                        raise BuildError(
                            f"{source}:{key_node.start_mark.line + 1}: {dotted(path + (key,))}: key given twice"
                        )
                    lines[path + (key,)] = key_node.start_mark.line + 1
                    out[key] = walk(value_node, path + (key,))
                return out
            if isinstance(node, yaml.SequenceNode):
                return [walk(v, path + (i,)) for i, v in enumerate(node.value)]
            try:
                return loader.construct_object(node, deep=True)
            except yaml.YAMLError as exc:
                raise BuildError(f"{source}:{node.start_mark.line + 1}: {dotted(path)}: {exc}") from None

        return Located(walk(node, ()), lines, source)
    finally:
        loader.dispose()


# --------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class Field:
    """One key: its kind (``str``, ``int``, ``float``, ``bool``, ``list``, ``map``, ``strlist``, ``intlist``,
    ``seeds``, ``mapping`` of a sub-schema, ``entries`` (name -> sub-schema), ``items`` (list of
    sub-schema), ``any``), whether it is required, and a check returning why a value is wrong."""

    kind: str
    required: bool = False
    schema: Mapping[str, Field] | None = None
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] = ()


def _positive(v):
    return None if v > 0 else "must be > 0"


def _side(v):
    return None if 64 <= v <= 2048 and v % 8 == 0 else "must be a multiple of 8 in [64, 2048]"


def _scale(v):
    return None if 0 < v <= 4 else "must be in (0, 4]"


CONTROL = {
    "image": Field("str", True),
    "type": Field("str", True, choices=("canny", "none")),
    "scale": Field("float"),
    "start": Field("float"),
    "end": Field("float"),
}
CONTEXT = {
    "slot": Field("str", True),
    "onto": Field("str", True),
    "anchor": Field("anchors", choices=("top", "upper", "center", "lower", "left", "right")),
    "box": Field("floatlist"),
    "scale": Field("float", check=_scale),
    "soft_edge": Field("int"),
}
POOL = {
    "folder": Field("str"),
    "table": Field("str"),
    "dataset": Field("str"),
    "format": Field("str", choices=("csv", "tsv", "jsonl", "parquet")),
    "columns": Field(
        "mapping",
        schema={
            "image": Field("str", True),
            "key": Field("str"),
            "mask": Field("str"),
            "label": Field("str"),
        },
    ),
    "attributes": Field("strlist"),
    "where": Field("map"),
    "key": Field("str", choices=("name", "digest")),
    "mask_suffix": Field("str"),
    "concept_prompt": Field("str", True),
    "label": Field("str"),
    "weight": Field("float", check=_positive),
}
SLOT = {"pool": Field("str", True), "count": Field("int", check=lambda v: None if v >= 1 else "must be >= 1")}
COMPOSITION = {
    "slots": Field("slots", True),
    "cap": Field("int", check=lambda v: None if v >= 1 else "must be >= 1"),
    "context": Field("items", schema=CONTEXT),
}
TEMPLATE = {
    "name": Field("str", True),
    "prompt": Field("str", True),
    "compositions": Field("strlist"),
    "when": Field("map"),
    "mode": Field("str", choices=("combinatorial", "random")),
    "samples": Field("int", check=lambda v: None if v >= 1 else "must be >= 1"),
    "seeds": Field("seeds"),
    "negative_prompt": Field("str"),
    "height": Field("int", check=_side),
    "width": Field("int", check=_side),
    "guidance_scale": Field("float", check=lambda v: None if v >= 0 else "must be >= 0"),
    "num_inference_steps": Field("int", check=lambda v: None if 1 <= v <= 1000 else "must be in [1, 1000]"),
    "control": Field("mapping", schema=CONTROL),
    "controls": Field("items", schema=CONTROL),
    "control_references": Field("bool"),
    "mrsa_layers": Field("strlist"),
    "mrsa_blocks": Field("intlist"),
}
SPEC_SCHEMA: dict[str, Field] = {
    "version": Field("int", check=lambda v: None if v == 1 else "only version 1 exists"),
    "seed": Field("int", check=lambda v: None if v >= 0 else "must be >= 0"),
    "seeds": Field("seeds"),
    "mode": Field("str", choices=("combinatorial", "random")),
    "samples": Field("int", check=lambda v: None if v >= 1 else "must be >= 1"),
    "lists": Field("map"),
    "pools": Field("entries", True, schema=POOL),
    "compositions": Field("entries", True, schema=COMPOSITION),
    "templates": Field("items", True, schema=TEMPLATE),
}

_SCALARS = {"str": str, "int": int, "float": (int, float), "bool": bool}


def check(doc: Located, value: Any, fld: Field, path: tuple) -> None:
    def bad(reason: str) -> BuildError:
        return BuildError(f"{doc.where(path)}: {reason}")

    kind = fld.kind
    if kind in _SCALARS:
        if isinstance(value, bool) and kind != "bool" or not isinstance(value, _SCALARS[kind]):
            raise bad(
                f"expected {'a number' if kind == 'float' else 'an integer' if kind == 'int' else kind}, got {value!r}"
            )
        if kind == "float" and not math.isfinite(value):
            raise bad(f"must be finite, got {value!r}")
        if fld.choices and value not in fld.choices:
            raise bad(f"{value!r} is not one of {list(fld.choices)}")
        if kind == "str" and not value.strip():
            raise bad("must not be empty")
    elif kind in ("strlist", "intlist", "floatlist"):
        inner = {"strlist": "str", "intlist": "int", "floatlist": "float"}[kind]
        if not isinstance(value, list) or not value:
            raise bad(f"expected a non-empty list, got {value!r}")
        for i, v in enumerate(value):
            check(doc, v, Field(inner), path + (i,))
    elif kind == "seeds":
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise bad("a seed count must be >= 1")
        elif isinstance(value, list) and value:
            for i, v in enumerate(value):
                check(
                    doc,
                    v,
                    Field("int", check=lambda s: None if 0 <= s < 2**63 else "seeds are in [0, 2**63)"),
                    path + (i,),
                )
            if len(set(value)) != len(value):
                raise bad("seeds repeat; each seed must appear once")
        else:
            raise bad(f"expected a seed count or a list of seeds, got {value!r}")
    elif kind == "anchors":  # one anchor, or one per item of a slot of several
        for i, v in enumerate(value if isinstance(value, list) and value else [value]):
            check(doc, v, Field("str", choices=fld.choices), path + ((i,) if isinstance(value, list) else ()))
    elif kind == "map":
        if not isinstance(value, dict):
            raise bad(f"expected a mapping, got {value!r}")
    elif kind == "slots":
        if not isinstance(value, dict) or not value:
            raise bad("expected a mapping of slot name -> pool (or {pool: NAME, count: K})")
        for name, v in value.items():
            if isinstance(v, dict):
                check(doc, v, Field("mapping", schema=SLOT), path + (name,))
            else:
                check(doc, v, Field("str"), path + (name,))
    elif kind == "mapping":
        if not isinstance(value, dict):
            raise bad(f"expected a mapping, got {value!r}")
        for key, v in value.items():
            if key not in fld.schema:
                raise BuildError(
                    f"{doc.where(path + (key,))}: unknown key (expected one of {sorted(fld.schema)})"
                )
            if v is not None:
                check(doc, v, fld.schema[key], path + (key,))
        for key, sub in fld.schema.items():
            if sub.required and value.get(key) is None:
                raise bad(f"missing required key {key!r}")
    elif kind == "entries":
        if not isinstance(value, dict) or not value:
            raise bad("expected a non-empty mapping of name -> entry")
        for name, v in value.items():
            check(doc, v, Field("mapping", schema=fld.schema), path + (name,))
    elif kind == "items":
        if not isinstance(value, list) or not value:
            raise bad("expected a non-empty list")
        for i, v in enumerate(value):
            check(doc, v, Field("mapping", schema=fld.schema), path + (i,))
    if fld.check is not None and (reason := fld.check(value)):
        raise bad(f"{value!r}: {reason}")
