"""Stage: score a shard's samples after generation, before writing (``run --score``), and route the
samples a ``--min-score`` threshold rejects out of the shard.

Input and output: the generation stage's rows (``generate.shard_row``). Each sample's metadata gets
``scores`` (``stages.scoring.score``); a sample below a threshold (a per-concept score's minimum over
concepts) gets ``rejected_by`` (e.g. ``["clip_t<20"]``) and moves from ``tar`` / ``metas`` to
``rejected_tar`` / ``rejected_metas``, which the write stage stores under ``rejected/``, with its
further fields (``<key>.attn.png``: ``stages.output.layout.extra_fields``). A sample
that cannot be scored (its concept set's references unreadable) gets ``score_error`` and, with
thresholds, is rejected by ``score_error`` (nothing unchecked passes a filter). The references are
the concept sets' final references and masks in ``references/<concept-set-id>/``.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile

from PIL import Image

from ..generation.embed import load_references
from ..generation.shard import pack_shard
from ..output.folder import OutputFolder
from .score import SIGNAL_NAMES, Scorer, failed_thresholds
from .score_models import ScoreModels

logger = logging.getLogger(__name__)

SCORE_ERROR = "score_error"
RUN_ADDED = ("scores", SCORE_ERROR, "rejected_by")  # what this stage adds to a sample's metadata


def score_samples(
    scorer: Scorer, folder: OutputFolder, metas: list[dict], images: list[bytes | None]
) -> list[dict]:
    """Per sample ``{"scores": ...}`` or ``{"score_error": reason}`` (never raised): its image (None:
    missing) against its concept set's references in ``folder``, with its prompt."""
    results: list[dict] = [{} for _ in metas]
    todo = []
    for i, (meta, data) in enumerate(zip(metas, images, strict=True)):
        cs = meta.get("concept_set_id")
        try:
            if data is None:
                raise ValueError(f"no image for sample {meta.get('key')}")
            refs = scorer.references(cs, lambda cs=cs: load_references(folder, cs))
            if refs.concepts != len(meta.get("concepts") or []):
                raise ValueError(
                    f"concept set {cs}: {refs.concepts} references for {len(meta['concepts'])} concepts"
                )
            todo.append((i, Image.open(io.BytesIO(data)).convert("RGB"), refs))
        except (OSError, ValueError, KeyError) as e:
            results[i][SCORE_ERROR] = str(e)
            logger.warning("%s: not scored: %s", meta.get("key"), e)
    if todo:
        scores = scorer.score(
            [t[1] for t in todo], [metas[t[0]]["prompt"] for t in todo], [t[2] for t in todo]
        )
        for (i, _, _), s in zip(todo, scores, strict=True):
            results[i]["scores"] = s
    return results


def tar_members(tar_bytes: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


class ScoreStage:
    """The stage (beside the generator, in its actor: it shares its GPU). ``thresholds``: score name
    -> minimum (``--min-score``; ``NAME<`` -> upper bound, see ``stages.scoring.score.parse_min_score``); empty:
    score only. ``models`` None: no scores, only thresholds over ``run --annotate``'s ``presence`` and
    ``overlap`` (``SIGNAL_NAMES``, read from the sample's JSON)."""

    def __init__(
        self,
        models: ScoreModels | None,
        out_dir: str,
        *,
        image_format: str = "png",
        thresholds: dict[str, float] | None = None,
        device: str | None = None,
    ):
        self.scorer = Scorer(models, None if device in (None, "auto") else device) if models is not None else None
        self.out = OutputFolder(out_dir)
        self.image_format = image_format
        self.thresholds = dict(thresholds or {})

    def score_metas(self, metas: list[dict], images: list[bytes]) -> list[dict]:
        """``metas`` with ``scores`` (or ``score_error``) and, below a threshold, ``rejected_by``."""
        results = score_samples(self.scorer, self.out, metas, images) if self.scorer else [{} for _ in metas]
        # a sample copied by --reuse from a scored output: this run's scores replace the old ones
        out = [
            {k: v for k, v in m.items() if k not in RUN_ADDED} | r
            for m, r in zip(metas, results, strict=True)
        ]
        for meta in out:
            if self.thresholds:
                failed = (
                    [SCORE_ERROR]
                    if SCORE_ERROR in meta
                    else failed_thresholds(
                        dict(meta.get("scores") or {}, **{k: meta.get(k) for k in SIGNAL_NAMES}), self.thresholds
                    )
                )
                if failed:
                    meta["rejected_by"] = failed
        return out

    def __call__(self, batch: dict) -> dict:
        out = {k: list(v) for k, v in batch.items()}
        out["rejected_tar"], out["rejected_metas"] = [], []
        for j, (tar, metas) in enumerate(zip(batch["tar"], batch["metas"], strict=True)):
            metas = json.loads(metas)
            members = tar_members(bytes(tar))
            images = [members[f"{m['key']}.{self.image_format}"] for m in metas]
            scored = self.score_metas(metas, images) if metas else []
            kept = [
                (m["key"], self.image_format, img, m)
                for m, img in zip(scored, images, strict=True)
                if "rejected_by" not in m
            ]
            rejected = [
                (m["key"], self.image_format, img, m)
                for m, img in zip(scored, images, strict=True)
                if "rejected_by" in m
            ]
            out["tar"][j] = pack_shard(kept, members)
            out["metas"][j] = json.dumps([s[3] for s in kept])
            out["rejected_tar"].append(pack_shard(rejected, members) if rejected else b"")
            out["rejected_metas"].append(json.dumps([s[3] for s in rejected]))
        return out
