"""The driver of ``freecustom-pipeline run``: validate, plan shards, resume, run the Ray phases, report.

Output folder (the contract):
  shards/{n:05d}.tar + .parquet   samples; final names only once complete (temp + rename)
  _progress/{n:05d}.json          per-shard done marker, written last (resume reads these)
  references/<concept-set-id>/    reference previews and contact sheets
  errors.parquet                  one row per failed manifest row: id, stage, field, reason
  _run.json                       what the output depends on (a rerun with other settings is refused)
  _stats.json                     counts and timings, written at the end of every run
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.manifest import (
    GenParams,
    Limits,
    ManifestValidation,
    RowProblem,
    RowSpec,
    manifest_base_dir,
    read_manifest,
)
from stages.inputs import InputSettings

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
RUN_FILE, STATS_FILE, ERRORS_FILE = "_run.json", "_stats.json", "errors.parquet"
KV_STORE = "_kv"


class RunFailed(Exception):
    """The run broke off (exit 1): finished shards stay; rerunning the same command resumes."""


class RunRefused(Exception):
    """The run cannot start (exit 2): e.g. OUT holds the output of another manifest or settings."""


@dataclass(frozen=True)
class RunSettings:
    manifest: str
    out: str
    model: str = DEFAULT_MODEL
    defaults: GenParams = GenParams()
    limits: Limits = Limits()
    root: str | None = None
    allow_roots: tuple[str, ...] = ()
    max_pixels: int = 64_000_000
    kv_cache: str | None = None
    samples_per_shard: int = 256
    image_format: str = "png"
    address: str | None = None
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    max_workers: int | None = None
    batch_size: int | None = None
    overwrite: bool = False
    dtype: str = "auto"
    scheduler: str | None = None
    channels_last: bool = False
    compile: bool = False
    mask_policy: str = "fail"
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_b"
    detector: str | None = None
    # who computes reference K/V: "auto" = the generation actor itself when the run has one (one model
    # load), a reference actor pool before generation when it has several; "always" / "never" force
    # either way (both give the same K/V files and images; tests cover both)
    reference_actors: str = "auto"
    faults: dict | None = None  # test-only fault injection (stages/faults.py); never set in production

    def __post_init__(self):
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard}: must be >= 1")
        if self.image_format not in ("png", "jpg", "webp"):
            raise ValueError(f"image_format={self.image_format!r}: expected png, jpg or webp")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker}: must be >= 0")
        if self.reference_actors not in ("auto", "always", "never"):
            raise ValueError(f"reference_actors={self.reference_actors!r}: expected auto, always or never")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")

    def inputs(self) -> InputSettings:
        return InputSettings(root=self.root, allow_roots=tuple(self.allow_roots), max_pixels=self.max_pixels)

    def output_identity(self) -> dict:
        """Settings that change what is written (not where or how fast)."""
        return {
            "model": self.model, "dtype": self.dtype, "scheduler": self.scheduler,
            "defaults": dataclasses.asdict(self.defaults), "samples_per_shard": self.samples_per_shard,
            "image_format": self.image_format, "mask_policy": self.mask_policy, "batch_size": self.batch_size,
            "sam_checkpoint": self.sam_checkpoint, "sam_model_type": self.sam_model_type, "detector": self.detector,
            # only when on: output folders written before the flag existed keep their identity (and resume)
            **({"channels_last": True} if self.channels_last else {}),
            **({"compile": True} if self.compile else {}),
        }


@dataclass(slots=True)
class Target:
    row: RowSpec
    seed: int
    key: str


@dataclass
class RunSummary:
    out: str
    stats: dict
    errors: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if not self.errors else 1


# ---- planning (pure, deterministic) ------------------------------------------------------------


def sample_key(row_id: str, seed: int) -> str:
    """WebDataset key of one sample: row id and seed (ids are ``[A-Za-z0-9_-]``, so keys have no dots)."""
    return f"{row_id}-{seed}"


@functools.lru_cache(maxsize=4096)
def mrsa_dict(p: GenParams) -> dict:
    """The MRSA config of a row's parameters, as a dict (cached: rows share few parameter sets; do not mutate)."""
    from freecustom_core import MRSAConfig

    return MRSAConfig(blocks=p.mrsa_blocks, layers=p.mrsa_layers, start_step=p.start_step, end_step=p.end_step,
                      mask_mode=p.mask_mode, style_fidelity=p.style_fidelity,
                      null_ref_prompts=p.null_ref_prompts).to_dict()


def reference_params(p: GenParams) -> dict:
    """What a concept set's reference K/V depend on besides the concepts themselves."""
    return {"num_inference_steps": p.num_inference_steps, "height": p.height, "width": p.width,
            "reference_seed": p.reference_seed, "mrsa": mrsa_dict(p),
            "negative_prompt": p.negative_prompt if p.style_fidelity < 1 else None}


def group_key(row: RowSpec) -> str:
    """Rows with the same concepts and reference parameters share one resolution and one K/V."""
    return _group_key(tuple(row.concepts), row.params)


@functools.lru_cache(maxsize=65536)
def _group_key(concepts: tuple, params: GenParams) -> str:
    payload = json.dumps([[dataclasses.asdict(c) for c in concepts], reference_params(params)],
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class RunPlan:
    """The run's shards, planned without holding the rows: a few integers per target.

    Targets are ordered by concept group (in order of first appearance), then row order, then seed
    order, and cut into shards of ``samples_per_shard``. One streaming validation pass records, per
    good row, its concept group and seed count (and the first row of each group, which phase 1
    resolves); shard n's targets are rebuilt on demand from the manifest table
    (``ManifestValidation.rows``). tests/test_plan.py checks this against the same plan made over
    every validated row held in memory.
    """

    def __init__(self, validation: ManifestValidation, samples_per_shard: int):
        from array import array

        self.validation = validation
        self.samples_per_shard = samples_per_shard
        self.problems: list[RowProblem] = []
        self.rows_valid = 0
        self.group_keys: list[str] = []
        self.group_first: list[RowSpec] = []  # one row per group, in order of first appearance
        group_of: dict[str, int] = {}
        rows_of: list[array] = []  # per group: row indices, in manifest order
        seeds_of: list[array] = []  # per group: seed count of each of those rows
        self.row_group = array("l", [-1]) * validation.table.num_rows
        for index, spec, found in validation:
            if found:
                self.problems.extend(found)
                continue
            if spec is None:
                continue
            self.rows_valid += 1
            key = group_key(spec)
            g = group_of.get(key)
            if g is None:
                g = group_of[key] = len(self.group_keys)
                self.group_keys.append(key)
                self.group_first.append(spec)
                rows_of.append(array("q"))
                seeds_of.append(array("l"))
            rows_of[g].append(index)
            seeds_of[g].append(len(spec.seeds))
            self.row_group[index] = g
        self.target_row, self.target_seed = array("q"), array("l")  # (row index, position in its seeds)
        for rows, counts in zip(rows_of, seeds_of, strict=True):
            for index, count in zip(rows, counts, strict=True):
                self.target_row.extend([index] * count)
                self.target_seed.extend(range(count))
        self.samples = len(self.target_row)
        self.n_shards = -(-self.samples // samples_per_shard)

    def _bounds(self, n: int) -> tuple[int, int]:
        return n * self.samples_per_shard, min((n + 1) * self.samples_per_shard, self.samples)

    def shard_size(self, n: int) -> int:
        lo, hi = self._bounds(n)
        return hi - lo

    def shard(self, n: int) -> list[Target]:
        lo, hi = self._bounds(n)
        rows = self.validation.rows(self.target_row[lo:hi])
        out = []
        for index, pos in zip(self.target_row[lo:hi], self.target_seed[lo:hi], strict=True):
            row = rows[index]
            out.append(Target(row, row.seeds[pos], sample_key(row.id, row.seeds[pos])))
        return out

    def groups_of(self, shard_ids) -> list[RowSpec]:
        """The first row of every concept group that has targets in these shards."""
        wanted: set[int] = set()
        for n in shard_ids:
            lo, hi = self._bounds(n)
            wanted.update(self.row_group[i] for i in set(self.target_row[lo:hi]))
        return [self.group_first[g] for g in sorted(wanted)]

    def digest(self) -> str:
        """Digest of every shard's sample keys, in order (``_run.json``: a resume must plan the same
        shards); read from the id and seeds columns, no row is re-validated."""
        import pyarrow as pa

        table = self.validation.table
        # one contiguous copy of each column (64-bit offsets: no overflow past 2 GiB of ids) instead of a
        # chunked take per shard, which concatenated the chunks every time
        id_column = table.column("id").cast(pa.large_string()).combine_chunks()
        seeds_column = table.column("seeds").cast(pa.large_list(pa.int64())).combine_chunks()
        h = hashlib.sha256()
        for n in range(self.n_shards):
            lo, hi = self._bounds(n)
            idx = pa.array(self.target_row[lo:hi], pa.int64())
            ids = id_column.take(idx).to_pylist()
            seeds = seeds_column.take(idx).to_pylist()
            keys = [sample_key(i, s[p]) for i, s, p in zip(ids, seeds, self.target_seed[lo:hi], strict=True)]
            h.update(f"{n}:{','.join(keys)};".encode())
        return h.hexdigest()[:20]


def file_digest(path: str) -> str:
    """Content digest of the manifest (a file, or every Parquet file of a manifest folder)."""
    from stages.inputs import is_uri, read_bytes

    h = hashlib.sha256()
    if not is_uri(path) and Path(path).is_dir():
        for part in sorted(Path(path).rglob("*.parquet")):
            h.update(part.relative_to(path).as_posix().encode() + b"\0" + part.read_bytes())
    else:
        h.update(read_bytes(path, settings=InputSettings(), field="manifest"))
    return h.hexdigest()


# ---- output folder -----------------------------------------------------------------------------------


def _atomic_json(path: Path, data: dict) -> None:
    from stages.write import atomic_write

    atomic_write(path, json.dumps(data, indent=2, sort_keys=True, default=str).encode())


def read_markers(out: Path) -> dict[int, dict]:
    markers = {}
    for path in sorted((out / "_progress").glob("*.json")):
        try:
            marker = json.loads(path.read_text())
            markers[int(marker["shard"])] = marker
        except (OSError, ValueError, KeyError):
            logger.warning("ignoring unreadable marker %s (its shard will be redone)", path)
    return markers


def _clear_output(out: Path) -> None:
    import shutil

    for name in ("shards", "_progress", "references", KV_STORE):
        if (out / name).is_dir() and not (out / name).is_symlink():
            shutil.rmtree(out / name)
    for name in (RUN_FILE, STATS_FILE, ERRORS_FILE):
        (out / name).unlink(missing_ok=True)


def check_output_folder(out: Path, identity: dict, *, overwrite: bool) -> None:
    """Refuse to mix outputs: OUT must be new, or hold a run of the same manifest and settings."""
    if out.is_symlink():
        raise RunRefused(f"{out} is a symbolic link; give the real output folder")
    links = [name for name in ("shards", "_progress", "references", KV_STORE) if (out / name).is_symlink()]
    if links:
        raise RunRefused(f"{out}: {', '.join(links)} are symbolic links; the pipeline never writes through links")
    run_file = out / RUN_FILE
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous != identity:
            if not overwrite:
                diffs = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
                raise RunRefused(
                    f"{out} holds the output of another manifest or other settings (differs in: {', '.join(diffs)}). "
                    "Use another output folder, or --overwrite to replace it."
                )
            _clear_output(out)
    elif out.exists() and any(p.name in ("shards", "_progress") for p in out.iterdir()):
        if not overwrite:
            raise RunRefused(f"{out} holds shards without a {RUN_FILE}; use --overwrite to replace them")
        _clear_output(out)
    out.mkdir(parents=True, exist_ok=True)
    _sweep_temporaries(out)
    _atomic_json(run_file, identity)


def _sweep_temporaries(out: Path) -> None:
    """Temp files and folders an interrupted run left behind (never under a final name)."""
    import shutil

    for sub in ("shards", "_progress", "references", KV_STORE):
        folder = out / sub
        if not folder.is_dir():
            continue
        for stale in folder.glob(".*.tmp*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def write_errors(out: Path, errors: list[dict]) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.write import atomic_write

    table = pa.table({
        "id": pa.array([e.get("id") for e in errors], pa.string()),
        "row": pa.array([e.get("row") for e in errors], pa.int64()),
        "stage": pa.array([e.get("stage") for e in errors], pa.string()),
        "field": pa.array([e.get("field") for e in errors], pa.string()),
        "reason": pa.array([e.get("reason") for e in errors], pa.string()),
        "seeds": pa.array([e.get("seeds") for e in errors], pa.list_(pa.int64())),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write(out / ERRORS_FILE, buf.getvalue())


def collect_errors(problems: list[RowProblem], markers: dict[int, dict]) -> list[dict]:
    """One row per failed manifest row (first reason; all seeds that failed for runtime errors)."""
    by_row: OrderedDict[int, dict] = OrderedDict()
    for p in problems:
        by_row.setdefault(p.index, {"id": p.id, "row": p.index, "stage": "validate", "field": p.field,
                                    "reason": p.reason, "seeds": []})
    for n in sorted(markers):
        for e in markers[n].get("errors", []):
            entry = by_row.setdefault(e.get("row"), {"id": e.get("id"), "row": e.get("row"), "stage": e.get("stage"),
                                                     "field": e.get("field") or "", "reason": e.get("reason"), "seeds": []})
            if e.get("seed") is not None:
                entry["seeds"].append(int(e["seed"]))
    return sorted(by_row.values(), key=lambda e: e["row"] if e["row"] is not None else -1)


# ---- the run -----------------------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        clock = self

        class _Span:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[name] = clock.seconds.get(name, 0.0) + time.perf_counter() - self.t

        return _Span()


def _group_meta(p: GenParams, shard_id: int) -> dict:
    """The part of a sample's metadata its shard's group shares (the rest: key, id, row, seed, prompt, passthrough)."""
    return {
        "negative_prompt": p.negative_prompt, "guidance_scale": p.guidance_scale,
        "num_inference_steps": p.num_inference_steps, "height": p.height, "width": p.width,
        "reference_seed": p.reference_seed, "mrsa": mrsa_dict(p), "shard": shard_id,
    }


def run(settings: RunSettings, *, on_shard=None, engine: dict | None = None) -> RunSummary:
    """Run (or resume) the whole job. ``on_shard(marker, done, total)`` is called as shards complete.

    ``engine`` swaps stage classes (``{"reference_kv": cls, "generate": cls}``): for benchmarks of
    the machinery around the model only; production runs leave it None.
    """
    engine = engine or {}
    clock = _Clock()
    started = time.perf_counter()
    out = Path(settings.out).absolute()
    with clock("validate"):
        table = read_manifest(settings.manifest)
        validation = ManifestValidation(table, defaults=settings.defaults, limits=settings.limits,
                                        inputs=settings.inputs(), base_dir=manifest_base_dir(settings.manifest))
        del table
        plan = RunPlan(validation, settings.samples_per_shard)
        problems = plan.problems
    identity = dict(settings.output_identity(), manifest=file_digest(settings.manifest), plan=plan.digest())
    identity = json.loads(json.dumps(identity, sort_keys=True, default=str))  # as it reads back from _run.json
    check_output_folder(out, identity, overwrite=settings.overwrite)

    markers = read_markers(out)
    pending = [n for n in range(plan.n_shards)
               if markers.get(n, {}).get("status") != "complete" or not (out / "shards" / f"{n:05d}.tar").exists()]
    reference_passes = 0
    generated = 0
    concept_sets: set[str] = set()
    if pending:
        from pipeline.plan import Resources, ensure_ray

        ensure_ray(settings.address)
        resources = Resources(gpus_per_worker=settings.gpus_per_worker, max_workers=settings.max_workers,
                              cpus_per_actor=settings.cpus_per_worker)
        from pipeline.plan import actor_pool_size

        # one generation actor (e.g. one GPU): it computes the K/V itself, so the run loads the model
        # once; with several, a reference pool fills the store first (see _prepare)
        single = actor_pool_size(resources, len(pending)) == 1
        lazy = settings.reference_actors == "never" or (settings.reference_actors == "auto" and single)
        resolved, kv_paths, requests, reference_passes = _prepare(
            settings, plan.groups_of(pending), out, resources, clock, engine.get("reference_kv"), lazy=lazy)
        concept_sets = {r["concept_set_id"] for r in resolved.values() if r.get("concept_set_id")}
        try:
            units = [_unit(n, plan.shard(n), resolved, kv_paths, requests) for n in pending]
        except RuntimeError as e:  # a validated row re-read differently: its inputs changed under the run
            raise RunFailed(f"planning broke off: {e}; the manifest's inputs changed during the run, "
                            "rerun once they are stable") from None
        with clock("generate_and_write"):
            from pipeline.plan import render

            gen_kwargs = dict(model=settings.model, image_format=settings.image_format, batch_size=settings.batch_size,
                              dtype=settings.dtype, scheduler=settings.scheduler, channels_last=settings.channels_last,
                              compile=settings.compile, faults=settings.faults)
            failure = None
            try:
                shards_done = render(units, generate_kwargs=gen_kwargs, out_dir=str(out), resources=resources,
                                     faults=settings.faults, generate_cls=engine.get("generate"))
                for i, row in enumerate(shards_done):
                    reference_passes += int(row.get("reference_passes") or 0)
                    marker = json.loads(row["marker"])
                    markers[marker["shard"]] = marker
                    generated += marker["samples"]
                    if on_shard:
                        on_shard(marker, i + 1, len(units))
            except Exception as e:  # noqa: BLE001
                failure = f"{type(e).__name__}: {e}"
            if failure is not None:
                # raised outside the except block: the Ray exception's frames (which hold the actor
                # handles, and so the GPUs) are not kept alive by the new exception's context
                raise RunFailed(f"rendering broke off ({failure[:2000]}); finished shards are kept, "
                                "rerun the same command to resume")

    errors = collect_errors(problems, markers)
    write_errors(out, errors)
    complete = all(markers.get(n, {}).get("status") == "complete" for n in range(plan.n_shards))
    if complete and (out / KV_STORE).exists():
        from stages.reference_kv import remove_store

        remove_store(str(out / KV_STORE))
    render_seconds = clock.seconds.get("generate_and_write", 0.0)
    stats = {
        "rows": plan.validation.table.num_rows,
        "rows_valid": plan.rows_valid,
        "rows_failed": len(errors),
        "samples_expected": plan.samples,
        "samples_written": sum(m.get("samples", 0) for m in markers.values() if m.get("status") != "write_failed"),
        "samples_generated_this_run": generated,
        "shards": plan.n_shards,
        "shards_pending_before_run": len(pending),
        "concept_sets": len(plan.group_keys),
        "concept_sets_this_run": len(concept_sets),
        "reference_passes": reference_passes,
        "seconds": {k: round(v, 3) for k, v in clock.seconds.items()},
        "seconds_total": round(time.perf_counter() - started, 3),
        "images_per_second": round(generated / render_seconds, 4) if render_seconds and generated else 0.0,
        "complete": complete and not errors,
    }
    _atomic_json(out / STATS_FILE, stats)
    return RunSummary(out=str(out), stats=stats, errors=errors)


def _prepare(settings: RunSettings, rows: list[RowSpec], out: Path, resources, clock, reference_cls=None, *,
             lazy: bool = False) -> tuple[dict[str, dict], dict[str, str | dict], dict[str, str], int]:
    """Masks, composites and reference K/V, once per concept group.

    Returns group key -> resolved row, concept-set id -> K/V path (or the failed row), concept-set
    id -> reference request file (``lazy``), and the number of reference passes run here.

    ``lazy``: segment -> composite only (seconds under ``resolve``); each concept set's inputs are
    written to a request file in the run's store and the generation actor computes (or finds) the
    K/V at the K/V path when it first needs them. Otherwise segment -> composite -> reference K/V
    run chained in one Ray Data execution (``resolve_and_reference_kv``); when segmentation runs
    its models on a GPU, the reference actors would wait for that GPU, so the chain is cut in two
    executions (``resolve``, then ``reference_kv``).
    """
    from pipeline.plan import StageSpec, map_actor_stages
    from stages.composite import CompositeStage
    from stages.reference_kv import ReferenceKVStage
    from stages.segment import SegmentConfig, SegmentStage

    units: OrderedDict[str, dict] = OrderedDict()
    for r in rows:
        key = group_key(r)
        if key in units:
            continue
        p = reference_params(r.params)
        units[key] = {
            "key": key,
            "concepts": [dataclasses.asdict(c) for c in r.concepts],
            "base_dir": manifest_base_dir(settings.manifest),
            "identity": {"model_id": f"{settings.model}|{settings.dtype}|{settings.scheduler}"
                                     + ("|channels_last" if settings.channels_last else ""),
                         "height": p["height"], "width": p["width"], "num_inference_steps": p["num_inference_steps"],
                         "reference_seed": p["reference_seed"], "mrsa": p["mrsa"],
                         "extra": {"negative_prompt": p["negative_prompt"]}},
            "params": json.dumps(p, sort_keys=True),
        }
    segment_config = SegmentConfig(sam_checkpoint=settings.sam_checkpoint, sam_model_type=settings.sam_model_type,
                                   detector=settings.detector, mask_policy=settings.mask_policy)
    uses_models = bool(settings.sam_checkpoint or settings.detector)
    light = min(resources.cpus_per_actor, 1.0)  # no model: file reads and image arithmetic
    resolve_stages = [
        StageSpec(SegmentStage, {"config": segment_config, "input_settings": settings.inputs()}, gpu=uses_models,
                  num_cpus=None if uses_models else light),
        StageSpec(CompositeStage, {"out_dir": str(out), "input_settings": settings.inputs()}, gpu=False, num_cpus=light),
    ]
    reference_stage = StageSpec(reference_cls or ReferenceKVStage,
                                dict(model=settings.model, store_dir=str(out / KV_STORE), kv_cache=settings.kv_cache,
                                     dtype=settings.dtype, scheduler=settings.scheduler,
                                     channels_last=settings.channels_last, faults=settings.faults), gpu=True)
    if lazy:
        with clock("resolve"):
            done = map_actor_stages(list(units.values()), resolve_stages, resources)
    elif uses_models and _cluster_has_gpus():
        with clock("resolve"):
            composed = [_plain_row(r) for r in map_actor_stages(list(units.values()), resolve_stages, resources)]
        with clock("reference_kv"):
            done = map_actor_stages(composed, [reference_stage], resources)
    else:
        with clock("resolve_and_reference_kv"):
            done = map_actor_stages(list(units.values()), [*resolve_stages, reference_stage], resources)
    from stages.reference_kv import kv_file_name, write_reference_request

    resolved: dict[str, dict] = {}
    paths: dict[str, str | dict] = {}
    requests: dict[str, str] = {}
    passes = 0
    for row in map(_plain_row, done):
        passes += int(row.get("reference_pass") or 0)
        if lazy and row.get("concept_set_id") and not row.get("error_reason"):
            csid = row["concept_set_id"]
            if csid not in requests:
                request = out / KV_STORE / f"{csid}.request.json"
                write_reference_request(request, csid, row["resolved"], json.loads(row["params"]))
                requests[csid] = str(request)
                paths[csid] = str((Path(settings.kv_cache) if settings.kv_cache else out / KV_STORE) / kv_file_name(csid))
        elif row.get("error_stage") == "reference_kv":
            # the concept set resolved but its K/V failed: the row stays resolved (its metadata), the K/V
            # entry carries the error (as before the stages were chained); K/V another group with the
            # same concept-set id got are kept
            if not isinstance(paths.get(row["concept_set_id"]), str):
                paths[row["concept_set_id"]] = row
            row = dict(row, error_stage="", error_field="", error_reason="")
        elif row.get("concept_set_id") and not row.get("error_reason"):
            paths[row["concept_set_id"]] = row["kv_path"]
        resolved[row["key"]] = row
    return resolved, paths, requests, passes


def _cluster_has_gpus() -> bool:
    import ray

    return bool(ray.cluster_resources().get("GPU", 0))


def _plain_row(row) -> dict:
    """A Ray output row as plain Python values (numpy arrays and scalars to lists and numbers)."""
    import numpy as np

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

    from stages.segment import null_to_none

    return {k: null_to_none(plain(v)) for k, v in dict(row).items()}


def _unit(shard_id: int, shard: list[Target], resolved: dict[str, dict], kv_paths: dict,
          requests: dict[str, str] | None = None) -> dict:
    """One shard's work: targets share their group's K/V path, parameters and metadata (stored once).

    A group is one concept set with one parameter set; see ``stages.generate.expand_targets``. With
    ``requests`` (concept-set id -> request file), a group names the file the generation actor
    computes its K/V from when they are not at the K/V path yet.
    """
    groups: list[dict] = []
    group_of: dict[tuple, int] = {}
    targets = []
    for t in shard:
        p = t.row.params
        gkey = (group_key(t.row), p)
        if gkey not in group_of:
            r = resolved.get(gkey[0], {})
            error = None
            csid = r.get("concept_set_id")
            kv = kv_paths.get(csid) if csid else None
            if r.get("error_reason"):
                error = {"stage": r.get("error_stage"), "field": r.get("error_field") or "", "reason": r["error_reason"]}
            elif not isinstance(kv, str):
                bad = kv or {}
                error = {"stage": bad.get("error_stage") or "reference_kv", "field": bad.get("error_field") or "",
                         "reason": bad.get("error_reason") or "no reference K/V were produced for this concept set"}
            meta = dict(_group_meta(p, shard_id), concept_set_id=csid,
                        concepts=[_concept_meta(c) for c in r.get("resolved") or []])
            group_of[gkey] = len(groups)
            request = {"reference": requests[csid]} if requests and csid in requests and error is None else {}
            groups.append({"kv_path": kv if isinstance(kv, str) else None, "error": error, "meta": meta, **request,
                           "params": {"num_inference_steps": p.num_inference_steps, "height": p.height,
                                      "width": p.width, "guidance_scale": p.guidance_scale,
                                      "negative_prompt": p.negative_prompt}})
        targets.append({"g": group_of[gkey], "row": t.row.index, "id": t.row.id, "key": t.key, "prompt": t.row.prompt,
                        "seed": t.seed, "passthrough": t.row.passthrough})
    from stages.generate import encode_unit

    return {"shard_id": shard_id, "unit": encode_unit({"shard_id": shard_id, "groups": groups, "targets": targets})}


def _concept_meta(c: dict) -> dict:
    return {"image": c.get("image_path"), "image_digest": c.get("image_digest"), "prompt": c.get("prompt"),
            "weight": c.get("weight"), "mask_source": c.get("mask_source"), "mask_digest": c.get("mask_digest"),
            "composite": json.loads(c["composite_json"]) if c.get("composite_json") else None}
