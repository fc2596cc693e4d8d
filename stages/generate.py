"""Stage: generate customized images for one shard's targets, with cached reference K/V.

A GPU actor: the model loads once in ``__init__``; each input row is one shard work unit (it
cannot be split: a shard is the unit of atomic writing and resuming). Targets of one concept
set and one parameter set are batched through the UNet together; K/V are read from the store
by path and kept in a small LRU in (pinned) host memory, streamed to the GPU a step at a time.
When a group names a ``reference`` request (a run with one generation actor), missing K/V are
computed here first, once per concept set. A failure is recorded per target, never raised.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import OrderedDict
from importlib import metadata as importlib_metadata

from .faults import fault_point
from .reference_kv import load_generator

DEFAULT_BATCH_SIZE = 8  # fixed, not from free memory: a redone shard must batch (and so round) exactly as before

logger = logging.getLogger(__name__)

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
ERRORS_MEMBER = "__errors__.json"


def package_versions() -> dict:
    out = {}
    for name in ("freecustom-pipeline", "torch", "diffusers", "transformers"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def encode_image(image, image_format: str) -> bytes:
    """Deterministic encoding: same pixels, same settings, same bytes."""
    buf = io.BytesIO()
    fmt = IMAGE_FORMATS[image_format]
    if fmt == "PNG":
        image.save(buf, format="PNG", compress_level=6)
    elif fmt == "JPEG":
        image.save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        image.save(buf, format="WEBP", quality=95, method=4)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def pack_result(samples: list[tuple[str, str, bytes, dict]], errors: list[dict]) -> bytes:
    """One shard's output as an in-memory tar: ``<key>.<ext>``, ``<key>.json`` and the errors."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, ext, data, meta in samples:
            _add(tar, f"{key}.{ext}", data)
            _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        _add(tar, ERRORS_MEMBER, json.dumps(errors).encode())
    return buf.getvalue()


TARGET_META = ("key", "id", "row", "seed", "prompt", "passthrough")


def encode_unit(unit: dict) -> bytes:
    """A shard unit as the driver hands it to Ray: zlib-compressed JSON.

    The driver holds every pending unit until Ray has them; their JSON repeats the same keys and
    concept-set fields on every target, and compresses 5-10x (driver memory and object-store
    traffic per row stay small on manifests of millions of rows).
    """
    import zlib

    return zlib.compress(json.dumps(unit, separators=(",", ":")).encode(), 1)


def decode_unit(raw) -> dict:
    """The inverse of ``encode_unit``; plain JSON text is accepted too."""
    import zlib

    if isinstance(raw, str):
        return json.loads(raw)
    return json.loads(zlib.decompress(bytes(raw)))


def expand_targets(unit: dict) -> list[dict]:
    """A unit's targets, each with its group's fields (``kv_path``, ``error``, ``params``) and full ``meta``.

    The driver stores what a concept set and parameter set share once per shard (``groups``) and
    each target refers to its group by index (``g``): units stay small however many rows share a
    set. A target without ``g`` carries every field itself.
    """
    groups = unit.get("groups") or []
    out = []
    for t in unit["targets"]:
        if "g" in t:
            g = groups[t["g"]]
            meta = dict(g["meta"], **{k: t.get(k, {} if k == "passthrough" else None) for k in TARGET_META})
            t = {**{k: v for k, v in g.items() if k != "meta"}, **t, "meta": meta}
        out.append(t)
    return out


class GenerateStage:
    """Callable class. Input columns: ``shard_id``, ``unit`` (``encode_unit`` bytes or JSON text).
    Output: ``shard_id``, ``result`` (the shard as tar bytes), ``expected`` (targets), ``reference_passes``
    (K/V computed here for this unit: only for groups that name a ``reference`` request).
    """

    def __init__(self, model: str, *, image_format: str = "png", batch_size: int | None = None,
                 dtype: str = "auto", device: str = "auto", scheduler: str | None = None, kv_lru: int = 2,
                 channels_last: bool = False, compile: bool = False, faults: dict | None = None):
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format={image_format!r}: expected one of {sorted(IMAGE_FORMATS)}")
        # the reference stage never compiles: its pass is eager either way (the K/V are the same)
        self.generator = load_generator(model, dtype=dtype, device=device, scheduler=scheduler, channels_last=channels_last,
                                        compile=compile)
        self.image_format = image_format
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.faults = faults  # test-only fault injection plan (stages/faults.py)
        self.kv_lru = kv_lru
        self._kv: OrderedDict = OrderedDict()
        self._references: dict[str, dict | None] = {}  # K/V path -> None (ready) or the error computing them
        self._unit_passes = 0
        gen = self.generator
        self.model_meta = {
            "id": gen.model_id,
            "fingerprint": gen.model_fingerprint,
            "dtype": str(gen.dtype).removeprefix("torch."),
            "memory_format": gen.memory_format,
            "compiled": gen.compiled,
            "scheduler": gen.scheduler_identity(),
        }
        self.versions = package_versions()

    def _load_kv(self, path: str, kv=None):
        """The K/V at ``path`` from the LRU, loaded on a miss (or ``kv``, already in host memory)."""
        from freecustom_core import ReferenceKV

        if path not in self._kv:
            while len(self._kv) >= self.kv_lru:
                self._kv.popitem(last=False)
            # host memory, page-locked: the engine copies one step at a time to the GPU, so the LRU costs
            # host RAM (about 1 GiB per concept set at 512², fp16, 50 steps), not GPU memory
            self._kv[path] = (kv if kv is not None else ReferenceKV.load(path, device="cpu", verify=False)).pin_memory()
        self._kv.move_to_end(path)
        return self._kv[path]

    def _ensure_references(self, t: dict) -> dict | None:
        """When the run has one generation actor, it computes the K/V itself, once per concept set
        (the group's ``reference`` names its request file): no separate reference actor and model
        load. Returns None when the K/V are ready, else the error (kept: the set fails fast after)."""
        from pathlib import Path

        from .errors import RowError
        from .reference_kv import ensure_reference_kv, read_reference_request

        path = t["kv_path"]
        if path not in self._references:
            try:
                csid, resolved, params = read_reference_request(t["reference"])
                passes, kv = ensure_reference_kv(self.generator, csid, resolved, params, Path(path), faults=self.faults)
                self._unit_passes += passes
                self._load_kv(path, kv)  # checked or computed just now: into the LRU without reading the file again
                error = None
            except RowError as e:
                error = {"stage": "reference_kv", "field": e.field, "reason": e.reason}
            except Exception as e:  # noqa: BLE001 - one concept set fails alone (its targets), never the unit
                logger.exception("reference K/V for %s failed", path)
                error = {"stage": "reference_kv", "field": "concepts", "reason": f"{type(e).__name__}: {e}"}
            self._references[path] = error
        return self._references[path]

    def _truncated(self, prompt: str) -> bool:
        tok = self.generator.pipe.tokenizer
        return len(tok(prompt, truncation=False).input_ids) > tok.model_max_length

    def _generate_group(self, targets: list[dict]) -> list:
        p = targets[0]["params"]
        kv = self._load_kv(targets[0]["kv_path"])
        return self.generator.generate(
            [t["prompt"] for t in targets], [t["seed"] for t in targets], kv,
            num_inference_steps=p["num_inference_steps"], height=p["height"], width=p["width"],
            guidance_scale=p["guidance_scale"], negative_prompt=p["negative_prompt"],
            output_type="pil", batch_size=self.batch_size,
        )

    def run_unit(self, unit: dict) -> tuple[list, list]:
        fault_point("generate.unit", self.faults)
        samples, errors = [], []
        groups: OrderedDict[str, list[dict]] = OrderedDict()
        all_targets = expand_targets(unit)
        for t in all_targets:
            error = t.get("error") or (self._ensure_references(t) if t.get("reference") else None)
            if error:
                errors.append(dict(error, id=t["id"], row=t["row"], seed=t["seed"]))
                continue
            groups.setdefault(json.dumps([t["kv_path"], t["params"]], sort_keys=True), []).append(t)
        for targets in groups.values():
            try:
                images = self._generate_group(targets)
                done = list(zip(targets, images, strict=True))
            except Exception as e:  # isolate: retry each target alone, so one bad target fails alone
                logger.warning("batch of %d failed (%s); retrying targets one by one", len(targets), e)
                done = []
                for t in targets:
                    try:
                        done.append((t, self._generate_group([t])[0]))
                    except Exception as e1:  # noqa: BLE001 - any failure becomes this row's error
                        errors.append({"id": t["id"], "row": t["row"], "seed": t["seed"], "stage": "generate",
                                       "field": "", "reason": f"{type(e1).__name__}: {e1}"})
            for t, image in done:
                truncated = self._truncated(t["prompt"])
                if truncated:
                    logger.warning("row %s: the prompt is longer than the text encoder's %d tokens and was truncated",
                                   t["id"], self.generator.pipe.tokenizer.model_max_length)
                meta = dict(t["meta"], model=self.model_meta, versions=self.versions, prompt_truncated=truncated)
                samples.append((t["key"], self.image_format, encode_image(image, self.image_format), meta))
        order = {t["key"]: i for i, t in enumerate(all_targets)}
        samples.sort(key=lambda s: order[s[0]])
        return samples, errors

    def __call__(self, batch: dict) -> dict:
        out = {"shard_id": [], "result": [], "expected": [], "reference_passes": []}
        for shard_id, raw in zip(batch["shard_id"], batch["unit"], strict=True):
            unit = decode_unit(raw)
            self._unit_passes = 0
            try:
                samples, errors = self.run_unit(unit)
            except Exception as e:  # noqa: BLE001 - a broken unit fails its own targets, never the run
                logger.exception("shard %s failed as a whole", shard_id)
                samples = []
                errors = [{"id": t["id"], "row": t["row"], "seed": t["seed"], "stage": "generate", "field": "",
                           "reason": f"{type(e).__name__}: {e}"} for t in unit["targets"]]
            out["shard_id"].append(int(shard_id))
            out["result"].append(pack_result(samples, errors))
            out["expected"].append(len(unit["targets"]))
            out["reference_passes"].append(self._unit_passes)
        return out
