"""Stage: reference K/V, once per concept set.

A GPU actor (resources set in ``pipeline/plan.py``) that loads the model once, and for each
resolved concept set either finds valid K/V in the persistent ``--kv-cache`` or the run's own
store, or runs ``FreeCustomGenerator.prepare_references`` and saves them there. K/V go to disk,
never through the object store: the generation actors read them from the store by path.

When a run has a single generation actor, that actor does this work itself
(``ensure_reference_kv`` on its own model, inputs read from a ``ReferenceRequest`` file) and this
stage does not run: the model loads once per run.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from freecustom_core.concept import ConceptTooSmallError

from ..base import RowStage
from ..errors import RowError
from ..faults import fault_point
from ..inputs.concepts import ResolvedConcept
from ..inputs.control import condition_kwargs
from ..inputs.subject import reference_kwargs as subject_kwargs
from ..output.locations import join_location, open_location, read_location
from ..params import GenParams
from .models import apply_loras, load_generator

logger = logging.getLogger(__name__)

STAGE = "reference_kv"


def kv_location(folder: str, concept_set_id: str) -> str:
    """Where a concept set's K/V file lives in ``folder`` (a local folder or a URI)."""
    return join_location(os.fspath(folder), f"{concept_set_id}.safetensors")  # a URI's query stays last


@dataclass
class ReferenceRequest:
    """What computing one concept set's K/V needs: its id, its resolved concepts
    (``ResolvedConcept.to_row`` dicts) and its parameter set; ``control``: the condition when the
    references go through ControlNet (``control.reference_condition``'s JSON), else None; ``subject``: the
    BLIP-Diffusion subject when the references get it (``RowSubject.reference_condition``'s JSON), else None."""

    concept_set_id: str
    resolved: list[dict]
    params: GenParams
    control: str | None = None
    subject: str | None = None

    _BYTES_FIELDS = ("image_png", "mask_png")

    def to_json(self) -> bytes:
        """One JSON document (PNG bytes in base64), for a file in the run's store: a generation actor
        that computes K/V itself reads it by path, so work units stay small."""
        concepts = [{k: base64.b64encode(bytes(v)).decode() if k in self._BYTES_FIELDS else v for k, v in c.items()}
                    for c in self.resolved]
        return json.dumps({"concept_set_id": self.concept_set_id, "resolved": concepts,
                           "params": self.params.to_row(),
                           **({"control": self.control} if self.control else {}),
                           **({"subject": self.subject} if self.subject else {})}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> ReferenceRequest:
        payload = json.loads(data)
        resolved = [{k: base64.b64decode(v) if k in cls._BYTES_FIELDS else v for k, v in c.items()}
                    for c in payload["resolved"]]
        return cls(payload["concept_set_id"], resolved, GenParams.from_row(payload["params"]), payload.get("control"),
                   payload.get("subject"))


def read_reference_request(location: str) -> ReferenceRequest:
    return ReferenceRequest.from_json(read_location(location))


class KVFile:
    """Where one concept set's K/V live: a local file, or an object (``--kv-cache s3://...``), which is
    read through a local temporary file and written as one object."""

    def __init__(self, location: str | os.PathLike):
        self.location = os.fspath(location)
        self.fs, self.path = open_location(self.location, option="--kv-cache")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def stat(self) -> tuple | None:
        """What tells this file apart from the one we wrote (None: no file)."""
        info = self.fs.get_file_info(self.path)
        if info.type != pafs.FileType.File:
            return None
        return info.size, info.mtime_ns, os.stat(self.path).st_ino if self.local else None

    def load(self, *, verify: bool):
        """The K/V in host memory; ``FileNotFoundError`` when there is no file."""
        from freecustom_core import ReferenceKV

        if self.local:
            return ReferenceKV.load(self.path, device="cpu", verify=verify)
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
            with self.fs.open_input_stream(self.path) as f:
                shutil.copyfileobj(f, tmp)
            tmp.flush()
            return ReferenceKV.load(tmp.name, device="cpu", verify=verify)

    def save(self, kv) -> None:
        if self.local:
            kv.save(self.path)
            return
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / "kv.safetensors"
            kv.save(local)
            with self.fs.open_output_stream(self.path) as f, open(local, "rb") as src:
                shutil.copyfileobj(src, f)


def load_valid_kv(target: KVFile, expected: dict):
    """The K/V at ``target`` (host memory) when the file is readable and fits ``expected``
    (``FreeCustomGenerator.kv_identity``), else None."""
    from freecustom_core import ReferenceKVError

    if target.stat() is None:
        return None
    try:
        kv = target.load(verify=True)
        kv.check_fits(expected)
        return kv
    except (ReferenceKVError, OSError) as e:
        logger.warning("reference K/V %s is unusable and will be recomputed: %s", target.location, e)
        return None


def ensure_reference_kv(generator, request: ReferenceRequest, target: KVFile, *, faults: dict | None = None):
    """The K/V of one concept set at ``target``: kept when a valid file is there (a --kv-cache hit, or
    a resumed run), else computed with ``generator`` and saved (atomically). Returns ``(passes, kv)``:
    passes is 1 when computed here; kv the K/V in host memory (a caller that uses them needs no reload).
    Used by ReferenceKVStage, and by GenerateStage when the run has one generation actor.
    """
    fault_point("reference_kv.unit", faults)
    p = request.params
    apply_loras(generator, p.loras)
    control = condition_kwargs(request.control) if request.control else {}  # through ControlNet: its identity
    identity = p.kv_identity_kwargs(generator.family)
    subject = subject_kwargs(request.subject) if request.subject else {}  # BLIP-Diffusion: the references' subject
    identity.update(subject)
    if control:
        identity["control"] = generator.control_input(control["control_image"], 1, **_without_image(control)).identity()
    kv = load_valid_kv(target, generator.kv_identity(**identity))
    if kv is not None:
        return 0, kv
    concepts = [ResolvedConcept.from_row(c).to_concept_ref() for c in request.resolved]
    # pin_memory=False: saved, then loaded where used; page-locked buffers would stay cached here
    try:
        kv = generator.prepare_references(concepts, **p.reference_kwargs(generator.family), **control, **subject,
                                          pin_memory=False)
    except ConceptTooSmallError as e:  # a mask too small for every token grid: the concept's row error
        raise RowError(f"concepts[{_concept_index(e)}].mask", str(e)) from e
    kv.meta["concept_set_id"] = request.concept_set_id
    target.save(kv)
    return 1, kv


def _without_image(control: dict) -> dict:
    return {k: v for k, v in control.items() if k != "control_image"}


def _concept_index(error: Exception) -> int | str:
    """The concept a ``ConceptTooSmallError`` names."""
    index = getattr(error, "index", None)
    return "?" if index is None else index


class ReferenceKVStage(RowStage):
    """Row stage: ``__init__`` loads the model; each row (a concept group) gets its concept set's K/V
    path (groups with the same concept-set id are computed once per actor).

    Input columns: ``concept_set_id``, ``resolved`` (per row a list of ``ResolvedConcept.to_row``
    dicts), ``gen_params`` (``GenParams.to_row`` as JSON). Adds ``kv_path`` and ``reference_pass`` (1 when
    computed here); errors as every ``RowStage``.
    """

    stage = STAGE
    columns = {"kv_path": "", "reference_pass": 0}

    def __init__(self, model: str, *, store_dir: str, kv_cache: str | None = None, dtype: str = "auto",
                 device: str = "auto", scheduler: str | None = None, channels_last: bool = False,
                 model_config: str | None = None, controlnet: list[str] | None = None, faults: dict | None = None):
        self.generator = load_generator(model, dtype=dtype, device=device, scheduler=scheduler,
                                        channels_last=channels_last, model_config=model_config,
                                        controlnet=controlnet)
        self.store_dir = store_dir
        self.kv_cache = kv_cache
        self.faults = faults  # test-only fault injection plan (stages/faults.py)
        self._done: dict[str, tuple] = {}  # concept-set id -> (KVFile, error, its stat): once per actor

    def target(self, concept_set_id: str) -> KVFile:
        return KVFile(kv_location(self.kv_cache or self.store_dir, concept_set_id))

    def row(self, batch: Mapping[str, Any], i: int, out: dict[str, list]) -> None:
        csid = out["concept_set_id"][i]
        if not csid:
            return
        if csid in self._done:
            target, error, stat = self._done[csid]
            if stat == (target.stat() if target else None):
                # another concept group with the same content (a path spelled otherwise, ...), done here
                if error is not None:
                    raise error
                out["kv_path"][i] = target.location
                return
        target = self.target(csid)
        try:
            request = ReferenceRequest(csid, list(batch["resolved"][i]), GenParams.from_row(json.loads(out["gen_params"][i])),
                                       control=(out["control_condition"][i] if "control_condition" in out else None) or None,
                                       subject=(out["subject_condition"][i] if "subject_condition" in out else None) or None)
            passes, _ = ensure_reference_kv(self.generator, request, target, faults=self.faults)
        except Exception as e:
            if not isinstance(e, RowError):
                logger.exception("reference K/V for concept set %s failed", csid)
            self._done[csid] = (None, e, None)
            raise
        self._done[csid] = (target, None, target.stat())
        out["kv_path"][i] = target.location
        out["reference_pass"][i] = passes
