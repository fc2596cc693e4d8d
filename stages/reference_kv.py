"""Stage: reference K/V, once per concept set.

A GPU actor (resources set in ``pipeline/plan.py``) that loads the model once, and for each
resolved concept set either finds valid K/V in the persistent ``--kv-cache`` or the run's own
store, or runs ``FreeCustomGenerator.prepare_references`` and saves them there. K/V go to disk,
never through the object store: the generation actors read them from the store by path.
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


class ReferenceKVStage:
    """Callable class: ``__init__`` loads the model; ``__call__`` maps a batch of concept sets to K/V paths.

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

    def _valid(self, path: Path, expected: dict) -> bool:
        from freecustom_core import ReferenceKV, ReferenceKVError

        if not path.is_file():
            return False
        try:
            ReferenceKV.load(path, verify=True).check_fits(expected)
            return True
        except (ReferenceKVError, OSError) as e:
            logger.warning("reference K/V %s is unusable and will be recomputed: %s", path, e)
            return False

    def one(self, concept_set_id: str, resolved: list, params: dict) -> dict:
        from freecustom_core import DEFAULT_NEGATIVE_PROMPT, MRSAConfig

        from .segment import decode_resolved

        fault_point("reference_kv.unit", self.faults)
        gen = self.generator
        expected = gen.kv_identity(num_inference_steps=params["num_inference_steps"], height=params["height"], width=params["width"])
        name = kv_file_name(concept_set_id)
        target = (self.kv_cache or self.store_dir) / name
        if self._valid(target, expected):
            return {"kv_path": str(target), "reference_pass": 0}
        concepts = [decode_resolved(c).to_concept_ref() for c in resolved]
        kv = gen.prepare_references(
            concepts,
            num_inference_steps=params["num_inference_steps"],
            height=params["height"],
            width=params["width"],
            reference_seed=params["reference_seed"],
            mrsa=MRSAConfig.from_dict(params["mrsa"]),
            negative_prompt=params.get("negative_prompt") or DEFAULT_NEGATIVE_PROMPT,  # used only when style_fidelity < 1
        )
        kv.meta["concept_set_id"] = concept_set_id
        kv.save(target)
        return {"kv_path": str(target), "reference_pass": 1}

    def __call__(self, batch: dict) -> dict:
        from .segment import batch_len, has_error, to_column

        n = batch_len(batch)
        out = {k: [] for k in ("concept_set_id", "kv_path", "reference_pass", "error_stage", "error_field", "error_reason")}
        for row in range(n):
            csid = batch["concept_set_id"][row]
            out["concept_set_id"].append(csid)
            if has_error(batch, row):  # an earlier stage (segment, composite) failed this concept set: pass it on
                result = {"kv_path": "", "reference_pass": 0}
                error = tuple(str(batch[k][row] or "") for k in ("error_stage", "error_field", "error_reason"))
            else:
                try:
                    result = self.one(csid, list(batch["resolved"][row]), json.loads(batch["params"][row]))
                    error = ("", "", "")
                except RowError as e:
                    result, error = {"kv_path": "", "reference_pass": 0}, ("reference_kv", e.field, e.reason)
                except (ValueError, TypeError, OSError, RuntimeError) as e:
                    logger.exception("reference K/V for concept set %s failed", csid)
                    result = {"kv_path": "", "reference_pass": 0}
                    error = ("reference_kv", "concepts", f"{type(e).__name__}: {e}")
            out["kv_path"].append(result["kv_path"])
            out["reference_pass"].append(result["reference_pass"])
            for key, value in zip(("error_stage", "error_field", "error_reason"), error, strict=True):
                out[key].append(value)
        # every other column passes through (chained after CompositeStage in one Ray Data execution)
        for column, values in batch.items():
            if column not in out:
                out[column] = to_column(list(values))
        return out


def remove_store(store_dir: str) -> None:
    """The run-scoped K/V store is deleted once every shard is done (the persistent cache is kept)."""
    if os.path.isdir(store_dir):
        shutil.rmtree(store_dir, ignore_errors=True)
