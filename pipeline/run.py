"""The driver of ``freecustom-pipeline run``: validate, plan shards, resume, run the Ray phases, report.

The output folder's layout is ``stages.output``'s; planning is ``pipeline.shards``; the Ray
executions are ``pipeline.plan``'s. ``run`` reads as the steps of a run.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.manifest import MANIFEST_SCHEMA, manifest_base_dir, read_manifest
from pipeline.plan import (
    Resources,
    actor_memory,
    actor_pool_size,
    check_shared_storage,
    ensure_ray,
    not_shared_in,
    render,
    resolve_concept_sets,
    resolve_device,
    wait_for_gpus,
)
from pipeline.preflight import preflight
from pipeline.scoring import annotation_summary, run_score_summary, write_rejected_table
from pipeline.settings import RunSettings
from pipeline.shards import ConceptSets, RunPlan, concept_group_rows, file_digest, work_unit
from pipeline.validate import ManifestValidation
from stages.card import dataset_card
from stages.output import CARD_FILE, KV_STORE, RUN_FILE, STATS_FILE, OutputFolder, collect_errors
from stages.params import GenParams
from stages.reference_kv import ReferenceRequest, kv_location
from stages.reuse import build_index

logger = logging.getLogger(__name__)


class RunFailed(Exception):
    """The run broke off (exit 1): finished shards stay; rerunning the same command resumes."""


@dataclass
class RunSummary:
    out: str
    stats: dict
    errors: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if not self.errors else 1


class Clock:
    """Seconds per named phase: ``with clock("validate"): ...``; ``on_phase(name)`` as each starts."""

    def __init__(self, on_phase=None):
        self.seconds: dict[str, float] = {}
        self.on_phase = on_phase

    def __call__(self, name: str):
        clock = self

        class _Span:
            def __enter__(self):
                if clock.on_phase:
                    clock.on_phase(name)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[name] = clock.seconds.get(name, 0.0) + time.perf_counter() - self.t

        return _Span()


def run(settings: RunSettings, *, on_shard=None, progress=None, engine: dict | None = None) -> RunSummary:
    """Run (or resume) the whole job. ``on_shard(marker, done, total)`` is called as shards complete;
    ``progress`` (``pipeline.progress.ProgressLog`` or alike) hears of phases, the plan and each shard.

    ``engine`` swaps stage classes (``{"reference_kv": cls, "generate": cls}``): for benchmarks of
    the machinery around the model only; production runs leave it None.
    """
    # the model, the scorers' models, misspelled columns, object storage: checked before anything starts
    settings = preflight(settings, check_model=not engine)
    engine = engine or {}
    clock = Clock(progress.phase if progress else None)
    started = time.perf_counter()
    out = OutputFolder(settings.out)

    # 1. Validate the manifest in one streaming pass and plan the shards
    with clock("validate"):
        settings.check_family()
        validation = ManifestValidation(read_manifest(settings.manifest), defaults=settings.defaults,
                                        limits=settings.limits, inputs=settings.inputs(),
                                        base_dir=manifest_base_dir(settings.manifest), family=settings.family,
                                        control=settings.control(), mask_policy=settings.checked_mask_policy(),
                                        subject=settings.subject())
        plan = RunPlan(validation, settings.samples_per_shard)

    # 2. Check the output folder: new, or the same run (resume); _run.json names what it depends on
    identity = dict(settings.output_identity(), manifest=file_digest(settings.manifest), plan=plan.digest())
    if settings.blip_subject:  # an input outside the manifest: its bytes, as the manifest's
        identity["blip_subject"] = dict(identity["blip_subject"], digest=file_digest(settings.blip_subject))
    identity = json.loads(json.dumps(identity, sort_keys=True, default=str))  # as it reads back from _run.json
    for previous in settings.reuse:  # before anything is written or started: a typo costs nothing
        if not OutputFolder(previous, option="--reuse").exists(RUN_FILE):
            raise ValueError(f"--reuse {previous}: not an output folder of freecustom-pipeline run (no {RUN_FILE})")
    out.prepare(identity, overwrite=settings.overwrite)

    # 3. Resume: the shards without a complete marker
    markers = out.read_markers()
    pending = out.pending(plan.n_shards, markers)
    if progress:
        progress.planned(shards=len(pending), images=sum(plan.shard_size(n) for n in pending),
                         rows_failed=len(plan.problems), complete=plan.n_shards - len(pending))
    sets, generated, reused, device, nodes, warnings = ConceptSets(), 0, 0, None, Counter(), Counter()
    if pending:
        # 4. Ray: the cluster (RAY_ADDRESS, --address or a local one), the device, GPUs to wait for
        ensure_ray(settings.address)
        device = resolve_device(settings.device)
        resources = Resources(gpus_per_worker=settings.gpus_per_worker, max_workers=settings.max_workers,
                              cpus_per_actor=settings.cpus_per_worker, device=device,
                              memory=actor_memory(settings, plan.groups_of(pending), device=device))
        waited = wait_for_gpus(resources, settings.gpu_wait)
        if waited:
            clock.seconds["wait_for_gpus"] = waited
        probe = check_shared_storage({"-o/--out": out.root if out.local else None, "--kv-cache": settings.kv_cache})
        try:
            # 5. Concept sets: masks, composites and reference K/V, once per concept group
            try:
                sets = _concept_sets(settings, plan, pending, out, resources, clock, engine.get("reference_kv"),
                                     probe, progress)
            except Exception as e:  # a node added since the start that does not see OUT: exit 2
                if (refused := not_shared_in(e)) is not None:
                    raise refused from None
                raise

            # 6. Work units, one per pending shard (and, with --reuse, where the previous outputs' samples are)
            reuse_index = None
            if settings.reuse:
                out.write(out.reuse_index(), json.dumps(build_index(settings.reuse)).encode())
                reuse_index = out.uri(out.reuse_index())
            try:
                units = [work_unit(n, plan.shard(n), sets).encode() for n in pending]
            except RuntimeError as e:  # a validated row re-read differently: its inputs changed under the run
                raise RunFailed(f"planning broke off: {e}; the manifest's inputs changed during the run, "
                                "rerun once they are stable") from None

            # 7. Generate and write the shards, streamed; markers arrive as shards complete
            with clock("generate_and_write"):
                generate_kwargs = dict(model=settings.model, image_format=settings.image_format,
                                       batch_size=settings.batch_size, **settings.generator_kwargs(),
                                       compile=settings.compile, reuse_index=reuse_index, faults=settings.faults,
                                       **({"save_attention": True} if settings.save_attention else {}),
                                       **settings.training_kwargs(out.location),
                                       # control images and BLIP-Diffusion subjects are read like concept images
                                       **({"input_settings": settings.inputs()}
                                          if settings.controlnet or settings.family.name == "blip" else {}))
                failure = None
                try:
                    rows = render([{"shard_id": n, "unit": u} for n, u in zip(pending, units, strict=True)],
                                  generate_kwargs=generate_kwargs, out_dir=out.location, resources=resources,
                                  faults=settings.faults, generate_cls=engine.get("generate"),
                                  passthrough_schema=_passthrough_schema(plan), probe=probe,
                                  score_kwargs=_score_kwargs(settings, out))
                    for i, row in enumerate(rows):
                        sets.passes += int(row.get("reference_passes") or 0)
                        marker = json.loads(row["marker"])
                        markers[marker["shard"]] = marker
                        generated += marker["samples"] + marker.get("rejected", 0)
                        reused += marker.get("reused", 0)
                        nodes[row.get("node") or "?"] += 1
                        warnings.update(json.loads(row.get("warnings") or "{}"))
                        if on_shard:
                            on_shard(marker, i + 1, len(units))
                        if progress:
                            progress.shard(marker)
                except Exception as e:  # noqa: BLE001
                    failure = f"{type(e).__name__}: {e}"
                if failure is not None and (refused := not_shared_in(failure)) is not None:
                    raise refused
                if failure is not None:
                    # raised outside the except block: the Ray exception's frames (which hold the actor
                    # handles, and so the GPUs) are not kept alive by the new exception's context
                    raise RunFailed(f"rendering broke off ({failure[:2000]}); finished shards are kept, "
                                    "rerun the same command to resume")
        finally:
            if probe is not None:
                probe.remove()

    # 8. Report: errors.parquet, rejected.parquet (--min-score), the run's K/V store removed once
    # complete, _stats.json with the score distributions (--score)
    errors = collect_errors((p.record() for p in plan.problems), markers)
    out.write_errors(errors)
    if settings.min_score:
        write_rejected_table(out)
    complete = all(markers.get(n, {}).get("status") == "complete" for n in range(plan.n_shards))
    if complete:
        out.remove_dir(KV_STORE)
    stats = _stats(plan, markers, errors, pending, sets, generated, clock, started, complete)
    stats.update(device=device, nodes=dict(sorted(nodes.items())), samples_reused=reused,
                 samples_rendered=generated - reused, warnings=dict(sorted(warnings.items())))
    if settings.score_models or settings.min_score:
        stats.update(samples_rejected=sum(m.get("rejected", 0) for m in markers.values()
                                          if m.get("status") != "write_failed"),
                     scores=run_score_summary(out))
    if settings.annotate:
        stats.update(annotations=annotation_summary(out))
    for kind, count in sorted(warnings.items()):
        logger.warning("%s: %d time(s) in this run (see _stats.json warnings)", kind, count)
    if progress:
        progress.phase("done")
    out.write_json(STATS_FILE, stats, indent=2)
    out.write(CARD_FILE, dataset_card(stats, identity).encode())
    return RunSummary(out=out.location, stats=stats, errors=errors)


def _concept_sets(settings: RunSettings, plan: RunPlan, pending: list[int], out: OutputFolder, resources: Resources,
                  clock, reference_cls, probe=None, progress=None) -> ConceptSets:
    """Resolve the concept groups of the pending shards and get their K/V (or the requests to compute them).

    With one generation actor (e.g. one GPU) that actor computes the K/V itself from a request file,
    so the run loads the model once; with several, a reference actor pool fills the store first.
    """
    single = actor_pool_size(resources, len(pending)) == 1
    lazy = settings.reference_actors == "never" or (settings.reference_actors == "auto" and single)
    rows = concept_group_rows(plan.groups_of(pending), base_dir=manifest_base_dir(settings.manifest),
                              model_identity=settings.model_identity(), controlnet=settings.controlnet,
                              subjects=settings.family.name == "blip")
    sets = ConceptSets()
    if progress:
        progress.concept_sets(len(rows))
    for row in resolve_concept_sets(rows, settings, out, resources, clock, lazy=lazy, reference_cls=reference_cls,
                                    probe=probe, on_set=progress.concept_set if progress else None):
        sets.add(row)
        csid = row.get("concept_set_id")
        if lazy and csid and not row.get("error_reason") and csid not in sets.requests:
            request = ReferenceRequest(csid, row["resolved"], GenParams.from_row(json.loads(row["gen_params"])),
                                       control=row.get("control_condition") or None,
                                       subject=row.get("subject_condition") or None)
            out.write(out.kv_request(csid), request.to_json())
            sets.requests[csid] = out.uri(out.kv_request(csid))
            sets.kv[csid] = kv_location(settings.kv_cache or out.uri(KV_STORE), csid)
    return sets


def _score_kwargs(settings: RunSettings, out: OutputFolder) -> dict | None:
    """``ScoreStage``'s arguments with ``--score`` / ``--min-score``; None without."""
    if settings.score_models is None and not settings.min_score:  # --min-score presence=... scores nothing
        return None
    return dict(models=settings.score_models, out_dir=out.location, image_format=settings.image_format,
                thresholds=settings.thresholds())


def _passthrough_schema(plan: RunPlan) -> bytes | None:
    """The manifest's pass-through columns with their types (the shard Parquet keeps them), serialized."""
    schema = pa.schema([f for f in plan.validation.table.schema if f.name not in MANIFEST_SCHEMA.names])
    return schema.serialize().to_pybytes() if len(schema) else None


def _stats(plan: RunPlan, markers: dict, errors: list, pending: list, sets: ConceptSets, generated: int, clock: Clock,
           started: float, complete: bool) -> dict:
    render_seconds = clock.seconds.get("generate_and_write", 0.0)
    return {
        "rows": plan.validation.table.num_rows,
        "rows_valid": plan.rows_valid,
        "rows_failed": len(errors),
        "samples_expected": plan.samples,
        "samples_written": sum(m.get("samples", 0) for m in markers.values() if m.get("status") != "write_failed"),
        "samples_generated_this_run": generated,
        "shards": plan.n_shards,
        "shards_pending_before_run": len(pending),
        "concept_sets": len(plan.group_keys),
        "concept_sets_this_run": len(sets.ids()),
        "reference_passes": sets.passes,
        "seconds": {k: round(v, 3) for k, v in clock.seconds.items()},
        "seconds_total": round(time.perf_counter() - started, 3),
        "images_per_second": round(generated / render_seconds, 4) if render_seconds and generated else 0.0,
        "complete": complete and not errors,
    }
