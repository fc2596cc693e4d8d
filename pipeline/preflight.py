"""Checks a run makes before anything starts (no Ray, no ``_run.json``): each failure is one line that
names the option and what to do, and ``run`` exits 2 on it.

1. ``--model`` (and ``--model-config``): a diffusers folder, a ``.safetensors`` file, or a hub id in the
   Hugging Face cache (offline: the cache only, no retries; online: the hub, asked once). A local path
   becomes absolute and a hub id gains the revision it resolves to, so a resumed run compares what the
   model *is*, not how it was typed.
2. The scorers' models (``--dino-model``, ``--clip-image-model``, ``--clip-text-model``) the same way.
3. The manifest's column names: none a misspelling of a known column (``pipeline.manifest_columns``).
4. Object storage (``-o``, ``--kv-cache``, ``--reuse``): the endpoint answers within seconds, the region
   is one, the bucket exists (``stages.output.storage_check``).
"""

from __future__ import annotations

import dataclasses
import os
import re

from freecustom_core.hub import cached_file, hub_commit, hub_offline
from pipeline.manifest_columns import check_columns
from pipeline.settings import RunSettings
from stages.inputs.read import is_uri
from stages.output.locations import open_location
from stages.output.storage_check import check_bucket
from stages.scoring.score_models import ScoreModels

MODEL_INDEX = "model_index.json"  # what makes a folder (or hub repo) a diffusers pipeline
TRANSFORMERS_CONFIG = "config.json"  # what makes one a transformers model (the scorers')
# what a hub id looks like ("org/name" or "name"); anything else (``/a/b``, ``./m``, ``m.safetensors``) is a path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What a ``--model``-like option resolves to: an absolute local path, or a hub id and its revision."""

    value: str  # the absolute path, or the hub id as given
    revision: str | None = None  # a hub id's commit (the cached snapshot's), None for a local path


def resolve_model(value: str, *, option: str = "--model", required: str = MODEL_INDEX) -> ModelSource:
    """``value`` checked and resolved, or ``ValueError`` naming ``option`` and the fix.

    A folder must hold ``required``; a file must be ``.safetensors`` (diffusers' single file); anything
    else is a hub id, looked up in the cache (``try_to_load_from_cache``: no network) and, when the
    network is allowed and the cache has nothing, asked of the hub once.
    """
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, required)):
            raise ValueError(
                f"{option} {value}: a folder without {required}; give the folder a "
                f"{'diffusers pipeline was saved to (save_pretrained)' if required == MODEL_INDEX else 'model was saved to'}"
                " or a hub id"
            )
        return ModelSource(os.path.abspath(path))
    if os.path.isfile(path):
        if required != MODEL_INDEX or not path.lower().endswith(".safetensors"):
            raise ValueError(
                f"{option} {value}: a file; give a model folder"
                + (" or a single-file .safetensors checkpoint" if required == MODEL_INDEX else "")
            )
        return ModelSource(os.path.abspath(path))
    if not _HUB_ID.match(value) or value.endswith((".safetensors", ".ckpt")):
        raise ValueError(
            f"{option} {value}: no such file or folder (and not a hub id such as org/name); check the path"
        )
    return ModelSource(value, _hub_revision(value, option=option, required=required))


def _hub_revision(repo_id: str, *, option: str, required: str) -> str:
    """The commit a hub id resolves to: the cached snapshot's, else (online) the hub's, asked once."""
    cached = cached_file(repo_id, required)
    if cached is not None:
        return _snapshot_of(cached)
    if hub_offline():
        raise ValueError(
            f"{option} {repo_id}: not a local path and not in the Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}), "
            "and HF_HUB_OFFLINE is set; download it where there is network (hf download "
            f"{repo_id}) and copy the cache, or give a local folder"
        )
    try:
        return hub_commit(repo_id, required)
    except Exception as e:  # noqa: BLE001 - unknown repo, no network, gated: one line either way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{option} {repo_id}: not a local path, not in the Hugging Face cache, and the hub did not give "
            f"{required} ({type(e).__name__}: {reason[:200]}); check the id and the network (offline: "
            "HF_HUB_OFFLINE=1 with a filled cache), log in (hf auth login) for a gated model, or give a local folder"
        ) from None


def _snapshot_of(cached_file: str) -> str:
    """The commit of a file in the hub cache: ``.../snapshots/<commit>/<file>``."""
    parts = os.path.normpath(cached_file).split(os.sep)
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else "unknown"


def check_score_models(models: ScoreModels) -> None:
    """Each scorer's model is a local folder or a hub id the cache (or, online, the hub) has."""
    for option, value in (
        ("--dino-model", models.dino),
        ("--clip-image-model", models.clip_image),
        ("--clip-text-model", models.clip_text),
    ):
        resolve_model(value, option=option, required=TRANSFORMERS_CONFIG)


def preflight(settings: RunSettings, *, check_model: bool = True) -> RunSettings:
    """``settings`` checked before a run starts, with ``--model`` (and ``--model-config``) resolved.
    ``check_model`` False: no model is loaded (``run``'s ``engine`` swaps the stages: benchmarks)."""
    # 1. the model: a local path becomes absolute, a hub id gets its revision
    resolved: dict = {}
    if check_model:
        source = resolve_model(settings.model)
        resolved.update(model=source.value, model_revision=source.revision)
    if settings.model_config:
        resolved["model_config"] = os.path.abspath(settings.model_config)
    # 2. the scorers' models
    if settings.score_models is not None:
        check_score_models(settings.score_models)
    # 3. the manifest's columns: none a misspelling of a known one (unless declared pass-through)
    check_columns(settings.manifest, settings.passthrough)
    # 4. object storage: endpoint, region, bucket
    for option, location in (
        ("-o/--out", settings.out),
        ("--kv-cache", settings.kv_cache),
        *(("--reuse", previous) for previous in settings.reuse),
    ):
        if location and is_uri(location):
            check_bucket(*open_location(location, option=option), location=location, option=option)
    return dataclasses.replace(settings, **resolved)
