"""Prompt templates: slots filled from item attributes, variants and wildcards in the syntax of the
``dynamicprompts`` package, expanded combinatorially or sampled with a seed.

Syntax (a subset of dynamicprompts', plus attribute slots):

* ``{title}``, ``{pet.breed}``: a *slot*, a brace group without ``|``. ``{attr}`` is an attribute of
  the composition's first slot; ``{slot.attr}`` one of that slot (several items: joined with " and ").
  Every item also has ``key`` and ``prompt`` (its concept prompt). A name in ``lists:`` is a list slot:
  one of its values, like a variant.
* ``{a|b|c}``: a *variant*, one of the alternatives; alternatives may hold slots, variants, wildcards.
* ``__scene__``: a *wildcard*, one value of the list ``scene`` (``lists:`` in the spec: a list, or a
  text file with one value per line, as dynamicprompts' wildcard files).
* ``{{`` and ``}}``: literal braces.

Not taken from dynamicprompts: weights (``{0.5::a|b}``), ``{2$$a|b}`` multi-picks, variables and
Jinja templates. Why not the package itself (it installs): its ``{x}`` is a one-alternative variant,
so attribute slots would have to be pasted into the text before parsing, and a product title holding
``{``, ``|`` or ``__`` would then be read as syntax; its random sampler is seeded per generator, where
a row's draw must depend only on what the row is (its id), so rows keep their prompt when the feed
changes around them. The grammar above is 100 lines here and has no such traps.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["Template", "TemplateError", "compile_template"]

MAX_COMBINATIONS = 10_000  # expansions of one template in combinatorial mode; beyond: use mode random


class TemplateError(ValueError):
    """A template does not parse or names an unknown slot (the caller adds the spec line)."""


@dataclass(frozen=True)
class Slot:
    name: str


@dataclass(frozen=True)
class Choice:
    """A variant or a list: one of ``options`` (each a sequence of parts); ``name`` for a list."""

    options: tuple[tuple, ...]
    name: str | None = None


_WILDCARD = re.compile(r"__([A-Za-z0-9_.-]+?)__")
_SLOT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?")


def _parse(
    text: str, lists: dict[str, tuple[str, ...]], pos: int = 0, depth: int = 0
) -> tuple[list, int, str]:
    """Parts of ``text`` from ``pos`` to the end or to an unnested ``|`` / ``}`` (returned as the stop)."""
    parts: list = []
    literal = ""
    while pos < len(text):
        c = text[pos]
        if text.startswith("{{", pos) or text.startswith("}}", pos):
            literal += c
            pos += 2
        elif c == "{":
            parts.append(literal) if literal else None
            literal = ""
            options, pos = _parse_group(text, lists, pos + 1, depth + 1)
            parts.append(options)
        elif c in "|}" and depth:
            break
        elif c == "}":
            raise TemplateError(f"a '}}' at character {pos} closes nothing (write '}}}}' for a brace)")
        elif (m := _WILDCARD.match(text, pos)) is not None:
            parts.append(literal) if literal else None
            literal = ""
            name = m.group(1)
            if name not in lists:
                raise TemplateError(f"wildcard __{name}__ names no list (lists: {sorted(lists)})")
            parts.append(Choice(tuple((v,) for v in lists[name]), name))
            pos = m.end()
        else:
            literal += c
            pos += 1
    if literal:
        parts.append(literal)
    return parts, pos, text[pos] if pos < len(text) else ""


def _parse_group(text: str, lists: dict, pos: int, depth: int) -> tuple[Slot | Choice, int]:
    start = pos
    options = []
    while True:
        parts, pos, stop = _parse(text, lists, pos, depth)
        options.append(tuple(parts))
        if stop == "}":
            break
        if stop != "|":
            raise TemplateError(f"the '{{' at character {start - 1} is never closed")
        pos += 1
    pos += 1
    if len(options) == 1:
        body = text[start : pos - 1].strip()
        if not _SLOT_NAME.fullmatch(body):
            raise TemplateError(
                f"{{{body}}} is neither a slot name ({{title}}, {{pet.breed}}) nor a variant ({{a|b}})"
            )
        if body in lists:
            return Choice(tuple((v,) for v in lists[body]), body), pos
        return Slot(body), pos
    return Choice(tuple(options)), pos


def _slots(parts) -> Iterator[str]:
    for p in parts:
        if isinstance(p, Slot):
            yield p.name
        elif isinstance(p, Choice):
            for option in p.options:
                yield from _slots(option)


def _count(parts) -> int:
    n = 1
    for p in parts:
        if isinstance(p, Choice):
            n *= sum(_count(o) for o in p.options)
    return n


def _expand(parts) -> Iterator[tuple[tuple, tuple[str, ...]]]:
    """Every (flat parts: text and slots, chosen option texts) of ``parts``, in order."""
    per_part = []
    for p in parts:
        if isinstance(p, Choice):
            per_part.append([(flat, (_text(o),) + picks) for o in p.options for flat, picks in _expand(o)])
        else:
            per_part.append([((p,), ())])
    for combo in itertools.product(*per_part):
        yield tuple(x for flat, _ in combo for x in flat), tuple(c for _, picks in combo for c in picks)


class _Draws:
    """Choices from a hash stream of ``key`` (blake2b blocks of 64 bytes, 8 per draw): a generator that
    depends on the row only, and cheaper than seeding ``random.Random`` per row. Modulo bias: < n / 2**64."""

    def __init__(self, key: bytes):
        self.key, self.block, self.buf, self.pos = key, 0, b"", 64

    def randrange(self, n: int) -> int:
        if self.pos >= len(self.buf):
            self.buf = hashlib.blake2b(self.key + self.block.to_bytes(4, "big")).digest()
            self.block, self.pos = self.block + 1, 0
        value = int.from_bytes(self.buf[self.pos : self.pos + 8], "big")
        self.pos += 8
        return value % n


def _draw(parts, rng: _Draws) -> tuple[tuple, tuple[str, ...]]:
    flat, picks = [], []
    for p in parts:
        if isinstance(p, Choice):
            option = p.options[rng.randrange(len(p.options))]
            sub_flat, sub_picks = _draw(option, rng)
            flat += sub_flat
            picks += (_text(option),) + sub_picks
        else:
            flat.append(p)
    return tuple(flat), tuple(picks)


def _text(parts) -> str:
    """An option's source text: what a choice is named by in the row id (not its position)."""
    out = ""
    for p in parts:
        out += (
            p
            if isinstance(p, str)
            else f"{{{p.name}}}"
            if isinstance(p, Slot)
            else "{" + "|".join(_text(o) for o in p.options) + "}"
        )
    return out


@dataclass(frozen=True)
class Template:
    """A compiled template: ``slots`` it needs; ``expansions(mode, samples, key)`` its prompts as flat parts."""

    source: str
    parts: tuple
    slots: tuple[str, ...]
    count: int

    def expansions(self, mode: str, samples: int, key: bytes) -> list[tuple[tuple, tuple[str, ...]]]:
        """Combinatorial: every expansion (the same list for every row). Random: ``samples`` distinct
        draws (fewer when the template has fewer) from a generator seeded by ``key`` (what the row is)."""
        if mode == "combinatorial" or self.count == 1:
            return self._all
        rng = _Draws(key)
        found: dict[tuple, tuple] = {}
        for _ in range(samples * 20):
            if len(found) >= min(samples, self.count):
                break
            flat, picks = _draw(self.parts, rng)
            found.setdefault(picks, flat)
        return [(flat, picks) for picks, flat in found.items()]

    @property
    def _all(self):
        cached = self.__dict__.get("_cache")
        if cached is None:
            # one per distinct choice of texts: an option listed twice (a wildcard file's repeated line)
            # would give two rows of one id; random mode keeps one per choice as well (``found``)
            cached = list({picks: (flat, picks) for flat, picks in _expand(self.parts)}.values())
            object.__setattr__(self, "_cache", cached)
        return cached

    def fill(self, flat: tuple, value: Callable[[str], str]) -> str:
        """The prompt: literal text and each slot's ``value``, whitespace runs made single spaces."""
        return " ".join("".join(p if isinstance(p, str) else value(p.name) for p in flat).split())


def compile_template(
    text: str,
    lists: dict[str, tuple[str, ...]],
    *,
    mode: str = "combinatorial",
    known: Callable[[str], str | None] | None = None,
    variants: bool = True,
) -> Template:
    """Parse ``text``; ``known(slot)`` returns why a slot cannot be filled (None when it can).
    ``variants=False`` refuses variants and lists (a concept prompt is one text per item)."""
    parts, _, _ = _parse(text, lists)
    slots = tuple(dict.fromkeys(_slots(parts)))
    if known is not None:
        for slot in slots:
            if (problem := known(slot)) is not None:
                raise TemplateError(f"unknown slot {{{slot}}}: {problem}")
    count = _count(parts)
    if not variants and count > 1:
        raise TemplateError("variants, lists and wildcards are not allowed here (one text per item)")
    if mode == "combinatorial" and count > MAX_COMBINATIONS:
        raise TemplateError(
            f"{count} combinations (more than {MAX_COMBINATIONS}): use mode: random with samples: N"
        )
    return Template(text, tuple(parts), slots, count)
