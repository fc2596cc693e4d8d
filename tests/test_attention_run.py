"""``run --save-attention`` end to end on the tiny SD1.5-topology model (a local Ray): every sample has a
``<key>.attn.png`` field with one panel per concept, equal pixel for pixel to the engine's maps drawn
by ``maps_image``; ``--reuse`` copies the maps (or leaves them behind when a run does not save them);
``--min-score`` keeps them with rejected samples; the gallery shows them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from freecustom_core.heatmap import maps_image
from pipeline.cli import app
from pipeline.examples import write_example_manifest
from pipeline.scoring import score_output
from pipeline.tiny_scorers import build_tiny_scorers
from stages.output.folder import OutputFolder
from stages.scoring.score_stage import tar_members

pytestmark = [pytest.mark.ray, pytest.mark.slow]

WIDTH, HEIGHT, STEPS = 80, 64, 2  # not square: width and height cannot be swapped unseen
COMMON = ["--num-inference-steps", str(STEPS), "--height", str(HEIGHT), "--width", str(WIDTH),
          "--samples-per-shard", "3", "--device", "cpu"]


def run_cli(manifest: Path, out: Path, model: Path, *extra: str):
    result = CliRunner().invoke(app, ["run", str(manifest), "-o", str(out), "--model", str(model), *COMMON, *extra])
    stats = json.loads((out / "_stats.json").read_text()) if (out / "_stats.json").exists() else None
    return result, stats


def shard(out: Path, kind: str = "shards") -> dict[str, bytes]:
    """Every member of the output's tars of ``kind`` (shards/ or rejected/)."""
    members = {}
    for tar in sorted((out / kind).glob("*.tar")):
        members.update(tar_members(tar.read_bytes()))
    return members


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, ray_session):
    """``with_maps``: 1 row (2 concepts) x 3 seeds with --save-attention and a kept K/V cache;
    ``without``: the same without it, reusing ``with_maps``; ``filtered``: --save-attention --min-score
    (one sample below) reusing both (the samples with maps win)."""
    root = tmp_path_factory.mktemp("attention-run")
    example = write_example_manifest(root / "in", seeds_per_row=3)
    table = pq.read_table(example)
    manifest = root / "in" / "one_row.parquet"  # beside the example's images: its paths are relative
    pq.write_table(table.filter(pc.equal(table["id"], "dog_hat_park")), manifest)
    kv = root / "kv-cache"
    with_maps, stats = run_cli(manifest, root / "with_maps", tiny_model_dir, "--save-attention", "--kv-cache", str(kv))
    assert with_maps.exit_code == 0, with_maps.output
    assert stats["samples_written"] == 3 and stats["samples_reused"] == 0
    without, without_stats = run_cli(manifest, root / "without", tiny_model_dir, "--reuse", str(root / "with_maps"))
    assert without.exit_code == 0, without.output
    scorers = build_tiny_scorers(root / "scorers")
    score_output(OutputFolder(str(root / "without")), scorers, device="cpu")
    clip_t = sorted(r["clip_t"] for r in pq.read_table(root / "without" / "scores").to_pylist())
    limit = round((clip_t[0] + clip_t[1]) / 2, 6)  # one sample below
    filtered, filtered_stats = run_cli(
        manifest, root / "filtered", tiny_model_dir, "--save-attention", "--min-score", f"clip_t={limit}",
        "--dino-model", scorers.dino, "--clip-image-model", scorers.clip_image,
        "--clip-text-model", scorers.clip_text, "--reuse", str(root / "without"), "--reuse", str(root / "with_maps"),
    )
    assert filtered.exit_code == 0, filtered.output
    return {"root": root, "manifest": manifest, "model": tiny_model_dir, "kv": kv, "without_stats": without_stats,
            "filtered_stats": filtered_stats, "limit": limit}


def test_every_sample_has_its_attention_panels(runs):
    out = runs["root"] / "with_maps"
    members = shard(out)
    metas = [json.loads(m) for m in pq.read_table(out / "shards" / "00000.parquet")["metadata"].to_pylist()]
    assert len(metas) == 3
    for meta in metas:
        key = meta["key"]
        attention = meta["attention"]
        assert attention["file"] == "attn.png" and attention["panels"] == 2 == len(meta["concepts"])
        assert attention["panel_size"] == [WIDTH, HEIGHT] and attention["gap"] == 4
        assert attention["steps"] == [0, STEPS] and len(attention["layers"]) == 6  # blocks (5, 6): the last six attn1
        assert all(name.startswith("up_blocks.") and name.endswith("attn1") for name in attention["layers"])
        assert json.loads(members[f"{key}.json"]) == meta
        with Image.open(io.BytesIO(members[f"{key}.attn.png"])) as image:
            assert image.format == "PNG" and image.size == (2 * WIDTH + 4, HEIGHT)
        panels = pixels(members[f"{key}.attn.png"])
        assert (panels[:, WIDTH : WIDTH + 4] == 255).all()  # the gap
        assert not np.array_equal(panels[:, :WIDTH], panels[:, WIDTH + 4 :])  # two concepts, two maps
    # WebDataset order: image, attention panels, JSON per sample
    import tarfile

    with tarfile.open(out / "shards" / "00000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == [f"{metas[0]['key']}.{ext}" for ext in ("png", "attn.png", "json")]
    assert json.loads((out / "_run.json").read_text())["save_attention"] is True


def test_maps_equal_the_engines(runs):
    """The stored panels are the engine's maps for the same prompts, seeds and K/V, drawn by maps_image."""
    import torch

    from stages.reference.models import load_generator
    from stages.reference.reference_kv import KVFile, kv_location

    out = runs["root"] / "with_maps"
    members = shard(out)
    metas = [json.loads(m) for m in pq.read_table(out / "shards" / "00000.parquet")["metadata"].to_pylist()]
    gen = load_generator(str(runs["model"]), dtype="float32", device="cpu", scheduler="release")
    kv = KVFile(kv_location(str(runs["kv"]), metas[0]["concept_set_id"])).load(verify=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the run's one-CPU actor (Ray sets OMP_NUM_THREADS=1): the same sums, bit for bit
    try:
        images, maps = gen.generate(
            [m["prompt"] for m in metas], [m["seed"] for m in metas], kv, num_inference_steps=STEPS,
            height=HEIGHT, width=WIDTH, guidance_scale=metas[0]["guidance_scale"],
            negative_prompt=metas[0]["negative_prompt"], reference_seed=metas[0]["reference_seed"],
            attention_maps=True, output_type="pil", batch_size=8,
        )
    finally:
        torch.set_num_threads(threads)
    assert maps.shape == (3, 2, HEIGHT // 8, WIDTH // 8)
    for meta, image, target_maps in zip(metas, images, maps, strict=True):
        assert np.array_equal(pixels(members[f"{meta['key']}.png"]), np.asarray(image))
        assert np.array_equal(pixels(members[f"{meta['key']}.attn.png"]), np.asarray(maps_image(target_maps, (WIDTH, HEIGHT))))


def test_reuse_without_save_attention_leaves_the_maps_behind(runs):
    out, first = runs["root"] / "without", shard(runs["root"] / "with_maps")
    members = shard(out)
    assert runs["without_stats"]["samples_reused"] == 3 and runs["without_stats"]["samples_rendered"] == 0
    assert sorted(name.split(".", 1)[1] for name in members) == ["json"] * 3 + ["png"] * 3
    for name, data in members.items():
        if name.endswith(".png"):
            assert data == first[name]
        else:
            assert "attention" not in json.loads(data)
    assert "save_attention" not in json.loads((out / "_run.json").read_text())  # the identity without it as before


def test_min_score_and_reuse_keep_the_maps(runs):
    out, first = runs["root"] / "filtered", shard(runs["root"] / "with_maps")
    stats = runs["filtered_stats"]
    assert stats["samples_reused"] == 3 and stats["samples_rejected"] == 1 and stats["samples_written"] == 2
    kept, rejected = shard(out), shard(out, "rejected")
    for members, n in ((kept, 2), (rejected, 1)):
        keys = {name.split(".", 1)[0] for name in members}
        assert len(keys) == n
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            assert meta["attention"]["file"] == "attn.png"
            assert members[f"{key}.attn.png"] == first[f"{key}.attn.png"]  # the maps of the sample it reused
            assert members[f"{key}.png"] == first[f"{key}.png"]
    assert all("rejected_by" in json.loads(v) for k, v in rejected.items() if k.endswith(".json"))


def test_a_run_that_saves_attention_renders_what_it_cannot_reuse_with_maps(runs, tmp_path):
    first = shard(runs["root"] / "with_maps")
    result, stats = run_cli(runs["manifest"], tmp_path / "again", runs["model"], "--save-attention",
                            "--reuse", str(runs["root"] / "without"))
    assert result.exit_code == 0, result.output
    assert stats["samples_reused"] == 0 and stats["samples_rendered"] == 3
    assert shard(tmp_path / "again") == first  # rendered again: the same images, maps and JSON


def test_save_attention_is_part_of_the_output_identity(runs):
    result, _ = run_cli(runs["manifest"], runs["root"] / "with_maps", runs["model"], "--kv-cache", str(runs["kv"]))
    assert result.exit_code == 2 and "save_attention" in result.output


def test_gallery_shows_the_maps(runs):
    from pipeline.review import build_review

    site = runs["root"] / "site"
    result = build_review(str(runs["root"] / "filtered"), str(site))
    assert result["samples"] == 3 and result["rejected"] == 1
    assert len(list((site / "thumbs").rglob("*.attn.jpg"))) == 3
    script = next((site / "data").glob("*.js")).read_text()
    data = json.loads(script.removeprefix("window.REVIEW_DATA = ").rstrip(";\n"))
    assert [[data["extras"][i]["thumb"] for i in s] for s in data["samples"]["extras"]] == [["attn.jpg"]] * 3
