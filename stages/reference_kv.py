"""Stage: reference K/V, once per concept set.

A GPU actor (resources set in ``pipeline/plan.py``) that loads the model once, and for each
resolved concept set either finds valid K/V in the persistent ``--kv-cache`` or the run's own
store, or runs ``FreeCustomGenerator.prepare_references`` and saves them there. K/V go to disk,
never through the object store: the generation actors read them from the store by path.

When a run has a single generation actor, that actor does this work itself
(``ensure_reference_kv`` on its own model, inputs read from ``write_reference_request``'s file)
and this stage does not run: the model loads once per run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .errors import RowError
from .faults import fault_point

logger = logging.getLogger(__name__)


def load_generator(model: str, *, dtype: str = "auto", device: str = "auto", scheduler: str | None = None,
                   channels_last: bool = False, compile: bool = False):
    """The one place stages load the diffusion model (real diffusers loading, safetensors only)."""
    import torch

    from freecustom_core import FreeCustomGenerator

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if str(device).startswith("cuda") else "float32"
    return FreeCustomGenerator.from_pretrained(model, torch_dtype=getattr(torch, dtype), device=device, scheduler=scheduler,
                                               channels_last=channels_last, compile=compile)


def kv_file_name(concept_set_id: str) -> str:
    return f"{concept_set_id}.safetensors"


def load_valid_kv(path: Path, expected: dict):
    """The K/V in ``path`` (host memory) when the file is readable and fits ``expected``
    (``FreeCustomGenerator.kv_identity``), else None."""
    from freecustom_core import ReferenceKV, ReferenceKVError

    if not path.is_file():
        return None
    try:
        kv = ReferenceKV.load(path, verify=True)
        kv.check_fits(expected)
        return kv
    except (ReferenceKVError, OSError) as e:
        logger.warning("reference K/V %s is unusable and will be recomputed: %s", path, e)
        return None


def ensure_reference_kv(generator, concept_set_id: str, resolved: list, params: dict, target: Path, *,
                        faults: dict | None = None):
    """The K/V of one concept set at ``target``: kept when a valid file is there (a --kv-cache hit, or
    a resumed run), else computed with ``generator`` and saved (atomically). Returns ``(passes, kv)``:
    passes is 1 when computed here; kv the K/V in host memory (a caller that uses them needs no reload).

    ``resolved``: ``segment.encode_resolved`` dicts; ``params``: num_inference_steps, height, width,
    reference_seed, mrsa, negative_prompt. Used by ReferenceKVStage, and by GenerateStage when the
    run has one generation actor (see ``pipeline.run``).
    """
    from freecustom_core import DEFAULT_NEGATIVE_PROMPT, MRSAConfig

    from .segment import decode_resolved

    fault_point("reference_kv.unit", faults)
    expected = generator.kv_identity(num_inference_steps=params["num_inference_steps"], height=params["height"],
                                     width=params["width"])
    kv = load_valid_kv(target, expected)
    if kv is not None:
        return 0, kv
    concepts = [decode_resolved(c).to_concept_ref() for c in resolved]
    kv = generator.prepare_references(
        concepts,
        num_inference_steps=params["num_inference_steps"],
        height=params["height"],
        width=params["width"],
        reference_seed=params["reference_seed"],
        mrsa=MRSAConfig.from_dict(params["mrsa"]),
        negative_prompt=params.get("negative_prompt") or DEFAULT_NEGATIVE_PROMPT,  # used only when style_fidelity < 1
        pin_memory=False,  # saved, then loaded where used: page-locked buffers would stay cached here
    )
    kv.meta["concept_set_id"] = concept_set_id
    kv.save(target)
    return 1, kv


_BYTES_FIELDS = ("image_png", "mask_png")


def write_reference_request(path: Path, concept_set_id: str, resolved: list, params: dict) -> None:
    """What computing a concept set's K/V needs, as one JSON file (PNG bytes in base64) in the run's
    store: a generation actor that computes K/V itself reads it by path (units stay small)."""
    import base64

    from .write import atomic_write

    concepts = [{k: base64.b64encode(bytes(v)).decode() if k in _BYTES_FIELDS else v for k, v in c.items()}
                for c in resolved]
    payload = {"concept_set_id": concept_set_id, "resolved": concepts, "params": params}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(payload, sort_keys=True).encode())


def read_reference_request(path: str | Path) -> tuple[str, list, dict]:
    """``(concept_set_id, resolved, params)`` from ``write_reference_request``'s file."""
    import base64

    payload = json.loads(Path(path).read_text())
    resolved = [{k: base64.b64decode(v) if k in _BYTES_FIELDS else v for k, v in c.items()} for c in payload["resolved"]]
    return payload["concept_set_id"], resolved, payload["params"]


class ReferenceKVStage:
    """Callable class: ``__init__`` loads the model; ``__call__`` maps a batch of concept groups to K/V paths
    (groups with the same concept-set id are computed once per actor).

    Input columns: ``concept_set_id``, ``resolved`` (per row a list of ``segment.encode_resolved``
    dicts), ``params`` (JSON: num_inference_steps, height, width, reference_seed, mrsa, negative_prompt).
    Output columns: ``concept_set_id``, ``kv_path``, ``reference_pass`` (1 when computed here),
    ``error_stage``, ``error_field``, ``error_reason`` ("" when fine), and every other input column
    unchanged. A row that arrives with an error (from segment or composite) passes untouched.
    """

    def __init__(self, model: str, *, store_dir: str, kv_cache: str | None = None, dtype: str = "auto",
                 device: str = "auto", scheduler: str | None = None, channels_last: bool = False,
                 faults: dict | None = None):
        self.generator = load_generator(model, dtype=dtype, device=device, scheduler=scheduler, channels_last=channels_last)
        self.store_dir = Path(store_dir)
        self.kv_cache = Path(kv_cache) if kv_cache else None
        self.faults = faults  # test-only fault injection plan (stages/faults.py)
        self._done: dict[str, tuple] = {}  # concept-set id -> (result, error, K/V file stat): once per actor

    def one(self, concept_set_id: str, resolved: list, params: dict) -> dict:
        target = (self.kv_cache or self.store_dir) / kv_file_name(concept_set_id)
        passes, _ = ensure_reference_kv(self.generator, concept_set_id, resolved, params, target, faults=self.faults)
        return {"kv_path": str(target), "reference_pass": passes}

    def _known(self, csid: str) -> bool:
        """Done by this actor already, and its K/V file (if any) unchanged since."""
        if csid not in self._done:
            return False
        result, _, stat = self._done[csid]
        return stat == _stat(result["kv_path"])

    def __call__(self, batch: dict) -> dict:
        from .segment import batch_len, has_error, null_to_none, to_column

        n = batch_len(batch)
        out = {k: [] for k in ("concept_set_id", "kv_path", "reference_pass", "error_stage", "error_field", "error_reason")}
        for row in range(n):
            csid = null_to_none(batch["concept_set_id"][row])
            out["concept_set_id"].append(csid)
            if has_error(batch, row) or not csid:  # an earlier stage (segment, composite) failed this set: pass it on
                result = {"kv_path": "", "reference_pass": 0}
                error = tuple(str(null_to_none(batch[k][row]) or "") if k in batch else "" for k in
                              ("error_stage", "error_field", "error_reason"))
            elif self._known(csid):  # another concept group with the same content (a path spelled otherwise, ...)
                result, error, _ = self._done[csid]
                result = dict(result, reference_pass=0)
            else:
                try:
                    result = self.one(csid, list(batch["resolved"][row]), json.loads(batch["params"][row]))
                    error = ("", "", "")
                except RowError as e:
                    result, error = {"kv_path": "", "reference_pass": 0}, ("reference_kv", e.field, e.reason)
                except Exception as e:  # noqa: BLE001 - one concept set fails alone, never the run
                    logger.exception("reference K/V for concept set %s failed", csid)
                    result = {"kv_path": "", "reference_pass": 0}
                    error = ("reference_kv", "concepts", f"{type(e).__name__}: {e}")
                self._done[csid] = (result, error, _stat(result["kv_path"]))
            out["kv_path"].append(result["kv_path"])
            out["reference_pass"].append(result["reference_pass"])
            for key, value in zip(("error_stage", "error_field", "error_reason"), error, strict=True):
                out[key].append(value)
        # every other column passes through (chained after CompositeStage in one Ray Data execution); Ray hands
        # a column that is null in every row of a block over as float NaN: back to None
        for column, values in batch.items():
            if column not in out:
                out[column] = to_column([null_to_none(v) for v in values])
        return out


def _stat(path: str | None) -> tuple | None:
    """What tells a file apart from the one we wrote (None: no file)."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino) if st else None


def remove_store(store_dir: str) -> None:
    """The run-scoped K/V store is deleted once every shard is done (the persistent cache is kept)."""
    if os.path.isdir(store_dir):
        shutil.rmtree(store_dir, ignore_errors=True)
