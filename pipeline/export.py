"""``freecustom-pipeline export OUT -o DIR --format hf|jsonl``: an output folder as the layouts trainers load.

Per sample one training example: the image, its prompt, its references and their masks (as the engine
took them: the sample's ``ref{i}.png`` / ``ref{i}.mask.png`` fields of ``run --embed-references``, else
drawn the same way from ``references/<concept-set-id>/``), where each concept landed (boxes, masks,
confidence, source, presence, overlap: from ``run --annotate`` or ``score --annotate``'s
``annotations/``), the scores (``run --score`` or ``score OUT``'s ``scores/``) and the full metadata.

    hf      a Hugging Face ``datasets`` folder as ``Dataset.save_to_disk`` writes it, loadable with
            ``datasets.load_from_disk(DIR)``: ``data-<shard>.arrow`` (Arrow IPC streams), ``dataset_info.json``
            (the typed features: ``image`` an Image, ``references`` / ``reference_masks`` / ``masks`` lists of
            Images, ``boxes`` a list of [x0, y0, x1, y1], ...) and ``state.json``. Written with pyarrow
            alone: ``datasets`` is not needed to export (lists spelled ``Sequence``: datasets 3 to 5 read them).
    jsonl   what diffusers' training scripts read (``load_dataset("imagefolder", data_dir=DIR)``):
            ``metadata.jsonl`` (``file_name``, ``text``, and the other fields, references and masks as
            paths relative to DIR) and ``images/<shard>/<key>.<ext>``; references under
            ``references/<shard>/``, annotation masks under ``masks/<shard>/``.

Streaming: one source shard at a time (memory bounded by a shard, whatever the output's size). Resumable:
each shard's part (``data-<shard>.arrow``; ``_parts/<shard>.jsonl`` for jsonl, after its images) is
written whole, then its done marker ``_export/<shard>.json``; a rerun of the same command skips done
shards and writes the index files (``state.json``, ``metadata.jsonl``) again at the end. ``DIR`` holds one
export: ``_export.json`` names its source, format and filter, and another export into it is refused.
``OUT`` and ``DIR`` may be local folders or object storage URIs (``stages.output.folder.OutputFolder``).

Filter (``--min-score``, the syntax of ``run --min-score``: ``clip_t=20``, ``presence=0.1``,
``overlap<0.5``): a sample is exported when it has every filtered value and passes every bound.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Callable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.annotations import read_annotations
from pipeline.scoring import score_file
from stages.generation.embed import ReferenceEmbedder
from stages.output.folder import OutputFolder
from stages.output.layout import ANNOTATIONS, EMBEDDED, RUN_FILE, SHARDS
from stages.scoring.score import PER_CONCEPT, SCORE_NAMES, SIGNAL_NAMES, failed_thresholds, threshold_name

FORMATS = ("hf", "jsonl")
IDENTITY, DONE, PARTS = "_export.json", "_export", "_parts"
METADATA, STATE, INFO = "metadata.jsonl", "state.json", "dataset_info.json"
EMPTY_PART = "empty"  # the one data file of an hf export that kept no sample

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature in Arrow
_VALUE_TYPES = {pa.string(): "string", pa.int64(): "int64", pa.float64(): "float64"}


def _column(name: str, dtype: pa.DataType, feature: dict) -> tuple[str, pa.DataType, dict]:
    return name, dtype, feature


def _value(dtype: pa.DataType) -> dict:
    return {"dtype": _VALUE_TYPES[dtype], "_type": "Value"}


def _list(feature: dict) -> dict:
    """A list feature, spelled ``Sequence``: datasets 3 reads it, and datasets >= 4 reads it as its ``List``."""
    return {"feature": feature, "_type": "Sequence"}


_IMAGE_FEATURE = {"_type": "Image"}


def columns(scored: bool, annotated: bool) -> list[tuple[str, pa.DataType, dict]]:
    """The exported columns: name, Arrow type and ``datasets`` feature (its JSON form)."""
    out = [
        _column(n, pa.string(), _value(pa.string()))
        for n in ("key", "id", "prompt", "negative_prompt", "concept_set_id")
    ]
    out += [_column(n, pa.int64(), _value(pa.int64())) for n in ("seed", "width", "height")]
    out += [
        _column("image", IMAGE, _IMAGE_FEATURE),
        _column("references", pa.list_(IMAGE), _list(_IMAGE_FEATURE)),
        _column("reference_masks", pa.list_(IMAGE), _list(_IMAGE_FEATURE)),
        _column("concept_prompts", pa.list_(pa.string()), _list(_value(pa.string()))),
    ]
    if annotated:
        out += [
            _column("boxes", pa.list_(pa.list_(pa.int64())), _list(_list(_value(pa.int64())))),
            _column("masks", pa.list_(IMAGE), _list(_IMAGE_FEATURE)),
            _column("confidence", pa.list_(pa.float64()), _list(_value(pa.float64()))),
            _column("sources", pa.list_(pa.string()), _list(_value(pa.string()))),
            _column("presence", pa.list_(pa.float64()), _list(_value(pa.float64()))),
            _column("overlap", pa.float64(), _value(pa.float64())),
        ]
    if scored:
        for name in SCORE_NAMES:
            if name in PER_CONCEPT:
                out.append(_column(name, pa.list_(pa.float64()), _list(_value(pa.float64()))))
            else:
                out.append(_column(name, pa.float64(), _value(pa.float64())))
    out.append(_column("metadata", pa.string(), _value(pa.string())))
    return out


# --------------------------------------------------------------------------- reading the source


class Source:
    """The output folder read shard by shard: each sample as an ``Example`` dict (bytes for images)."""

    def __init__(self, folder: OutputFolder):
        if not folder.exists(RUN_FILE):
            raise ValueError(f"{folder} is not an output folder of freecustom-pipeline run (no {RUN_FILE})")
        self.folder = folder
        self.run = folder.read_json(RUN_FILE)
        self.image_format = self.run.get("image_format", "png")
        self.embedder = ReferenceEmbedder(folder.location)

    @property
    def annotated(self) -> bool:
        return bool(self.run.get("annotate")) or bool(self.folder.list("annotations", ".parquet"))

    @property
    def scored(self) -> bool:
        return "score" in self.run or bool(self.folder.list("scores", ".parquet"))

    def shards(self) -> list[str]:
        return [n.removesuffix(".parquet") for n in self.folder.list(SHARDS, ".parquet")]

    def examples(self, shard: str) -> Iterator[dict]:
        """The shard's samples in order, each with its fields' bytes merged in."""
        with self.folder.fs.open_input_file(self.folder.path(SHARDS, f"{shard}.parquet")) as f:
            metas = [json.loads(m) for m in pq.read_table(f, columns=["metadata"])["metadata"].to_pylist()]
        with tarfile.open(fileobj=io.BytesIO(self.folder.read(f"{SHARDS}/{shard}.tar"))) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        later = read_annotations(self.folder, shard)  # score --annotate
        scores = self._scores(shard)  # score OUT
        for meta in metas:
            yield self._example(meta, members, later.get(meta["key"]), scores.get(meta["key"]))

    def _scores(self, shard: str) -> dict[str, dict]:
        if not self.folder.exists(score_file(shard)):
            return {}
        with self.folder.fs.open_input_file(self.folder.path(score_file(shard))) as f:
            rows = pq.read_table(f, columns=["key", *SCORE_NAMES, "score_error"]).to_pylist()
        return {r["key"]: {n: r[n] for n in SCORE_NAMES} for r in rows if r["score_error"] is None}

    def _example(
        self, meta: dict, members: Mapping[str, bytes], later: dict | None, scores: dict | None
    ) -> dict:
        key = meta["key"]
        field = {name.split(".", 1)[1]: data for name, data in members.items() if name.startswith(f"{key}.")}
        if not meta.get(EMBEDDED):  # drawn from references/ exactly as run --embed-references draws them
            extra: dict[str, bytes] = {}
            meta_refs = self.embedder.embed(meta, extra)[EMBEDDED]
            field.update({name.split(".", 1)[1]: data for name, data in extra.items()})
        else:
            meta_refs = meta[EMBEDDED]
        example = {
            k: meta.get(k)
            for k in ("key", "id", "prompt", "negative_prompt", "concept_set_id", "seed", "width", "height")
        }
        example.update(
            image=field[self.image_format],
            ext=self.image_format,
            references=[(n, field[n]) for n in meta_refs["images"]],
            reference_masks=[(n, field[n]) for n in meta_refs["masks"]],
            concept_prompts=[c.get("prompt") for c in meta.get("concepts") or []],
            metadata=json.dumps(meta, sort_keys=True),
            signals={**(scores or meta.get("scores") or {})},
        )
        if ANNOTATIONS in meta:
            notes = meta[ANNOTATIONS]
            example.update(
                masks=[(a["mask"], field[a["mask"]]) for a in notes],
                presence=meta["presence"],
                overlap=meta["overlap"],
            )
        elif later is not None and later.get("annotation_error") is None:
            notes = json.loads(later["annotations"])
            example.update(
                masks=list(zip(later["annotation_masks"], later["masks"], strict=True)),
                presence=later["presence"],
                overlap=later["overlap"],
            )
        else:
            notes = None
        if notes is not None:
            example.update(
                boxes=[a["box"] for a in notes],
                confidence=[a["confidence"] for a in notes],
                sources=[a["source"] for a in notes],
            )
            example["signals"].update(presence=example["presence"], overlap=example["overlap"])
        for name in SCORE_NAMES:
            example[name] = example["signals"].get(name)
        return example


def passes(example: dict, thresholds: Mapping[str, float]) -> bool:
    """Whether a sample has every value ``thresholds`` name and passes every bound."""
    signals = example["signals"]
    if any(signals.get(threshold_name(k)) is None for k in thresholds):
        return False
    return not failed_thresholds(signals, thresholds)


# --------------------------------------------------------------------------- writing the views


def _image(name: str, data: bytes) -> dict:
    return {"bytes": data, "path": name}


def hf_part(examples: list[dict], cols: list[tuple[str, pa.DataType, dict]]) -> bytes:
    """One Arrow IPC stream (a ``data-*.arrow`` file of ``save_to_disk``) of the examples."""

    def value(ex: dict, name: str):
        if name == "image":
            return _image(f"{ex['key']}.{ex['ext']}", ex["image"])
        if name in ("references", "reference_masks", "masks"):
            return None if ex.get(name) is None else [_image(f"{ex['key']}.{n}", d) for n, d in ex[name]]
        return ex.get(name)

    schema = pa.schema([(n, t) for n, t, _ in cols]).with_metadata(
        {"huggingface": json.dumps({"info": {"features": {n: f for n, _, f in cols}}})}
    )
    table = pa.table({n: pa.array([value(ex, n) for ex in examples], t) for n, t, _ in cols}, schema=schema)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table, max_chunksize=1000)
    return sink.getvalue()


def jsonl_part(dest: OutputFolder, shard: str, examples: list[dict]) -> bytes:
    """Writes the examples' images, references and masks under ``dest``; returns their metadata lines."""
    lines = []
    for ex in examples:
        key = ex["key"]

        def put(folder: str, name: str, data: bytes) -> str:
            rel = posixpath.join(folder, shard, name)
            dest.write(rel, data)
            return rel

        record = {"file_name": put("images", f"{key}.{ex['ext']}", ex["image"]), "text": ex["prompt"]}
        record.update(
            {
                k: ex[k]
                for k in (
                    "key",
                    "id",
                    "seed",
                    "negative_prompt",
                    "concept_set_id",
                    "width",
                    "height",
                    "concept_prompts",
                )
            }
        )
        record["references"] = [put("references", f"{key}.{n}", d) for n, d in ex["references"]]
        record["reference_masks"] = [put("references", f"{key}.{n}", d) for n, d in ex["reference_masks"]]
        if ex.get("masks") is not None:
            record["masks"] = [put("masks", f"{key}.{n}", d) for n, d in ex["masks"]]
            record.update({k: ex[k] for k in ("boxes", "confidence", "sources", "presence", "overlap")})
        record.update({n: ex[n] for n in SCORE_NAMES if ex.get(n) is not None})
        record["metadata"] = ex["metadata"]
        lines.append(json.dumps(record, sort_keys=True))
    return "".join(line + "\n" for line in lines).encode()


def export_output(
    source: str,
    dest: str,
    fmt: str,
    thresholds: Mapping[str, float] | None = None,
    *,
    on_shard: Callable[[str, str], None] | None = None,
) -> dict:
    """Export ``source`` (an output folder) into ``dest`` as ``fmt`` (see the module's docstring); returns
    ``samples`` (exported), ``filtered_out``, ``shards_exported``, ``shards_kept``."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    thresholds = dict(thresholds or {})
    for key in thresholds:
        if threshold_name(key) not in SCORE_NAMES + SIGNAL_NAMES:
            raise ValueError(
                f"--min-score {key}: unknown score; one of {', '.join(SCORE_NAMES + SIGNAL_NAMES)}"
            )
    src = Source(OutputFolder(source, option="OUT"))
    out = OutputFolder(dest, option="-o/--output")
    identity = {"source": src.folder.location, "format": fmt, "min_score": thresholds}
    if out.exists(IDENTITY) and out.read_json(IDENTITY) != identity:
        raise ValueError(f"{out} holds another export ({out.read_json(IDENTITY)}); use another folder")
    out.write_json(IDENTITY, identity, indent=2)
    cols = columns(src.scored, src.annotated)
    exported = kept_shards = done = filtered = 0
    parts = []
    for shard in src.shards():
        marker = f"{DONE}/{shard}.json"
        if out.exists(marker):
            counts = out.read_json(marker)
            kept_shards += 1
            what = "kept"
        else:
            examples, n_filtered = [], 0
            for ex in src.examples(shard):
                if passes(ex, thresholds):
                    examples.append(ex)
                else:
                    n_filtered += 1
            if fmt == "hf":
                if examples:
                    out.write(f"data-{shard}.arrow", hf_part(examples, cols))
            else:
                out.write(f"{PARTS}/{shard}.jsonl", jsonl_part(out, shard, examples))
            counts = {"samples": len(examples), "filtered_out": n_filtered}
            out.write_json(marker, counts)
            done += 1
            what = "exported"
        exported += counts["samples"]
        filtered += counts["filtered_out"]
        if counts["samples"]:
            parts.append(shard)
        if on_shard:
            on_shard(shard, what)
    if fmt == "hf":
        _write_hf_index(out, parts, cols)
    else:
        _write_metadata(out, src.shards())
    return {
        "samples": exported,
        "filtered_out": filtered,
        "shards_exported": done,
        "shards_kept": kept_shards,
        "format": fmt,
        "out": out.location,
    }


def _write_hf_index(out: OutputFolder, parts: list[str], cols: list) -> None:
    features = {n: f for n, _, f in cols}
    if not parts:  # every sample filtered out: an empty dataset still loads (load_from_disk needs one file)
        out.write(f"data-{EMPTY_PART}.arrow", hf_part([], cols))
        parts = [EMPTY_PART]
    out.write_json(
        INFO,
        {
            "citation": "",
            "description": "FreeCustom renders (freecustom-pipeline export)",
            "features": features,
            "homepage": "",
            "license": "",
        },
        indent=2,
    )
    out.write_json(
        STATE,
        {
            "_data_files": [{"filename": f"data-{p}.arrow"} for p in parts],
            "_fingerprint": f"freecustom-{len(parts)}-{'-'.join(parts[-1:])}",
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        },
        indent=2,
    )


def _write_metadata(out: OutputFolder, shards: list[str]) -> None:
    """``metadata.jsonl``: the shards' parts in order, streamed (one part in memory at a time)."""
    out.makedirs()
    target = out.path(METADATA) if not out.local else out.path(f".{METADATA}.tmp-export")
    with out.fs.open_output_stream(target) as stream:
        for shard in shards:
            if out.exists(f"{PARTS}/{shard}.jsonl"):
                stream.write(out.read(f"{PARTS}/{shard}.jsonl"))
    if out.local:
        out.fs.move(target, out.path(METADATA))
