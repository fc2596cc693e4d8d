"""``freecustom-pipeline score OUT``: quality scores for an existing output, written next to its shards
without touching them.

    scores/{n:05d}.parquet   one row per sample of shards/{n:05d}.tar: key, id, seed, concept_set_id,
                             the scores (``stages.scoring.score.SCORE_COLUMNS``), score_error (null when scored)
    scores/_summary.json     the models, and the score distributions overall and per concept set

A score file names (in its schema metadata) the models and the size and digest of the tar it scored;
a rerun with the same models skips shards whose score file still matches their tar. ``run --score``
writes the scores into the shards themselves; ``run_score_summary`` and ``write_rejected_table``
are its reports. The references scored against are the concept sets' final references and masks in ``references/<concept-set-id>/``
(``NN_reference.png``, ``NN_mask.png``), the same pixels the run conditioned on.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from stages.output.folder import OutputFolder
from stages.output.layout import REJECTED, REJECTED_FILE, RUN_FILE, SCORES, SHARDS
from stages.scoring.score import SCORE_COLUMNS, SCORE_NAMES, Scorer, distribution, score_arrays, summarize
from stages.scoring.score_models import ScoreModels
from stages.scoring.score_stage import SCORE_ERROR, score_samples

log = logging.getLogger(__name__)

SCORE_SUMMARY = f"{SCORES}/_summary.json"
SCORE_META = b"freecustom.scores"  # the score file's schema metadata: models and the tar it scored
CHUNK = 64  # generated images decoded and scored at a time


def score_file(shard: str) -> str:
    """``scores/<shard>.parquet`` for ``shard`` named like ``00000``."""
    return f"{SCORES}/{shard}.parquet"


def read_shard(folder: OutputFolder, shard: str, image_format: str) -> Iterator[tuple[dict, bytes | None]]:
    """A shard's samples: the metadata of each Parquet row and its image bytes from the tar (None when
    the tar lacks it)."""
    with folder.fs.open_input_file(folder.path(SHARDS, f"{shard}.parquet")) as f:
        metas = [json.loads(m) for m in pq.read_table(f, columns=["metadata"])["metadata"].to_pylist()]
    with tarfile.open(fileobj=io.BytesIO(folder.read(f"{SHARDS}/{shard}.tar"))) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for meta in metas:
            member = members.get(f"{meta['key']}.{image_format}")
            yield meta, (tar.extractfile(member).read() if member is not None else None)


def tar_record(folder: OutputFolder, shard: str) -> dict:
    """What a score (or annotation) file says of the tar it read: size, and the sha256 its done marker names."""
    record = {"size": folder.size(f"{SHARDS}/{shard}.tar")}
    marker = OutputFolder.marker(int(shard))
    if folder.exists(marker):
        record["sha256"] = ((folder.read_json(marker).get("files") or {}).get("tar") or {}).get("sha256")
    return record


def stamped(folder: OutputFolder, rel: str, stamp: dict) -> bool:
    """Whether the Parquet file ``rel`` exists and its schema metadata ``SCORE_META`` is ``stamp`` (up to date)."""
    if not folder.exists(rel):
        return False
    with folder.fs.open_input_file(folder.path(rel)) as f:
        meta = pq.read_schema(f).metadata or {}
    return json.loads(meta.get(SCORE_META, b"{}")) == stamp


def write_stamped(folder: OutputFolder, rel: str, table: pa.Table, stamp: dict) -> None:
    """``table`` as the Parquet file ``rel``, ``stamp`` in its schema metadata (see ``stamped``)."""
    table = table.replace_schema_metadata({SCORE_META: json.dumps(stamp, sort_keys=True).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    folder.write(rel, buf.getvalue())


def score_shard(folder: OutputFolder, shard: str, scorer: Scorer, image_format: str) -> pa.Table:
    """The score table of one shard (errors per sample in ``score_error``, never raised)."""
    samples = list(read_shard(folder, shard, image_format))  # image bytes (encoded): the tar's size
    metas, images = [m for m, _ in samples], [d for _, d in samples]
    results = []
    for start in range(0, len(metas), CHUNK):
        results += score_samples(scorer, folder, metas[start : start + CHUNK], images[start : start + CHUNK])
    rows = [
        {k: m.get(k) for k in ("key", "id", "seed", "concept_set_id")} | {"score_error": r.get(SCORE_ERROR)}
        for m, r in zip(metas, results, strict=True)
    ]
    scores = [r.get("scores") for r in results]
    columns = {
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "seed": pa.array([r["seed"] for r in rows], pa.int64()),
        "concept_set_id": pa.array([r["concept_set_id"] for r in rows], pa.string()),
        **score_arrays(scores),
        "score_error": pa.array([r["score_error"] for r in rows], pa.string()),
    }
    return pa.table(columns)


def read_scores(folder: OutputFolder) -> pa.Table | None:
    """Every score file of ``score OUT`` as one table (None when there is none)."""
    tables = []
    for name in folder.list(SCORES, ".parquet"):
        with folder.fs.open_input_file(folder.path(SCORES, name)) as f:
            tables.append(pq.read_table(f).replace_schema_metadata(None))
    return pa.concat_tables(tables) if tables else None


def score_output(
    folder: OutputFolder,
    models: ScoreModels,
    *,
    device: str | None = None,
    on_shard: Callable[[str, str], None] | None = None,
) -> dict:
    """Score every shard of ``folder`` not yet scored with ``models``; write the score files and
    ``scores/_summary.json``; return the summary (plus ``shards_scored``, ``shards_kept``, ``errors``).
    ``on_shard(shard, "scored" | "kept")`` reports progress."""
    if not folder.exists(RUN_FILE):
        raise ValueError(f"{folder} is not an output folder of freecustom-pipeline run (no {RUN_FILE})")
    image_format = folder.read_json(RUN_FILE).get("image_format", "png")
    scorer: Scorer | None = None  # the models load only when a shard needs them
    scored = kept = 0
    for name in folder.list(SHARDS, ".tar"):
        shard = name.removesuffix(".tar")
        if not folder.exists(f"{SHARDS}/{shard}.parquet"):
            continue
        stamp = {"models": models.identity(), "tar": tar_record(folder, shard)}
        if stamped(folder, score_file(shard), stamp):
            kept += 1
            if on_shard:
                on_shard(shard, "kept")
            continue
        scorer = scorer or Scorer(models, device)
        table = score_shard(folder, shard, scorer, image_format)
        write_stamped(folder, score_file(shard), table, stamp)
        scored += 1
        if on_shard:
            on_shard(shard, "scored")
    table = read_scores(folder)
    rows = table.to_pylist() if table is not None else []
    ok = [r for r in rows if r["score_error"] is None]
    summary = {
        "models": models.identity(),
        **summarize((r["concept_set_id"], {n: r[n] for n in SCORE_NAMES}) for r in ok),
        "errors": [
            {"key": r["key"], "reason": r["score_error"]} for r in rows if r["score_error"] is not None
        ],
    }
    folder.write_json(SCORE_SUMMARY, summary, indent=2)
    return dict(summary, shards_scored=scored, shards_kept=kept)


# --------------------------------------------------------------------------- run --score's reports

REJECTED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("id", pa.string()),
        ("seed", pa.int64()),
        ("concept_set_id", pa.string()),
        *SCORE_COLUMNS.items(),
        ("rejected_by", pa.string()),
    ]
)


def _score_rows(folder: OutputFolder, kind: str, extra: tuple[str, ...] = ()) -> list[dict]:
    """The score columns (and ``extra``) of every Parquet table in ``kind`` (``shards`` or ``rejected``)."""
    columns = ["key", "id", "seed", "concept_set_id", *SCORE_NAMES, *extra]
    rows = []
    for name in folder.list(kind, ".parquet"):
        with folder.fs.open_input_file(folder.path(kind, name)) as f:
            present = set(pq.read_schema(f).names)
            if "clip_t" in present:
                rows += pq.read_table(f, columns=[c for c in columns if c in present]).to_pylist()
    return rows


def run_score_summary(folder: OutputFolder) -> dict:
    """``_stats.json``'s ``scores``: the distributions (``stages.scoring.score.summarize``) of every scored
    sample, written and rejected, overall and per concept set."""
    rows = _score_rows(folder, SHARDS) + _score_rows(folder, REJECTED)
    return summarize(
        (r["concept_set_id"], {n: r.get(n) for n in SCORE_NAMES})
        for r in rows
        if r.get("clip_t") is not None or r.get("dino") is not None
    )


def write_rejected_table(folder: OutputFolder) -> int:
    """``rejected.parquet``: every sample under ``rejected/`` (key, id, seed, concept_set_id, the scores,
    ``rejected_by``: the thresholds it failed); returns how many."""
    rows = sorted(_score_rows(folder, REJECTED, ("rejected_by",)), key=lambda r: r["key"])
    table = pa.table(
        {f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in REJECTED_SCHEMA},
        schema=REJECTED_SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    folder.write(REJECTED_FILE, buf.getvalue())
    return len(rows)


def annotation_summary(folder: OutputFolder) -> dict:
    """``_stats.json``'s ``annotations`` (``run --annotate``): the distributions of ``presence`` (per sample
    its minimum over concepts) and ``overlap`` over every annotated sample, written and rejected."""
    rows = []
    for kind in (SHARDS, REJECTED):
        for name in folder.list(kind, ".parquet"):
            with folder.fs.open_input_file(folder.path(kind, name)) as f:
                if "overlap" in pq.read_schema(f).names:
                    rows += pq.read_table(f, columns=["presence", "overlap"]).to_pylist()
    return {
        "samples": len(rows),
        "presence": distribution(min(r["presence"]) if r["presence"] else None for r in rows),
        "overlap": distribution(r["overlap"] for r in rows),
    }
