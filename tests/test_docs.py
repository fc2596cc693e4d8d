"""The documentation: the site builds with ``mkdocs build --strict`` (a broken link or anchor, or a
page missing from the nav, fails), the manifest page agrees with ``MANIFEST_SCHEMA``, the Running
page shows every ``run --help`` panel, and the README stays a short way in whose set-up and test
commands are the ones CI runs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import typer

from pipeline.cli import app
from pipeline.manifest import (
    CONCEPT_TYPE,
    CONTEXT_TYPE,
    CONTROL_COLUMNS,
    MANIFEST_SCHEMA,
    OVERRIDE_TYPES,
    REQUIRED_COLUMNS,
    SUBJECT_COLUMNS,
)

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PAGE = REPO / "manifests" / "schema.md"  # included into docs/manifests.md
RUNNING_PAGE = REPO / "docs" / "running.md"
README = REPO / "README.md"


def test_the_site_builds_strict(tmp_path):
    pytest.importorskip("material", reason="the docs extra: pip install -e '.[docs]'")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    site = tmp_path / "site"
    # the included pages carry their files' text, the Running page its generated option tables
    assert "Sizing GPU workers" in (site / "clusters" / "index.html").read_text()
    assert "concepts[i].context" in (site / "manifests" / "index.html").read_text()
    running = (site / "running" / "index.html").read_text()
    assert "--num-inference-steps" in running and "FREECUSTOM_DTYPE" in running
    assert (site / "repo" / "benchmarks" / "results" / "sweep_cpu.png").is_file()  # the plot it shows


# --------------------------------------------------------------------------- the schema page


def _tables(markdown: str) -> dict[str, list[list[str]]]:
    """Heading -> the rows (cells) of the first table under it."""
    tables: dict[str, list[list[str]]] = {}
    heading = ""
    for line in markdown.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and not re.fullmatch(r"\|[-| ]+\|", line.strip()):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            tables.setdefault(heading, []).append(cells)
    return {h: rows[1:] for h, rows in tables.items()}  # without the header row


def _names(cell: str) -> list[str]:
    """`height`, `width` -> [height, width]."""
    return re.findall(r"`([a-z_]+)`", cell)


def _arrow(text: str) -> str:
    """The schema page's way of writing a type (`list\\<int64\\>`) as Arrow prints it, roughly."""
    return text.replace("\\", "").replace(" ", "")


def _arrow_of(t: pa.DataType) -> str:
    return str(t).replace("item: ", "").replace(" ", "")


@pytest.mark.parametrize(
    ("heading", "columns"),
    [
        ("Required columns", REQUIRED_COLUMNS),
        ("A concept (concepts[i])", {f.name: f.type for f in CONCEPT_TYPE}),
        ("concepts[i].context", {f.name: f.type for f in CONTEXT_TYPE}),
        ("Optional per-row overrides", OVERRIDE_TYPES),
        ("ControlNet columns (run --controlnet)", CONTROL_COLUMNS),
        ("BLIP-Diffusion column (a BLIP-Diffusion --model)", SUBJECT_COLUMNS),
    ],
)
def test_the_schema_page_documents_every_column_with_its_type(heading, columns):
    tables = {
        h.replace("`", ""): rows for h, rows in _tables(SCHEMA_PAGE.read_text(encoding="utf-8")).items()
    }
    assert heading in tables, (
        f"manifests/schema.md has no table under '{heading}' (headings: {sorted(tables)})"
    )
    documented = {name: row[1] for row in tables[heading] for name in _names(row[0])}
    assert set(documented) == set(columns), (
        f"'{heading}': in the schema, not documented: {sorted(set(columns) - set(documented))}; "
        f"documented, not in the schema: {sorted(set(documented) - set(columns))}"
    )
    for name, written in documented.items():
        actual = _arrow_of(columns[name])
        if "struct" in written:  # structs are spelled out in their own table: the outer type must agree
            assert actual.startswith(_arrow(written).split("struct")[0] + "struct"), (name, written, actual)
        else:
            assert _arrow(written) == actual, f"{name}: documented as {written}, the schema has {actual}"


def test_the_schema_tables_cover_the_whole_manifest_schema():
    documented = {
        name
        for h in (
            "Required columns",
            "Optional per-row overrides",
            "ControlNet columns (`run --controlnet`)",
            "BLIP-Diffusion column (a BLIP-Diffusion `--model`)",
        )
        for row in _tables(SCHEMA_PAGE.read_text(encoding="utf-8"))[h]
        for name in _names(row[0])
    }
    assert documented == set(MANIFEST_SCHEMA.names)


# --------------------------------------------------------------------------- the running page


def test_the_running_page_has_a_table_for_every_panel_of_run():
    run = typer.main.get_command(app).commands["run"]
    panels = {p.rich_help_panel or "Options" for p in run.params if p.param_type_name == "option"}
    markers = set(
        re.findall(r"^<!-- options: run / (.+?) -->$", RUNNING_PAGE.read_text(encoding="utf-8"), re.M)
    )
    assert markers == panels  # every option of run is in one generated table, and no table is empty


# --------------------------------------------------------------------------- the README


def _ci_commands() -> list[str]:
    text = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]


def test_the_readme_is_short_and_its_commands_are_the_ones_ci_runs():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    ci = _ci_commands()
    assert commands[0] == ci[0] == "bash scripts/setup.sh"
    assert commands[2] == ci[-1], "the README's test command is CI's"
    assert shlex.split(commands[1])[:2] == [".venv/bin/freecustom-pipeline", "demo"]


def test_every_relative_link_of_the_readme_exists():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]
    assert targets
    missing = [t for t in targets if not (REPO / t.partition("#")[0]).exists()]
    assert not missing, missing
