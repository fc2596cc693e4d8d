"""The copy pass of a ``--reuse`` run: shards whose every sample is in a previous output, copied whole by
CPU tasks before any model loads (``stages.generation.copy``).

A sample's record names the model's metadata (its weight fingerprint among it), which otherwise only a
loaded model gives. Every run records what its generation actors loaded in ``_stats.json``
(``model_loaded``: a *key*, the model's files and the settings that shape the metadata, and the
metadata). A ``--reuse`` run whose key equals a previous output's takes the metadata from there, so
a shard with nothing to render costs a file read and a write, not a model actor. The key's files are
each one's relative name, size and modification time (a folder, a single file and its config folder,
or a hub id's snapshot in the local cache): any change to a weight file makes the key differ and the
actors decide again, as before. A model on object storage, or a hub id not in the local cache, has
no key: its runs render (and copy) on the actors only.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

from pipeline.plan import Resources, shard_stream
from pipeline.settings import RunSettings
from pipeline.shard_units import ShardUnits
from stages.generation.copy import copy_unit
from stages.generation.reuse import ReusedShards
from stages.generation.shard import package_versions
from stages.output.folder import OutputFolder
from stages.output.layout import STATS_FILE
from stages.output.locations import read_location
from stages.output.write import write_batch

MODEL_LOADED = "model_loaded"  # _stats.json: {"key": model_key(...), "meta": the actors' model metadata}
COPY_NODE = "copy"  # the ``nodes`` entry (in _stats.json) of the shards the copy pass wrote


def _files(folder: str) -> list[list]:
    found = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = os.path.join(root, name)
            st = os.stat(path)  # through a hub cache's symlinks: the blob's size and time
            found.append([os.path.relpath(path, folder), st.st_size, st.st_mtime_ns])
    return found


def model_files(settings: RunSettings) -> list[list] | None:
    """``[name, size, mtime_ns]`` of every file the model is read from; None where that cannot be known
    here (a model on object storage, a hub id not in the local cache)."""
    model = settings.model
    if "://" in model:
        return None
    if os.path.isfile(model):
        st = os.stat(model)
        config = _files(settings.model_config) if settings.model_config and os.path.isdir(settings.model_config) else []
        return [[os.path.basename(model), st.st_size, st.st_mtime_ns], *[["config/" + f[0], *f[1:]] for f in config]]
    if os.path.isdir(model):
        return _files(model)
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model, revision=settings.model_revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the local cache (or not a hub id): no key
        return None
    return [["snapshot", os.path.basename(folder), 0], *_files(folder)]


def model_key(settings: RunSettings, device: str) -> dict | None:
    """What the model's metadata in a sample follows from: its files and how the actors load it on
    ``device`` (the resolved ``--device``: cuda or cpu), its dtype, scheduler, layout, config folder and
    compilation; None without a file list (``model_files``)."""
    files = model_files(settings)
    if files is None:
        return None
    return json.loads(json.dumps({"model": settings.model, "revision": settings.model_revision, "device": device,
                                  "compile": settings.compile, **settings.generator_kwargs(), "files": files}))


def copies_whole_shards(settings: RunSettings, streaming: bool) -> bool:
    """Whether the run's shards may be copied whole without a model: ``--reuse``, a streaming run (concept
    groups resolved as shards come up), and nothing a copied sample would need a model for (ControlNet
    conditions, a BLIP-Diffusion subject, attention maps, annotations, embedded references, scores)."""
    return bool(settings.reuse and streaming and not settings.controlnet and settings.family.name != "blip"
                and not settings.blip_subject and not settings.save_attention and not settings.annotate
                and not settings.embed_references and settings.score_models is None and not settings.min_score)


def previous_model(reuse: tuple[str, ...], key: dict) -> dict | None:
    """The model metadata a previous output's actors recorded under this ``key``; None when none did."""
    for location in reuse:
        folder = OutputFolder(location, option="--reuse")
        if not folder.exists(STATS_FILE):
            continue
        loaded = folder.read_json(STATS_FILE).get(MODEL_LOADED) or {}
        if loaded.get("key") == key and loaded.get("meta"):
            return loaded["meta"]
    return None


_WORKER: dict = {}  # one run's state per worker process: its unit builder, the reuse index, the last tar read


def _copy_batch(batch: dict, *, run: str, units: dict, reuse_index: str, model_meta: dict, image_format: str,
                out_dir: str, passthrough_schema: bytes | None, faults: dict | None, probe=None) -> dict:
    """Each shard of the batch copied and written when every sample is found (its ``marker``), else
    passed on (``marker`` empty) with its plan and number for the render stream."""
    if probe is not None:
        probe.check()
    if _WORKER.get("run") != run:
        _WORKER.clear()
        _WORKER.update(run=run, units=ShardUnits(**units), index=json.loads(read_location(reuse_index)),
                       shards=ReusedShards(), versions=package_versions())
    shard_ids, local, plans = [int(n) for n in batch["shard_id"]], [int(n) for n in batch["local"]], [
        str(p) for p in batch["plan"]]
    markers = []
    for n, k, plan in zip(shard_ids, local, plans, strict=True):
        row = copy_unit(_WORKER["units"].unit(n, k, plan), model_meta, _WORKER["versions"], image_format,
                        _WORKER["index"], _WORKER["shards"])
        if row is None:
            markers.append("")
            continue
        written = write_batch({c: [v] for c, v in row.items()}, out_dir, faults=faults,
                              passthrough_schema=passthrough_schema)
        markers.append(written["marker"][0])
    return {"shard_id": shard_ids, "local": local, "plan": plans, "marker": markers,
            "reference_passes": [0] * len(shard_ids), "node": [COPY_NODE] * len(shard_ids),
            "warnings": ["{}"] * len(shard_ids)}


def copy_shards(files: list[dict], planning: dict | None, *, units: dict, reuse_index: str, model_meta: dict,
                image_format: str, out_dir: str, resources: Resources, passthrough_schema: bytes | None = None,
                faults: dict | None = None, probe=None) -> Iterator[dict]:
    """The copy pass over ``render``'s input (the same ``files`` and ``planning``): one row per shard as
    it is done, ``marker`` its written marker or empty where the shard is left to render (its
    ``shard_id``, ``local`` and ``plan`` say which)."""
    ds = shard_stream(files, planning, resources)
    if ds is None:
        return
    ds = ds.map_batches(_copy_batch, fn_kwargs=dict(run=uuid.uuid4().hex, units=units, reuse_index=reuse_index,
                                                    model_meta=model_meta, image_format=image_format, out_dir=out_dir,
                                                    passthrough_schema=passthrough_schema, faults=faults, probe=probe),
                        batch_size=1, batch_format="numpy", num_cpus=resources.cpus_per_plan)
    yield from ds.iter_rows()
