"""The CLI's quality commands: ``score`` (identity and prompt scores of an output, ``--annotate``) and
``review`` (the static gallery). Registered on ``pipeline.cli``'s app by ``register_tools``."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.annotations import annotate_output
from pipeline.cli_common import (
    PANEL_QUALITY,
    AsJson,
    Quiet,
    SamModelType,
    Verbose,
    answer,
    fail,
    path_or_uri,
    say,
    set_voice,
)
from pipeline.preflight import check_score_models
from pipeline.review import build_review
from pipeline.scoring import SCORE_SUMMARY, score_output
from stages.masks.segment import SegmentConfig
from stages.output.folder import OutputFolder
from stages.output.layout import RUN_FILE
from stages.scoring.score import PER_CONCEPT, SCORE_NAMES
from stages.scoring.score_models import (
    DEFAULT_CLIP_IMAGE_MODEL,
    DEFAULT_CLIP_TEXT_MODEL,
    DEFAULT_DINO_MODEL,
    ScoreModels,
)

# --------------------------------------------------------------------------- quality

DinoModel = Annotated[
    str, typer.Option(help="DINOv2 model (id or folder) for the dino scores.", rich_help_panel=PANEL_QUALITY)
]
ClipImageModel = Annotated[
    str, typer.Option(help="CLIP model (id or folder) for clip_i.", rich_help_panel=PANEL_QUALITY)
]
ClipTextModel = Annotated[
    str, typer.Option(help="CLIP model (id or folder) for clip_t.", rich_help_panel=PANEL_QUALITY)
]
ScoreBatch = Annotated[int, typer.Option(min=1, help="Images per scorer model call.", rich_help_panel=PANEL_QUALITY)]
ScoreDevice = Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when there is a GPU).")]

def score_table(summary: dict) -> list[str]:
    """Lines of the score summary: one per concept set and score (mean, p05, p50, p95)."""

    def fmt(v):
        return "-" if v is None else f"{v:.4g}"

    lines = [f"{'concept set':<18} {'score':<12} {'n':>6} {'mean':>8} {'p05':>8} {'p50':>8} {'p95':>8}"]
    for cs, entry in [("all", summary["all"]), *summary["concept_sets"].items()]:
        for name in SCORE_NAMES:
            d = entry[name]
            lines.append(
                f"{cs:<18} {name + ('*' if name in PER_CONCEPT else ''):<12} {d['n']:>6} {fmt(d['mean']):>8} "
                f"{fmt(d.get('p05')):>8} {fmt(d.get('p50')):>8} {fmt(d.get('p95')):>8}"
            )
    return lines + ["* per concept: the minimum over the concept set's concepts"]


def score(
    ctx: typer.Context,
    out: Annotated[str, typer.Argument(help="An output folder of `run`.")],
    dino_model: DinoModel = DEFAULT_DINO_MODEL,
    clip_image_model: ClipImageModel = DEFAULT_CLIP_IMAGE_MODEL,
    clip_text_model: ClipTextModel = DEFAULT_CLIP_TEXT_MODEL,
    batch_size: ScoreBatch = 16,
    device: ScoreDevice = None,
    annotate: Annotated[
        bool,
        typer.Option(
            "--annotate",
            help="Instead of scores: where each concept landed (as run --annotate), from the attention maps of an "
            "output written with run --save-attention, into OUT/annotations/NNNNN.parquet.",
        ),
    ] = False,
    sam_checkpoint: Annotated[
        str | None, typer.Option(help="With --annotate: refine each box with this SAM checkpoint.")
    ] = None,
    sam_model_type: Annotated[SamModelType, typer.Option(help="SAM architecture of the checkpoint.")] = "vit_b",
    detector: Annotated[
        str | None, typer.Option(help="With --annotate: refine each box with this detector (concept prompts).")
    ] = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Quality scores of an existing output, written next to its shards (which are left untouched).

    Writes `OUT/scores/NNNNN.parquet` (key, id, seed, concept_set_id, dino, dino_paper, dino_masked,
    clip_i, clip_t, score_error) per shard and `OUT/scores/_summary.json` (distributions per concept
    set); a rerun with the same models skips shards already scored. Exit 1 if some samples could not
    be scored, 2 if OUT is no output folder. With --json: the summary. With --annotate: annotations
    instead (docs/training-data.md).
    """
    quiet = set_voice(ctx, verbose, quiet)
    out = path_or_uri(out)
    if device not in (None, "cuda", "cpu"):
        fail(f"--device {device!r}: expected cuda or cpu", as_json=as_json)
    if annotate:
        _annotate(out, SegmentConfig(sam_checkpoint=sam_checkpoint, sam_model_type=sam_model_type.value,
                                     detector=detector, device=device), as_json=as_json, quiet=quiet)
    try:
        folder = OutputFolder(out, option="OUT")
        models = ScoreModels(dino_model, clip_image_model, clip_text_model, batch_size=batch_size)
        if not folder.exists(RUN_FILE):
            raise ValueError(f"{out} is not an output folder of freecustom-pipeline run (no {RUN_FILE})")
        check_score_models(models)  # local folders or cached hub ids: before any shard is opened
    except (ValueError, OSError) as e:
        fail(str(e), as_json=as_json)
    summary = score_output(
        folder,
        models,
        device=device,
        on_shard=lambda shard, what: say(f"shards/{shard}.tar: {what}", quiet, err=True),
    )
    if as_json:
        answer(summary)
    else:
        for line in score_table(summary):
            say(line, quiet)
        say(f"written: {folder.uri(SCORE_SUMMARY)}", quiet)
    for e in summary["errors"]:
        typer.echo(f"not scored: {e['key']}: {e['reason']}", err=True)
    raise typer.Exit(1 if summary["errors"] else 0)


def _annotate(out: str, segment: SegmentConfig, *, as_json: bool, quiet: bool) -> None:
    """``score --annotate``: exit 1 if some samples could not be annotated, 2 if OUT cannot be."""
    try:
        summary = annotate_output(OutputFolder(out, option="OUT"), segment,
                                  on_shard=lambda shard, what: say(f"shards/{shard}.tar: {what}", quiet, err=True))
    except (ValueError, OSError) as e:
        fail(str(e), as_json=as_json)
    if as_json:
        answer(summary)
    else:
        say(f"annotated samples: {summary['samples']}; overlap median: {summary['overlap'].get('p50')}", quiet)
    for e in summary["errors"]:
        typer.echo(f"not annotated: {e['key']}: {e['reason']}", err=True)
    raise typer.Exit(1 if summary["errors"] else 0)


def review(
    ctx: typer.Context,
    out: Annotated[str, typer.Argument(help="An output folder of `run`.")],
    output: Annotated[
        str | None, typer.Option("-o", "--output", help="Folder of the site (default: OUT/review).")
    ] = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """A static review gallery of an output: open DIR/index.html in a browser (no server needed).

    An index of the concept sets (contact sheets, counts, score summaries) and per concept set its
    samples as thumbnails with prompt, seed, scores and a rejected marker, sortable and filterable
    by score, 100 a page. Thumbnails are made once; a rerun refreshes the pages. With --json:
    `{"site", "index", "concept_sets", "samples", "rejected", "thumbnails_made"}`.
    """
    quiet = set_voice(ctx, verbose, quiet)
    out = path_or_uri(out)
    try:
        result = build_review(out, path_or_uri(output) if output else None)
    except (ValueError, OSError) as e:
        fail(str(e), as_json=as_json)
    if as_json:
        answer(result)
        return
    say(
        f"{result['concept_sets']} concept sets, {result['samples']} samples ({result['rejected']} rejected), "
        f"{result['thumbnails_made']} new thumbnails",
        quiet,
        err=True,
    )
    typer.echo(result["index"])
