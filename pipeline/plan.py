"""The Ray Data plan: which stage runs where, with which resources. ``import ray`` lives only here.

Two executions, one after the other (three when segmentation runs models on a GPU, so GPU actors of
different stages never wait on each other):
  1. prepare    concept groups -> SegmentStage (actor; SAM / detector when configured) -> CompositeStage
                -> ReferenceKVStage (GPU actor pool): K/V to the store, once per concept set; chained
                in one execution unless SegmentStage needs the GPU, then split after CompositeStage.
                When generation has a single actor, ReferenceKVStage does not run: that actor
                computes each set's K/V itself from a request file (``--reference-actors``).
  2. render     shard units  -> GenerateStage (GPU actor pool) -> write_batch (CPU tasks), streamed
Work units are rows that cannot be split: one concept set, or one whole shard. Rows are grouped on
the driver (no ``map_groups`` shuffle), and shards are written under deterministic names by
``stages/write.py`` (not ``write_webdataset``, whose random names and in-place writes cannot resume).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.settings import RunSettings
from stages.base import null_to_none
from stages.composite import CompositeStage
from stages.generate import GenerateStage
from stages.output import KV_STORE, OutputFolder
from stages.reference_kv import ReferenceKVStage
from stages.segment import SegmentConfig, SegmentStage
from stages.write import write_batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    """Where ``map_batches`` puts each stage (set by the CLI)."""

    gpus_per_worker: float = 1.0
    max_workers: int | None = None  # generation actors; None = as many as GPUs allow
    cpus_per_actor: float = 1.0
    cpus_per_write: float = 0.5


def ensure_ray(address: str | None) -> None:
    """Connect to a cluster (``--address auto`` / ``ray://...``) or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    import torch

    kwargs = {"address": address} if address else {"num_gpus": max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 0}
    ray.init(logging_level=logging.WARNING, log_to_driver=False, **kwargs)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def actor_pool_size(resources: Resources, n_units: int) -> int:
    """How many actors a model stage gets for ``n_units`` units on this cluster."""
    return _pool_size(resources, n_units)


def _pool_size(resources: Resources, n_units: int) -> int:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if resources.gpus_per_worker > 0 and gpus:
        cap = max(1, int(gpus // resources.gpus_per_worker))
    else:
        cap = max(1, int(ray.cluster_resources().get("CPU", 1) // max(resources.cpus_per_actor, 1e-3)) - 1)
    if resources.max_workers:
        cap = min(cap, resources.max_workers)
    return max(1, min(cap, n_units))


def _gpus(resources: Resources) -> float:
    import ray

    return resources.gpus_per_worker if ray.cluster_resources().get("GPU", 0) else 0


@dataclass(frozen=True)
class StageSpec:
    """One callable-class stage of a chained execution (see ``map_actor_stages``)."""

    cls: type
    kwargs: dict
    gpu: bool
    num_cpus: float | None = None  # None: ``Resources.cpus_per_actor``


def map_actor_stages(rows: list[dict], stages: list[StageSpec], resources: Resources) -> list[dict]:
    """Run callable-class stages one after the other over ``rows`` (one row per batch) in ONE Ray Data
    execution, each on its own actor pool; return every output row.

    One execution instead of one per stage: the stages' actors start (and load their models) at the
    same time, and rows stream from one stage to the next; each execution costs several seconds of
    actor start-up however little work it has.
    """
    import ray

    if not rows:
        return []
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    for stage in stages:
        ds = ds.map_batches(
            stage.cls,
            fn_constructor_kwargs=stage.kwargs,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_pool_size(resources, len(rows))),
            num_gpus=_gpus(resources) if stage.gpu else 0,
            num_cpus=resources.cpus_per_actor if stage.num_cpus is None else stage.num_cpus,
        )
    return [plain_row(r) for r in ds.iter_rows()]


def plain_row(row) -> dict:
    """A Ray output row as plain Python values (numpy arrays and scalars to lists and numbers, NaN
    that stands for null to None)."""

    def plain(v):
        if isinstance(v, np.ndarray):
            return [plain(x) for x in v.tolist()] if v.dtype == object else v.tolist()
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return {k: null_to_none(plain(v)) for k, v in dict(row).items()}


def cluster_has_gpus() -> bool:
    import ray

    return bool(ray.cluster_resources().get("GPU", 0))


def resolve_concept_sets(rows: list[dict], settings: RunSettings, out: OutputFolder, resources: Resources, clock, *,
                         lazy: bool, reference_cls=None) -> list[dict]:
    """Masks, composites and reference K/V, once per concept group (``shards.concept_group_rows``).

    ``lazy``: segment -> composite only (seconds under ``resolve``); the generation actor computes
    (or finds) each set's K/V when it first needs them. Otherwise segment -> composite -> reference
    K/V run chained in one Ray Data execution (``resolve_and_reference_kv``); when segmentation runs
    its models on a GPU, the reference actors would wait for that GPU, so the chain is cut in two
    executions (``resolve``, then ``reference_kv``). ``reference_cls`` replaces ReferenceKVStage (the
    scale benchmark's no-op engine).
    """
    segment_config = SegmentConfig(sam_checkpoint=settings.sam_checkpoint, sam_model_type=settings.sam_model_type,
                                   detector=settings.detector, mask_policy=settings.mask_policy)
    uses_models = bool(settings.sam_checkpoint or settings.detector)
    light = min(resources.cpus_per_actor, 1.0)  # no model: file reads and image arithmetic
    resolve = [
        StageSpec(SegmentStage, {"config": segment_config, "input_settings": settings.inputs()}, gpu=uses_models,
                  num_cpus=None if uses_models else light),
        StageSpec(CompositeStage, {"out_dir": out.root, "input_settings": settings.inputs()}, gpu=False, num_cpus=light),
    ]
    reference = StageSpec(reference_cls or ReferenceKVStage,
                          dict(model=settings.model, store_dir=out.path(KV_STORE), kv_cache=settings.kv_cache,
                               **settings.generator_kwargs(), faults=settings.faults), gpu=True)
    if lazy:
        with clock("resolve"):
            return map_actor_stages(rows, resolve, resources)
    if uses_models and cluster_has_gpus():
        with clock("resolve"):
            composed = map_actor_stages(rows, resolve, resources)
        with clock("reference_kv"):
            return map_actor_stages(composed, [reference], resources)
    with clock("resolve_and_reference_kv"):
        return map_actor_stages(rows, [*resolve, reference], resources)


def render(units: list[dict], *, generate_kwargs: dict, out_dir: str, resources: Resources,
           faults: dict | None = None, generate_cls=None) -> Iterator[dict]:
    """Generate and write shards, streamed: yields each shard's marker row as its write completes.

    ``generate_cls`` replaces GenerateStage (the scale benchmark's no-op engine); None in production.
    """
    import ray

    generate_cls = generate_cls or GenerateStage
    if not units:
        return
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(
        generate_cls,
        fn_constructor_kwargs=generate_kwargs,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_pool_size(resources, len(units))),
        num_gpus=_gpus(resources),
        num_cpus=resources.cpus_per_actor,
    )
    ds = ds.map_batches(write_batch, fn_kwargs={"out_dir": out_dir, "faults": faults}, batch_size=1, batch_format="numpy",
                        num_cpus=resources.cpus_per_write)
    yield from ds.iter_rows()
