"""The Ray Data plan: which stage runs where, with which resources. ``import ray`` lives only here (and in
``plan_tasks``, the planning steps as plain Ray tasks).

Two executions, one after the other (three when segmentation runs models on a GPU, so GPU actors of
different stages never wait on each other):
  1. prepare    concept groups -> SegmentStage (actor; SAM / detector when configured) -> CompositeStage
                -> ReferenceKVStage (GPU actor pool): K/V to the store, once per concept set; chained
                in one execution unless SegmentStage needs the GPU, then split after CompositeStage.
                When generation has a single actor, ReferenceKVStage does not run: that actor
                computes each set's K/V itself from a request file (``--reference-actors``).
  2. render     shard units  -> GenerateStage (GPU actor pool; with --score, ScoreStage in the same
                actors, sharing their GPU) -> write_batch (CPU tasks), streamed
Work units are rows that cannot be split: one concept set, or one whole shard. Rows are grouped on
the driver (no ``map_groups`` shuffle), and shards are written under deterministic names by
``stages/output/write.py`` (not ``write_webdataset``, whose random names and in-place writes cannot resume).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.part_plan import Checks, plan_file, plan_part
from pipeline.plan_tasks import not_shared_in, part_infos, plan_parts  # noqa: F401 - run's steps, imported from here
from pipeline.settings import DEVICES, RunSettings
from pipeline.shard_units import ShardUnits
from stages.base import null_to_none, to_column
from stages.generation.generate import GenerateStage
from stages.masks.composite import CompositeStage
from stages.masks.segment_stage import SegmentStage
from stages.output.folder import OutputFolder
from stages.output.layout import KV_STORE
from stages.output.probe import NotShared, StorageProbe, not_shared_message, probed
from stages.output.write import write_batch
from stages.reference.reference_kv import ReferenceKVStage
from stages.scoring.score_stage import ScoreStage

logger = logging.getLogger(__name__)


GPU_WAIT_REPORT_SECONDS = 30.0


@dataclass(frozen=True)
class Resources:
    """Where ``map_batches`` puts each stage (set by the CLI).

    ``device``: ``cuda`` (model actors request ``gpus_per_worker`` GPUs whatever the cluster has
    now, so an autoscaler adds GPU nodes) or ``cpu`` (no GPU requested anywhere); ``auto`` is
    resolved once at start by ``resolve_device``. ``memory``: bytes each model actor declares
    (``pipeline.plan_memory.actor_memory``), so Ray places no more of them on a node than its RAM holds.
    """

    gpus_per_worker: float = 1.0
    max_workers: int | None = None  # model actors at most; None: one per work unit (cuda), CPUs allow (cpu)
    cpus_per_actor: float = 1.0
    cpus_per_write: float = 0.25  # writes encode and upload: with 0.5 a 2-CPU node running a model actor,
    # the unit builder and a planning task had no room left for one, and rendered shards piled up unwritten
    cpus_per_plan: float = 0.25  # a planning task and the unit builder: Parquet reads, no model
    device: str = "cuda"
    memory: int | None = None

    def __post_init__(self):
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"Resources.device={self.device!r}: resolve 'auto' first (resolve_device)")

    @property
    def actor_device(self) -> str:
        """What the stages load their models on: ``auto`` (CUDA when the actor has it) or ``cpu``."""
        return "cpu" if self.device == "cpu" else "auto"


class NoGPU(Exception):
    """``--device cuda`` and no GPU came within ``--gpu-wait`` seconds: the run cannot start (exit 2)."""


def ensure_ray(address: str | None) -> None:
    """Join a cluster (``--address``, else ``RAY_ADDRESS`` as ``ray.init()`` reads it) or start an
    embedded local Ray, which counts this machine's GPUs as ``ray start`` does (NVML, within
    ``CUDA_VISIBLE_DEVICES``). The driver never imports torch: only the actors load models."""
    import ray

    if ray.is_initialized():
        return
    # "local": a new Ray of our own, never another one running on this machine
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    # A new local Ray turns token authentication on by itself (Ray >= 2.5x) and says so at WARNING on
    # every start, which users read as a problem; the setting is right (a token, kept in ~/.ray), so
    # the notice alone is silenced. Whatever else that module logs above WARNING still shows.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    _quiet_ray_data_console()
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def _quiet_ray_data_console() -> None:
    """Ray Data's console: warnings and errors only. Its INFO lines (each execution's start, plan and
    end) and its notice that progress bars are off (the pipeline prints its own progress) are noise
    in a job log; its file log (``/tmp/ray/session_*/logs/ray-data``) keeps everything."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger's handlers

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":  # the console; not the file handler
            handler.setLevel(logging.WARNING)
            handler.addFilter(lambda record: "Progress bars disabled" not in record.getMessage())


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def resolve_device(requested: str) -> str:
    """``auto``: ``cuda`` when the cluster has a GPU now, else ``cpu`` with one warning line."""
    if requested not in DEVICES:
        raise ValueError(f"device={requested!r}: expected one of {DEVICES}")
    if requested != "auto":
        return requested
    if cluster_gpus():
        return "cuda"
    logger.warning("no GPU in the cluster at start: rendering on the CPU. Pass --device cuda to request GPUs "
                   "(an autoscaler then adds GPU nodes) and wait for them.")
    return "cpu"


def wait_for_gpus(resources: Resources, timeout: float, *, report=None, poll: float = 1.0) -> float:
    """With ``cuda``, until the cluster has the GPUs one model actor requests: asks the autoscaler for
    them, reports what it waits for at least every ``GPU_WAIT_REPORT_SECONDS``, and raises ``NoGPU``
    after ``timeout`` seconds. Returns the seconds waited."""
    if resources.device != "cuda" or resources.gpus_per_worker <= 0:
        return 0.0
    need = resources.gpus_per_worker
    if cluster_gpus() >= need:
        return 0.0
    report = report or logger.warning
    try:  # demand the autoscaler sees even before any actor is created
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"GPU": need}])
    except Exception as e:  # noqa: BLE001 - no autoscaler (a fixed cluster): wait for a node to join
        logger.debug("request_resources: %s", e)
    started = time.monotonic()
    last_report = -GPU_WAIT_REPORT_SECONDS
    while cluster_gpus() < need:
        waited = time.monotonic() - started
        if waited >= timeout:
            raise NoGPU(f"--device cuda: no GPU joined the cluster in {timeout:.0f} s (a generation actor requests "
                        f"{need:g}; the cluster has {cluster_gpus():g}). Nothing was rendered or lost: rerun the "
                        "same command once GPU nodes can start, or raise --gpu-wait.")
        if waited - last_report >= GPU_WAIT_REPORT_SECONDS:
            report(f"waiting for a GPU node: a generation actor requests {need:g} GPU, the cluster has "
                   f"{cluster_gpus():g} ({waited:.0f} s of --gpu-wait {timeout:.0f} s)")
            last_report = waited
        time.sleep(poll)
    return time.monotonic() - started


def check_shared_storage(folders: dict[str, str | None]) -> StorageProbe | None:
    """Write a probe into each local folder of ``folders`` (option -> path: OUT, --kv-cache; object-store
    URIs need none) and, with more than one node alive, have a task on each node read it now. The probe
    stays for the run: every actor and write task checks it on its node before writing (nodes the
    autoscaler adds later included); the caller removes it (``StorageProbe.remove``). Raises
    ``NotShared`` naming the node and the path."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = StorageProbe.create(folders)
    if probe is None:
        return None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) > 1:
            unseen = ray.remote(num_cpus=0)(StorageProbe.unseen)
            for node in nodes:
                strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
                missing = ray.get(unseen.options(scheduling_strategy=strategy).remote(probe))
                if missing is not None:
                    where = f"{node['NodeID']} ({node.get('NodeManagerAddress')})"
                    raise NotShared(not_shared_message(*missing, where, "Nothing was rendered."))
    except BaseException:
        probe.remove()
        raise
    return probe


def _is_uri(path: str) -> bool:
    return "://" in path


def actor_pool_size(resources: Resources, n_units: int) -> int:
    """How many model actors ``n_units`` units would get on the cluster as it is now."""
    return max(1, min(_now_cap(resources), resources.max_workers or n_units, n_units))


def _now_cap(resources: Resources) -> int:
    import ray

    if resources.device == "cuda" and resources.gpus_per_worker > 0:
        return max(1, int(cluster_gpus() // resources.gpus_per_worker))
    return max(1, int(ray.cluster_resources().get("CPU", 1) // max(resources.cpus_per_actor, 1e-3)) - 1)


def _pool_max(resources: Resources, n_units: int) -> int:
    """The pool's upper size: ``--max-workers``, else one actor per unit on GPUs (a cluster that grows
    during the run gets more actors), as many as the CPUs allow on the CPU."""
    if resources.device == "cuda" and resources.gpus_per_worker > 0:
        return max(1, min(resources.max_workers or n_units, n_units))
    return actor_pool_size(resources, n_units)


def _gpus(resources: Resources) -> float:
    return resources.gpus_per_worker if resources.device == "cuda" else 0


@dataclass(frozen=True)
class StageSpec:
    """One callable-class stage of a chained execution (see ``map_actor_stages``)."""

    cls: type
    kwargs: dict
    gpu: bool
    num_cpus: float | None = None  # None: ``Resources.cpus_per_actor``
    model: bool = False  # holds the diffusion model (and K/V): declares ``Resources.memory``


def map_actor_stages(rows: list[dict], stages: list[StageSpec], resources: Resources,
                     probe: StorageProbe | None = None, on_row=None) -> list[dict]:
    """Run callable-class stages one after the other over ``rows`` (one row per batch) in ONE Ray Data
    execution, each on its own actor pool; return every output row.

    One execution instead of one per stage: the stages' actors start (and load their models) at the
    same time, and rows stream from one stage to the next; each execution costs several seconds of
    actor start-up however little work it has. ``probe``: each actor checks it on its node first.
    ``on_row(row)``: called as each output row arrives (progress).
    """
    import ray

    if not rows:
        return []
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    for stage in stages:
        ds = ds.map_batches(
            probed(stage.cls, probe),
            fn_constructor_kwargs=stage.kwargs,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_pool_max(resources, len(rows))),
            num_gpus=_gpus(resources) if stage.gpu else 0,
            num_cpus=resources.cpus_per_actor if stage.num_cpus is None else stage.num_cpus,
            **({"memory": resources.memory} if stage.model and resources.memory else {}),
        )
    out = []
    for r in ds.iter_rows():
        out.append(plain_row(r))
        if on_row is not None:
            on_row(out[-1])
    return out


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


def resolve_concept_sets(rows: list[dict], settings: RunSettings, out: OutputFolder, resources: Resources, clock, *,
                         lazy: bool, reference_cls=None, probe: StorageProbe | None = None,
                         on_set=None) -> list[dict]:
    """Masks, composites and reference K/V, once per concept group (``shards.concept_group_rows``).

    ``lazy``: segment -> composite only (seconds under ``resolve``); the generation actor computes
    (or finds) each set's K/V when it first needs them. Otherwise segment -> composite -> reference
    K/V run chained in one Ray Data execution (``resolve_and_reference_kv``); when segmentation runs
    its models on a GPU, the reference actors would wait for that GPU, so the chain is cut in two
    executions (``resolve``, then ``reference_kv``). ``reference_cls`` replaces ReferenceKVStage (the
    scale benchmark's no-op engine). ``on_set(row)``: called as each concept set is done (progress).
    """
    segment_config = settings.segment_config()
    uses_models = settings.uses_segment_models()
    light = min(resources.cpus_per_actor, 1.0)  # no model: file reads and image arithmetic
    resolve = [
        StageSpec(SegmentStage, {"config": segment_config, "input_settings": settings.inputs()}, gpu=uses_models,
                  num_cpus=None if uses_models else light),
        StageSpec(CompositeStage, {"out_dir": out.location, "input_settings": settings.inputs()}, gpu=False, num_cpus=light),
    ]
    reference = StageSpec(reference_cls or ReferenceKVStage,
                          dict(model=settings.model, store_dir=out.uri(KV_STORE), kv_cache=settings.kv_cache,
                               **settings.generator_kwargs(), device=resources.actor_device, faults=settings.faults),
                          gpu=True, model=True)
    if lazy:
        with clock("resolve"):
            return map_actor_stages(rows, resolve, resources, probe, on_set)
    if uses_models and resources.device == "cuda":
        with clock("resolve"):
            composed = map_actor_stages(rows, resolve, resources, probe)
        with clock("reference_kv"):
            return map_actor_stages(composed, [reference], resources, probe, on_set)
    with clock("resolve_and_reference_kv"):
        return map_actor_stages(rows, [*resolve, reference], resources, probe, on_set)


class OnNode:
    """A model stage that also says which Ray node ran each unit (``node`` column; ``nodes`` in
    ``_stats.json``)."""

    def __init__(self, stage_cls, kwargs: dict, probe: StorageProbe | None = None, then: tuple | None = None):
        """``then``: ``(stage class, kwargs)`` of a stage run on this stage's output in the same actor
        (``ScoreStage``: it shares the generator's GPU, so a one-GPU machine needs no second GPU actor)."""
        import ray

        if probe is not None:
            probe.check()
        self.stage = stage_cls(**kwargs)
        self.then = then[0](**then[1]) if then else None
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        out = self.stage(batch)
        if self.then is not None and out:
            out = self.then(out)
        out["node"] = [self.node] * len(out["shard_id"])
        return out


def _planned_shards(batch: dict, jobs, earlier, checks: Checks, out_dir: str,
                    probe: StorageProbe | None = None) -> dict:
    """Plan files inside the render stream (``plan_part``): one output row per shard planned, so the
    first file's shards render while the others are still being planned."""
    if probe is not None:
        probe.check()
    out = OutputFolder(out_dir)
    shard_ids, local, plans = [], [], []
    for i in batch["i"]:
        part, record = jobs[int(i)]
        summary = plan_part(part, record, checks, out_dir, earlier[int(i)])
        shard_ids += [record.shard_base + n for n in range(summary["shards"])]
        local += list(range(summary["shards"]))
        plans += [out.uri(plan_file(record))] * summary["shards"]
    return _shard_rows(shard_ids, local, plans)


def _pending_shards(batch: dict) -> dict:
    """A planned file's pending shards, one row each: the driver hands Ray one row per file (``render``)."""
    shard_ids, local, plans = [], [], []
    for base, plan, pending in zip(batch["shard_base"], batch["plan"], batch["local"], strict=True):
        shard_ids += [int(base) + int(n) for n in pending]
        local += [int(n) for n in pending]
        plans += [str(plan)] * len(pending)
    return _shard_rows(shard_ids, local, plans)


def _shard_rows(shard_ids: list[int], local: list[int], plans: list[str]) -> dict:
    """The render stream's rows: a shard, its number in its file's plan, that plan file."""
    return {"shard_id": np.asarray(shard_ids, np.int64), "local": np.asarray(local, np.int64),
            "plan": to_column(plans)}


def shard_stream(files: list[dict], planning: dict | None, resources: Resources):
    """``render``'s input (None when there is nothing to render): one row per pending shard, and one
    shard per block. The planned files' pending shards are expanded from one row per file by a task; the
    new files' follow as each is planned in the stream (``_planned_shards``)."""
    import ray

    sources = []
    if files:
        sources.append(ray.data.from_items(files, override_num_blocks=len(files))
                       .map_batches(_pending_shards, batch_size=1, batch_format="numpy",
                                    num_cpus=resources.cpus_per_plan))
    jobs = (planning or {}).get("jobs") or []
    if jobs:
        sources.append(ray.data.from_items([{"i": i} for i in range(len(jobs))], override_num_blocks=len(jobs))
                       .map_batches(_planned_shards, fn_kwargs=planning, batch_size=1, batch_format="numpy",
                                    num_cpus=resources.cpus_per_plan))
    if not sources:
        return None
    ds = sources[0].union(*sources[1:]) if len(sources) > 1 else sources[0]
    # One row per block, in this execution only (its own DataContext); see ``render``. Not ``repartition(
    # target_num_rows_per_block=1)``: its own operator asks a whole CPU, which a busy 2-CPU node never frees.
    ds.context.target_max_block_size = 1
    return ds


def render(files: list[dict], *, units: dict, generate_kwargs: dict, out_dir: str, resources: Resources,
           planning: dict | None = None, faults: dict | None = None, generate_cls=None,
           passthrough_schema: bytes | None = None, probe: StorageProbe | None = None,
           score_kwargs: dict | None = None) -> Iterator[dict]:
    """Build each shard's work unit (``ShardUnits``: ``units`` are its arguments), generate (and, with
    ``score_kwargs``, score: ``ScoreStage``'s arguments) and write it, streamed: yields each shard's
    marker row (and ``node``) as its write completes. ``files``: one row per planned file with pending
    shards (``shard_base``, ``plan``: its plan file, ``local``: its pending shards' numbers in that plan).
    ``planning``: ``_planned_shards``' arguments (``jobs``, ``earlier``, ``checks``, ``out_dir``): new
    files, planned in the same stream, one task each, their shards following as each file is planned.

    Both sources give a file's shards as one block; the stream is cut to one shard per block before the
    unit builder, so that a file's shards spread over every generation actor (one block is one actor
    task: uncut, a whole file would render on one GPU) and each shard is written as it is done.

    ``generate_cls`` replaces GenerateStage (the scale benchmark's no-op engine); None in production.
    """
    import ray

    ds = shard_stream(files, planning, resources)
    if ds is None:
        return
    jobs = (planning or {}).get("jobs") or []
    # the CPUs it asks for leave room for a generation actor, a planning task and a write task on 2 CPUs
    ds = ds.map_batches(probed(ShardUnits, probe), fn_constructor_kwargs=units, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2), num_cpus=resources.cpus_per_plan)
    n_units = sum(len(f["local"]) for f in files) + sum(record.slots for _, record in jobs)
    ds = ds.map_batches(
        OnNode,
        fn_constructor_kwargs={"stage_cls": generate_cls or GenerateStage,
                               "kwargs": dict(generate_kwargs, device=resources.actor_device), "probe": probe,
                               "then": (ScoreStage, dict(score_kwargs, device=resources.actor_device))
                               if score_kwargs else None},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_pool_max(resources, n_units)),
        num_gpus=_gpus(resources),
        num_cpus=resources.cpus_per_actor,
        **({"memory": resources.memory} if resources.memory else {}),
    )
    ds = ds.map_batches(write_batch, fn_kwargs={"out_dir": out_dir, "faults": faults,
                                                "passthrough_schema": passthrough_schema, "probe": probe},
                        batch_size=1, batch_format="numpy", num_cpus=resources.cpus_per_write)
    yield from ds.iter_rows()
