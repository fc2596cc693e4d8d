"""Shared pieces of the fault and bad-input suites: the small job, its settings, and strict output readers.

Every run here is the real pipeline on the tiny random-weight model (``tests/conftest.py``) at
64x64 with 2 denoising steps, 2 samples per shard. ``read_output`` reads an output folder back
in full and fails on anything a consumer would trip over: a tar or Parquet file that does not
read to its end, an image without its JSON (or the reverse), a sample twice, a shard without
its done-marker, a temporary file left visible.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.params import GenParams

SMALL = GenParams(height=64, width=64, num_inference_steps=2)
SAMPLES_PER_SHARD = 2
CLI_ARGS = ["--num-inference-steps", "2", "--height", "64", "--width", "64", "--samples-per-shard", "2"]
REPO = Path(__file__).resolve().parents[2]


def cli_command() -> list[str]:
    """The ``freecustom-pipeline`` console script as pyproject.toml declares it, run by the interpreter
    running the tests: subprocesses started in REPO test this checkout wherever its environment lives."""
    scripts = (REPO / "pyproject.toml").read_text()
    module, func = re.search(r'^freecustom-pipeline\s*=\s*"([\w.]+):(\w+)"', scripts, re.M).groups()
    return [sys.executable, "-c", f"from {module} import {func}; {func}(prog_name='freecustom-pipeline')"]


def settings_for(manifest: Path, out: Path, model: Path, **kwargs):
    """The RunSettings the CLI builds from ``run MANIFEST -o OUT --model MODEL *CLI_ARGS``."""
    from pipeline.run import RunSettings

    return RunSettings(
        manifest=str(manifest),
        out=str(out),
        model=str(model),
        defaults=SMALL,
        samples_per_shard=SAMPLES_PER_SHARD,
        **kwargs,
    )


def expected_pairs(manifest: Path) -> set[tuple[str, int]]:
    return {(r["id"], s) for r in pq.read_table(manifest).to_pylist() for s in r["seeds"]}


@dataclass
class Output:
    """An output folder read back: per sample key its image bytes, metadata and shard."""

    samples: dict[str, dict] = field(default_factory=dict)
    tars: dict[str, bytes] = field(default_factory=dict)  # shard name -> tar bytes
    parquets: dict[str, list[dict]] = field(default_factory=dict)  # shard name -> rows
    markers: dict[str, dict] = field(default_factory=dict)

    def pairs(self) -> list[tuple[str, int]]:
        return [(s["meta"]["id"], s["meta"]["seed"]) for s in self.samples.values()]


def read_tar_fully(path: Path) -> list[tuple[str, bytes]]:
    """Every member of a tar, read to its end (a torn tar raises here)."""
    with tarfile.open(path, mode="r:") as tar:
        members = tar.getmembers()
        assert all(m.isfile() for m in members), path
        return [(m.name, tar.extractfile(m).read()) for m in members]


def read_output(out: Path) -> Output:
    """Read every shard of ``out`` in full and check each is whole; returns what it holds."""
    result = Output()
    shards = out / "shards"
    tars = sorted(shards.glob("*.tar")) if shards.is_dir() else []
    for tar_path in tars:
        name = tar_path.stem
        parquet = tar_path.with_suffix(".parquet")
        marker = out / "_progress" / f"{name}.json"
        assert parquet.exists() and marker.exists(), f"{tar_path.name} lacks its Parquet or its done-marker"
        result.tars[name] = tar_path.read_bytes()
        members = read_tar_fully(tar_path)
        by_key: dict[str, dict[str, bytes]] = {}
        for member, data in members:
            key, _, ext = member.rpartition(".")
            assert ext in ("png", "jpg", "webp", "json"), member
            assert ext not in by_key.setdefault(key, {}), f"{member} twice in {tar_path.name}"
            by_key[key][ext] = data
        for key, parts in by_key.items():
            assert set(parts) - {"json"} and "json" in parts, (
                f"partial sample {key} in {tar_path.name}: {sorted(parts)}"
            )
            (ext,) = set(parts) - {"json"}
            meta = json.loads(parts["json"])
            assert meta["key"] == key == f"{meta['id']}-{meta['seed']}"
            Image.open(io.BytesIO(parts[ext])).load()  # the image decodes to its end
            assert key not in result.samples, (
                f"sample {key} in {result.samples.get(key, {}).get('shard')} and {name}"
            )
            result.samples[key] = {"image": parts[ext], "meta": meta, "shard": name}
        rows = pq.read_table(parquet).to_pylist()
        assert [r["key"] for r in rows] == list(by_key), f"{parquet.name} does not list its tar's samples"
        assert [json.loads(r["metadata"]) for r in rows] == [json.loads(by_key[k]["json"]) for k in by_key]
        result.parquets[name] = rows
        result.markers[name] = json.loads(marker.read_text())
        assert result.markers[name]["keys"] == list(by_key)
    for parquet in sorted(shards.glob("*.parquet")) if shards.is_dir() else []:
        assert parquet.with_suffix(".tar").exists(), f"{parquet.name} without its tar"
    return result


def visible_temporaries(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name)


def assert_complete_and_identical(out: Path, reference: Output, manifest: Path | None = None) -> Output:
    """``out`` holds every sample exactly once, whole, byte for byte as ``reference``; no temp files."""
    got = read_output(out)
    assert len(got.pairs()) == len(set(got.pairs()))
    if manifest is not None:
        assert set(got.pairs()) == expected_pairs(manifest)
    assert sorted(got.samples) == sorted(reference.samples)
    assert got.tars.keys() == reference.tars.keys()
    for name, data in reference.tars.items():
        assert got.tars[name] == data, f"shard {name} differs from the uninterrupted run"
        assert got.parquets[name] == reference.parquets[name]
    assert all(m["status"] == "complete" for m in got.markers.values())
    assert visible_temporaries(out) == []
    return got


@pytest.fixture(scope="session")
def example(tmp_path_factory) -> Path:
    """The built-in example manifest (4 rows x 2 seeds, 3 concept sets, one context composite)."""
    from pipeline.examples import write_example_manifest

    return write_example_manifest(tmp_path_factory.mktemp("example"))
