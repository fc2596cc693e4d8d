"""The output folder's layout, and the fields of a sample beside its image and JSON.

    shards/{n:05d}.tar + .parquet   samples; under their final names only once complete (a sample's
                                    fields: <key>.<png|jpg|webp>, <key>.attn.png with --save-attention
                                    (see extra_fields), <key>.json)
    rejected/{n:05d}.tar + .parquet samples of shard n a --min-score threshold rejected (same layout)
    rejected.parquet                every rejected sample: key, id, seed, concept_set_id, scores, rejected_by
    scores/{n:05d}.parquet          `score OUT`: scores of shard n's samples (scores/_summary.json)
    annotations/{n:05d}.parquet     `score --annotate OUT`: where each concept landed in shard n's samples
    review/                         `review OUT`: the static gallery
    _progress/{n:05d}.json          a shard's done marker, written last (resume reads these)
    references/<concept-set-id>/    reference previews and contact sheets
    _kv/                            the run's reference K/V store (removed once the run is complete)
    _plan/<key>.parquet             each manifest file's plan: its shards' rows (.errors.parquet: its
                                    refused rows; .ids.parquet: its ids' hashes), kept with the output
    errors.parquet                  one row per failed manifest row
    README.md                       a dataset card (its configs point readers at the shards)
    _run.json                       what the output depends on (a rerun with other settings is refused)
    _stats.json                     counts and timings, written at the end of every run

Every name above is spelled here and nowhere else; every file the pipeline writes into OUT goes
through ``OutputFolder`` (``stages.output.folder``).
"""

from __future__ import annotations

import uuid

import pyarrow as pa

SHARDS, PROGRESS, REFERENCES, KV_STORE = "shards", "_progress", "references", "_kv"
PLAN = "_plan"  # each manifest file's plan (pipeline.part_plan): kept while OUT holds the run
RUN_FILE, STATS_FILE, ERRORS_FILE = "_run.json", "_stats.json", "errors.parquet"
CARD_FILE = "README.md"  # a dataset card: `datasets.load_dataset(OUT)` loads the samples
REJECTED, REJECTED_FILE = "rejected", "rejected.parquet"  # run --min-score
SCORES, REVIEW = "scores", "review"  # score OUT, review OUT
ANNOTATED_DIR = "annotations"  # score --annotate OUT
FOLDERS = (SHARDS, PROGRESS, REFERENCES, KV_STORE, REJECTED, SCORES, REVIEW, ANNOTATED_DIR, PLAN)
FILES = (RUN_FILE, STATS_FILE, ERRORS_FILE, CARD_FILE, REJECTED_FILE)
# a marker's files: name in the marker -> where it is, by shard id
MARKED_FILES = {
    "tar": lambda n: f"{SHARDS}/{shard_name(n)}.tar",
    "parquet": lambda n: f"{SHARDS}/{shard_name(n)}.parquet",
    "rejected_tar": lambda n: f"{REJECTED}/{shard_name(n)}.tar",
    "rejected_parquet": lambda n: f"{REJECTED}/{shard_name(n)}.parquet",
}
TMP_MARK = ".tmp-"  # in every temporary name: ".NAME.tmp-XXXXXXXX"
PROBE_PREFIX = ".freecustom-probe-"  # stages.output.probe's files: OUT sees one while a run is on
# run --save-attention: the WebDataset field <key>.attn.png (one heat-map panel per concept, left to right
# in concept order, each the image's size, freecustom_core.heatmap.GAP white pixels apart); the sample's
# JSON names it in "attention"
ATTENTION_FILE = "attn.png"
# run --embed-references (stages.generation.embed): <key>.ref{i}.png and <key>.ref{i}.mask.png per concept, named by the
# JSON's "embedded_references"; run --annotate (stages.generation.annotate): <key>.ann{i}.mask.png per concept, named by
# the JSON's "annotations"
EMBEDDED, ANNOTATIONS = "embedded_references", "annotations"

ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("row", pa.int64()), ("stage", pa.string()), ("field", pa.string()),
                          ("reason", pa.string()), ("seeds", pa.list_(pa.int64()))])


def control_file(k: int) -> str:
    """The field of the condition fed to ControlNet ``k`` (``run --controlnet``): ``control.png``, ``control1.png``..."""
    return "control.png" if k == 0 else f"control{k}.png"


def reference_field(i: int) -> str:
    """Concept ``i``'s reference as the engine took it (``run --embed-references``)."""
    return f"ref{i}.png"


def reference_mask_field(i: int) -> str:
    """Concept ``i``'s reference mask as the engine took it (``run --embed-references``)."""
    return f"ref{i}.mask.png"


def annotation_mask_field(i: int) -> str:
    """Where concept ``i`` landed in the generated image (``run --annotate``)."""
    return f"ann{i}.mask.png"


def extra_fields(meta: dict) -> list[str]:
    """A sample's WebDataset fields besides its image and JSON, as its metadata names them:
    ``attention.file`` (``ATTENTION_FILE``, with ``--save-attention``), then one ``control_file(k)`` per
    ControlNet source (with ``--controlnet``), then ``ref{i}.png`` and ``ref{i}.mask.png`` per concept
    (``embedded_references``, with ``--embed-references``), then each annotation's mask (``annotations``,
    with ``--annotate``)."""
    fields = [meta["attention"]["file"]] if "attention" in meta else []
    if "control" in meta:
        fields += [control_file(k) for k in range(len(meta["control"]["sources"]))]
    if meta.get(EMBEDDED):
        entry = meta[EMBEDDED]
        fields += [name for pair in zip(entry["images"], entry["masks"], strict=True) for name in pair]
    fields += [a["mask"] for a in meta.get(ANNOTATIONS) or []]
    return fields



def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def temporary_name(name: str) -> str:
    return f".{name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
