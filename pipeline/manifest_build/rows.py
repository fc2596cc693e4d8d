"""From a checked spec to manifest rows: compile the templates, read the pools, make the concept sets,
expand the prompts, and derive each row's id and seeds from what the row is.

Row id: ``<template>-<keys>-<h>``, where ``<keys>`` is the items' keys made file-name safe (shortened)
for people, and ``h`` a 64-bit blake2b hash (16 hex digits) of (composition name, template name, each
slot's item keys, the chosen variant/list texts). The id changes when one of those changes: an item's
key (or, without a key column, its image's bytes), the template's or composition's name, the variant
drawn. It does not change with the row's position, the feed's order, other items, the template's text
or any attribute: such a change keeps the id and changes the row's content, which ``run --reuse``
then renders again. Seeds given as a count are derived from the id (and the spec's ``seed``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.manifest import MANIFEST_SCHEMA

from .compose import ConceptSet, hash64, sets
from .pools import Item
from .prompts import Template, TemplateError, compile_template
from .spec import BuildError, CompositionSpec, Spec, TemplateSpec

__all__ = ["PASSTHROUGH", "RowMaker", "output_schema"]

# pass-through columns every built row carries (into each sample's metadata, not into its record)
PASSTHROUGH = {"composition": pa.string(), "template": pa.string(), "item_keys": pa.list_(pa.string())}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_RS, _GS, _US = "\x1e", "\x1d", "\x1f"  # separators of what a row id hashes (record, group, unit)
_ITEM_SLOTS = ("key", "prompt")  # every item has these besides its pool's attributes
# what a row's reference K/V depend on besides its concepts: rows differing here need their own pass
_REFERENCE_KEYS = (
    "height",
    "width",
    "num_inference_steps",
    "mrsa_layers",
    "mrsa_blocks",
    "control_references",
    "control",
    "controls",
    "loras",
    "reference_seed",
)


def output_schema(spec: Spec) -> pa.Schema:
    """The manifest's columns: required ones, the overrides any template sets, the pass-through ones."""
    used = dict.fromkeys(k for t in spec.templates for k in t.overrides)
    fields = [MANIFEST_SCHEMA.field(n) for n in ("id", "prompt", "seeds", "concepts")]
    fields += [MANIFEST_SCHEMA.field(n) for n in MANIFEST_SCHEMA.names if n in used]
    return pa.schema(fields + [pa.field(n, t) for n, t in PASSTHROUGH.items()])


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_")


@dataclass
class Bound:
    """A template bound to a composition: its compiled prompt and filter."""

    spec: TemplateSpec
    template: Template


@dataclass
class RowMaker:
    spec: Spec
    prompts: dict[str, Template] = field(default_factory=dict)  # pool -> concept prompt
    labels: dict[str, Template] = field(default_factory=dict)  # pool -> detector label
    bound: dict[str, list[Bound]] = field(default_factory=dict)  # composition -> its templates
    _groups: dict[str, str] = field(default_factory=dict)  # template -> its reference group

    def __post_init__(self) -> None:
        spec = self.spec
        for name, pool in spec.pools.items():

            def known(slot, pool=pool):
                return (
                    None
                    if slot in pool.attributes or slot in ("key",)
                    else f"the pool's attributes are {list(pool.attributes)}"
                )

            for attr, store in (("concept_prompt", self.prompts), ("label", self.labels)):
                text = getattr(pool, attr)
                if text is None:
                    continue
                try:
                    store[name] = compile_template(text, {}, known=known, variants=False)
                except TemplateError as exc:
                    raise BuildError(f"{spec.where(pool.path + (attr,))}: {exc}") from None
        for name, comp in spec.compositions.items():
            self.bound[name] = []
            for t in spec.templates:
                if name not in t.compositions:
                    continue
                try:
                    template = compile_template(t.prompt, spec.lists, mode=t.mode, known=self._known(comp))
                except TemplateError as exc:
                    raise BuildError(
                        f"{spec.where(t.path + ('prompt',))}: {exc} (composition {name})"
                    ) from None
                for attr in t.when:
                    if (problem := self._known(comp)(attr)) is not None or attr.endswith(".prompt"):
                        raise BuildError(
                            f"{spec.where(t.path + ('when', attr))}: unknown attribute {attr!r}: "
                            f"{problem or 'prompt is not an attribute'} (composition {name})"
                        )
                self.bound[name].append(Bound(t, template))

    def _known(self, comp: CompositionSpec):
        slots = {s.name: self.spec.pools[s.pool] for s in comp.slots}
        first = self.spec.pools[comp.slots[0].pool]

        def known(name: str) -> str | None:
            slot, dot, attr = name.rpartition(".")
            pool = slots.get(slot) if dot else first
            if dot and pool is None:
                return f"no slot {slot!r} in composition {comp.name} (slots: {list(slots)})"
            if attr in pool.attributes or attr in _ITEM_SLOTS:
                return None
            return (
                f"{attr!r} is not an attribute of pool {pool.name} (attributes: {list(pool.attributes)}, "
                f"and every item's key and prompt)"
            )

        return known

    # ----------------------------------------------------------------------- one set -> rows

    def concept_prompt(self, pool: str, item: Item) -> str:
        return self.prompts[pool].fill(self.prompts[pool].parts, lambda n: _attr(item, n))

    def rows(self, comp: CompositionSpec, concept_set: ConceptSet) -> Iterator[dict]:
        """The rows of one concept set: one per matching template and expansion."""
        concepts, offsets = [], {}
        for slot, items in zip(comp.slots, concept_set, strict=True):
            offsets[slot.name] = len(concepts)
            pool = self.spec.pools[slot.pool]
            for item in items:
                label = item.label or (
                    self.labels[slot.pool].fill(self.labels[slot.pool].parts, lambda n, it=item: _attr(it, n))
                    if slot.pool in self.labels
                    else None
                )
                concepts.append(
                    {
                        "image": item.image,
                        "prompt": self.concept_prompt(slot.pool, item),
                        "mask": item.mask,
                        "weight": pool.weight,
                        "box": None,
                        "points": None,
                        "label": label,
                        "context": None,
                        "_slot": slot.name,
                    }
                )
        for rule in comp.context:
            anchors = rule.get("anchor")
            anchors = [anchors] if anchors is None or isinstance(anchors, str) else anchors
            # the slot's n-th item takes the n-th anchor of a list (cycling)
            for n, c in enumerate(x for x in concepts if x["_slot"] == rule["slot"]):
                c["context"] = {
                    "onto": str(offsets[rule["onto"]]),
                    "anchor": anchors[n % len(anchors)],
                    "box": rule.get("box"),
                    "scale": rule.get("scale"),
                    "soft_edge": rule.get("soft_edge"),
                }
        for c in concepts:
            del c["_slot"]
        by_slot = {slot.name: items for slot, items in zip(comp.slots, concept_set, strict=True)}
        first = concept_set[0]
        keys = [[it.key for it in items] for items in concept_set]

        def value(name: str) -> str:
            slot, dot, attr = name.rpartition(".")
            items = by_slot[slot] if dot else first[:1]
            pool = comp.slots[0].pool if not dot else next(s.pool for s in comp.slots if s.name == slot)
            if attr == "prompt":
                return " and ".join(self.concept_prompt(pool, it) for it in items)
            return " and ".join(_attr(it, attr) for it in items)

        flat_keys = [k for ks in keys for k in ks]
        for b in self.bound[comp.name]:
            if not all(value(attr) in allowed for attr, allowed in b.spec.when.items()):
                continue
            base = f"{comp.name}{_RS}{b.spec.name}{_RS}{_GS.join(_US.join(ks) for ks in keys)}"
            for flat, picks in b.template.expansions(b.spec.mode, b.spec.samples, base.encode()):
                digest = hashlib.blake2b(f"{base}{_RS}{_US.join(picks)}".encode(), digest_size=8).hexdigest()
                readable = _safe("-".join([b.spec.name, *flat_keys]))[:100].rstrip("_-")
                row_id = f"{readable}-{digest}" if readable else digest
                yield {
                    "id": row_id,
                    "prompt": b.template.fill(flat, value),
                    "seeds": self._seeds(b.spec, row_id),
                    "concepts": concepts,
                    **b.spec.overrides,
                    "composition": comp.name,
                    "template": b.spec.name,
                    "item_keys": flat_keys,
                }

    def _seeds(self, t: TemplateSpec, row_id: str) -> list[int]:
        if not isinstance(t.seeds, int):
            return list(t.seeds)
        stream = hashlib.blake2b(f"{self.spec.seed}{_RS}{row_id}".encode()).digest()
        out = list(
            dict.fromkeys(
                int.from_bytes(stream[i : i + 4], "big") & 0x7FFFFFFF
                for i in range(0, 4 * min(t.seeds, 16), 4)
            )
        )
        j = 0
        while len(out) < t.seeds:  # more than 16 seeds (or a repeat among them): one hash each
            s = hash64(self.spec.seed, row_id, j) % 2**31
            out.append(s) if s not in out else None
            j += 1
        return out[: t.seeds]

    def reference_group(self, row: dict) -> str:
        """What besides the concepts a row's reference K/V depend on: all from its template's overrides."""
        group = self._groups.get(row["template"])
        if group is None:
            group = self._groups[row["template"]] = json.dumps(
                [row.get(k) for k in _REFERENCE_KEYS], sort_keys=True, default=str
            )
        return group

    def sets(self, comp: CompositionSpec, pools: dict[str, list[Item]]) -> Iterator[ConceptSet]:
        return sets(comp, pools, self.spec.seed)


def _attr(item: Item, name: str) -> str:
    if name == "key":
        return item.key
    value = item.attributes.get(name)
    return "" if value is None else str(value)
