"""The driver of ``freecustom-pipeline run``: validate, plan shards, resume, run the Ray phases, report.

The output folder's layout is ``stages.output.folder``'s; planning is ``pipeline.shards``; the Ray
executions are ``pipeline.plan``'s. ``run`` reads as the steps of a run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline.copy_pass import MODEL_LOADED, copies_whole_shards, copy_shards, model_key, previous_model
from pipeline.layout import ManifestLayout, reconcile
from pipeline.manifest_files import ManifestSource
from pipeline.part_plan import Checks, PartRecord, part_errors, plan_file, summary_file
from pipeline.plan import (
    Resources,
    actor_pool_size,
    check_shared_storage,
    ensure_ray,
    not_shared_in,
    part_infos,
    plan_parts,
    render,
    resolve_concept_sets,
    resolve_device,
    wait_for_gpus,
)
from pipeline.plan_memory import actor_memory, file_shape, group_shape
from pipeline.plan_tasks import EarlierFiles
from pipeline.preflight import preflight
from pipeline.scoring import annotation_summary, run_score_summary, write_rejected_table
from pipeline.settings import RunSettings
from pipeline.shards import ConceptSets, file_digest
from stages.generation.reuse import build_index
from stages.output.card import dataset_card
from stages.output.folder import OutputFolder, OutputRefused
from stages.output.layout import CARD_FILE, ERRORS_FILE, KV_STORE, RUN_FILE, STATS_FILE
from stages.params import GenParams
from stages.reference.reference_kv import ReferenceRequest, kv_location

logger = logging.getLogger(__name__)


class RunFailed(Exception):
    """The run broke off (exit 1): finished shards stay; rerunning the same command resumes."""


ERRORS_SHOWN = 1000  # errors.parquet rows a RunSummary carries (the CLI prints 20); the file has them all


@dataclass
class RunSummary:
    """``errors``: the first ``ERRORS_SHOWN`` rows of errors.parquet; ``failed``: how many it has."""

    out: str
    stats: dict
    errors: list[dict] = field(default_factory=list)
    failed: int = 0

    @property
    def exit_code(self) -> int:
        return 0 if not (self.failed or self.errors) else 1


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

    # 1. The manifest's files and their digests (nothing is read row by row here)
    with clock("validate"):
        settings.check_family()
        source = ManifestSource.open(settings.manifest)
        digests = source.digests()

    # 2. Check the output folder: new, or the same run (resume, or a manifest folder that changed)
    identity = settings.output_identity()
    if settings.blip_subject:  # an input outside the manifest: its bytes, as the manifest's
        identity["blip_subject"] = dict(identity["blip_subject"], digest=file_digest(settings.blip_subject))
    identity["manifest_source"] = _source_name(source)  # the manifest's files may change, not where it is
    identity = json.loads(json.dumps(identity, sort_keys=True, default=str))  # as it reads back from _run.json
    for previous_out in settings.reuse:  # before anything is written or started: a typo costs nothing
        if not OutputFolder(previous_out, option="--reuse").exists(RUN_FILE):
            raise ValueError(f"--reuse {previous_out}: not an output folder of freecustom-pipeline run (no {RUN_FILE})")
    # a new OUT: a manifest no row of which can run (no rows, a file's schema) is refused before OUT is made
    fresh = None if out.exists(RUN_FILE) else reconcile(None, source, digests, finished=False)
    if settings.overwrite and not _same_files(out, digests):  # --overwrite: another manifest replaces it all
        out.clear()
    previous = out.prepare(identity, overwrite=settings.overwrite, growing=("manifest", "plan"),
                           recorded_since=("manifest_source",))
    legacy = _legacy_plan(previous, source, settings)
    markers = {n: _slim_marker(m) for n, m in out.read_markers().items()}
    recorded = None if legacy else ManifestLayout.from_row((previous or {}).get("manifest"))
    for record in recorded.files if recorded else []:  # planned in a stream that broke off: its summary says
        if not record.planned and out.exists(summary_file(record)):
            _planned(record, out.read_json(summary_file(record)))
    finished = any(m.get("status") == "complete" for m in markers.values())
    change = fresh if fresh is not None and recorded is None and not markers else reconcile(
        recorded, source, digests, finished=finished, split=not legacy)
    layout = change.layout
    previous_loaded = (out.read_json(STATS_FILE) if out.exists(STATS_FILE) else {}).get(MODEL_LOADED)  # see 8.

    # The storage check before any Ray task writes into OUT (planning tasks write plan files there): each
    # local OUT and --kv-cache gets a probe file, checked on every node that plans, renders or writes
    probe = None

    def storage_probe():
        ensure_ray(settings.address)
        return check_shared_storage({"-o/--out": out.root if out.local else None, "--kv-cache": settings.kv_cache})

    try:
        # 3. New (or changed) files: their ids hashed and their shard numbers set aside, one Ray task each;
        # _run.json names every file before anything renders
        checks = Checks(defaults=settings.defaults, limits=settings.limits, inputs=settings.inputs(),
                        base_dir=source.base_dir, family=settings.family, control=settings.control(),
                        samples_per_shard=settings.samples_per_shard, model_identity=settings.model_identity(),
                        controlnet=settings.controlnet, mask_policy=settings.checked_mask_policy(),
                        subject=settings.subject(), subjects=settings.family.name == "blip")
        located = {p.name: p.location for p in source.parts}
        earlier = EarlierFiles([(f, located[f.name]) for f in layout.files] + [(r, p.location) for p, r in change.new],
                               len(layout.files))
        # BLIP-Diffusion runs resolve their concept sets first: the K/V computed on demand by a generation
        # actor do not carry the row's subject yet (issue 22's notes)
        streaming = (not legacy and not settings.uses_segment_models() and settings.reference_actors != "always"
                     and settings.family.name != "blip")
        shapes, ready = [], {}  # ready: new file -> its plan summary, planned beside the ids tasks
        if change.new:
            probe = storage_probe()
            with clock("validate"):  # streaming into a new OUT, the first file (it renders first) is planned beside
                infos = part_infos(change.new, out.location, settings.limits, probe=probe,
                                   first=(checks, earlier[0]) if streaming and not earlier[0] else None)
            ready = {0: infos[0]["planned"]} if "planned" in infos[0] else {}
            for (_, record), info in zip(change.new, infos, strict=True):
                record.slots = -(-info["targets"] // settings.samples_per_shard)
                record.shard_base, layout.next_shard = layout.next_shard, layout.next_shard + record.slots
                layout.files.append(record)
                shapes.append(info["shape"])
        if change.new or change.dropped:  # OUT changes: unfinished (_run.json, no _stats.json) until the end
            out.remove(STATS_FILE)  # so a run that breaks off never leaves the last run's "complete"
        for record in change.dropped:  # a file changed or gone: its shards go (they are not in any range now)
            for n in record.shard_ids():
                out.remove_shard(n)
        # planned before rendering: every new file (its concept groups resolved first), or, streaming, the
        # first (a run whose rows are all refused, the common one-file mistake, loads no model: nothing to
        # render) and those with no seed at all; the others are planned in the render stream
        upfront = [i for i, (_, r) in enumerate(change.new) if not streaming or not r.slots or i == 0]
        streamed = [i for i in range(len(change.new)) if i not in set(upfront)]
        new = [change.new[i] for i in streamed]
        if upfront:
            todo = [i for i in upfront if i not in ready]
            with clock("validate"):
                ready.update(zip(todo, plan_parts([change.new[i] for i in todo], earlier.select(todo), checks,
                                                  out.location, probe), strict=True))
                for record, summary in ((change.new[i][1], ready[i]) for i in upfront):
                    if legacy and summary["plan"] != legacy:
                        raise OutputRefused(f"{out.root} was written by an earlier version of the pipeline and its "
                                            "plan differs from this version's; use another output folder, or --overwrite")
                    _planned(record, summary, clock)
        identity["manifest"] = layout.to_row()
        out.write_json(RUN_FILE, identity, indent=2)
        owner = layout.shard_of()
        for n in sorted(set(markers) | out.shard_ids_present()):  # shards of no file: a dropped file's, left by a crash
            if n not in owner:
                out.remove_shard(n)
                markers.pop(n, None)

        # 4. Resume: the shards of planned files without a complete marker (new files' shards follow their plans)
        planned = sorted(n for n, f in owner.items() if f.planned)
        pending = out.pending_of(planned, markers)
        if progress:
            progress.planned(shards=len(pending) + sum(r.slots for _, r in new),
                             images=sum(owner[n].shard_size(n, settings.samples_per_shard) for n in pending)
                             + sum(r.slots for _, r in new) * settings.samples_per_shard,
                             rows_failed=sum(f.rows - f.rows_valid for f in layout.files if f.planned),
                             complete=len(planned) - len(pending))
        sets, generated, reused, device, nodes, warnings = ConceptSets(), 0, 0, None, Counter(), Counter()
        loaded, key, copy_meta = [], None, None  # the model metadata the actors reported; copy pass: see 5b
        if pending or new:
            out.remove(STATS_FILE)  # (as above)
            groups = _groups(out, {owner[n].key: owner[n] for n in pending}.values())
            # 5. Ray: the cluster (RAY_ADDRESS, --address or a local one), the device, GPUs to wait for
            ensure_ray(settings.address)
            device = resolve_device(settings.device)
            resources = Resources(gpus_per_worker=settings.gpus_per_worker, max_workers=settings.max_workers,
                                  cpus_per_actor=settings.cpus_per_worker, device=device,
                                  memory=actor_memory(settings, [group_shape(g) for g in groups]
                                                      + [file_shape(settings, s) for s in shapes], device=device))
            probe = probe or storage_probe()
            units = {"resolver": dict(out_dir=out.location, kv_dir=settings.kv_cache or out.uri(KV_STORE),
                                      input_settings=settings.inputs(), segment_config=settings.segment_config())}
            if settings.reuse:  # where the previous outputs' samples are, by record
                out.write(out.reuse_index(), json.dumps(build_index(settings.reuse)).encode())
            reuse_index = out.uri(out.reuse_index()) if settings.reuse else None
            files: dict[str, dict] = {}  # one row per file, its pending shards as numbers in its plan
            for n in pending:
                files.setdefault(owner[n].key, {"shard_base": owner[n].shard_base, "plan": out.uri(plan_file(owner[n])),
                                                "local": []})["local"].append(n - owner[n].shard_base)
            files, total, done = list(files.values()), len(pending) + sum(r.slots for _, r in new), [0]

            def finished(row: dict) -> None:
                """A shard written (copied or rendered): its marker, counts and progress."""
                nonlocal generated, reused
                sets.passes += int(row.get("reference_passes") or 0)
                marker = json.loads(row["marker"])
                markers[marker["shard"]] = _slim_marker(marker)
                generated += marker["samples"] + marker.get("rejected", 0)
                reused += marker.get("reused", 0)
                nodes[row.get("node") or "?"] += 1
                warnings.update(json.loads(row.get("warnings") or "{}"))
                if row.get("model") and not loaded:
                    loaded.append(json.loads(row["model"]))
                done[0] += 1
                if on_shard:
                    on_shard(marker, done[0], total)
                if progress:
                    progress.shard(marker)

            planning = dict(jobs=new, earlier=earlier.select(streamed), checks=checks, out_dir=out.location,
                            probe=probe)
            # 5b. --reuse: shards whose every sample a previous output has, copied by CPU tasks, no model loaded
            key = model_key(settings, device)  # recorded for later runs, whatever this one does
            copy_meta = previous_model(settings.reuse, key) if key and copies_whole_shards(settings, streaming) else None
            if copy_meta is not None:
                left: dict[str, dict] = {}

                def copied(row: dict) -> None:
                    if row["marker"]:
                        return finished(row)
                    left.setdefault(row["plan"], {"shard_base": row["shard_id"] - row["local"], "plan": row["plan"],
                                                  "local": []})["local"].append(row["local"])

                with clock("copy"):
                    _drain(lambda: copy_shards(files, planning, units=units, reuse_index=reuse_index,
                                               model_meta=copy_meta, image_format=settings.image_format,
                                               out_dir=out.location, resources=resources, probe=probe, faults=settings.faults,
                                               passthrough_schema=layout.passthrough_schema()), copied,
                           "copying previous shards")
                files, planning = list(left.values()), None  # what is left to render (every new file planned now)
            if files or (planning and planning["jobs"]):
                waited = wait_for_gpus(resources, settings.gpu_wait)
                if waited:
                    clock.seconds["wait_for_gpus"] = waited
                # 6. Concept sets: resolved as the shards that need them come up (their K/V computed by the
                # generation actor that first needs them), or, with segmentation models or a reference actor
                # pool, all before rendering
                if not streaming:
                    try:
                        sets = _concept_sets(settings, groups, len(pending), out, resources, clock,
                                             engine.get("reference_kv"), probe, progress)
                    except Exception as e:  # a node added since the start that does not see OUT: exit 2
                        if (refused := not_shared_in(e)) is not None:
                            raise refused from None
                        raise
                    units = {"sets": sets}

                # 7. Build each shard's work unit from its plan file, generate and write it, streamed; markers
                # arrive as shards complete
                with clock("generate_and_write"):
                    generate_kwargs = dict(model=settings.model, image_format=settings.image_format,
                                           batch_size=settings.batch_size, **settings.generator_kwargs(),
                                           compile=settings.compile, reuse_index=reuse_index, faults=settings.faults,
                                           **({"save_attention": True} if settings.save_attention else {}),
                                           **settings.training_kwargs(out.location),
                                           # control images and BLIP-Diffusion subjects are read like concept images
                                           **({"input_settings": settings.inputs()}
                                              if settings.controlnet or settings.family.name == "blip" else {}))
                    _drain(lambda: render(files, units=units, planning=planning, generate_kwargs=generate_kwargs,
                                          out_dir=out.location, resources=resources, faults=settings.faults,
                                          generate_cls=engine.get("generate"),
                                          passthrough_schema=layout.passthrough_schema(), probe=probe,
                                          score_kwargs=_score_kwargs(settings, out)), finished)

    finally:
        if probe is not None:
            probe.remove()

    for _, record in new:  # planned in the stream: their counts, from their plan summaries
        if out.exists(summary_file(record)):
            _planned(record, out.read_json(summary_file(record)), clock)
    if new:
        identity["manifest"] = layout.to_row()
        out.write_json(RUN_FILE, identity, indent=2)
        owner = layout.shard_of()  # their shards as planned, not the numbers set aside for every seed
    layout.files = [f for f in layout.files if f.planned]

    out.sweep_temporaries()  # a write that a lost node broke off (its retry wrote the shard whole)

    # 8. Report: errors.parquet (streamed file by file), rejected.parquet (--min-score), the run's K/V
    # store removed once complete, _stats.json with the score distributions (--score)
    failed, errors = out.write_errors_stream(part_errors(out, f, markers) for f in layout.files), []
    if failed:  # a few for the caller to show; every one is in errors.parquet
        errors = pq.read_table(out.path(ERRORS_FILE), filesystem=out.fs).slice(0, ERRORS_SHOWN).to_pylist()
    if settings.min_score:
        write_rejected_table(out)
    complete = all(markers.get(n, {}).get("status") == "complete" for n in owner)
    if complete:
        out.remove_dir(KV_STORE)
    touched = {owner[n].key: owner[n] for n in pending} | {r.key: r for _, r in new if r.planned}
    pending_count = len(pending) + sum(r.shards for _, r in new if r.planned)
    stats = _stats(layout, markers, failed, pending_count, len(_groups(out, touched.values())), sets.passes, generated,
                   clock, started, complete, out)
    stats.update(device=device, nodes=dict(sorted(nodes.items())), samples_reused=reused,
                 samples_rendered=generated - reused, warnings=dict(sorted(warnings.items())))
    if settings.score_models or settings.min_score:
        stats.update(samples_rejected=sum(m.get("rejected", 0) for m in markers.values()
                                          if m.get("status") != "write_failed"),
                     scores=run_score_summary(out))
    if settings.annotate:
        stats.update(annotations=annotation_summary(out))
    # what the actors loaded, for a later --reuse run's copy pass (pipeline.copy_pass); else OUT's record kept
    if key and (loaded or copy_meta):
        stats[MODEL_LOADED] = {"key": key, "meta": loaded[0] if loaded else copy_meta}
    elif previous_loaded:
        stats[MODEL_LOADED] = previous_loaded
    for kind, count in sorted(warnings.items()):
        logger.warning("%s: %d time(s) in this run (see _stats.json warnings)", kind, count)
    if progress:
        progress.phase("done")
    out.write_json(STATS_FILE, stats, indent=2)
    out.write(CARD_FILE, dataset_card(stats, identity).encode())
    return RunSummary(out=out.location, stats=stats, errors=errors, failed=failed)


def _drain(rows_of, on_row, what: str = "rendering") -> None:
    """Each row of a Ray stream (``rows_of()``: ``render``'s or ``copy_shards``') to ``on_row``, as shards
    complete. A stream that breaks off is stopped and raised as ``RunFailed`` ("``what`` broke off"), or
    ``NotShared`` (exit 2) when a node does not see OUT."""
    failure, rows = None, None
    try:
        rows = rows_of()
        for row in rows:
            on_row(row)
    except Exception as e:  # noqa: BLE001
        failure = f"{type(e).__name__}: {e}"
        if rows is not None:
            rows.close()
    if failure is not None and (refused := not_shared_in(failure)) is not None:
        raise refused
    if failure is not None:
        # raised outside the except block: the Ray exception's frames (actor handles, GPUs) are not kept alive
        raise RunFailed(f"{what} broke off ({failure[:2000]}); finished shards are kept, "
                        "rerun the same command to resume")


def _legacy_plan(previous: dict | None, source: ManifestSource, settings: RunSettings) -> str | None:
    """The plan digest of an OUT an earlier version wrote (its ``_run.json`` names the manifest by one
    digest and the whole plan by another): it resumes when the manifest is the same single file and this
    version plans it the same (checked once planned). None for an OUT of this version, or a new one."""
    if not previous or not isinstance(previous.get("manifest"), str):
        return None
    if len(source.parts) != 1 or file_digest(settings.manifest) != previous["manifest"] or "plan" not in previous:
        raise OutputRefused(f"{settings.out} holds the output of another manifest (written by an earlier version "
                            "of the pipeline). Use another output folder, or --overwrite to replace it.")
    return previous["plan"]


def _source_name(source: ManifestSource) -> str:
    """Where the manifest is, as ``_run.json`` records it: a local path made absolute, a URI as given
    (without a trailing slash either way)."""
    spec = os.fspath(source.spec)
    return (spec if "://" in spec else os.path.abspath(spec)).rstrip("/")


def _same_files(out: OutputFolder, digests: dict[str, str]) -> bool:
    """Whether OUT's ``_run.json`` names exactly these files with these digests (False without one)."""
    if not out.exists(RUN_FILE):
        return True
    layout = ManifestLayout.from_row(out.read_json(RUN_FILE).get("manifest"))
    return layout is not None and {f.name: f.sha256 for f in layout.files} == dict(digests)


def _planned(record: PartRecord, summary: dict, clock: Clock | None = None) -> None:
    """A file's record completed from its plan summary (``part_plan.plan_part``); ``clock`` adds its
    planning task's seconds (when the answer has them) to ``plan_tasks`` (summed over tasks side by side)."""
    record.rows_valid, record.shards, record.samples = summary["rows_valid"], summary["shards"], summary["samples"]
    if clock is not None:
        clock.seconds["plan_tasks"] = clock.seconds.get("plan_tasks", 0.0) + summary.get("seconds", 0.0)


def _slim_marker(marker: dict) -> dict:
    """A marker as the driver keeps it: without its sample keys (a few bytes per shard, not per sample)."""
    return {k: v for k, v in marker.items() if k not in ("keys", "rejected_keys")}


def _groups(out: OutputFolder, records) -> list[dict]:
    """The concept groups of these files, once each (``plan_part``'s summaries: one row per group)."""
    groups: dict[str, dict] = {}
    for record in records:
        for g in out.read_json(summary_file(record))["groups"]:
            groups.setdefault(g["key"], g)
    return list(groups.values())


def _concept_sets(settings: RunSettings, groups: list[dict], n_units: int, out: OutputFolder, resources: Resources,
                  clock, reference_cls, probe=None, progress=None) -> ConceptSets:
    """Resolve these concept groups (``shards.concept_group_rows``) and get their K/V (or the requests to
    compute them).

    With one generation actor (e.g. one GPU) that actor computes the K/V itself from a request file,
    so the run loads the model once; with several, a reference actor pool fills the store first.
    """
    single = actor_pool_size(resources, n_units) == 1
    lazy = settings.reference_actors == "never" or (settings.reference_actors == "auto" and single)
    sets = ConceptSets()
    if progress:
        progress.concept_sets(len(groups))
    for row in resolve_concept_sets(groups, settings, out, resources, clock, lazy=lazy, reference_cls=reference_cls,
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


def _stats(layout: ManifestLayout, markers: dict, failed: int, pending: int, groups_this_run: int, passes: int,
           generated: int, clock: Clock, started: float, complete: bool, out: OutputFolder) -> dict:
    render_seconds = clock.seconds.get("generate_and_write", 0.0)
    return {
        "rows": sum(f.rows for f in layout.files),
        "rows_valid": sum(f.rows_valid for f in layout.files),
        "rows_failed": failed,
        "samples_expected": sum(f.samples for f in layout.files),
        "samples_written": sum(m.get("samples", 0) for m in markers.values() if m.get("status") != "write_failed"),
        "samples_generated_this_run": generated,
        "shards": sum(f.shards for f in layout.files),
        "shards_pending_before_run": pending,
        "files": len({f.name for f in layout.files}),  # files, not their pieces
        "concept_sets": len(_groups(out, layout.files)),
        "concept_sets_this_run": groups_this_run,  # the concept groups of the files rendered in this run
        "reference_passes": passes,
        "seconds": {k: round(v, 3) for k, v in clock.seconds.items()},
        "seconds_total": round(time.perf_counter() - started, 3),
        "images_per_second": round(generated / render_seconds, 4) if render_seconds and generated else 0.0,
        "complete": complete and not failed,
    }
