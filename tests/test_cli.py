"""CLI surface: help with examples on every command, customize (the engine alone), option errors."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import sample_root

runner = CliRunner()


@pytest.mark.parametrize("command", [["run"], ["validate"], ["inspect"], ["demo"], ["customize"], ["manifest", "from-config"]])
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "freecustom-pipeline" in result.output


def test_customize_a_case_folder(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    result = runner.invoke(app, ["customize", str(sample_root() / "cat_necklace"), "-o", str(out), "--model",
                                 str(tiny_model_dir), "--steps", "2", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["seed15207.png", "seed20394.png"]  # the case's seeds
    assert Image.open(out / "seed15207.png").size == (64, 64)


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
    result = runner.invoke(app, ["customize", "--concept", f"{tmp_path}/ball.png::a green ball",
                                 "--concept", f"{tmp_path}/room.jpg:{tmp_path}/room_mask.png:a room:2.5",
                                 "--prompt", "a green ball in a room", "--seed", "3", "-o", str(out),
                                 "--model", str(tiny_model_dir), "--steps", "2", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert (out / "seed3.png").exists()
    bad = runner.invoke(app, ["customize", "--concept", "only-two:parts", "--prompt", "x", "-o", str(out)])
    assert bad.exit_code == 2 and "IMAGE:MASK:PROMPT" in bad.output
