"""Stage: generate customized images for one shard's targets, with cached reference K/V.

A GPU actor: the model loads once in ``__init__``; each input row is one shard's work unit
(``stages.generation.units.WorkUnit``). Targets of one group (one concept set, one parameter set) are
batched through the UNet together; K/V are read from the store by path and kept in a small LRU in
(pinned) host memory, streamed to the GPU a step at a time. When a group names a ``reference``
request (a run with one generation actor), missing K/V are computed here first, once per concept
set. A failure is recorded per target, never raised. The output is the shard itself: its tar
(final bytes), its samples' metadata and its errors, for ``stages.output.write`` to store.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter, OrderedDict

from PIL import Image

from freecustom_core.heatmap import GAP, maps_image
from freecustom_core.topology import FLUX_MAX_SEQUENCE_LENGTH

from ..errors import ErrorRecord, RowError
from ..faults import fault_point
from ..inputs.control import RowControl, load_condition
from ..inputs.read import InputSettings, LoadedImage
from ..inputs.subject import RowSubject
from ..masks.segment import SegmentConfig, Segmenter
from ..output.layout import ATTENTION_FILE, control_file, extra_fields
from ..output.locations import read_location
from ..reference.models import apply_loras, load_generator, model_source
from ..reference.reference_kv import KVFile, ensure_reference_kv, read_reference_request
from .annotate import annotate_sample
from .embed import ReferenceEmbedder
from .reuse import ReusedShards, sample_record
from .shard import RUN_FIELDS, pack_shard, package_versions, reused_meta, shard_row  # noqa: F401 - pack_shard: imported from here too
from .units import Group, Target, WorkUnit

CONDITION_CACHE = 64  # control conditions kept per actor (rows often share a layout)
DEFAULT_BATCH_SIZE = 8  # fixed, not from free memory: a redone shard must batch (and so round) exactly as before

logger = logging.getLogger(__name__)

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
STAGE = "generate"


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


class GenerateStage:
    """Callable class. Input columns: ``shard_id``, ``unit`` (``WorkUnit.encode`` bytes). Output
    (``shard_row``): ``shard_id``, ``tar``, ``metas`` (JSON list), ``errors`` (JSON list of
    ``ErrorRecord`` rows), ``expected`` (targets), ``reference_passes`` (K/V computed here for this
    unit: only for groups that name a ``reference`` request), ``model`` (the model's metadata as this actor
    loaded it, JSON: the run records it, so that a later ``--reuse`` run can copy whole shards without a model).

    ``save_attention``: each sample also gets ``<key>.attn.png`` (``ATTENTION_FILE``), its attention maps
    (``generate(..., attention_maps=True)``) drawn by ``freecustom_core.heatmap.maps_image``, and its
    JSON an ``attention`` entry saying what the maps average over.

    ``embed_references``: the output folder whose ``references/`` each sample's references and masks are
    embedded from (``stages.generation.embed``). ``annotate``: each sample gets ``annotations``, ``presence`` and
    ``overlap`` and a mask field per concept (``stages.generation.annotate``), refined with SAM and/or the detector
    of ``annotate_segment`` (``SegmentConfig`` keyword arguments) when it names them.
    """

    def __init__(self, model: str, *, image_format: str = "png", batch_size: int | None = None,
                 dtype: str = "auto", device: str = "auto", scheduler: str | None = None, kv_lru: int = 2,
                 channels_last: bool = False, compile: bool = False, reuse_index: str | None = None,
                 model_config: str | None = None, controlnet: list[str] | None = None,
                 input_settings: InputSettings | None = None, faults: dict | None = None,
                 save_attention: bool = False,
                 embed_references: str | None = None, annotate: bool = False, annotate_segment: dict | None = None):
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format={image_format!r}: expected one of {sorted(IMAGE_FORMATS)}")
        # the reference stage never compiles: its pass is eager either way (the K/V are the same)
        self.generator = load_generator(model, dtype=dtype, device=device, scheduler=scheduler, channels_last=channels_last,
                                        compile=compile, model_config=model_config, controlnet=controlnet)
        self.image_format = image_format
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.faults = faults  # test-only fault injection plan (stages/faults.py)
        self.save_attention = save_attention
        self.annotate = annotate
        self.embedder = ReferenceEmbedder(embed_references) if embed_references else None
        segment = SegmentConfig(**(annotate_segment or {}))
        refines = annotate and (segment.sam_checkpoint is not None or segment.detector is not None)
        self.segmenter = Segmenter(segment) if refines else None
        self.kv_lru = kv_lru
        # --reuse: record digest -> a previous sample (stages.generation.reuse); read once per actor
        self._reuse = json.loads(read_location(reuse_index)) if reuse_index else {}
        self._reused = ReusedShards()
        self._kv: OrderedDict = OrderedDict()
        self._references: dict[str, dict | None] = {}  # K/V path -> None (ready) or the error computing them
        self._unit_passes = self._unit_reused = 0
        self._unit_warnings: Counter = Counter()  # kind -> count in this unit (the driver sums them up)
        self._unit_extras: dict[str, bytes] = {}  # member name -> bytes: the unit's samples' further fields
        gen = self.generator
        self.model_meta = {
            "id": gen.model_id,
            "fingerprint": gen.model_fingerprint,
            "dtype": str(gen.dtype).removeprefix("torch."),
            "memory_format": gen.memory_format,
            "compiled": gen.compiled,
            "scheduler": gen.scheduler_identity(),
            "source": model_source(model, model_config),  # single file, folder or hub id
        }
        self._model_metas = {(): self.model_meta}  # LoRA set -> model metadata (its fingerprint)
        self.versions = package_versions()
        # ControlNet (run --controlnet) and BLIP-Diffusion subjects: images read like concept images, kept per actor
        self.input_settings = input_settings or InputSettings()
        self._conditions: OrderedDict = OrderedDict()  # (image path, type, canny) -> (image, PNG bytes)
        self._subjects: OrderedDict = OrderedDict()  # subject image path -> LoadedImage

    def _subject(self, t: Target) -> tuple[RowSubject, LoadedImage] | None:
        """A target's BLIP-Diffusion subject and its image (read once per actor and path), None without."""
        subject = RowSubject.from_row(t.blip_subject)
        if subject is None:
            return None
        if subject.image_path not in self._subjects:
            while len(self._subjects) >= CONDITION_CACHE:
                self._subjects.popitem(last=False)
            self._subjects[subject.image_path] = subject.load(self.input_settings)
        self._subjects.move_to_end(subject.image_path)
        return subject, self._subjects[subject.image_path]

    def _subject_meta(self, t: Target) -> dict:
        """A sample's ``blip_subject`` metadata (part of its reproducibility record), {} without a subject."""
        found = self._subject(t)
        return {"blip_subject": found[0].record(found[1].digest)} if found else {}

    def _use_loras(self, loras) -> dict:
        """Activate a parameter set's LoRA adapters; the model metadata of the weights now in use."""
        apply_loras(self.generator, loras)
        if loras not in self._model_metas:
            self._model_metas[loras] = dict(self.model_meta, fingerprint=self.generator.model_fingerprint)
        return self._model_metas[loras]

    def _load_kv(self, path: str, kv=None):
        """The K/V at ``path`` from the LRU, loaded on a miss (or ``kv``, already in host memory)."""
        if path not in self._kv:
            while len(self._kv) >= self.kv_lru:
                self._kv.popitem(last=False)
            # host memory, page-locked: the engine copies one step at a time to the GPU, so the LRU costs
            # host RAM (about 1 GiB per concept set at 512², fp16, 50 steps), not GPU memory
            self._kv[path] = (kv if kv is not None else KVFile(path).load(verify=False)).pin_memory()
        self._kv.move_to_end(path)
        return self._kv[path]

    def _ensure_references(self, group: Group) -> ErrorRecord | None:
        """When the run has one generation actor, it computes the K/V itself, once per concept set
        (the group's ``reference`` names its request file): no separate reference actor and model
        load. Returns None when the K/V are ready, else the error (kept: the set fails fast after)."""
        path = group.kv_path
        if path not in self._references:
            try:
                request = read_reference_request(group.reference)
                passes, kv = ensure_reference_kv(self.generator, request, KVFile(path), faults=self.faults)
                self._unit_passes += passes
                self._load_kv(path, kv)  # checked or computed just now: into the LRU without reading the file again
                error = None
            except Exception as e:  # noqa: BLE001 - one concept set fails alone (its targets), never the unit
                if not isinstance(e, RowError):
                    logger.exception("reference K/V for %s failed", path)
                error = ErrorRecord.from_exception(e, stage="reference_kv", field="concepts")
            self._references[path] = error
        return self._references[path]

    def _prompt_limit(self) -> tuple:
        """The tokenizer that decides what of a prompt the model sees, and its token limit (FLUX: T5's)."""
        pipe = self.generator.pipe
        if self.generator.family == "flux":
            return pipe.tokenizer_2, FLUX_MAX_SEQUENCE_LENGTH
        return pipe.tokenizer, pipe.tokenizer.model_max_length

    def _truncated(self, prompt: str) -> bool:
        tok, limit = self._prompt_limit()
        return len(tok(prompt, truncation=False).input_ids) > limit

    def _generate(self, group: Group, targets: list[Target]) -> list[tuple]:
        """``(image, attention maps (N, h, w) or None, control record or None)`` per target (maps with
        ``save_attention``, records with ControlNet)."""
        control = RowControl.from_row(targets[0].control)  # the batch shares scales and steps (run_unit)
        kwargs, per_net = {}, None
        if control is not None:
            per_net = self._control_images(targets)
            kwargs = dict(control_image=per_net[0] if len(per_net) == 1 else per_net, **control.engine_kwargs(),
                          control_references=control.references)
        subject = self._subject(targets[0])  # the batch shares its subject (run_unit)
        if subject is not None:
            kwargs.update(subject[0].generate_kwargs(subject[1].image))
        result = self.generator.generate(
            [t.prompt for t in targets], [t.seed for t in targets], self._load_kv(group.kv_path),
            **group.params.generate_kwargs(self.generator.family), reference_seed=group.params.reference_seed,  # checked against the K/V's
            output_type="pil", batch_size=self.batch_size, **kwargs,
            **({"attention_maps": True} if self.maps else {}),
        )
        images, maps = result if self.maps else (result, [None] * len(result))
        records = [None] * len(targets) if control is None else self._control_records(targets, per_net)
        return list(zip(images, maps, records, strict=True))

    @property
    def maps(self) -> bool:
        """Whether the engine computes attention maps (saved, or read for annotations)."""
        return self.save_attention or self.annotate

    def _attention(self, group: Group, image, maps) -> tuple[dict, bytes]:
        """A sample's attention maps drawn as ``<key>.attn.png`` (PNG bytes) and its metadata entry
        ``attention``: the file, its panels (one per concept, left to right in concept order, each the
        image's size, ``gap`` white pixels apart) and what the maps average over (the MRSA layers, the
        steps ``[start, end)``)."""
        mrsa = self._load_kv(group.kv_path).mrsa
        steps = group.params.num_inference_steps
        entry = {"file": ATTENTION_FILE, "panels": len(maps), "panel_size": list(image.size), "gap": GAP,
                 "layers": list(self.generator.layer_names(mrsa)),
                 "steps": [mrsa.start_step, steps if mrsa.end_step is None else min(mrsa.end_step, steps)]}
        return entry, encode_image(maps_image(maps, image.size), "png")

    def _training_fields(self, meta: dict, attention: tuple[dict, bytes] | None, image) -> dict:
        """``meta`` with what ``--save-attention``, ``--annotate`` and ``--embed-references`` add (and only
        that: a reused sample's entries of other runs are dropped), their fields into the unit's extras.
        ``attention``: the sample's ``(attention entry, attn.png bytes)``; ``image``: its pixels (refinement)."""
        meta = {k: v for k, v in meta.items() if k not in RUN_FIELDS}
        key = meta["key"]
        if self.save_attention:
            meta["attention"] = attention[0]
            self._unit_extras[f"{key}.{ATTENTION_FILE}"] = attention[1]
        if self.annotate:
            fields, members = annotate_sample(dict(meta, attention=attention[0]), attention[1], image, self.segmenter)
            meta.update(fields)
            self._unit_extras.update({f"{key}.{name}": data for name, data in members.items()})
        if self.embedder is not None:
            meta = self.embedder.embed(meta, self._unit_extras)
        return meta

    def _condition(self, control: RowControl, k: int) -> tuple:
        """ControlNet k's condition for a row: ``(image, PNG bytes)``, computed once per actor and input."""
        entry = control.entries[k]
        key = (entry.image_path, entry.type, entry.canny)
        if key not in self._conditions:
            while len(self._conditions) >= CONDITION_CACHE:
                self._conditions.popitem(last=False)
            image = load_condition(control, k, self.input_settings)
            self._conditions[key] = (image, encode_image(image, "png"))
        self._conditions.move_to_end(key)
        return self._conditions[key]

    def _conditions_of(self, t: Target) -> list[tuple]:
        control = RowControl.from_row(t.control)
        return [self._condition(control, k) for k in range(len(control.entries))]

    def _control_images(self, targets: list[Target]) -> list[list]:
        """Per ControlNet, the targets' condition images (as ``generate`` takes them: ``[net][target]``)."""
        controls = [RowControl.from_row(t.control) for t in targets]
        return [[self._condition(c, k)[0] for c in controls] for k in range(len(controls[0].entries))]

    def _control_records(self, targets: list[Target], per_net: list[list]) -> list[dict]:
        """Each target's ``control`` metadata: the engine's ``control_record`` with this target's condition
        digests, and per ControlNet its source (image, type, canny thresholds, condition digest)."""
        gen, control = self.generator, RowControl.from_row(targets[0].control)  # shared scales and steps
        record = gen.control_record(gen.control_input(per_net if len(per_net) > 1 else per_net[0], len(targets),
                                                      **control.engine_kwargs()),
                                    control_references=control.references)
        records = []
        for j, t in enumerate(targets):
            digests = [per[j] for per in record["image_digests"]]
            sources = [dict(e.source(), condition_digest=d)
                       for e, d in zip(RowControl.from_row(t.control).entries, digests, strict=True)]
            records.append(dict(record, image_digests=digests, sources=sources))
        return records

    def _control_members(self, t: Target) -> None:
        """The sample's condition fed to each ControlNet, as its further fields ``control_file(k)``."""
        for k, (_, png) in enumerate(self._conditions_of(t)):
            self._unit_extras[f"{t.key}.{control_file(k)}"] = png

    def _reuse_sample(self, unit: WorkUnit, t: Target, samples: list) -> bool:
        """A previous output's sample with this target's record, copied (image bytes unchanged; its
        metadata with this output's shard, row and pass-through columns and ``reused_from``)."""
        try:
            model_meta = self._use_loras(unit.groups[t.group].params.loras)
        except RowError:
            return False  # rendered (and failed) as usual
        meta = dict(unit.sample_meta(t), model=model_meta, versions=self.versions, **self._subject_meta(t))
        if t.control is not None:  # the condition is part of the record
            meta["control"] = self._control_records([t], self._control_images([t]))[0]
        entry = self._reuse.get(sample_record(meta, self.image_format))
        if entry is None:
            return False
        if self.maps and not entry.get("attention"):
            return False  # rendered: the previous sample has no attention maps
        image, previous, fields = self._reused.sample(entry)
        reused = reused_meta(previous, shard=unit.shard_id, row=t.row, passthrough=t.passthrough, entry=entry)
        attention = (previous["attention"], fields[ATTENTION_FILE]) if self.maps else None
        pixels = Image.open(io.BytesIO(image)).convert("RGB") if self.segmenter is not None else None
        reused = self._training_fields(reused, attention, pixels)  # the maps stay behind without --save-attention
        for name in extra_fields(reused):  # the control conditions (the rest was added just now)
            self._unit_extras.setdefault(f"{t.key}.{name}", fields.get(name))
        samples.append((t.key, self.image_format, image, reused))
        self._unit_reused += 1
        return True

    def run_unit(self, unit: WorkUnit) -> tuple[list, list[ErrorRecord]]:
        """The unit's samples ``(key, ext, image bytes, metadata)`` in target order, and its errors."""
        fault_point("generate.unit", self.faults)
        samples, errors = [], []
        # targets batched together: same K/V and same engine arguments (groups of one concept set
        # reached through differently spelled paths share a batch)
        batches: OrderedDict[str, tuple[Group, list[Target]]] = OrderedDict()
        for t in unit.targets:
            group = unit.groups[t.group]
            if group.error:
                errors.append(t.fail(group.error))
                continue
            try:
                if t.control is not None:
                    self._conditions_of(t)
                self._subject(t)
            except RowError as e:  # an unreadable control image or subject fails its own targets
                errors.append(t.fail(ErrorRecord.from_exception(e, stage=STAGE)))
                continue
            if self._reuse and self._reuse_sample(unit, t, samples):
                continue
            error = self._ensure_references(group) if group.reference else None
            if error:
                errors.append(t.fail(error))
                continue
            key = [group.params.loras, group.kv_path, group.params.generate_kwargs(self.generator.family)]
            if t.control is not None:  # one engine call shares ControlNet scales and steps
                key.append(RowControl.from_row(t.control).steering())
            if t.blip_subject is not None:  # and its BLIP-Diffusion subject
                key.append(RowSubject.from_row(t.blip_subject).steering())
            key = json.dumps(key, sort_keys=True)
            batches.setdefault(key, (group, []))[1].append(t)
        # one adapter set after another: each switch unloads and loads LoRAs
        for key in sorted(batches, key=lambda k: json.loads(k)[0]):
            group, targets = batches[key]
            try:
                model_meta = self._use_loras(group.params.loras)
            except RowError as e:  # a LoRA that does not load fails the targets that use it
                errors.extend(t.fail(ErrorRecord.from_exception(e, stage=STAGE)) for t in targets)
                continue
            try:
                done = [(t, *out) for t, out in zip(targets, self._generate(group, targets), strict=True)]
            except Exception as e:  # isolate: retry each target alone, so one bad target fails alone
                logger.warning("batch of %d failed (%s); retrying targets one by one", len(targets), e)
                done = []
                for t in targets:
                    try:
                        done.append((t, *self._generate(group, [t])[0]))
                    except Exception as e1:  # noqa: BLE001 - any failure becomes this target's error
                        errors.append(t.fail(ErrorRecord.from_exception(e1, stage=STAGE)))
            for t, image, maps, control in done:
                truncated = self._truncated(t.prompt)
                if truncated:
                    self._unit_warnings["prompt_truncated"] += 1
                    logger.warning("row %s: the prompt is longer than the text encoder's %d tokens and was truncated",
                                   t.id, self._prompt_limit()[1])
                meta = dict(unit.sample_meta(t), model=model_meta, versions=self.versions,
                            prompt_truncated=truncated, **self._subject_meta(t))
                meta = self._training_fields(meta, self._attention(group, image, maps) if maps is not None else None,
                                             image)
                if control is not None:  # the condition fed to each ControlNet, beside the image
                    meta["control"] = control
                    self._control_members(t)
                samples.append((t.key, self.image_format, encode_image(image, self.image_format), meta))
        order = {t.key: i for i, t in enumerate(unit.targets)}
        samples.sort(key=lambda s: order[s[0]])
        return samples, errors

    def __call__(self, batch: dict) -> dict:
        rows = []
        for raw in batch["unit"]:
            unit = WorkUnit.decode(raw)
            self._unit_passes = self._unit_reused = 0
            self._unit_warnings = Counter()
            self._unit_extras = {}
            try:
                samples, errors = self.run_unit(unit)
            except Exception as e:  # noqa: BLE001 - a broken unit fails its own targets, never the run
                logger.exception("shard %s failed as a whole", unit.shard_id)
                samples, error = [], ErrorRecord.from_exception(e, stage=STAGE)
                errors = [t.fail(error) for t in unit.targets]
            try:  # a sample that cannot be packed fails alone (shard_row); anything else the unit's targets
                row = shard_row(unit.shard_id, samples, errors, expected=len(unit.targets),
                                reference_passes=self._unit_passes, reused=self._unit_reused,
                                warnings=dict(self._unit_warnings), extras=self._unit_extras, stage=STAGE)
            except Exception as e:  # noqa: BLE001 - never the run
                logger.exception("shard %s could not be packed", unit.shard_id)
                error = ErrorRecord.from_exception(e, stage=STAGE)
                row = shard_row(unit.shard_id, [], [t.fail(error) for t in unit.targets],
                                expected=len(unit.targets), reference_passes=self._unit_passes, stage=STAGE)
            rows.append(row | {"model": json.dumps(self.model_meta)})
        return {column: [r[column] for r in rows] for column in rows[0]} if rows else {}
