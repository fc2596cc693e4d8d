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


def test_validate_streams_problems_and_counts_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.manifest import MANIFEST_SCHEMA

    cutout = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(cutout).ellipse((4, 4, 28, 28), fill=(200, 10, 10, 255))
    cutout.save(tmp_path / "ball.png")
    concept = {"image": "ball.png", "prompt": "a ball", "mask": None, "weight": 3.0, "box": None, "points": None,
               "label": None, "context": None}
    rows = [{"id": "a", "prompt": "a ball", "seeds": [1], "concepts": [concept]},
            {"id": "b", "prompt": "a ball", "seeds": [], "concepts": [concept]},
            {"id": "c", "prompt": "a ball", "seeds": [2, 3], "concepts": [dict(concept, image="gone.png")]},
            {"id": "d", "prompt": "a ball", "seeds": [4], "concepts": [concept]}]
    schema = pa.schema([MANIFEST_SCHEMA.field(n) for n in ("id", "prompt", "seeds", "concepts")])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "m.parquet")
    result = runner.invoke(app, ["validate", str(tmp_path / "m.parquet")])
    assert result.exit_code == 1
    assert "row 1 (id=b): seeds:" in result.output and "row 2 (id=c): concepts[0].image:" in result.output
    assert "4 rows: 2 valid, 2 refused (2 problems)" in result.output
