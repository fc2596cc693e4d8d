"""`run --model` an SDXL or a FLUX.1 checkpoint, end to end on a local Ray (tiny random-weight models
built, saved and loaded back through the real loaders).

Each run renders rows with two and three concepts, several prompts and seeds per concept set; the
K/V are computed once per concept set and reused (``reference_passes``), the family's defaults are
the run's (MRSA blocks from the checkpoint's config), and every image equals the engine API's
``generate`` with the K/V the run stored, so the pipeline hands the engine exactly the row's
parameters.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from tests.flux_tiny import build_tiny_flux

pytestmark = [pytest.mark.ray, pytest.mark.slow]

runner = CliRunner()
COLORS = ("red", "blue", "green")


def _concept_png(path: Path, color: str, box: tuple[int, int, int, int]) -> None:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (box[2] - box[0], box[3] - box[1]), color), box[:2])
    image.save(path)


def _manifest(folder: Path, extra_rows: list[dict] = ()) -> Path:
    boxes = ((8, 8, 40, 40), (24, 4, 60, 28), (0, 36, 64, 64))
    for color, box in zip(COLORS, boxes, strict=True):
        _concept_png(folder / f"{color}.png", color, box)
    two = [{"image": "red.png", "prompt": "a red cube"}, {"image": "blue.png", "prompt": "a blue hat", "weight": 2.5}]
    three = [*two, {"image": "green.png", "prompt": "green grass"}]
    rows = [
        {"id": "two-a", "prompt": "a red cube wearing a blue hat", "seeds": [1, 2], "concepts": two},
        {"id": "two-b", "prompt": "a red cube with a blue hat on a table", "seeds": [3], "concepts": two},
        {"id": "three", "prompt": "a red cube in a blue hat on green grass", "seeds": [4, 5], "concepts": three},
        *extra_rows,
    ]
    columns = sorted({k for r in rows for k in r})
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]), manifest)
    return manifest


def _samples(out: Path) -> dict[str, tuple[dict, np.ndarray]]:
    """Sample key -> (metadata, RGB array)."""
    samples: dict[str, dict] = {}
    for f in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(f) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return {k: (json.loads(v["json"]), np.asarray(Image.open(io.BytesIO(v["png"])).convert("RGB")))
            for k, v in samples.items()}


def _check_against_engine(gen, out: Path, kv_cache: Path, family_kwargs) -> dict:
    """Every sample equals ``gen.generate`` with the K/V file of its concept set, computed as the run does:
    one call per concept set with its targets in shard order, on one thread as the run's actors
    (``--cpus-per-worker 1``); batch composition and thread count change float rounding. Returns the
    metadata by row id."""
    from stages.reference.reference_kv import KVFile, kv_location

    by_set: dict[str, list[tuple[dict, np.ndarray]]] = {}
    for _key, (meta, pixels) in sorted(_samples(out).items()):
        by_set.setdefault(meta["concept_set_id"], []).append((meta, pixels))
    by_id: dict[str, list[dict]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for csid, samples in by_set.items():
            kv = KVFile(kv_location(str(kv_cache), csid)).load(verify=True)
            meta = samples[0][0]
            images = gen.generate([m["prompt"] for m, _ in samples], [m["seed"] for m, _ in samples], kv,
                                  num_inference_steps=meta["num_inference_steps"], height=meta["height"],
                                  width=meta["width"], guidance_scale=meta["guidance_scale"],
                                  reference_seed=meta["reference_seed"], batch_size=8, **family_kwargs(meta))
            for (m, pixels), image in zip(samples, images, strict=True):
                np.testing.assert_array_equal(pixels, np.asarray(image.convert("RGB")))
                by_id.setdefault(m["id"], []).append(m)
    finally:
        torch.set_num_threads(threads)
    return by_id


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("flux"), seed=0, num_layers=3, num_single_layers=5)


def test_flux_manifest_with_two_and_three_concepts(flux_dir, ray_session, tmp_path):
    from freecustom_core import FluxFreeCustomGenerator

    manifest = _manifest(tmp_path, extra_rows=[
        {"id": "negative", "prompt": "a red cube", "seeds": [6], "negative_prompt": "blurry",
         "concepts": [{"image": "red.png", "prompt": "a red cube"}]},
        {"id": "guidance", "prompt": "a red cube", "seeds": [7], "guidance_scale": 5.0,
         "concepts": [{"image": "red.png", "prompt": "a red cube"}]},
    ])
    out, kv_cache = tmp_path / "out", tmp_path / "kv"
    result = runner.invoke(app, ["run", str(manifest), "-o", str(out), "--model", str(flux_dir), "--kv-cache",
                                 str(kv_cache), "--num-inference-steps", "2", "--height", "64", "--width", "64"])
    assert result.exit_code == 1, result.output  # the two FLUX-incompatible rows failed, the rest rendered
    refused = runner.invoke(app, ["run", str(manifest), "-o", str(tmp_path / "maps"), "--model", str(flux_dir),
                                  "--save-attention"])
    assert refused.exit_code == 2 and "not available for FLUX.1" in refused.output
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert sorted((e["id"], e["field"]) for e in errors) == [("guidance", "guidance_scale"),
                                                             ("negative", "negative_prompt")]
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["samples_written"] == 5 and stats["concept_sets"] == 2
    assert stats["reference_passes"] == 2  # once per concept set, reused for 2 prompts and 3 seeds / 2 seeds

    gen = FluxFreeCustomGenerator.from_pretrained(str(flux_dir), torch_dtype=torch.float32, device="cpu")
    by_id = _check_against_engine(gen, out, kv_cache, lambda meta: {})
    meta = by_id["three"][0]
    # the family's defaults: FreeCus's vital layers at this depth, guidance 3.5, no negative prompt
    assert meta["mrsa"]["blocks"] == [0, 2, 4, 7] and meta["guidance_scale"] == 3.5 and meta["negative_prompt"] == ""
    assert len(meta["concepts"]) == 3 and len(by_id["two-a"][0]["concepts"]) == 2
    assert by_id["two-a"][0]["concept_set_id"] == by_id["two-b"][0]["concept_set_id"] != meta["concept_set_id"]


def test_sdxl_manifest_end_to_end(ray_session, tmp_path):
    from freecustom_core import FreeCustomGenerator
    from pipeline.tiny_model import build_tiny_sdxl

    sdxl_dir = build_tiny_sdxl(tmp_path / "sdxl", seed=0)
    manifest = _manifest(tmp_path)
    out, kv_cache = tmp_path / "out", tmp_path / "kv"
    result = runner.invoke(app, ["run", str(manifest), "-o", str(out), "--model", str(sdxl_dir), "--kv-cache",
                                 str(kv_cache), "--num-inference-steps", "2", "--height", "128", "--width", "128"])
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "_stats.json").read_text())
    assert (stats["samples_written"], stats["concept_sets"], stats["reference_passes"]) == (5, 2, 2)

    gen = FreeCustomGenerator.from_pretrained(str(sdxl_dir), torch_dtype=torch.float32, device="cpu")
    by_id = _check_against_engine(gen, out, kv_cache, lambda meta: {"negative_prompt": meta["negative_prompt"]})
    meta = by_id["three"][0]
    assert meta["mrsa"]["blocks"] == [3, 4]  # SDXL's default: up_blocks.0 and .1, read from the UNet config
    assert (meta["height"], meta["width"]) == (128, 128)


def test_blip_diffusion_run_with_a_subject(ray_session, tmp_path):
    from freecustom_core import BlipDiffusionFreeCustom
    from tests.blip_tiny import build_tiny_blip_diffusion

    blip_dir = build_tiny_blip_diffusion(tmp_path / "blip", seed=0)
    manifest = _manifest(tmp_path)
    subject = tmp_path / "subject.png"
    _concept_png(subject, "orange", (10, 10, 50, 54))
    common = ["--num-inference-steps", "2", "--height", "64", "--width", "64"]
    # the subject is required by a BLIP-Diffusion model (per row: the rows have no blip_subject column)
    result = runner.invoke(app, ["run", str(manifest), "-o", str(tmp_path / "none"), "--model", str(blip_dir), *common])
    errors = pq.read_table(tmp_path / "none" / "errors.parquet").to_pylist()
    assert result.exit_code != 0 and {e["field"] for e in errors} == {"blip_subject"}, result.output
    assert all("--blip-subject IMAGE --blip-category WORD" in e["reason"] for e in errors)
    out, kv_cache = tmp_path / "out", tmp_path / "kv"
    result = runner.invoke(app, ["run", str(manifest), "-o", str(out), "--model", str(blip_dir), "--kv-cache",
                                 str(kv_cache), *common, "--blip-subject", str(subject), "--blip-category", "cube",
                                 "--blip-target-category", "box"])
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "_stats.json").read_text())
    assert (stats["samples_written"], stats["reference_passes"]) == (5, 2)

    gen = BlipDiffusionFreeCustom.from_pretrained(str(blip_dir), torch_dtype=torch.float32, device="cpu")
    image = Image.open(subject)
    by_id = _check_against_engine(gen, out, kv_cache, lambda meta: {
        "negative_prompt": meta["negative_prompt"], "subject_image": image.convert("RGB"),
        "subject_category": "cube", "target_subject_category": "box"})
    record = by_id["three"][0]["blip_subject"]
    assert (record["image"], record["category"], record["target_category"]) == (str(subject), "cube", "box")
    assert json.loads((out / "_run.json").read_text())["blip_subject"]["category"] == "cube"


def test_flux_with_a_controlnet(flux_dir, ray_session, tmp_path):
    """`--controlnet` with a FLUX.1 model: FLUX ControlNet residuals on the targets, references without them."""
    from freecustom_core import FluxFreeCustomGenerator
    from tests.flux_tiny import build_tiny_flux_controlnet

    cn_dir = build_tiny_flux_controlnet(tmp_path / "cn", seed=0, num_layers=1, num_single_layers=2)
    _manifest(tmp_path)
    layout = tmp_path / "layout.png"
    _concept_png(layout, "white", (16, 20, 48, 60))
    two = [{"image": "red.png", "prompt": "a red cube"}, {"image": "blue.png", "prompt": "a blue hat"}]
    control = {"image": "layout.png", "type": "none", "scale": 0.7, "start": None, "end": None}
    manifest = tmp_path / "cn.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "cn", "prompt": "a red cube in a blue hat", "seeds": [1, 2],
                                          "concepts": two, "control": control}]), manifest)
    out, kv_cache = tmp_path / "out-cn", tmp_path / "kv-cn"
    common = ["--model", str(flux_dir), "--num-inference-steps", "2", "--height", "64", "--width", "64"]
    refused = runner.invoke(app, ["run", str(manifest), "-o", str(tmp_path / "refused"), *common, "--controlnet",
                                  str(cn_dir), "--control-references"])
    assert refused.exit_code == 2 and "not available with a FLUX.1 model" in refused.output
    result = runner.invoke(app, ["run", str(manifest), "-o", str(out), *common, "--kv-cache", str(kv_cache),
                                 "--controlnet", str(cn_dir)])
    assert result.exit_code == 0, result.output

    gen = FluxFreeCustomGenerator.from_pretrained(str(flux_dir), torch_dtype=torch.float32, device="cpu",
                                                  controlnet=str(cn_dir))
    condition = Image.open(layout).convert("RGB")
    by_id = _check_against_engine(gen, out, kv_cache, lambda meta: {
        "control_image": condition, "controlnet_conditioning_scale": 0.7})
    meta = by_id["cn"][0]
    assert meta["control"]["control_references"] is False and meta["control"]["scale"] in (0.7, [0.7])


def test_customize_takes_every_family(flux_dir, tmp_path):
    """`customize --model` an SDXL, BLIP-Diffusion or FLUX.1 folder: loaded as `run` loads it; a BLIP model
    needs its subject, which no other family takes."""
    from pipeline.tiny_model import build_tiny_sdxl
    from tests.blip_tiny import build_tiny_blip_diffusion

    _concept_png(tmp_path / "red.png", "red", (8, 8, 40, 40))
    _concept_png(tmp_path / "subject.png", "orange", (10, 10, 50, 54))
    base = ["customize", "--concept", f"{tmp_path}/red.png::a red cube", "--prompt", "a red cube", "--seed", "3",
            "--steps", "2", "--size", "64"]
    blip = ["--blip-subject", str(tmp_path / "subject.png"), "--blip-category", "cube"]
    models = {"sdxl": build_tiny_sdxl(tmp_path / "sdxl", seed=0), "flux": flux_dir,
              "blip": build_tiny_blip_diffusion(tmp_path / "blip", seed=0)}
    for name, folder in models.items():
        out = tmp_path / f"out-{name}"
        result = runner.invoke(app, [*base, "-o", str(out), "--model", str(folder), *(blip if name == "blip" else [])])
        assert result.exit_code == 0, (name, result.output)
        assert Image.open(out / "seed3.png").size == (64, 64)
    refused = runner.invoke(app, [*base, "-o", str(tmp_path / "x"), "--model", str(models["blip"])])
    assert refused.exit_code == 2 and "--blip-subject and --blip-category" in refused.output
    refused = runner.invoke(app, [*base, "-o", str(tmp_path / "y"), "--model", str(models["sdxl"]), *blip])
    assert refused.exit_code == 2


def test_sdxl_with_a_controlnet(ray_session, tmp_path):
    """`--controlnet` with an SDXL model (StableDiffusionXLControlNetPipeline): the targets get the residuals
    of their own condition (canny, the run's thresholds), references without, K/V once per concept set."""
    from freecustom_core import FreeCustomGenerator
    from freecustom_core.controlnet import canny
    from pipeline.tiny_model import build_tiny_controlnet, build_tiny_sdxl

    sdxl_dir = build_tiny_sdxl(tmp_path / "sdxl", seed=0)
    cn_dir = build_tiny_controlnet(sdxl_dir, tmp_path / "cn", seed=1)
    _manifest(tmp_path)
    for name, box in (("layout_a.png", (16, 20, 48, 60)), ("layout_b.png", (4, 4, 30, 40))):
        _concept_png(tmp_path / name, "white", box)
    two = [{"image": "red.png", "prompt": "a red cube"}, {"image": "blue.png", "prompt": "a blue hat"}]
    rows = [{"id": f"cn-{k}", "prompt": "a red cube in a blue hat", "seeds": [seed], "concepts": two,
             "control": {"image": f"layout_{k}.png", "type": "canny", "scale": 0.6, "start": None, "end": None}}
            for seed, k in ((1, "a"), (2, "b"))]
    manifest = tmp_path / "cn.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out, kv_cache = tmp_path / "out-cn", tmp_path / "kv-cn"
    result = runner.invoke(app, ["run", str(manifest), "-o", str(out), "--model", str(sdxl_dir), "--kv-cache",
                                 str(kv_cache), "--controlnet", str(cn_dir), "--canny-low", "40", "--canny-high",
                                 "120", "--num-inference-steps", "2", "--height", "128", "--width", "128"])
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "_stats.json").read_text())
    assert (stats["samples_written"], stats["reference_passes"]) == (2, 1)  # one K/V for both layouts

    gen = FreeCustomGenerator.from_pretrained(str(sdxl_dir), torch_dtype=torch.float32, device="cpu",
                                              controlnet=str(cn_dir))
    conditions = {f"cn-{k}": canny(Image.open(tmp_path / f"layout_{k}.png").convert("RGB"), 40, 120)
                  for k in ("a", "b")}
    from stages.reference.reference_kv import KVFile, kv_location

    samples = [samples for _key, samples in sorted(_samples(out).items())]  # one batch, in shard order
    metas = [meta for meta, _ in samples]
    kv = KVFile(kv_location(str(kv_cache), metas[0]["concept_set_id"])).load(verify=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = gen.generate([m["prompt"] for m in metas], [m["seed"] for m in metas], kv, num_inference_steps=2,
                              height=128, width=128, negative_prompt=metas[0]["negative_prompt"], reference_seed=0,
                              control_image=[conditions[m["id"]] for m in metas], controlnet_conditioning_scale=0.6)
    finally:
        torch.set_num_threads(threads)
    for (meta, pixels), image in zip(samples, images, strict=True):
        np.testing.assert_array_equal(pixels, np.asarray(image.convert("RGB")))
        assert meta["mrsa"]["blocks"] == [3, 4] and meta["control"]["sources"][0]["type"] == "canny"
