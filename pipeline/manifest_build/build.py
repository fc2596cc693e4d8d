"""``manifest build``: the steps, in order.

1. Read and check the spec (``spec.load_spec``), compile its templates (``rows.RowMaker``): every
   error here names the spec line, before any pool is read.
2. Read the pools a composition samples from into memory (compositions of several slots or with a
   cap); a composition of one item of one pool without cap streams its pool instead.
3. With ``--check-images``, read and probe every image, mask and control image (in threads).
4. Make the rows of every composition (``compose.sets`` x templates x expansions) into the writer
   (a temporary folder) and the summary, checking duplicate keys and empty pools as they come.
5. Commit (rename into place) only when nothing was wrong; otherwise remove the temporary.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from stages.inputs.read import InputSettings

from .compose import hash64
from .pools import EMBEDDED, ImageSink, Item, check_image, iter_items
from .rows import RowMaker, output_schema
from .spec import BuildError, CompositionSpec, PoolSpec, Spec, load_spec
from .write import ManifestWriter

__all__ = ["BuildOptions", "build_manifest", "format_row"]

IMAGES_DIR = "_images"  # inside a folder manifest: images a datasets pool held as bytes
MAX_LISTED = 20  # problems listed by --check-images


@dataclass(frozen=True)
class BuildOptions:
    out: str | None = None  # None: a dry run
    rows_per_file: int = 100_000
    single_file: bool = False
    check_images: bool = False
    seconds_per_image: float | None = None
    sample_rows: int = 5
    settings: InputSettings = InputSettings()


@dataclass
class _SlotUse:
    """How often each item of a slot appears in a composition's sets (its balance)."""

    counts: Counter = field(default_factory=Counter)
    low: int | None = None  # streamed slots: min/max kept on the fly instead of a counter
    high: int = 0
    items: int = 0

    def add_streamed(self, n: int) -> None:
        self.items += 1
        self.low = n if self.low is None else min(self.low, n)
        self.high = max(self.high, n)

    def report(self, pool: str, pool_items: int) -> dict:
        if self.counts:
            values = list(self.counts.values())
            used, low, high = len(values), min(values), max(values)
        else:
            used, low, high = self.items, self.low or 0, self.high
        return {
            "pool": pool,
            "items_in_pool": pool_items,
            "items_used": used,
            "min_per_item": low,
            "max_per_item": high,
        }


class _Keys:
    """Duplicate keys of a streamed pool, in bounded memory: 8-byte hashes, checked at the end."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.current: list[int] = []

    def add(self, key: str) -> None:
        self.current.append(hash64(key))
        if len(self.current) >= 100_000:
            self.chunks.append(np.array(self.current, dtype=np.uint64))
            self.current = []

    def duplicated(self) -> set[int]:
        values = np.sort(np.concatenate([*self.chunks, np.array(self.current, dtype=np.uint64)]))
        return set(values[1:][values[1:] == values[:-1]].tolist())


def build_manifest(spec_path: str, options: BuildOptions) -> dict:
    """Build (or with ``options.out`` None, dry-run) and return the summary (see ``docs/manifest-build.md``)."""
    # 1. the spec and its templates
    spec = load_spec(spec_path)
    maker = RowMaker(spec)
    schema = output_schema(spec)
    writer = None
    if options.out is not None:
        writer = ManifestWriter(
            options.out, schema, rows_per_file=options.rows_per_file, single_file=options.single_file
        )
    try:
        summary = _build(spec, maker, writer, options)
        if writer is not None:
            writer.commit(summary)
        return summary
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def _sink(writer: ManifestWriter | None, options: BuildOptions) -> ImageSink:
    if writer is None:
        return ImageSink(None, None)
    if options.single_file:
        folder = f"{writer.out}.images"
        return ImageSink(folder, folder)
    return ImageSink(os.path.join(writer.out, IMAGES_DIR), os.path.join(writer.staging, IMAGES_DIR))


def _streams(comp: CompositionSpec) -> bool:
    return comp.cap is None and len(comp.slots) == 1 and comp.slots[0].count == 1


def _read(spec: Spec, pool: PoolSpec, sink: ImageSink, settings: InputSettings) -> Iterator[list[Item]]:
    try:
        yield from iter_items(pool, sink, settings)
    except BuildError as exc:
        raise BuildError(f"{spec.where(pool.path)}: {exc}") from None


def _empty(spec: Spec, pool: PoolSpec) -> BuildError:
    what = f"after its filter (where: {dict(pool.where)})" if pool.where else "(no items)"
    return BuildError(
        f"{spec.where(pool.path + (('where',) if pool.where else ()))}: pool {pool.name} is empty {what}"
    )


def _load(spec: Spec, pool: PoolSpec, sink: ImageSink, settings: InputSettings) -> list[Item]:
    items: list[Item] = []
    seen: dict[str, str] = {}
    for batch in _read(spec, pool, sink, settings):
        for item in batch:
            if item.key in seen:
                raise BuildError(
                    f"{spec.where(pool.path)}: pool {pool.name}: {item.where}: duplicate key "
                    f"{item.key!r} (first at {seen[item.key]})"
                )
            seen[item.key] = item.where
            items.append(item)
    if not items:
        raise _empty(spec, pool)
    return items


def _check_images(spec: Spec, pools: dict[str, Iterator[Item]], settings: InputSettings,
                  sink: ImageSink) -> None:
    jobs = []
    for name, items in pools.items():
        for item in items:
            if not item.image.startswith(EMBEDDED):  # bytes of a dataset: a dry run writes no file
                jobs += [(f"pool {name}: {item.where}", "image", sink.written(item.image))]
            jobs += [(f"pool {name}: {item.where}", "mask", item.mask)] if item.mask else []
    for t in spec.templates:
        controls = t.overrides.get("controls") or (
            [t.overrides["control"]] if "control" in t.overrides else []
        )
        jobs += [(spec.where(t.path + ("control",)), "control.image", c["image"]) for c in controls]
    with ThreadPoolExecutor(16) as pool:
        problems = [
            f"{where}: {fld}: {reason}"
            for (where, fld, _), reason in zip(
                jobs, pool.map(lambda j: check_image(j[2], settings, j[1]), jobs), strict=True
            )
            if reason
        ]
    if problems:
        more = f"\n... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise BuildError(
            f"--check-images: {len(problems)} unusable image(s):\n" + "\n".join(problems[:MAX_LISTED]) + more
        )


def _build(spec: Spec, maker: RowMaker, writer: ManifestWriter | None, options: BuildOptions) -> dict:
    sink = _sink(writer, options)
    settings = options.settings
    # 2. pools held in memory
    in_memory = {s.pool for c in spec.compositions.values() if not _streams(c) for s in c.slots}
    loaded = {name: _load(spec, spec.pools[name], sink, settings) for name in sorted(in_memory)}
    # 3. images
    if options.check_images:
        streamed = {s.pool for c in spec.compositions.values() if _streams(c) for s in c.slots} - in_memory
        every = dict(loaded)
        every.update(
            {n: (it for b in _read(spec, spec.pools[n], sink, settings) for it in b) for n in streamed}
        )
        _check_images(spec, every, settings, sink)
    # 4. rows
    totals = Counter()
    comps, sample = {}, []
    for comp in spec.compositions.values():
        stats = Counter()
        uses = {s.name: _SlotUse() for s in comp.slots}
        if _streams(comp):
            concept_sets, pool_size = _streamed_sets(spec, comp, sink, settings)
        else:
            concept_sets, pool_size = maker.sets(comp, loaded), None
        for concept_set in concept_sets:
            refs = set()
            n_rows = 0
            for row in maker.rows(comp, concept_set):
                n_rows += 1
                stats["rows"] += 1
                stats["samples"] += len(row["seeds"])
                refs.add(maker.reference_group(row))
                if len(sample) < options.sample_rows:
                    sample.append(format_row(row))
                if writer is not None:
                    writer.add(row)
            stats["sets"] += 1
            stats["sets_without_rows"] += n_rows == 0
            stats["reference_passes"] += len(refs)
            if _streams(comp):
                uses[comp.slots[0].name].add_streamed(1)
            else:
                for slot, items in zip(comp.slots, concept_set, strict=True):
                    uses[slot.name].counts.update(it.key for it in items)
        slots = {
            s.name: uses[s.name].report(
                s.pool, len(loaded[s.pool]) if s.pool in loaded else (pool_size or {}).get("items", 0)
            )
            for s in comp.slots
        }
        comps[comp.name] = {
            "sets": stats["sets"],
            "rows": stats["rows"],
            "samples": stats["samples"],
            "sets_without_rows": stats["sets_without_rows"],
            "cap": comp.cap,
            "slots": slots,
        }
        totals.update(stats)
    summary = {
        "spec": os.path.abspath(spec.source),
        "rows": totals["rows"],
        "concept_sets": totals["sets"] - totals["sets_without_rows"],  # the sets a run sees
        "samples": totals["samples"],
        "reference_passes": totals["reference_passes"],
        "compositions": comps,
        "pools": {n: {"items": len(v)} for n, v in loaded.items()},
        "sample": sample,
    }
    for comp in comps.values():
        for slot in comp["slots"].values():
            summary["pools"].setdefault(slot["pool"], {"items": slot["items_in_pool"]})
    if options.seconds_per_image is not None:
        summary["seconds_per_image"] = options.seconds_per_image
        summary["gpu_hours"] = round(totals["samples"] * options.seconds_per_image / 3600, 3)
    if totals["rows"] == 0:
        raise BuildError(
            f"{spec.source}: no rows: no template matches any concept set (check the templates' "
            "when: and compositions:)"
        )
    return summary


def _streamed_sets(spec: Spec, comp: CompositionSpec, sink: ImageSink, settings: InputSettings):
    """One item per set, straight from the pool; duplicate keys and emptiness are checked at the end."""
    pool = spec.pools[comp.slots[0].pool]
    size = {"items": 0}

    def generate():
        keys = _Keys()
        for batch in _read(spec, pool, sink, settings):
            for item in batch:
                keys.add(item.key)
                size["items"] += 1
                yield ((item,),)
        if size["items"] == 0:
            raise _empty(spec, pool)
        duplicated = keys.duplicated()
        if duplicated:
            _name_duplicate(spec, pool, sink, settings, duplicated)

    return generate(), size


def _name_duplicate(spec: Spec, pool: PoolSpec, sink: ImageSink, settings: InputSettings, hashes: set[int]):
    """A second pass over the pool to name the rows of the first duplicate key."""
    first: dict[str, str] = {}
    for batch in _read(spec, pool, sink, settings):
        for item in batch:
            if hash64(item.key) in hashes:
                if item.key in first:
                    raise BuildError(
                        f"{spec.where(pool.path)}: pool {pool.name}: {item.where}: duplicate key "
                        f"{item.key!r} (first at {first[item.key]})"
                    )
                first[item.key] = item.where
    raise BuildError(
        f"{spec.where(pool.path)}: pool {pool.name}: duplicate keys"
    )  # pragma: no cover - hash only


def format_row(row: dict) -> str:
    """A row as one line of text for the dry run's sample."""
    concepts = "; ".join(
        f"{c['prompt']} <- {os.path.basename(c['image'])}"
        + (f" (mask {os.path.basename(c['mask'])})" if c.get("mask") else "")
        + (f" (onto {c['context']['onto']})" if c.get("context") else "")
        for c in row["concepts"]
    )
    return f"{row['id']}: {row['prompt']!r} seeds={row['seeds']} concepts=[{concepts}]"
