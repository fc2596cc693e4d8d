"""CLI surface: help with examples on every command, customize (the engine alone), option errors,
and what scripts rely on: --version, -v/-q, --json answers, choices checked while parsing, and
options from FREECUSTOM_* environment variables."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.numpy
from PIL import Image, ImageDraw
from typer.testing import CliRunner

import pipeline.cli
from pipeline.cli import app
from pipeline.cli_common import PROJECT_LOGGERS
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.run import RunSummary
from tests.conftest import sample_root

runner = CliRunner()
TINY_CUSTOMIZE = ["--steps", "2", "--size", "64"]
COMMANDS = [["run"], ["validate"], ["inspect"], ["demo"], ["customize"], ["manifest", "from-config"], ["manifest", "build"]]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "freecustom-pipeline" in result.output


def test_customize_a_case_folder(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    case = str(sample_root() / "cat_necklace")
    result = runner.invoke(
        app, ["customize", case, "-o", str(out), "--model", str(tiny_model_dir), *TINY_CUSTOMIZE]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["seed15207.png", "seed20394.png"]  # the case's seeds
    assert Image.open(out / "seed15207.png").size == (64, 64)


def test_customize_with_a_controlnet_and_a_canny_condition(tmp_path, tiny_model_dir):
    layout = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(layout).rectangle((16, 16, 48, 48), fill="white")
    layout.save(tmp_path / "layout.png")
    case = str(sample_root() / "cat_necklace")
    base = ["customize", case, "--model", str(tiny_model_dir), "--seed", "3", *TINY_CUSTOMIZE]
    control = ["--controlnet", "tiny", "--control-image", str(tmp_path / "layout.png"), "--canny-low", "30"]
    plain = runner.invoke(app, [*base, "-o", str(tmp_path / "plain")])
    controlled = runner.invoke(app, [*base, "-o", str(tmp_path / "cn"), *control])
    assert plain.exit_code == 0 and controlled.exit_code == 0, controlled.output
    # the ControlNet's residuals reach the image (a random ControlNet: any change shows they do)
    assert (tmp_path / "cn" / "seed3.png").read_bytes() != (tmp_path / "plain" / "seed3.png").read_bytes()
    alone = runner.invoke(app, [*base, "-o", str(tmp_path / "x"), "--controlnet", "tiny"])
    assert alone.exit_code == 2 and "one control image per ControlNet" in alone.output
    bad = runner.invoke(app, [*base, "-o", str(tmp_path / "y"), *control, "--control-type", "depth"])
    assert bad.exit_code == 2 and "--control-type 'depth'" in bad.output


def test_customize_concepts_on_the_command_line(tmp_path, tiny_model_dir):
    cutout = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    ImageDraw.Draw(cutout).ellipse((8, 8, 40, 40), fill=(10, 200, 10, 255))
    cutout.save(tmp_path / "ball.png")
    photo = Image.new("RGB", (48, 48), "gray")
    photo.save(tmp_path / "room.jpg")
    mask = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(mask).rectangle((0, 48, 95, 95), fill=255)
    mask.save(tmp_path / "room_mask.png")
    out = tmp_path / "o"
    concepts = [
        "--concept",
        f"{tmp_path}/ball.png::a green ball",
        "--concept",
        f"{tmp_path}/room.jpg:{tmp_path}/room_mask.png:a room:2.5",
    ]
    args = [
        "--prompt",
        "a green ball in a room",
        "--seed",
        "3",
        "-o",
        str(out),
        "--model",
        str(tiny_model_dir),
    ]
    result = runner.invoke(app, ["customize", *concepts, *args, *TINY_CUSTOMIZE])
    assert result.exit_code == 0, result.output
    assert (out / "seed3.png").exists()
    bad = runner.invoke(app, ["customize", "--concept", "only-two:parts", "--prompt", "x", "-o", str(out)])
    assert bad.exit_code == 2 and "IMAGE:MASK:PROMPT" in bad.output


def _ball_manifest(folder: Path, ids=("a", "b", "c", "d")) -> Path:
    """A manifest over one drawn cutout: rows a and d are good, b has no seeds, c a missing image."""
    cutout = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(cutout).ellipse((4, 4, 28, 28), fill=(200, 10, 10, 255))
    cutout.save(folder / "ball.png")
    concept = {"image": "ball.png", "prompt": "a ball", "weight": 3.0} | dict.fromkeys(
        ("mask", "box", "points", "label", "context")
    )
    rows = {
        "a": {"id": "a", "prompt": "a ball", "seeds": [1], "concepts": [concept]},
        "b": {"id": "b", "prompt": "a ball", "seeds": [], "concepts": [concept]},
        "c": {"id": "c", "prompt": "a ball", "seeds": [2, 3], "concepts": [dict(concept, image="gone.png")]},
        "d": {"id": "d", "prompt": "a ball", "seeds": [4], "concepts": [concept]},
    }
    schema = pa.schema([MANIFEST_SCHEMA.field(n) for n in ("id", "prompt", "seeds", "concepts")])
    path = folder / f"m-{''.join(ids)}.parquet"
    pq.write_table(pa.Table.from_pylist([rows[i] for i in ids], schema=schema), path)
    return path


@pytest.fixture
def restore_project_loggers():
    """-v / -q set the project's loggers' levels and add a stderr handler: put them back after a test."""
    saved = {
        name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers))
        for name in PROJECT_LOGGERS
    }
    yield
    for name, (level, handlers) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).handlers[:] = handlers


@pytest.fixture
def fake_run(monkeypatch):
    """``run``'s pipeline replaced by one that records the RunSettings it gets (the CLI layer alone)."""
    calls = []

    def run_pipeline(settings, on_shard=None, progress=None):
        calls.append(settings)
        logging.getLogger("pipeline.run").debug("a debug line from the pipeline")
        logging.getLogger("stages.generation.generate").warning("a warning from a stage")
        return RunSummary(out=settings.out, stats={"rows": 0}, errors=[])

    monkeypatch.setattr(pipeline.cli, "run_pipeline", run_pipeline)
    return calls


def test_validate_streams_problems_and_counts_rows(tmp_path):
    result = runner.invoke(app, ["validate", str(_ball_manifest(tmp_path))])
    assert result.exit_code == 1
    assert "row 1 (id=b): seeds:" in result.output and "row 2 (id=c): concepts[0].image:" in result.output
    assert "4 rows: 2 valid, 2 refused (2 problems)" in result.output


def test_validate_json_is_one_object_with_the_same_exit_codes(tmp_path):
    bad = runner.invoke(app, ["validate", str(_ball_manifest(tmp_path)), "--json"])
    assert bad.exit_code == 1
    answer = json.loads(bad.stdout)  # the whole of stdout is one JSON object
    assert {k: answer[k] for k in ("rows", "valid", "refused")} == {"rows": 4, "valid": 2, "refused": 2}
    assert [(p["id"], p["row"], p["field"]) for p in answer["problems"]] == [
        ("b", 1, "seeds"),
        ("c", 2, "concepts[0].image"),
    ]
    assert all(set(p) == {"id", "row", "field", "reason"} and p["reason"] for p in answer["problems"])

    good = runner.invoke(app, ["validate", str(_ball_manifest(tmp_path, ids=("a", "d"))), "--json"])
    assert good.exit_code == 0
    assert json.loads(good.stdout) == {"rows": 2, "valid": 2, "refused": 0, "problems": []}

    (tmp_path / "junk.parquet").write_text("not parquet")
    unusable = runner.invoke(app, ["validate", str(tmp_path / "junk.parquet"), "--json"])
    assert unusable.exit_code == 2
    assert set(json.loads(unusable.stdout)) == {"error"} and "error:" in unusable.stderr


def test_validate_quiet_keeps_the_problems_and_drops_the_summary(tmp_path, restore_project_loggers):
    result = runner.invoke(app, ["validate", str(_ball_manifest(tmp_path)), "-q"])
    assert result.exit_code == 1
    assert "row 1 (id=b): seeds:" in result.stdout and "4 rows" not in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"freecustom-pipeline {importlib.metadata.version('freecustom-pipeline')}\n"


@pytest.mark.parametrize("flag", ["-v", "--verbose", "-q", "--quiet"])
@pytest.mark.parametrize("command", COMMANDS)
def test_verbose_and_quiet_are_accepted_by_every_command(command, flag):
    result = runner.invoke(app, [*command, flag, "--help"])  # an unknown option would be a usage error
    assert result.exit_code == 0, result.output
    assert "--verbose" in result.stdout and "--quiet" in result.stdout


def test_verbose_shows_the_pipelines_debug_lines_and_quiet_only_errors(
    tmp_path, fake_run, restore_project_loggers
):
    args = ["run", "m.parquet", "-o", str(tmp_path / "out")]
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0, plain.output
    assert "a warning from a stage" in plain.stderr and "a debug line" not in plain.stderr
    assert "freecustom-pipeline:" in plain.stdout  # the summary table

    for verbose in (["-v", *args], [*args, "--verbose"]):  # before or after the command
        result = runner.invoke(app, verbose)
        assert result.exit_code == 0, result.output
        assert "DEBUG pipeline.run: a debug line from the pipeline" in result.stderr

    for quiet in (["-q", *args], [*args, "--quiet"]):
        result = runner.invoke(app, quiet)
        assert result.exit_code == 0, result.output
        assert result.stdout == "" and result.stderr == ""

    both = runner.invoke(app, ["-v", *args, "-q"])
    assert both.exit_code == 2 and "exclude each other" in both.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--dtype", "float17"),
        ("--image-format", "gif"),
        ("--mask-policy", "guess"),
        ("--reference-actors", "sometimes"),
        ("--sam-model-type", "vit_x"),
    ],
)
def test_a_bad_choice_is_a_usage_error_before_the_pipeline_starts(tmp_path, fake_run, option, value):
    started = time.perf_counter()
    result = runner.invoke(app, ["run", "m.parquet", "-o", str(tmp_path / "out"), option, value])
    assert time.perf_counter() - started < 2
    assert result.exit_code == 2 and not fake_run
    assert option in result.stderr and value in result.stderr
    help_text = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "250"}).stdout
    assert option in help_text and "<auto|float16|bfloat16|float32>" in help_text  # choices listed in --help


def test_a_bad_choice_exits_2_in_the_real_command_without_starting_ray(tmp_path):
    command = Path(sys.executable).with_name("freecustom-pipeline")
    argv = [str(command)] if command.exists() else [sys.executable, "-m", "pipeline.cli"]
    for option, value in (("--dtype", "float17"), ("--image-format", "gif")):
        started = time.perf_counter()
        done = subprocess.run(
            [*argv, "run", str(_ball_manifest(tmp_path)), "-o", str(tmp_path / "out"), option, value],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert time.perf_counter() - started < 10  # Python and the CLI's imports; a Ray start takes longer
        assert done.returncode == 2 and done.stdout == ""
        assert option in done.stderr and value in done.stderr
        assert not (tmp_path / "out").exists()


def test_options_from_the_environment_and_the_command_line_wins(tmp_path, fake_run):
    env = {
        "FREECUSTOM_MODEL": "env/model",
        "FREECUSTOM_KV_CACHE": f"file://{tmp_path}/kv",
        "FREECUSTOM_ALLOW_ROOT": "/a /b",
        "FREECUSTOM_MAX_WORKERS": "3",
        "FREECUSTOM_GPUS_PER_WORKER": "0.5",
        "FREECUSTOM_DTYPE": "bfloat16",
        "FREECUSTOM_SCHEDULER": "DDIMScheduler",
        "FREECUSTOM_SAM_CHECKPOINT": "sam.safetensors",
        "FREECUSTOM_SAM_MODEL_TYPE": "vit_l",
        "FREECUSTOM_DETECTOR": "owl",
    }
    result = runner.invoke(app, ["run", "m.parquet", "-o", f"file://{tmp_path}/out/"], env=env)
    assert result.exit_code == 0, result.output
    s = fake_run[-1]
    assert (s.model, s.kv_cache, s.allow_roots, s.max_workers, s.gpus_per_worker, s.dtype, s.scheduler) == (
        "env/model",
        f"file://{tmp_path}/kv",
        ("/a", "/b"),
        3,
        0.5,
        "bfloat16",
        "DDIMScheduler",
    )
    assert (s.sam_checkpoint, s.sam_model_type, s.detector) == ("sam.safetensors", "vit_l", "owl")
    assert s.out == f"file://{tmp_path}/out/"  # a URI is passed on as given (s3://... alike)
    for name in ("dtype", "image_format", "mask_policy", "sam_model_type", "reference_actors"):
        assert type(getattr(s, name)) is str  # plain strings, not the CLI's enums

    overrides = "--model cli/model --allow-root /c --dtype float32 --kv-cache ./kv".split()
    result = runner.invoke(app, ["run", "m.parquet", "-o", "out/", *overrides], env=env)
    assert result.exit_code == 0, result.output
    s = fake_run[-1]
    assert (s.model, s.allow_roots, s.dtype, s.kv_cache, s.out) == (
        "cli/model",
        ("/c",),
        "float32",
        "kv",
        "out",
    )

    bad = runner.invoke(app, ["run", "m.parquet", "-o", "out"], env={"FREECUSTOM_DTYPE": "float17"})
    assert bad.exit_code == 2 and "FREECUSTOM_DTYPE" in bad.stderr
    help_text = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "250"}).stdout
    assert all(var in help_text for var in env)


@pytest.mark.ray
def test_inspect_json_on_a_real_output_folder(tmp_path, tiny_model_dir, ray_session, restore_project_loggers):
    out = tmp_path / "out"
    tiny = "--num-inference-steps 2 --height 64 --width 64 --samples-per-shard 1".split()
    manifest = str(_ball_manifest(tmp_path))
    ran = runner.invoke(app, ["run", manifest, "-o", str(out), "--model", str(tiny_model_dir), *tiny, "-q"])
    assert ran.exit_code == 1, ran.output  # rows b and c fail, a and d are rendered
    assert ran.stdout == "" and "failed row 1 (id=b)" in ran.stderr  # -q: only errors

    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"output", "stats", "shards", "failed_rows", "concept_sets", "settings"}
    assert report["output"] == str(out)
    assert report["stats"] == json.loads((out / "_stats.json").read_text())
    assert report["stats"]["samples_written"] == 2 and report["stats"]["rows_failed"] == 2
    assert [(s["name"], s["samples"]) for s in report["shards"]] == [("00000.tar", 1), ("00001.tar", 1)]
    assert all(s["bytes"] == (out / "shards" / s["name"]).stat().st_size for s in report["shards"])
    assert [(e["id"], e["row"], e["field"]) for e in report["failed_rows"]] == [
        ("b", 1, "seeds"),
        ("c", 2, "concepts[0].image"),
    ]
    assert report["settings"] == json.loads((out / "_run.json").read_text())
    # concept sets by what they are (rows a and d share their one concept), not only by hash
    [(csid, entry)] = report["concept_sets"].items()
    assert entry == {"concepts": ["a ball"], "rows": ["a", "d"]}

    sample = runner.invoke(app, ["inspect", str(out), "--sample", "a", "--json"])
    assert sample.exit_code == 0 and json.loads(sample.stdout)["id"] == "a"
    missing = runner.invoke(app, ["inspect", str(out), "--sample", "zzz", "--json"])
    assert missing.exit_code == 1 and "error" in json.loads(missing.stdout)
    human = runner.invoke(app, ["inspect", str(out)])
    assert human.exit_code == 0 and "failed rows: 2" in human.stdout
    assert "  00000.tar  1 samples" in human.stdout
    assert f'  {csid}  "a ball" (rows: a, d)' in human.stdout

    not_out = runner.invoke(app, ["inspect", str(tmp_path), "--json"])
    assert not_out.exit_code == 2 and "_run.json" in json.loads(not_out.stdout)["error"]
    for typo in ("s3:/bucket/out", "foo://bucket/out"):  # not a URI pyarrow.fs opens: refused, exit 2
        refused = runner.invoke(app, ["inspect", typo, "--json"])
        assert refused.exit_code == 2 and typo in json.loads(refused.stdout)["error"]


def test_lora_and_model_config_options_reach_the_settings(tmp_path, fake_run):
    lora, model, config = tmp_path / "style.safetensors", tmp_path / "model.safetensors", tmp_path / "cfg"
    lora.write_bytes(b"")
    model.write_bytes(b"")
    config.mkdir()
    (config / "model_index.json").write_text("{}")
    args = ["run", "m.parquet", "-o", str(tmp_path / "out"), "--model", str(model), "--model-config",
            str(config), "--lora", f"{lora}:0.3", "--lora", "org/lcm-lora-sdv1-5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    s = fake_run[-1]
    assert s.defaults.loras == ((str(lora), 0.3), ("org/lcm-lora-sdv1-5", 1.0)) and s.model_config == str(config)
    assert s.generator_kwargs()["model_config"] == str(config) and s.output_identity()["defaults"]["loras"]
    (tmp_path / "model.ckpt").write_bytes(b"")
    sdxl = tmp_path / "sdxl.safetensors"  # the SGM layout's second text encoder: SDXL, whose configs do not ship
    safetensors.numpy.save_file({"conditioner.embedders.1.model.positional_embedding": np.zeros((2, 3))}, sdxl)
    for bad, message in ((["--model", str(tmp_path / "model.ckpt")], "must be .safetensors"),
                         (["--model", str(sdxl)], "an SDXL checkpoint (conditioner.embedders.1.* keys) needs --model-config"),
                         (["--model-config", str(config)], "is for a single-file --model"),
                         (["--model", str(model), "--model-config", str(tmp_path)], "no model_index.json")):
        result = runner.invoke(app, ["run", "m.parquet", "-o", str(tmp_path / "o3"), *bad])
        assert result.exit_code == 2 and message in result.stderr, result.output
    for bad, message in (("x.safetensors:nan", "finite"), ("weights.bin", "safetensors only")):
        result = runner.invoke(app, ["run", "m.parquet", "-o", str(tmp_path / "o2"), "--lora", bad])
        assert result.exit_code == 2 and message in result.stderr, result.output
