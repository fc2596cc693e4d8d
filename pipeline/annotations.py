"""``freecustom-pipeline score --annotate OUT``: where each concept landed, for an existing output, written
next to its shards without touching them.

    annotations/{n:05d}.parquet   one row per sample of shards/{n:05d}.tar: key, id, seed, concept_set_id,
                                  annotations (the JSON list ``run --annotate`` writes into a sample),
                                  boxes, annotation_masks, confidence, presence, overlap, masks (the mask
                                  PNGs, concept order), annotation_error (null when annotated)

The annotations are drawn from each sample's saved attention maps, ``<key>.attn.png``: the output must
have been written with ``run --save-attention`` (the maps are not recomputed: that would need the model,
the K/V and a second denoising pass per sample). A sample without them gets ``annotation_error``. The
rule is ``stages.generation.annotate``'s, the same as ``run --annotate``'s, so both give the same annotations for
the same maps. A file names (in its schema metadata) the refinement models and the tar it read; a
rerun with the same models skips shards whose file still matches their tar.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.scoring import stamped, tar_record, write_stamped
from stages.generation.annotate import annotate_sample
from stages.masks.segment import SegmentConfig, Segmenter
from stages.output.folder import OutputFolder
from stages.output.layout import ANNOTATED_DIR, ATTENTION_FILE, RUN_FILE, SHARDS
from stages.scoring.score import distribution

ANNOTATION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("id", pa.string()),
        ("seed", pa.int64()),
        ("concept_set_id", pa.string()),
        ("annotations", pa.string()),
        ("boxes", pa.list_(pa.list_(pa.int64()))),
        ("annotation_masks", pa.list_(pa.string())),
        ("confidence", pa.list_(pa.float64())),
        ("presence", pa.list_(pa.float64())),
        ("overlap", pa.float64()),
        ("masks", pa.list_(pa.binary())),
        ("annotation_error", pa.string()),
    ]
)


def annotation_file(shard: str) -> str:
    """``annotations/<shard>.parquet`` for ``shard`` named like ``00000``."""
    return f"{ANNOTATED_DIR}/{shard}.parquet"


def annotate_row(
    meta: dict, members: dict[str, bytes], image_format: str, segmenter: Segmenter | None
) -> dict:
    """One row of ``ANNOTATION_SCHEMA`` for a sample (its error in ``annotation_error``, never raised)."""
    row = {k: meta.get(k) for k in ("key", "id", "seed", "concept_set_id")}
    attention = members.get(f"{meta['key']}.{ATTENTION_FILE}")
    if "attention" not in meta or attention is None:
        return dict(
            row, annotation_error=f"no {ATTENTION_FILE}: the output was not written with run --save-attention"
        )
    try:
        image = None
        if segmenter is not None:
            image = Image.open(io.BytesIO(members[f"{meta['key']}.{image_format}"])).convert("RGB")
        fields, masks = annotate_sample(meta, attention, image, segmenter)
    except (OSError, ValueError, KeyError) as e:
        return dict(row, annotation_error=f"{type(e).__name__}: {e}")
    notes = fields["annotations"]
    return dict(
        row,
        annotations=json.dumps(notes),
        boxes=[a["box"] for a in notes],
        annotation_masks=[a["mask"] for a in notes],
        confidence=[a["confidence"] for a in notes],
        presence=fields["presence"],
        overlap=fields["overlap"],
        masks=[masks[a["mask"]] for a in notes],
    )


def annotate_shard(
    folder: OutputFolder, shard: str, image_format: str, segmenter: Segmenter | None
) -> pa.Table:
    """The annotation table of one shard."""
    with folder.fs.open_input_file(folder.path(SHARDS, f"{shard}.parquet")) as f:
        metas = [json.loads(m) for m in pq.read_table(f, columns=["metadata"])["metadata"].to_pylist()]
    with tarfile.open(fileobj=io.BytesIO(folder.read(f"{SHARDS}/{shard}.tar"))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    rows = [annotate_row(m, members, image_format, segmenter) for m in metas]
    return pa.table(
        {f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in ANNOTATION_SCHEMA},
        schema=ANNOTATION_SCHEMA,
    )


def read_annotations(folder: OutputFolder, shard: str) -> dict[str, dict]:
    """``score --annotate``'s rows of one shard by key (empty without a file)."""
    if not folder.exists(annotation_file(shard)):
        return {}
    with folder.fs.open_input_file(folder.path(annotation_file(shard))) as f:
        return {r["key"]: r for r in pq.read_table(f).to_pylist()}


def annotate_output(
    folder: OutputFolder,
    segment: SegmentConfig | None = None,
    *,
    on_shard: Callable[[str, str], None] | None = None,
) -> dict:
    """Annotate every shard of ``folder`` not yet annotated with these refinement models; write the
    annotation files; return a summary: ``samples``, ``presence`` and ``overlap`` distributions,
    ``errors`` (key, reason), ``shards_annotated``, ``shards_kept``. ``segment``: SAM and/or the
    detector to refine with (None: attention only)."""
    if not folder.exists(RUN_FILE):
        raise ValueError(f"{folder} is not an output folder of freecustom-pipeline run (no {RUN_FILE})")
    run = folder.read_json(RUN_FILE)
    if not run.get("save_attention"):
        raise ValueError(
            f"{folder}: score --annotate reads the attention maps (<key>.{ATTENTION_FILE}) that "
            "run --save-attention writes, and this output was written without it; rerun it with "
            "--save-attention (or --annotate) into another folder"
        )
    refines = segment is not None and (segment.sam_checkpoint is not None or segment.detector is not None)
    segmenter: Segmenter | None = None  # loaded only when a shard needs it
    done = kept = 0
    rows: list[dict] = []
    for name in folder.list(SHARDS, ".parquet"):
        shard = name.removesuffix(".parquet")
        stamp = {"refine": segment.to_dict() if refines else None, "tar": tar_record(folder, shard)}
        what = "kept"
        if stamped(folder, annotation_file(shard), stamp):
            kept += 1
        else:
            segmenter = segmenter or (Segmenter(segment) if refines else None)
            table = annotate_shard(folder, shard, run.get("image_format", "png"), segmenter)
            write_stamped(folder, annotation_file(shard), table, stamp)
            done, what = done + 1, "annotated"
        if on_shard:
            on_shard(shard, what)
        with folder.fs.open_input_file(
            folder.path(annotation_file(shard))
        ) as f:  # the summary's columns only
            rows += pq.read_table(f, columns=["key", "presence", "overlap", "annotation_error"]).to_pylist()
    ok = [r for r in rows if r["annotation_error"] is None]
    return {
        "samples": len(ok),
        "presence": distribution(min(r["presence"]) if r["presence"] else None for r in ok),
        "overlap": distribution(r["overlap"] for r in ok),
        "errors": [{"key": r["key"], "reason": r["annotation_error"]} for r in rows if r["annotation_error"]],
        "shards_annotated": done,
        "shards_kept": kept,
    }
