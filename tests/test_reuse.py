"""Incremental runs: ``--reuse`` copies every sample whose reproducibility record is in a previous
output and renders exactly the new and changed ones."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.examples import write_example_manifest
from pipeline.run import run
from pipeline.settings import RunSettings
from stages.params import GenParams

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _samples(out: Path) -> dict[str, tuple[bytes, dict]]:
    found = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".png"):
                key = name.removesuffix(".png")
                found[key] = (data, json.loads(members[f"{key}.json"]))
    return found


def _settings(manifest: Path, out: Path, model: Path, **kw) -> RunSettings:
    return RunSettings(manifest=str(manifest), out=str(out), model=str(model), samples_per_shard=3,
                       defaults=GenParams(num_inference_steps=2, height=64, width=64), **kw)


def test_reuse_renders_exactly_the_new_and_changed_samples(tmp_path, tiny_model_dir, ray_session):
    inputs = tmp_path / "inputs"
    first_manifest = write_example_manifest(inputs)
    first = run(_settings(first_manifest, tmp_path / "night1", tiny_model_dir))
    assert first.stats["complete"] and first.stats["samples_reused"] == 0
    before = _samples(tmp_path / "night1")

    # night 2: the same rows, one with a changed prompt, one whose product photo changed, one new row
    rows = pq.read_table(first_manifest).to_pylist()
    changed_photo = Image.open(inputs / "images" / "mug.jpg").convert("RGB")
    changed_photo.putpixel((10, 10), (255, 0, 0))
    changed_photo.save(inputs / "images" / "mug_v2.png")
    by_id = {r["id"]: r for r in rows}
    by_id["dog_hat_beach"]["prompt"] = "a dog wearing a red hat on a snowy beach"
    by_id["mug_kitchen"]["concepts"][0]["image"] = "images/mug_v2.png"
    rows.append(dict(by_id["hat_product"], id="hat_studio", prompt="a red hat in a photo studio", seeds=[7]))
    second_manifest = inputs / "night2.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(first_manifest)), second_manifest)

    second = run(_settings(second_manifest, tmp_path / "night2", tiny_model_dir, reuse=(str(tmp_path / "night1"),)))
    stats = second.stats
    changed = {"dog_hat_beach-1000", "dog_hat_beach-1001", "mug_kitchen-2000", "mug_kitchen-2001", "hat_studio-7"}
    assert stats["complete"] and stats["samples_written"] == 9
    assert stats["samples_rendered"] == len(changed) and stats["samples_reused"] == 9 - len(changed)
    after = _samples(tmp_path / "night2")
    assert set(after) == set(before) | {"hat_studio-7"}
    for key, (image, meta) in after.items():
        if key in changed:
            assert "reused_from" not in meta
        else:  # byte for byte the previous night's image; its metadata plus where it came from
            assert image == before[key][0]
            assert meta["reused_from"].endswith(f"#{key}") and "night1" in meta["reused_from"]
            assert {k: v for k, v in meta.items() if k not in ("reused_from", "shard")} == \
                {k: v for k, v in before[key][1].items() if k != "shard"}
    assert after["dog_hat_beach-1000"][1]["prompt"] == "a dog wearing a red hat on a snowy beach"

    # another setting changes every record: nothing is reused from that output
    third = run(_settings(second_manifest, tmp_path / "night3", tiny_model_dir, reuse=(str(tmp_path / "night2"),),
                          image_format="webp"))
    assert third.stats["samples_reused"] == 0 and third.stats["samples_rendered"] == 9


def test_a_reuse_that_is_no_output_folder_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    manifest = write_example_manifest(tmp_path / "inputs")
    (tmp_path / "typo").mkdir()
    with pytest.raises(ValueError, match=r"--reuse .*typo: not an output folder .*no _run\.json"):
        run(_settings(manifest, tmp_path / "out", tiny_model_dir, reuse=(str(tmp_path / "typo"),)))
    assert not (tmp_path / "out" / "_run.json").exists()
