"""`run --config FILE` / `--print-config` (issue 25) and what `--help` shows: panels, one-line helps,
argument names, every model family, and the demo naming its model (issue 26)."""

from __future__ import annotations

import shlex

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli_common import PANELS
from tests.test_cli import fake_run  # noqa: F401  (a fixture: run's pipeline replaced by a recorder)

runner = CliRunner()
WIDE = {"COLUMNS": "250"}
COMMON = {"config", "print_config", "verbose", "quiet"}  # the first panel, "Options"


def _command(*words: str):
    command = typer.main.get_command(app)
    for word in words:
        command = command.commands[word]
    return command


def _all_commands(command=None, path=()):
    command = command or typer.main.get_command(app)
    for name, sub in getattr(command, "commands", {}).items():
        yield (*path, name), sub
        yield from _all_commands(sub, (*path, name))


# --------------------------------------------------------------------------- --config


def test_a_yaml_config_file_sets_options_by_either_spelling(tmp_path, fake_run):  # noqa: F811
    config = tmp_path / "night.yaml"
    config.write_text(
        "num-inference-steps: 30\nguidance_scale: 4.5\n--kv-cache: /mnt/kv\nreuse: /renders/a\n"
        "allow_root: [/a, /b]\nscore: true\nimage_format: webp\nscheduler: null\n"
    )
    result = runner.invoke(app, ["run", "m.parquet", "-o", str(tmp_path / "out"), "--config", str(config)])
    assert result.exit_code == 0, result.output
    s = fake_run[-1]
    assert (s.defaults.num_inference_steps, s.defaults.guidance_scale, s.kv_cache) == (30, 4.5, "/mnt/kv")
    assert (s.reuse, s.allow_roots, s.image_format, s.scheduler) == (
        ("/renders/a",),
        ("/a", "/b"),
        "webp",
        "release",
    )
    assert s.score_models is not None  # score: true


def test_a_toml_config_file_holds_the_manifest_and_out_too(tmp_path, fake_run):  # noqa: F811
    config = tmp_path / "night.toml"
    config.write_text(f'manifest = "m.parquet"\nout = "{tmp_path}/o"\nbatch_size = 3\ndevice = "cpu"\n')
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 0, result.output
    s = fake_run[-1]
    assert (s.manifest, s.out, s.batch_size, s.device) == ("m.parquet", f"{tmp_path}/o", 3, "cpu")


def test_command_line_then_environment_then_file_then_default(tmp_path, fake_run):  # noqa: F811
    config = tmp_path / "c.yaml"
    config.write_text("dtype: float16\nmax_workers: 5\n")
    base = ["run", "m.parquet", "-o", str(tmp_path / "out"), "--config", str(config)]
    env = {"FREECUSTOM_DTYPE": "bfloat16"}
    for args, environment, dtype in (
        ([], {}, "float16"),  # the file over the default (auto)
        ([], env, "bfloat16"),  # the environment over the file
        (["--dtype", "float32"], env, "float32"),  # the command line over both
    ):
        result = runner.invoke(app, [*base, *args], env=environment)
        assert result.exit_code == 0, result.output
        assert (fake_run[-1].dtype, fake_run[-1].max_workers) == (dtype, 5)
    result = runner.invoke(app, ["run", "m.parquet", "-o", str(tmp_path / "out")])
    assert (fake_run[-1].dtype, fake_run[-1].max_workers) == ("auto", None)  # no file: the defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("guidance_scal: 3\n", "unknown option 'guidance_scal'; did you mean 'guidance_scale'?"),
        ("num-inference-step: 3\n", "did you mean 'num-inference-steps'?"),
        ("steps: 3\n", "did you mean 'num_inference_steps'?"),
        ("verbose: true\n", "unknown option 'verbose'"),  # how the command talks is not a setting
        ("height: 64\nheight: 72\n", None),  # YAML keeps the last: allowed
        ("width: 64\n--width: 72\n", "option '--width' is given twice"),
        ("num_inference_steps: [3, 4]\n", "takes one value, got a list"),
        ("- a\n- b\n", "expected a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_a_bad_config_file_is_a_usage_error_naming_the_key(tmp_path, fake_run, text, message):  # noqa: F811
    config = tmp_path / "c.yaml"
    config.write_text(text)
    result = runner.invoke(
        app, ["run", "m.parquet", "-o", str(tmp_path / "o"), "--config", str(config)], env=WIDE
    )
    if message is None:
        assert result.exit_code == 0 and fake_run[-1].defaults.height == 72
        return
    assert result.exit_code == 2 and not fake_run, result.output
    assert "--config" in result.stderr and message in " ".join(result.stderr.split())


def test_print_config_is_a_config_file_giving_the_same_run(tmp_path, fake_run):  # noqa: F811
    args = [
        "run",
        "m.parquet",
        "-o",
        str(tmp_path / "out"),
        "--num-inference-steps",
        "7",
        "--min-score",
        "clip_t=0.3",
        "--reuse",
        "/r/1",
        "--reuse",
        "/r/2",
        "--image-format",
        "jpg",
        "--channels-last",
        "--batch-size",
        "3",
    ]
    printed = runner.invoke(app, [*args, "--print-config"], env={"FREECUSTOM_MAX_WORKERS": "3"})
    assert printed.exit_code == 0 and not fake_run, printed.output  # printed, nothing run
    assert "num_inference_steps: 7\n" in printed.stdout and "max_workers: 3\n" in printed.stdout
    direct = runner.invoke(app, args, env={"FREECUSTOM_MAX_WORKERS": "3"})
    assert direct.exit_code == 0
    (tmp_path / "saved.yaml").write_text(printed.stdout)
    from_file = runner.invoke(app, ["run", "--config", str(tmp_path / "saved.yaml")])
    assert from_file.exit_code == 0, from_file.output
    assert fake_run[-1] == fake_run[-2]  # the same RunSettings, field for field


# --------------------------------------------------------------------------- --help


def test_run_help_groups_every_option_into_a_panel_with_a_one_line_help():
    run = _command("run")
    for param in run.params:
        if param.param_type_name != "option":
            continue
        assert (param.name in COMMON) == (param.rich_help_panel is None), param.name
        assert param.rich_help_panel in (None, *PANELS), (param.name, param.rich_help_panel)
        assert param.help and "\n" not in param.help and len(param.help) <= 90, (param.name, param.help)
        # its default is shown: by typer, or written in the help where it depends on the model family
        assert (
            param.is_flag
            or param.show_default is not False
            and (
                param.default is not None
                or "[default:" in param.help
                or param.multiple
                or param.required
                or param.name
                in (
                    "sam_checkpoint",
                    "detector",
                    "max_workers",
                    "kv_cache",
                    "blip_subject",
                    "blip_category",
                    "config",
                )
            )
        ), param.name
    text = runner.invoke(app, ["run", "--help"], env=WIDE).stdout
    positions = [text.index(f"─ {panel} ─") for panel in PANELS]
    assert positions == sorted(positions)  # input first, output last


@pytest.mark.parametrize("path", [p for p, _ in _all_commands()], ids=" ".join)
def test_usage_names_arguments_in_capitals_and_flags_have_no_type(path):
    text = runner.invoke(app, [*path, "--help"], env=WIDE).stdout
    usage = next(line for line in text.splitlines() if "Usage:" in line).strip()
    arguments = usage.partition("[OPTIONS]")[2]
    assert "{" not in usage and arguments == arguments.upper(), usage  # run [OPTIONS] MANIFEST
    assert "<bool>" not in text


def test_customize_help_shows_the_concept_form_and_every_model_family():
    text = runner.invoke(app, ["customize", "--help"], env=WIDE).stdout
    assert "IMAGE:MASK:PROMPT[:WEIGHT]" in text and "\N{FACE WITH MEDICAL MASK}" not in text
    for command in ("run", "customize"):
        help_text = " ".join(runner.invoke(app, [command, "--help"], env=WIDE).stdout.split())
        assert all(family in help_text for family in ("SD1.x/2.x", "SDXL", "BLIP-Diffusion", "FLUX.1")), (
            command
        )


def test_the_demo_names_its_model_and_the_next_command(tmp_path, fake_run):  # noqa: F811
    result = runner.invoke(app, ["demo", "-o", str(tmp_path / "demo"), "--steps", "2", "--size", "64"])
    assert result.exit_code == 0, result.output
    model = tmp_path / "demo" / "inputs" / "tiny-sd15"
    assert f"model:      {model}" in result.stdout
    again = next(line for line in result.stdout.splitlines() if line.startswith("run again:"))
    argv = shlex.split(again.removeprefix("run again:"))
    assert argv[:2] == ["freecustom-pipeline", "run"]
    rerun = runner.invoke(app, argv[1:])  # the printed command runs as printed
    assert rerun.exit_code == 0, rerun.output
    first, second = fake_run
    assert second.model == first.model == str(model) and second.defaults == first.defaults


def test_every_flag_a_config_file_sets_the_command_line_can_unset(tmp_path):
    """"The command line wins" holds for on/off options too: each flag of ``run`` has its ``--no-`` form,
    so a nightly config's ``score: true`` can be turned off for one run."""
    import yaml

    flags = [p for p in _command("run").params
             if p.param_type_name == "option" and p.is_flag and p.name not in COMMON | {"help", "version"}]
    assert {"score", "compile", "save_attention", "embed_references", "annotate"} <= {p.name for p in flags}
    config = tmp_path / "c.yaml"
    config.write_text("".join(f"{p.name}: {str(not p.default).lower()}\n" for p in flags))
    base = ["run", "m.parquet", "-o", str(tmp_path / "out"), "--config", str(config), "--print-config"]
    from_file = yaml.safe_load(runner.invoke(app, base).stdout)
    assert {p.name: from_file[p.name] for p in flags} == {p.name: not p.default for p in flags}
    assert not [p.name for p in flags if not p.secondary_opts]  # each has its --no- form (or --x for a default on)
    unset = [p.opts[0] if p.default else p.secondary_opts[0] for p in flags]
    result = runner.invoke(app, [*base, *unset])
    assert result.exit_code == 0, result.output
    assert {p.name: yaml.safe_load(result.stdout)[p.name] for p in flags} == {p.name: p.default for p in flags}
