"""The CLI's commands around a run: validate, inspect, manifest from-config, customize (and, from
``pipeline.cli_quality``, score and review).

Registered on ``pipeline.cli``'s apps by ``register_tools``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli_common import (
    COLON,
    ENV_VARS,
    PANEL_CONTROLNET,
    PANEL_MODEL,
    AsJson,
    MaskPolicy,
    Passthrough,
    Quiet,
    Verbose,
    answer,
    fail,
    path_or_uri,
    say,
    set_voice,
)
from pipeline.cli_quality import review, score, score_table
from pipeline.customize import (
    CONTROL_TYPES,
    case_concepts,
    control_condition,
    parse_concept,
    render_concepts,
    tiny_controlnet,
    tiny_model,
    write_attention_maps,
)
from pipeline.from_config import ConfigImportError, manifest_from_configs, write_manifest
from pipeline.manifest import ManifestError
from pipeline.manifest_columns import column_problem, manifest_column_names, misspelled_columns
from pipeline.manifest_files import ManifestSource
from pipeline.part_plan import Checks, EarlierIds, earlier_duplicates, id_index
from pipeline.preflight import resolve_model
from pipeline.report import describe_set, find_sample, inspect_report
from pipeline.validate import RowProblem, format_problem
from stages.inputs.control import CANNY_HIGH, CANNY_LOW, ControlSettings
from stages.inputs.read import InputSettings
from stages.inputs.subject import SubjectSettings
from stages.output.folder import OutputFolder
from stages.output.layout import RUN_FILE
from stages.params import DEFAULT_HEIGHT, DEFAULT_STEPS, DEFAULT_WIDTH
from stages.reference.family import ModelFamily, model_family

# BLIP-Diffusion subject options (validate, run, customize)
BlipCategory = Annotated[
    str | None,
    typer.Option(help="BLIP-Diffusion: the subject's category (e.g. 'dog').", rich_help_panel=PANEL_MODEL),
]
BlipTargetCategory = Annotated[
    str | None,
    typer.Option(help="BLIP-Diffusion: the target prompts' word for it [default: the category].",
                 rich_help_panel=PANEL_MODEL),
]


def validate(
    ctx: typer.Context,
    manifest: Annotated[str, typer.Argument(help="Parquet manifest.")],
    root: Annotated[str | None, typer.Option(help="Folder relative input paths resolve against.")] = None,
    allow_root: Annotated[
        list[str] | None,
        typer.Option(
            envvar=ENV_VARS["allow_root"],
            help="Only inputs under this folder (repeatable; the variable: folders separated by spaces).",
        ),
    ] = None,
    max_pixels: Annotated[int, typer.Option(help="Refuse images above this many pixels.")] = 64_000_000,
    num_inference_steps: Annotated[
        int | None, typer.Option(help=f"Run default to validate rows against [default: the model family's, {DEFAULT_STEPS} for SD].")
    ] = None,
    height: Annotated[int | None, typer.Option(help=f"Run default [default: the family's, {DEFAULT_HEIGHT} for SD].")] = None,
    width: Annotated[int | None, typer.Option(help=f"Run default [default: the family's, {DEFAULT_WIDTH} for SD].")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="The run's --model: its family's defaults and row rules apply (read from its "
                     "model_index.json and configs; no weights are loaded). Default: SD1.5's."),
    ] = None,
    model_config: Annotated[
        str | None, typer.Option(help="A single-file --model's local diffusers config folder.")
    ] = None,
    controlnet: Annotated[
        list[str] | None,
        typer.Option(help="The run's --controlnet (repeatable): rows need a control per ControlNet; without it "
                     "only the control structs themselves are checked."),
    ] = None,
    mask_policy: Annotated[
        MaskPolicy,
        typer.Option(help="The run's --mask-policy: with fail (run's default) a concept without a mask, alpha, "
                     "box, points or label is a problem."),
    ] = "fail",
    passthrough: Passthrough = None,
    blip_subject: Annotated[
        str | None, typer.Option(help="The run's --blip-subject: the subject of rows without a blip_subject column.")
    ] = None,
    blip_category: BlipCategory = None,
    blip_target_category: BlipTargetCategory = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Every static check (schema, ids, seeds, paths exist and decode, sizes, values) without a model.

    One line per problem naming row, id, field and reason; exit 1 if any, 2 if the file is unusable.
    With --json: `{"rows", "valid", "refused", "problems": [{"id", "row", "field", "reason"}]}`
    (exit 2: `{"error": ...}`).
    """

    quiet = set_voice(ctx, verbose, quiet)
    try:
        if model:
            resolve_model(model)
        family = model_family(model, model_config) if model else ModelFamily()
        columns = misspelled_columns(manifest_column_names(manifest), passthrough or ())
        source = ManifestSource.open(manifest)
        checks = Checks(
            defaults=family.defaults(num_inference_steps=num_inference_steps, height=height, width=width),
            family=family,
            inputs=InputSettings(root=root, allow_roots=tuple(allow_root or ()), max_pixels=max_pixels),
            base_dir=source.base_dir,
            control=ControlSettings(controlnet=tuple(controlnet) if controlnet else None),
            mask_policy=mask_policy.value,
            subject=SubjectSettings(default={"image": path_or_uri(blip_subject), "category": blip_category,
                                             "target_category": blip_target_category} if blip_subject else None),
        )
    except (ManifestError, ValueError) as e:
        fail(str(e), as_json=as_json)
    # misspelled columns first: they concern every row (the run refuses to start)
    problems: list[RowProblem] = [RowProblem(index=None, id=None, field=c, reason=column_problem(c, t))
                                  for c, t in columns]
    if not as_json:
        for p in problems:
            typer.echo(f"manifest: {p.field}: {p.reason}")
    rows = valid = refused = 0
    n_problems = len(problems)
    try:
        for validation in _validations(source, checks):  # file by file, row by row: problems print as found
            for _, spec, found in validation:
                if as_json:
                    problems += found
                else:
                    for p in found:
                        typer.echo(format_problem(p))
                n_problems += len(found)
                refused += bool(found)
                valid += spec is not None
            rows += validation.table.num_rows
    except ManifestError as e:
        fail(str(e), as_json=as_json)
    if as_json:
        answer(
            {
                "rows": rows,
                "valid": valid,
                "refused": refused,
                "problems": [
                    {"id": p.id, "row": p.index, "field": p.field, "reason": p.reason} for p in problems
                ],
            }
        )
    say(f"{rows} rows: {valid} valid, {refused} refused ({n_problems} problems)", quiet, err=True)
    raise typer.Exit(1 if n_problems else 0)


def _validations(source: ManifestSource, checks: Checks):
    """Each file of the manifest validated in turn (rows numbered across files, as a run numbers them; an
    id an earlier file used is refused). An empty file is skipped; a manifest without rows is refused."""
    earlier: list[EarlierIds] = []
    row_base = 0
    for part in source.parts:
        if not part.open().metadata.num_rows:
            continue
        table = part.read()
        ids = table.column("id")
        yield checks.validation(table, row_base=row_base, earlier=earlier_duplicates(ids, earlier))
        earlier.append(EarlierIds(id_index(ids, row_base), part.name, row_base, lambda ids=ids: ids))
        row_base += table.num_rows
    if not row_base:
        raise ManifestError(f"{source.spec}: the manifest has no rows")


def inspect(
    ctx: typer.Context,
    out: Annotated[str, typer.Argument(help="An output folder of `run`.")],
    sample: Annotated[
        str | None, typer.Option(help="Print this sample's metadata (its key, or a row id).")
    ] = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Counts, failed rows with reasons, shards and settings of an output folder.

    With --json: `{"output", "stats" (all of _stats.json), "shards": [{"name", "samples", "bytes"}],
    "failed_rows": [{"id", "row", "stage", "field", "reason", "seeds"}], "concept_sets": {ID: {"concepts":
    [prompts], "rows": [ids]}}, "settings" (_run.json)}`;
    with --sample, that sample's metadata. Exit 2 (`{"error": ...}`) if OUT is no output folder,
    1 if the sample is not there.
    """
    set_voice(ctx, verbose, quiet)  # inspect's report is its answer: -q leaves it
    out = path_or_uri(out)
    try:
        folder = OutputFolder(out, option="OUT")
    except (ValueError, OSError) as e:  # a scheme pyarrow.fs does not know, unreachable storage
        fail(str(e), as_json=as_json)
    if not folder.exists(RUN_FILE):
        fail(f"{out} is not an output folder of freecustom-pipeline run (no {RUN_FILE})", as_json=as_json)
    if sample is not None:
        metadata = find_sample(folder, sample)
        if metadata is None:
            fail(f"no sample with key or id {sample!r} in {out}", code=1, as_json=as_json)
        typer.echo(
            json.dumps(metadata, sort_keys=True)
            if as_json
            else json.dumps(metadata, indent=2, sort_keys=True)
        )
        raise typer.Exit(0)
    report = inspect_report(folder, out)
    if as_json:
        answer(report)
        return
    typer.echo(f"output: {out}")
    for key in (
        "rows",
        "rows_valid",
        "rows_failed",
        "samples_expected",
        "samples_written",
        *(["samples_rejected"] if "samples_rejected" in report["stats"] else []),
        "shards",
        "concept_sets",
        "reference_passes",
        "images_per_second",
        "complete",
    ):
        typer.echo(f"  {key}: {report['stats'].get(key)}")
    typer.echo("shards:")
    for shard in report["shards"]:
        n = "?" if shard["samples"] is None else shard["samples"]
        typer.echo(f"  {shard['name']}  {n} samples  {shard['bytes']} bytes")
    if report["failed_rows"] is not None:
        typer.echo(f"failed rows: {len(report['failed_rows'])}")
        for e in report["failed_rows"]:
            typer.echo(f"  row {e['row']} (id={e['id']}): {e['stage']}: {e['field']}: {e['reason']}")
    if report["concept_sets"]:
        typer.echo("concept sets:")
        for csid, entry in report["concept_sets"].items():
            typer.echo(f"  {csid}  {describe_set(entry)}")
    if report["stats"].get("scores"):
        typer.echo("scores (run --score):")
        for line in score_table(report["stats"]["scores"]):
            typer.echo("  " + line)
    typer.echo("settings: " + json.dumps(report["settings"], sort_keys=True))


# --------------------------------------------------------------------------- ControlNet and BLIP-Diffusion (run, customize)

CannyLow = Annotated[
    float, typer.Option(help="Canny low threshold (control type canny).", rich_help_panel=PANEL_CONTROLNET)
]
CannyHigh = Annotated[
    float, typer.Option(help="Canny high threshold (control type canny).", rich_help_panel=PANEL_CONTROLNET)
]


# --------------------------------------------------------------------------- manifest, demo, customize


def from_config(
    ctx: typer.Context,
    configs: Annotated[list[Path], typer.Argument(help="The authors' config_stable_diffusion.yaml files.")],
    root: Annotated[
        Path, typer.Option(help="The authors' repository root (image paths are relative to it).")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Manifest to write.")],
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Import the FreeCustom authors' run configs into one manifest (row id = the config's folder name).
    Image paths are written relative to the manifest, so its folder can move with the images."""

    quiet = set_voice(ctx, verbose, quiet)
    try:
        table = manifest_from_configs([str(c) for c in configs], root=str(root), relative_to=output.parent)
    except ConfigImportError as e:
        fail(str(e))
    write_manifest(table, output)
    say(f"wrote {output}: {table.num_rows} rows", quiet)


def customize(
    ctx: typer.Context,
    case: Annotated[
        Path | None,
        typer.Argument(
            help="A case folder in the authors' layout: image/, mask/, config_stable_diffusion.yaml."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the images.")] = Path("out/customize"),
    concept: Annotated[
        list[str] | None,
        typer.Option(help=f"IMAGE{COLON}MASK{COLON}PROMPT[{COLON}WEIGHT] (repeatable); an empty MASK uses the "
                     "image's alpha."),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(help="Target prompt (default: the case config's target_prompt).")
    ] = None,
    seed: Annotated[
        list[int] | None, typer.Option(help="Seeds (repeatable; default: the case config's seeds).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            envvar=ENV_VARS["model"],
            help="SD1.x/2.x, SDXL, BLIP-Diffusion or FLUX.1 model: hub id, folder or .safetensors file "
            "[default: a tiny random-weight model built in OUT].",
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 10,
    size: Annotated[int, typer.Option(help="Image side (multiple of 8).")] = 256,
    controlnet: Annotated[
        list[str] | None,
        typer.Option(help="ControlNet id or folder (repeatable, one per --control-image); 'tiny' builds a "
                     "random one for the tiny model."),
    ] = None,
    control_image: Annotated[
        list[Path] | None, typer.Option(help="Control image (repeatable, one per --controlnet).")
    ] = None,
    control_type: Annotated[
        str, typer.Option(help=f"{'|'.join(CONTROL_TYPES)}: canny computes the edge map from the image; "
                          "none uses the image as the condition (depth map, pose...).")
    ] = "canny",
    canny_low: CannyLow = CANNY_LOW,
    canny_high: CannyHigh = CANNY_HIGH,
    control_references: Annotated[
        bool, typer.Option(help="The release's references through ControlNet too (K/V per control image).")
    ] = False,
    save_attention: Annotated[
        bool,
        typer.Option(help="Also write seed{S}.attn.png: per concept (panels left to right, in concept order) "
                     "the attention mass the image gives its reference tokens (0 black .. 1 white)."),
    ] = False,
    blip_subject: Annotated[
        Path | None, typer.Option(help="BLIP-Diffusion --model: the subject image of the target prompt.")
    ] = None,
    blip_category: BlipCategory = None,
    blip_target_category: BlipTargetCategory = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """The engine alone, no Ray: customize one prompt with reference images and masks from the command line."""
    quiet = set_voice(ctx, verbose, quiet)
    try:
        refs, target, seeds = case_concepts(case) if case is not None else ([], None, [])
        refs += [parse_concept(spec) for spec in concept or []]
    except (OSError, KeyError, ValueError, TypeError) as e:
        fail(str(e))
    target, seeds = prompt or target, list(seed or []) or seeds or [0]
    if not refs or not target:
        fail("give a case folder or --concept ... with --prompt")
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = tiny_model(out / "tiny-sd15")
        say(f"no --model: using a tiny random-weight model ({model}); images will be noise", quiet, err=True)
    controlnet = [tiny_controlnet(out / "tiny-controlnet", model) if c == "tiny" else c for c in controlnet or []]
    try:
        controls = [control_condition(p, control_type, canny_low=canny_low, canny_high=canny_high)
                    for p in control_image or []]
    except (OSError, ValueError) as e:
        fail(str(e))
    subject = None
    if (blip_subject is None) != (blip_category is None):
        fail("--blip-subject and --blip-category go together")
    if blip_subject is not None:
        from PIL import Image

        try:
            subject = {"subject_image": Image.open(blip_subject).convert("RGB"), "subject_category": blip_category,
                       "target_subject_category": blip_target_category}
        except OSError as e:
            fail(f"--blip-subject {blip_subject}: {e}")
    try:
        images, kv, *maps = render_concepts(
            model, refs, target, seeds, steps=steps, size=size, controlnet=controlnet,
            control_images=controls, control_references=control_references, attention_maps=save_attention,
            subject=subject,
        )
    except ValueError as e:  # arguments that do not go together (the engine names them)
        fail(str(e))
    for s, image in zip(seeds, images, strict=True):
        image.save(out / f"seed{s}.png")
    if maps:
        write_attention_maps(out, seeds, maps[0], images[0].size)
    say(
        f"{len(images)} images in {out} (prompt {target!r}; reference K/V {kv.nbytes / 2**20:.1f} MiB, "
        f"{kv.nbytes / max(1, kv.dense_nbytes):.0%} of dense)",
        quiet,
    )


def register_tools(app: typer.Typer, manifest_app: typer.Typer) -> None:
    """Add these commands to the CLI's apps."""
    app.command(
        epilog="Examples:\n\n    freecustom-pipeline validate manifest.parquet --root /data/catalog\n\n"
        "    freecustom-pipeline validate manifest.parquet --json | jq '.problems[] | .field'"
    )(validate)
    app.command(
        epilog="Examples:\n\n    freecustom-pipeline inspect out/\n\n"
        "    freecustom-pipeline inspect out/ --sample dog_hat_park-0\n\n"
        "    freecustom-pipeline inspect out/ --json | jq .stats.samples_written"
    )(inspect)
    app.command(
        epilog="Examples:\n\n    freecustom-pipeline score out/\n\n"
        "    freecustom-pipeline score out/ --json | jq '.concept_sets[].clip_t.mean'"
    )(score)
    app.command(
        epilog="Examples:\n\n    freecustom-pipeline review out/        # then open out/review/index.html\n\n"
        "    freecustom-pipeline review s3://bucket/out -o s3://bucket/out-review"
    )(review)
    manifest_app.command(
        "from-config",
        epilog="Example:\n\n    freecustom-pipeline manifest from-config "
        "FreeCustom/dataset/freecustom/multi_concept/*/config_stable_diffusion.yaml --root FreeCustom -o m.parquet",
    )(from_config)
    app.command(
        epilog="Examples:\n\n    freecustom-pipeline customize ../shared/data/freecustom-samples/dog_hat_sunglasses_0 -o out/dog\n\n"
        "    freecustom-pipeline customize --concept dog.jpg:dog_mask.png:'a dog' --concept hat.png::'a hat' "
        "--prompt 'a dog wearing a hat' --seed 1 --seed 2 -o out/custom --model stable-diffusion-v1-5/stable-diffusion-v1-5"
    )(customize)
