"""The samples of an output as the review gallery shows them (``Sample``, grouped by concept set in
``ConceptSetPage``): read from the shards' and rejected Parquet tables with their scores and annotations
(``read_samples``), each with the further fields it carries (``extras_of``)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline.annotations import read_annotations
from pipeline.scoring import score_file
from stages.output.folder import OutputFolder
from stages.output.layout import ANNOTATIONS, REJECTED, SHARDS, control_file, extra_fields
from stages.scoring.score import SCORE_NAMES

# the gallery's folders (a sample's thumbnails are under THUMBS)
THUMBS, CONTACT, DATA, SETS, ASSETS = "thumbs", "contact", "data", "sets", "assets"
TRAINING_FIELD = re.compile(r"^(ref|ann)(\d+)(\.mask)?\.png$")  # ref0.png, ref0.mask.png, ann0.mask.png


@dataclass(frozen=True)
class Extra:
    """A further field of a sample (``stages.output.layout.extra_fields``) as the gallery shows it: a labelled
    thumbnail ``<key>.<thumb>`` under the sample's, of class ``kind``, with alt text (``{key}``: the
    sample's key)."""

    field: str  # the WebDataset field: attn.png, control.png, control1.png...
    label: str  # attention, control, control 1...
    kind: str  # attn, control or extra: the thumbnail's class
    alt: str

    @property
    def thumb(self) -> str:
        """Its thumbnail's name after the key: attn.png -> attn.jpg."""
        return self.field.rsplit(".", 1)[0] + ".jpg"


ATTENTION_ALT = (
    "Attention maps of sample {key}: one panel per concept, left to right in concept order "
    "(black: no attention, white: all of it)"
)


def _control_extra(field: str, k: int, sources: list[dict]) -> Extra:
    """Condition ``k`` of ``sources`` (a sample's ``control.sources``): labelled as its field is named."""
    source = sources[k]
    if source.get("type") == "canny":
        low, high = source.get("canny_low"), source.get("canny_high")
        thresholds = f" (thresholds {low:g}/{high:g})" if low is not None else ""
        what = f"the canny map{thresholds} of its control image"
    else:
        what = "its control image as given"
    net = "the ControlNet" if len(sources) == 1 else f"ControlNet {k + 1} of {len(sources)}"
    label = "control" + (f" {k}" if k else "")
    return Extra(field, label, "control", f"Control condition of sample {{key}}: {what}, fed to {net}")


def extras_of(meta: dict) -> tuple[Extra, ...]:
    """The further fields a sample's metadata names, in ``extra_fields``'s order."""
    attention = (meta.get("attention") or {}).get("file")
    sources = (meta.get("control") or {}).get("sources") or []
    controls = {control_file(k): k for k in range(len(sources))}
    extras = []
    for name in extra_fields(meta):
        if name == attention:
            extras.append(Extra(name, "attention", "attn", ATTENTION_ALT))
        elif name in controls:
            extras.append(_control_extra(name, controls[name], sources))
        elif (match := TRAINING_FIELD.match(name)) is not None:  # --embed-references, --annotate
            what, i, mask = match.groups()
            if what == "ref":
                kind = "reference mask" if mask else "reference"
                extras.append(
                    Extra(name, f"{kind} {i}", "training", f"{kind.capitalize()} {i} of sample {{key}}")
                )
            else:
                extras.append(
                    Extra(name, f"landed {i}", "training", f"Where concept {i} landed in sample {{key}}")
                )
        else:  # a field this gallery does not know yet
            extras.append(Extra(name, name.rsplit(".", 1)[0], "extra", f"Field {name} of sample {{key}}"))
    return tuple(extras)


@dataclass
class Sample:
    """One sample as the gallery shows it."""

    key: str
    seed: int
    prompt: str
    concept_set_id: str
    thumb_dir: str  # thumbs/<kind>/<shard>
    rejected: str | None = None  # the thresholds it failed
    scores: dict | None = None
    extras: tuple[Extra, ...] = ()  # further fields of its tar (attention maps, control conditions)
    boxes: list | None = None  # run --annotate / score --annotate: [x0, y0, x1, y1] per concept, image pixels
    size: tuple[int, int] = (0, 0)  # the image's width and height (what the boxes are in)


@dataclass
class ConceptSetPage:
    concept_set_id: str
    samples: list[Sample] = field(default_factory=list)


def _read_parquet(folder: OutputFolder, rel: str, columns: list[str] | None = None):
    with folder.fs.open_input_file(folder.path(rel)) as f:
        if columns is None:
            return pq.read_table(f)
        names = set(pq.read_schema(f).names)
        return pq.read_table(f, columns=[c for c in columns if c in names])


def _tar_version(folder: OutputFolder, kind: str, shard: str, markers: dict) -> str:
    """What names a tar's thumbnails: its sha256 as its marker names it (else its size), so a shard
    rewritten with other samples (``--overwrite``) gets new thumbnails."""
    files = (markers.get(int(shard)) or {}).get("files") or {}
    digest = (files.get("tar" if kind == SHARDS else "rejected_tar") or {}).get("sha256")
    return digest[:12] if digest else f"s{folder.size(f'{kind}/{shard}.tar')}"


def read_samples(folder: OutputFolder) -> list[Sample]:
    """Every sample of ``shards/`` and ``rejected/`` with its scores (see the module's docstring)."""
    wanted = ["key", "seed", "prompt", "concept_set_id", "rejected_by", "metadata", *SCORE_NAMES]
    samples = []
    markers = folder.read_markers()
    for kind in (SHARDS, REJECTED):
        for name in folder.list(kind, ".parquet"):
            shard = name.removesuffix(".parquet")
            if not folder.exists(f"{kind}/{shard}.tar"):
                continue
            version = _tar_version(folder, kind, shard, markers)
            rows = _read_parquet(folder, f"{kind}/{name}", wanted).to_pylist()
            later = read_annotations(folder, shard) if kind == SHARDS else {}  # score --annotate
            scored = {}
            if kind == SHARDS and rows and "clip_t" not in rows[0] and folder.exists(score_file(shard)):
                for r in _read_parquet(folder, score_file(shard)).to_pylist():
                    if r.get("score_error") is None:
                        scored[r["key"]] = {n: r.get(n) for n in SCORE_NAMES}
            for r in rows:
                scores = {n: r[n] for n in SCORE_NAMES if n in r} or scored.get(r["key"])
                meta = json.loads(r.get("metadata") or "{}")
                notes = annotation_signals(meta, later.get(r["key"]))
                if notes is not None:
                    scores = dict(scores or {}, presence=notes["presence"], overlap=notes["overlap"])
                rejected = (r.get("rejected_by") or "rejected") if kind == REJECTED else None
                samples.append(
                    Sample(
                        r["key"],
                        int(r["seed"]),
                        r["prompt"],
                        r["concept_set_id"],
                        f"{THUMBS}/{kind}/{shard}-{version}",
                        rejected,
                        scores,
                        extras_of(meta),
                        notes["boxes"] if notes is not None else None,
                        (int(meta.get("width") or 0), int(meta.get("height") or 0)),
                    )
                )
    return samples


def annotation_signals(meta: dict, later: dict | None) -> dict | None:
    """A sample's ``boxes``, ``presence`` and ``overlap``: from its JSON (``run --annotate``), else from
    ``score --annotate``'s row ``later``; None when it has none."""
    if meta.get(ANNOTATIONS):
        return {
            "boxes": [a["box"] for a in meta[ANNOTATIONS]],
            "presence": meta["presence"],
            "overlap": meta["overlap"],
        }
    if later is not None and later.get("annotation_error") is None:
        return {"boxes": later["boxes"], "presence": later["presence"], "overlap": later["overlap"]}
    return None
