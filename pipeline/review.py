"""``freecustom-pipeline review OUT [-o DIR]``: a static review gallery of an output (no server: it
opens from disk, or from object storage, with relative links only and no external resource).

    index.html                  the concept sets: contact sheet, sample and rejected counts, score summary
    sets/<concept-set-id>.html  its samples as thumbnails with prompt, seed, scores, a rejected marker;
                                sorted, filtered by score and paged (100 a page) in the browser
    data/<concept-set-id>.js    the page's samples, as columns (window.REVIEW_DATA)
    thumbs/<shards|rejected>/<shard>-<tar digest>/<key>.jpg   thumbnails (THUMB_SIZE px), made
                                once per tar: a rerun makes only those missing; <key>.<field>.jpg: one
                                of each further field ``extra_fields`` names (attention panels of run
                                --save-attention, control conditions of run --controlnet, references,
                                reference masks and concept masks of --embed-references / --annotate),
                                shown under it; the boxes of --annotate drawn over it (a checkbox)
    contact/<concept-set-id>.jpg                 the concept set's contact sheet, scaled down
    assets/review.css, review.js                 the page's style and behaviour

Scores come from the shard Parquet's score columns (``run --score``) or else from ``scores/``
(``score OUT``); samples a ``--min-score`` threshold rejected come from ``rejected/``. Only one page
of thumbnails is in the document at a time, so a concept set of 100k samples opens in about a second.
"""

from __future__ import annotations

import html
import io
import json
import os
import tarfile
import uuid
from pathlib import Path

from PIL import Image

from pipeline.report import concept_sets, rows_text
from pipeline.review_samples import ASSETS, CONTACT, DATA, SETS, ConceptSetPage, Sample, read_samples
from stages.output.folder import OutputFolder
from stages.output.layout import REVIEW, RUN_FILE
from stages.scoring.score import PER_CONCEPT, SCORE_NAMES, SIGNAL_NAMES, summarize

THUMB_SIZE = 160
CONTACT_WIDTH = 480
PAGE_SIZE = 100
ASSET_FILES = ("review.css", "review.js")
ASSET_DIR = Path(__file__).with_name("review_assets")


class Site:
    """The site's folder: local writes go straight to a temporary name and are renamed (thumbnails are
    many and small); elsewhere through ``OutputFolder``."""

    def __init__(self, location: str):
        self.folder = OutputFolder(location, option="-o/--output")

    def put(self, rel: str, data: bytes) -> None:
        if not self.folder.local:
            self.folder.write(rel, data)
            return
        path = Path(self.folder.path(rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def existing(self, rel: str) -> set[str]:
        return set(self.folder.list(rel))


def _jpeg(image: Image.Image, max_side: int, *, width_only: bool = False) -> bytes:
    image = image.convert("RGB")
    scale = max_side / image.width if width_only else max_side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_thumbnails(folder: OutputFolder, site: Site, samples: list[Sample], image_format: str) -> int:
    """Thumbnails of the samples that have none yet (and of their further fields, ``<key>.<field>.jpg``,
    when they have them); each shard's tar is read only when one is missing. Returns how many sample
    thumbnails were made (further fields' not counted)."""
    by_dir: dict[str, list[Sample]] = {}
    for s in samples:
        by_dir.setdefault(s.thumb_dir, []).append(s)
    made = 0
    for thumb_dir, dir_samples in by_dir.items():
        have = site.existing(thumb_dir)
        missing = [  # (thumbnail name, tar member, is the sample's own)
            (name, member, own)
            for s in dir_samples
            for name, member, own in (
                (f"{s.key}.jpg", f"{s.key}.{image_format}", True),
                *((f"{s.key}.{e.thumb}", f"{s.key}.{e.field}", False) for e in s.extras),
            )
            if name not in have
        ]
        if not missing:
            continue
        kind, shard = thumb_dir.split("/")[1], thumb_dir.split("/")[2].split("-")[0]
        with tarfile.open(fileobj=io.BytesIO(folder.read(f"{kind}/{shard}.tar"))) as tar:
            for name, member, own in missing:
                try:
                    data = tar.extractfile(member)
                except KeyError:
                    continue  # the page shows its alt text
                with Image.open(data) as image:
                    site.put(f"{thumb_dir}/{name}", _jpeg(image, THUMB_SIZE))
                made += own
    return made


def _round(v):
    if v is None:
        return None
    if isinstance(v, list):
        return [_round(x) for x in v]
    return float(f"{v:.5g}")


def page_data(concept_set_id: str, samples: list[Sample], concepts: int) -> dict:
    """``window.REVIEW_DATA`` of a concept set's page: samples as columns, prompts listed once."""
    prompts = list(dict.fromkeys(s.prompt for s in samples))
    prompt_index = {p: i for i, p in enumerate(prompts)}
    dirs = list(dict.fromkeys(s.thumb_dir for s in samples))
    dir_index = {d: i for i, d in enumerate(dirs)}
    extras = list(dict.fromkeys(e for s in samples for e in s.extras))
    extra_index = {e: i for i, e in enumerate(extras)}
    annotated = any(s.boxes is not None for s in samples)
    names = score_names(annotated)
    return {
        "concept_set": concept_set_id,
        "concepts": concepts,
        "scores": names,
        "per_concept": list(PER_CONCEPT),
        "page_size": PAGE_SIZE,
        "thumb_size": THUMB_SIZE,
        "prompts": prompts,
        "thumb_dirs": dirs,
        # further fields: {thumb, label, kind, alt}, listed once; a sample's "extras" index them
        "extras": [{"thumb": e.thumb, "label": e.label, "kind": e.kind, "alt": e.alt} for e in extras],
        "samples": {
            "key": [s.key for s in samples],
            "seed": [s.seed for s in samples],
            "prompt": [prompt_index[s.prompt] for s in samples],
            "dir": [dir_index[s.thumb_dir] for s in samples],
            "rejected": [s.rejected for s in samples],
            "scores": {n: [_round((s.scores or {}).get(n)) for s in samples] for n in names},
            # the sample's further fields, in order, as indexes into "extras"; only when some sample has them
            **({"extras": [[extra_index[e] for e in s.extras] for s in samples]} if extras else {}),
            # where each concept landed (drawn over the thumbnail) and the image's size; only when annotated
            **(
                {"boxes": [s.boxes for s in samples], "size": [list(s.size) for s in samples]}
                if annotated
                else {}
            ),
        },
    }


def _head(title: str, prefix: str) -> str:
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n"
        f'<link rel="stylesheet" href="{prefix}{ASSETS}/review.css">\n</head>\n'
    )


def _summary_table(summary: dict | None) -> str:
    if not summary or not summary.get("samples"):
        return '<p class="muted">No scores (run <code>freecustom-pipeline score OUT</code>).</p>'
    rows = []
    for name in SCORE_NAMES:
        d = summary[name]
        if not d["n"]:
            continue
        cells = "".join(f"<td>{d[k]:.4g}</td>" for k in ("mean", "p05", "p50", "p95"))
        label = name + ("*" if name in PER_CONCEPT else "")
        rows.append(f"<tr><td>{label}</td><td>{d['n']}</td>{cells}</tr>")
    return (
        '<table class="summary"><caption class="muted">Scores (* per concept: minimum over concepts)</caption>'
        '<thead><tr><th scope="col">score</th><th scope="col">n</th><th scope="col">mean</th>'
        '<th scope="col">p05</th><th scope="col">p50</th><th scope="col">p95</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _set_name(entry: dict | None) -> str:
    """A concept set as a person tells it apart: its concepts' prompts, escaped ("" when unknown)."""
    return html.escape(" + ".join(entry["concepts"])) if entry and entry.get("concepts") else ""


def _set_rows(entry: dict | None) -> str:
    """The paragraph naming the rows that use a concept set."""
    if not entry or not entry.get("rows"):
        return ""
    return f'<p class="rows">rows: {html.escape(rows_text(entry["rows"]))}</p>'


def index_html(out: str, pages: list[ConceptSetPage], summaries: dict, contact: set[str],
               described: dict | None = None) -> str:
    """The gallery's front page; ``described``: ``pipeline.report.concept_sets`` (concepts and rows per set)."""
    described = described or {}
    total = sum(len(p.samples) for p in pages)
    rejected = sum(s.rejected is not None for p in pages for s in p.samples)
    items = []
    for p in pages:
        cs = html.escape(p.concept_set_id)
        n_rej = sum(s.rejected is not None for s in p.samples)
        image = (
            f'<img src="{CONTACT}/{cs}.jpg" alt="Contact sheet of concept set {cs}: each concept\'s reference, '
            f'mask and composite" loading="lazy">'
            if p.concept_set_id in contact
            else '<p class="muted">no contact sheet</p>'
        )
        items.append(
            f'<li class="set" data-concept-set="{cs}"><div>{image}</div><div>'
            f'<h2><a href="{SETS}/{cs}.html">{_set_name(described.get(p.concept_set_id)) or "Concept set " + cs}</a>'
            f' <code class="muted">{cs}</code></h2>{_set_rows(described.get(p.concept_set_id))}'
            f'<p><span class="samples" data-samples="{len(p.samples)}">{len(p.samples)} samples</span>, '
            f'<span data-rejected="{n_rej}">{n_rej} rejected</span></p>'
            f"{_summary_table(summaries.get(p.concept_set_id))}</div></li>"
        )
    return (
        _head("Review: " + out, "")
        + "<body>\n<header><h1>Review of <code>"
        + html.escape(out)
        + "</code></h1>"
        + f'<p id="totals" data-samples="{total}" data-rejected="{rejected}">{len(pages)} concept sets, '
        + f"{total} samples, {rejected} rejected</p>"
        + '<p id="missing" role="status" class="muted"></p></header>\n'
        + '<main><ul class="sets" aria-label="Concept sets">'
        + "\n".join(items)
        + f'</ul></main>\n<script src="{ASSETS}/review.js"></script>\n</body>\n</html>\n'
    )


def score_names(annotated: bool) -> list[str]:
    """What a page sorts and filters by: the scores, and with annotations ``presence`` and ``overlap``."""
    return list(SCORE_NAMES) + (list(SIGNAL_NAMES) if annotated else [])


def set_html(concept_set_id: str, n: int, contact: bool, entry: dict | None = None, annotated: bool = False) -> str:
    """A concept set's page; ``entry``: its concepts and rows (``pipeline.report.concept_sets``)."""
    cs = html.escape(concept_set_id)
    options = "".join(f'<option value="{s}">{s}</option>' for s in score_names(annotated))
    boxes = (
        (
            '<label>Boxes<span><input id="show-boxes" type="checkbox" checked> where each concept landed'
            "</span></label>"
        )
        if annotated
        else ""
    )

    def pager(suffix: str) -> str:
        return (
            f'<nav class="pager" aria-label="Pages{" (bottom)" if suffix else ""}">'
            f'<button type="button" id="prev{suffix}" aria-label="Previous page">&larr; Previous</button>'
            f'<span id="page-info{suffix}" aria-live="polite"></span>'
            f'<button type="button" id="next{suffix}" aria-label="Next page">Next &rarr;</button></nav>'
        )

    return (
        _head(f"Concept set {concept_set_id}", "../")
        + '<body>\n<header><p><a href="../index.html">&larr; All concept sets</a></p>'
        + f"<h1>{_set_name(entry) or 'Concept set'} <code>{cs}</code></h1>{_set_rows(entry)}"
        + (
            f'<p><img src="../{CONTACT}/{cs}.jpg" alt="Contact sheet of concept set {cs}" height="120"></p>'
            if contact
            else ""
        )
        + f'<p id="count" role="status" aria-live="polite">{n} samples</p>'
        + '<p id="missing" role="status" class="muted"></p></header>\n<main>'
        + '<form class="controls" aria-label="Sort and filter" onsubmit="return false">'
        + '<label>Sort by<select id="sort"><option value="key">key</option><option value="seed">seed</option>'
        + f"{options}</select></label>"
        + '<label>Order<select id="dir"><option value="asc">ascending</option>'
        + '<option value="desc">descending</option></select></label>'
        + f'<label>Filter on<select id="filter"><option value="">(no filter)</option>{options}</select></label>'
        + '<label>Minimum<input id="min" type="number" step="any" inputmode="decimal"></label>'
        + '<label>Show<select id="status"><option value="all">all</option><option value="accepted">accepted</option>'
        + '<option value="rejected">rejected</option></select></label>'
        + boxes
        + "</form>"
        + pager("")
        + '<p class="muted">Arrow keys move between samples; Page Up / Page Down turn pages. '
        + "* per concept: one value per concept; sorting and filtering use their minimum.</p>"
        + f'<ol id="samples" class="grid" tabindex="-1" aria-label="Samples of concept set {cs}"></ol>'
        + pager("-bottom")
        + f'</main>\n<script src="../{DATA}/{cs}.js"></script>\n'
        + f'<script src="../{ASSETS}/review.js"></script>\n</body>\n</html>\n'
    )


def write_set_page(site: Site, concept_set_id: str, samples: list[Sample], *, contact: bool = False,
                   entry: dict | None = None) -> None:
    """A concept set's page and its data file (``contact``: the site has its contact sheet; ``entry``: its
    concepts and rows)."""
    concepts = max(
        (len(v) for s in samples for v in (s.scores or {}).values() if isinstance(v, list)), default=0
    )
    data = json.dumps(page_data(concept_set_id, samples, concepts), separators=(",", ":"))
    site.put(f"{DATA}/{concept_set_id}.js", f"window.REVIEW_DATA = {data};\n".encode())
    annotated = any(s.boxes is not None for s in samples)
    site.put(
        f"{SETS}/{concept_set_id}.html", set_html(concept_set_id, len(samples), contact, entry, annotated).encode()
    )


def write_assets(site: Site) -> None:
    for name in ASSET_FILES:
        site.put(f"{ASSETS}/{name}", (ASSET_DIR / name).read_bytes())


def build_review(out: str, site_location: str | None = None) -> dict:
    """Write the gallery of output ``out`` into ``site_location`` (default ``OUT/review``); return
    ``{"site", "index", "concept_sets", "samples", "rejected", "thumbnails_made"}``."""
    folder = OutputFolder(out, option="OUT")
    if not folder.exists(RUN_FILE):
        raise ValueError(f"{out} is not an output folder of freecustom-pipeline run (no {RUN_FILE})")
    site = Site(site_location or folder.uri(REVIEW))
    image_format = folder.read_json(RUN_FILE).get("image_format", "png")
    samples = read_samples(folder)
    made = write_thumbnails(folder, site, samples, image_format)
    pages: dict[str, ConceptSetPage] = {}
    for s in samples:
        pages.setdefault(s.concept_set_id, ConceptSetPage(s.concept_set_id)).samples.append(s)
    summaries = summarize((s.concept_set_id, s.scores) for s in samples if s.scores)["concept_sets"]
    contact = {name.removesuffix(".jpg") for name in site.existing(CONTACT)}  # made once, like thumbnails
    described = concept_sets(folder)
    for cs, page in sorted(pages.items()):
        sheet = f"{OutputFolder.references(cs)}/contact_sheet.png"
        if cs not in contact and folder.exists(sheet):
            with Image.open(io.BytesIO(folder.read(sheet))) as image:
                site.put(f"{CONTACT}/{cs}.jpg", _jpeg(image, CONTACT_WIDTH, width_only=True))
            contact.add(cs)
        write_set_page(site, cs, page.samples, contact=cs in contact, entry=described.get(cs))
    write_assets(site)
    ordered = [pages[cs] for cs in sorted(pages)]
    site.put("index.html", index_html(str(folder), ordered, summaries, contact, described).encode())
    return {
        "site": site.folder.location,
        "index": site.folder.uri("index.html"),
        "concept_sets": len(pages),
        "samples": len(samples),
        "rejected": sum(s.rejected is not None for s in samples),
        "thumbnails_made": made,
    }
