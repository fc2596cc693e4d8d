"""Compositions: which items form a concept set, enumerated or sampled, balanced, without enumerating.

A composition has slots, each ``count`` distinct items of a pool (one pet; one accessory; two
accessories). Its *space* is the product over slots of C(n, count).

* Without ``cap`` every set of the space is made, pools in their seeded order (a composition of one
  slot of one item streams its pool: a feed of any length in bounded memory).
* With ``cap`` the first ``cap`` sets of a fixed, seeded sequence over the space are made. Each pool
  is put in a seeded order (items sorted by a hash of the spec's seed, the pool and the item's key,
  so adding an item does not reorder the others). Set ``i`` takes from slot ``j`` the item at
  position ``d_j(i)``, where the digits are a *diagonal* walk of the mixed-radix space:
  ``H_1(i) = i mod R_1`` and ``H_j(i) = (H_{j-1}(i mod N_{j-1}), (i + i // lcm(N_{j-1}, R_j)) mod R_j)``
  (``R_j`` the slot's size, ``N_{j-1}`` the product of the earlier ones). It is a bijection of
  ``[0, N)`` onto the space (within a block of ``L = lcm`` consecutive indices the pairs are distinct by
  the Chinese remainder theorem; block ``t`` holds exactly the pairs whose digits differ by ``t`` mod
  ``gcd``), so sets never repeat, and every slot's digit runs through its items cyclically, so in any
  prefix each item of a pool appears ``floor`` or ``ceil`` of ``cap / n`` times (exactly balanced).
  A slot of ``count`` k > 1 walks its seeded order in chunks of k (cycle ``c`` re-orders the pool with
  the seed and ``c``), which keeps items balanced; sets met twice are skipped. Where such a cap takes
  more than half of a space of at most ``DENSE_LIMIT`` sets, the chunks would repeat too often to fill
  it: every set is ranked by a seeded hash of its keys and the first ``cap`` are taken.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Sequence

from .pools import Item
from .spec import BuildError, CompositionSpec

__all__ = ["ENUMERATION_LIMIT", "hash64", "ordered", "sets", "space_size"]

ENUMERATION_LIMIT = 50_000_000  # sets of an uncapped composition of several slots; beyond: give a cap
DENSE_LIMIT = 1_000_000  # a capped space with k-of slots this small and more than half taken: ranked whole
ConceptSet = tuple[tuple[Item, ...], ...]  # per slot, its items


def hash64(*parts: object) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "big")


def ordered(items: Sequence[Item], seed: int, pool: str, cycle: int = 0) -> list[Item]:
    """The pool's seeded order: by a hash of (seed, pool, cycle, key)."""
    return sorted(items, key=lambda it: hash64(seed, pool, cycle, it.key))


def space_size(comp: CompositionSpec, sizes: dict[str, int]) -> int:
    return math.prod(math.comb(sizes[s.pool], s.count) for s in comp.slots)


def sets(comp: CompositionSpec, pools: dict[str, list[Item]], seed: int) -> Iterator[ConceptSet]:
    """The composition's concept sets (see the module's docstring)."""
    sizes = {s.pool: len(pools[s.pool]) for s in comp.slots}
    space = space_size(comp, sizes)
    if comp.cap is not None and comp.cap > space:
        shape = " x ".join(
            f"C({sizes[s.pool]}, {s.count})" if s.count > 1 else str(sizes[s.pool]) for s in comp.slots
        )
        raise BuildError(
            f"composition {comp.name}: cap {comp.cap} is larger than its space of {space} sets ({shape})"
        )
    orders = {s.pool: ordered(pools[s.pool], seed, s.pool) for s in comp.slots}
    if comp.cap is None:
        if space > ENUMERATION_LIMIT:
            raise BuildError(
                f"composition {comp.name}: {space} sets are too many to make them all "
                f"(more than {ENUMERATION_LIMIT}); give a cap"
            )
        yield from itertools.product(*(itertools.combinations(orders[s.pool], s.count) for s in comp.slots))
        return
    if any(s.count > 1 for s in comp.slots) and space <= DENSE_LIMIT and comp.cap > space // 2:
        yield from _dense(comp, orders, seed)
        return
    yield from _sampled(comp, orders, seed, space)


def _dense(comp: CompositionSpec, orders: dict[str, list[Item]], seed: int) -> Iterator[ConceptSet]:
    """A cap over half of a small space with slots of several items (where chunks would repeat too often to
    fill it): every set, in the order of a seeded hash of its keys, the first ``cap``."""
    every = itertools.product(*(itertools.combinations(orders[s.pool], s.count) for s in comp.slots))
    ranked = sorted(every, key=lambda cs: hash64(seed, comp.name, *(it.key for items in cs for it in items)))
    yield from ranked[: comp.cap]


def digits(i: int, radices: Sequence[int]) -> list[int]:
    """The diagonal walk's digits of set ``i`` (< the product of ``radices``)."""
    out = [0] * len(radices)
    prefix = list(itertools.accumulate(radices, lambda a, b: a * b))
    x = i
    for j in range(len(radices) - 1, 0, -1):
        block = math.lcm(prefix[j - 1], radices[j])
        out[j] = (x + x // block) % radices[j]
        x %= prefix[j - 1]
    out[0] = x % radices[0]
    return out


def _sampled(
    comp: CompositionSpec, orders: dict[str, list[Item]], seed: int, space: int
) -> Iterator[ConceptSet]:
    radices = [
        len(orders[s.pool]) if s.count == 1 else math.comb(len(orders[s.pool]), s.count) for s in comp.slots
    ]
    several = any(s.count > 1 for s in comp.slots)
    cycles: dict[tuple[str, int], list[Item]] = {}

    def chunk(slot, digit: int) -> tuple[Item, ...]:
        items = orders[slot.pool]
        n = len(items)
        cycle, start = divmod(digit * slot.count, n)
        if (slot.name, cycle) not in cycles:
            cycles.clear() if len(cycles) > 64 else None
            cycles[(slot.name, cycle)] = items if cycle == 0 else ordered(items, seed, slot.pool, cycle)
        order = cycles[(slot.name, cycle)]
        return tuple(order[(start + r) % n] for r in range(slot.count))

    seen: set[int] = set()
    made = 0
    for i in range(space):
        if made >= comp.cap:
            return
        ds = digits(i, radices)
        concept_set = tuple(
            (orders[s.pool][d],) if s.count == 1 else chunk(s, d) for s, d in zip(comp.slots, ds, strict=True)
        )
        if several:
            fingerprint = hash64(*(sorted(it.key for it in items) for items in concept_set))
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
        made += 1
        yield concept_set
    if made < comp.cap:  # pragma: no cover - only k-of slots whose chunks repeat over the whole space
        raise BuildError(f"composition {comp.name}: only {made} distinct sets found for cap {comp.cap}")
