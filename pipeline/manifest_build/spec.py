"""The build spec (``manifest build SPEC.yaml``): checked against ``schema.SPEC_SCHEMA`` (errors name the
line and key path) and turned into a tree of frozen records (``Spec``, ``PoolSpec``, ``CompositionSpec``,
``TemplateSpec``) before any pool is read. Relative paths resolve against the spec's folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import SPEC_SCHEMA, BuildError, Field, Located, check, load_yaml

__all__ = [
    "BuildError",
    "CompositionSpec",
    "PoolSpec",
    "SlotSpec",
    "Spec",
    "TemplateSpec",
    "load_spec",
    "parse_spec",
]


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PoolSpec:
    name: str
    kind: str  # folder | table | dataset
    location: str  # absolute local path, URI or URL
    format: str | None
    columns: dict[str, str]
    attributes: tuple[str, ...]
    where: dict[str, tuple]
    key: str
    mask_suffix: str
    concept_prompt: str
    label: str | None
    weight: float | None
    path: tuple  # where in the spec, for messages


@dataclass(frozen=True)
class SlotSpec:
    name: str
    pool: str
    count: int


@dataclass(frozen=True)
class CompositionSpec:
    name: str
    slots: tuple[SlotSpec, ...]
    cap: int | None
    context: tuple[dict, ...]
    path: tuple


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    prompt: str
    compositions: tuple[str, ...]
    when: dict[str, tuple]
    mode: str
    samples: int
    seeds: int | tuple[int, ...]
    overrides: dict[str, Any]  # manifest override / control columns, as the manifest spells them
    path: tuple


@dataclass(frozen=True)
class Spec:
    source: str
    base_dir: str
    seed: int
    pools: dict[str, PoolSpec]
    compositions: dict[str, CompositionSpec]
    templates: tuple[TemplateSpec, ...]
    lists: dict[str, tuple[str, ...]]
    doc: Located = field(repr=False, compare=False)

    def where(self, path: tuple) -> str:
        return self.doc.where(path)


_TEMPLATE_KEYS = ("name", "prompt", "compositions", "when", "mode", "samples", "seeds")
FOLDER_ATTRIBUTES = ("key", "name", "folder")  # what a folder pool's items know about themselves


def _resolve(location: str, base_dir: str) -> str:
    if "://" in location or os.path.isabs(location):
        return location
    return os.path.abspath(os.path.join(base_dir, location))


def _values(value: Any) -> tuple:
    return tuple(str(v) for v in value) if isinstance(value, list) else (str(value),)


def _lists(doc: Located, raw: dict, base_dir: str) -> dict[str, tuple[str, ...]]:
    """``lists:`` name -> values; a string value is a wildcard file, one entry per non-empty line."""
    out = {}
    for name, value in raw.items():
        path = ("lists", name)
        if isinstance(value, str):
            file = _resolve(value, base_dir)
            try:
                value = [line.strip() for line in Path(file).read_text(encoding="utf-8").splitlines()]
            except OSError as exc:
                raise BuildError(f"{doc.where(path)}: cannot read the wildcard file {file}: {exc}") from None
            value = [v for v in value if v and not v.startswith("#")]
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str | int | float) for v in value)
        ):
            raise BuildError(
                f"{doc.where(path)}: a list is a non-empty list of texts or a wildcard file path"
            )
        out[name] = tuple(str(v) for v in value)
    return out


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read and check a spec; relative paths in it resolve against its folder."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"{source}: cannot read the spec: {exc}") from None
    return parse_spec(text, source=source, base_dir=os.path.dirname(os.path.abspath(source)))


def parse_spec(text: str, *, source: str = "spec", base_dir: str = ".") -> Spec:
    doc = load_yaml(text, source)
    check(doc, doc.value, Field("mapping", schema=SPEC_SCHEMA), ())
    raw = doc.value
    pools = {}
    for name, p in raw["pools"].items():
        path = ("pools", name)
        sources = [k for k in ("folder", "table", "dataset") if p.get(k) is not None]
        if len(sources) != 1:
            raise BuildError(
                f"{doc.where(path)}: give exactly one of folder, table, dataset (found {sources or 'none'})"
            )
        kind = sources[0]
        columns = dict(p.get("columns") or {})
        if kind != "folder" and "image" not in columns:
            raise BuildError(f"{doc.where(path)}: a {kind} pool needs columns.image (the image column)")
        if kind == "folder" and columns:
            raise BuildError(f"{doc.where(path + ('columns',))}: a folder pool has no columns")
        attributes = tuple(p.get("attributes") or ())
        if kind == "folder":
            attributes = FOLDER_ATTRIBUTES
        where = {k: _values(v) for k, v in (p.get("where") or {}).items()}
        for attr in where:
            if attr not in attributes:
                raise BuildError(
                    f"{doc.where(path + ('where', attr))}: filters on {attr!r}, which is not one of the "
                    f"pool's attributes {list(attributes)}"
                )
        pools[name] = PoolSpec(
            name=name,
            kind=kind,
            location=_resolve(p[kind], base_dir),
            format=p.get("format"),
            columns=columns,
            attributes=attributes,
            where=where,
            key=p.get("key") or "name",
            mask_suffix=p.get("mask_suffix") or "_mask",
            concept_prompt=p["concept_prompt"],
            label=p.get("label"),
            weight=None if p.get("weight") is None else float(p["weight"]),
            path=path,
        )
    compositions = {}
    for name, c in raw["compositions"].items():
        path = ("compositions", name)
        slots = []
        for slot, v in c["slots"].items():
            pool, count = (v["pool"], v.get("count") or 1) if isinstance(v, dict) else (v, 1)
            if pool not in pools:
                raise BuildError(
                    f"{doc.where(path + ('slots', slot))}: no pool named {pool!r} (pools: {sorted(pools)})"
                )
            slots.append(SlotSpec(slot, pool, count))
        names = [s.name for s in slots]
        for i, rule in enumerate(c.get("context") or ()):
            rpath = path + ("context", i)
            if rule["slot"] not in names or rule["onto"] not in names or rule["slot"] == rule["onto"]:
                raise BuildError(
                    f"{doc.where(rpath)}: slot and onto must name two different slots of {names}"
                )
            onto = next(s for s in slots if s.name == rule["onto"])
            if onto.count != 1:
                raise BuildError(
                    f"{doc.where(rpath + ('onto',))}: the carrier slot must hold one item (count 1)"
                )
            if rule.get("anchor") is not None and rule.get("box") is not None:
                raise BuildError(f"{doc.where(rpath)}: give anchor or box, not both")
        compositions[name] = CompositionSpec(
            name, tuple(slots), c.get("cap"), tuple(c.get("context") or ()), path
        )
    templates = []
    seen = {}
    for i, t in enumerate(raw["templates"]):
        path = ("templates", i)
        if t["name"] in seen:
            raise BuildError(
                f"{doc.where(path + ('name',))}: template name {t['name']!r} is used by templates[{seen[t['name']]}]"
            )
        seen[t["name"]] = i
        for comp in t.get("compositions") or ():
            if comp not in compositions:
                raise BuildError(
                    f"{doc.where(path + ('compositions',))}: no composition named {comp!r} "
                    f"(compositions: {sorted(compositions)})"
                )
        if t.get("control") is not None and t.get("controls") is not None:
            raise BuildError(f"{doc.where(path)}: give control or controls, not both")
        overrides = {k: v for k, v in t.items() if k not in _TEMPLATE_KEYS and v is not None}
        for key in ("control", "controls"):
            if key in overrides:  # control images are paths like any other
                items = overrides[key] if key == "controls" else [overrides[key]]
                items = [
                    {"scale": None, "start": None, "end": None, **c, "image": _resolve(c["image"], base_dir)}
                    for c in items
                ]
                overrides[key] = items if key == "controls" else items[0]
        templates.append(
            TemplateSpec(
                name=t["name"],
                prompt=t["prompt"],
                compositions=tuple(t.get("compositions") or compositions),
                when={k: _values(v) for k, v in (t.get("when") or {}).items()},
                mode=t.get("mode") or raw.get("mode") or "combinatorial",
                samples=t.get("samples") or raw.get("samples") or 1,
                seeds=_seeds(t.get("seeds") or raw.get("seeds") or 1),
                overrides=overrides,
                path=path,
            )
        )
    return Spec(
        source=source,
        base_dir=base_dir,
        seed=raw.get("seed") or 0,
        pools=pools,
        compositions=compositions,
        templates=tuple(templates),
        lists=_lists(doc, raw.get("lists") or {}, base_dir),
        doc=doc,
    )


def _seeds(value: int | list) -> int | tuple[int, ...]:
    return value if isinstance(value, int) else tuple(value)
