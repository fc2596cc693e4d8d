"""End to end: ``run --controlnet`` on the ControlNet example manifest (manifests/examples/controlnet.py),
against the engine API.

One run (tiny SD1.5 + a tiny random ControlNet built here, 64x64, 2 steps, canny thresholds 40 / 120),
with both K/V modes in it (the example's rows, renamed a-d here):

- rows a (canny) and b (type none) leave ``control_references`` null (the run's default, off): the
  references skip ControlNet, so the two control images share one concept set and ONE reference pass;
- rows c (canny) and d (none) set ``control_references``: K/V per (concept set, control image), TWO
  more passes and two more concept-set ids;
- row e (added here) has no control: refused by validation (field ``control``), the others go on.

Each sample equals ``FreeCustomGenerator.generate`` with the same control image and seed (same batch),
its JSON holds the control record and source, its ``.control.png`` is the condition fed to ControlNet.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from freecustom_core import ConceptRef, FreeCustomGenerator, MRSAConfig
from freecustom_core.controlnet import canny, image_digest
from manifests.examples.controlnet import LAYOUT_SCALE, build_controlnet_example, controlnet_rows
from pipeline.cli import app
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.tiny_model import build_tiny_controlnet

pytestmark = [pytest.mark.ray]

runner = CliRunner()
LOW, HIGH = 40.0, 120.0  # not the defaults: the run's thresholds must be the ones used
SCALE = LAYOUT_SCALE


@pytest.fixture(scope="module")
def controlnet_run(tiny_model_dir, ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    cn = build_tiny_controlnet(tiny_model_dir, root / "tiny-controlnet", seed=1)
    rows = [dict(r, id=short) for r, short in zip(controlnet_rows(), "abcd", strict=True)]
    rows.append(dict(rows[0], id="e", prompt="a red teapot without layout", seeds=[7], control=None,
                     control_references=None))
    build_controlnet_example(root, size=64)  # the layouts and the concept; its manifest, with row e added:
    manifest = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), manifest)
    out = root / "out"
    result = runner.invoke(app, [
        "run", str(manifest), "-o", str(out), "--model", str(tiny_model_dir), "--controlnet", str(cn),
        "--canny-low", str(LOW), "--canny-high", str(HIGH),
        "--num-inference-steps", "2", "--height", "64", "--width", "64", "--samples-per-shard", "8",
        "--batch-size", "4",
    ])
    assert result.exit_code == 1, result.output  # row e failed, every other row rendered
    return root, out, cn, json.loads((out / "_stats.json").read_text())


def _samples(out: Path) -> dict[str, dict]:
    import webdataset as wds

    urls = [str(p) for p in sorted((out / "shards").glob("*.tar"))]
    return {json.loads(s["json"])["id"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


@pytest.mark.slow
def test_a_row_without_control_is_refused_and_the_run_goes_on(controlnet_run):
    _, out, _, stats = controlnet_run
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [(e["id"], e["stage"], e["field"]) for e in errors] == [("e", "validate", "control")]
    assert "this run has --controlnet" in errors[0]["reason"] and "type none with a blank image" in errors[0]["reason"]
    assert stats["samples_written"] == 4 and sorted(_samples(out)) == ["a", "b", "c", "d"]
    assert "control.png" in (out / "README.md").read_text()  # the dataset card names the extra member


@pytest.mark.slow
def test_k_v_once_for_two_control_images_by_default_and_per_image_with_control_references(controlnet_run):
    _, out, _, stats = controlnet_run
    metas = {k: json.loads(s["json"]) for k, s in _samples(out).items()}
    csid = {k: m["concept_set_id"] for k, m in metas.items()}
    assert csid["a"] == csid["b"]  # the default: K/V per concept set, whatever the control image
    assert len({csid["a"], csid["c"], csid["d"]}) == 3  # control_references: per (concept set, control image)
    assert stats["reference_passes"] == 3
    assert [m["control"]["control_references"] for m in (metas["a"], metas["b"], metas["c"], metas["d"])] == [
        False, False, True, True]
    # the previews of a set computed through ControlNet show its condition; a plain set has none
    assert (out / "references" / csid["c"] / "control_0.png").exists()
    assert not (out / "references" / csid["a"] / "control_0.png").exists()
    assert (out / "references" / csid["c"] / "contact_sheet.png").exists()


@pytest.mark.slow
def test_metadata_and_control_png_hold_the_condition(controlnet_run):
    root, out, cn, _ = controlnet_run
    samples = _samples(out)
    photo = Image.open(root / "layouts" / "table.png").convert("RGB")
    expected = {"a": canny(photo, LOW, HIGH), "b": Image.open(root / "layouts" / "scribble.png").convert("RGB")}
    assert not np.array_equal(np.asarray(expected["a"]), np.asarray(canny(photo)))  # the thresholds matter here
    for key, condition in expected.items():
        s = samples[key]
        meta = json.loads(s["json"])
        stored = Image.open(io.BytesIO(s["control.png"]))
        assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(condition))
        c = meta["control"]
        assert c["controlnet"] == [str(cn)] and len(c["controlnet_fingerprint"]) == 16
        assert c["image_digests"] == [image_digest(condition)]
        assert (c["scale"], c["start"], c["end"]) == ([SCALE], [0.0], [1.0])
        (source,) = c["sources"]
        assert source["condition_digest"] == image_digest(condition)
    a, b = (json.loads(samples[k]["json"])["control"]["sources"][0] for k in "ab")
    assert a == {"image": str(root / "layouts" / "table.png"), "type": "canny", "canny_low": LOW, "canny_high": HIGH,
                 "condition_digest": a["condition_digest"]}
    assert b == {"image": str(root / "layouts" / "scribble.png"), "type": "none", "condition_digest": b["condition_digest"]}


def _engine(tiny_model_dir, cn, out: Path, meta: dict):
    gen = FreeCustomGenerator.from_pretrained(str(tiny_model_dir), controlnet=str(cn), torch_dtype=torch.float32,
                                              device="cpu")
    refs = out / "references" / meta["concept_set_id"]
    concepts = [ConceptRef(Image.open(refs / f"{i:02d}_reference.png"), Image.open(refs / f"{i:02d}_mask.png"),
                           c["prompt"], c["weight"]) for i, c in enumerate(meta["concepts"])]
    common = dict(num_inference_steps=meta["num_inference_steps"], height=meta["height"], width=meta["width"])
    return gen, concepts, common


@pytest.mark.slow
def test_each_sample_equals_the_engine_api(controlnet_run, tiny_model_dir):
    root, out, cn, _ = controlnet_run
    samples = _samples(out)
    metas = {k: json.loads(s["json"]) for k, s in samples.items()}
    conditions = {k: Image.open(io.BytesIO(s["control.png"])).convert("RGB") for k, s in samples.items()}
    gen, concepts, common = _engine(tiny_model_dir, cn, out, metas["a"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the run's one-CPU actor: the same reduction order, the same floats
    try:
        _compare(gen, concepts, common, samples, metas, conditions)
    finally:
        torch.set_num_threads(threads)


def _compare(gen, concepts, common, samples, metas, conditions):
    mrsa = MRSAConfig.from_dict(metas["a"]["mrsa"])
    cn_kw = dict(controlnet_conditioning_scale=SCALE, control_guidance_start=0.0, control_guidance_end=1.0)
    # a and b: one batch in the pipeline (same K/V, same scale and steps), so one call here
    kv = gen.prepare_references(concepts, reference_seed=metas["a"]["reference_seed"], mrsa=mrsa, **common)
    images = gen.generate([metas[k]["prompt"] for k in "ab"], [metas[k]["seed"] for k in "ab"], kv,
                          control_image=[conditions[k] for k in "ab"], output_type="np", **common, **cn_kw)
    expected = dict(zip("ab", images, strict=True))
    # c and d: each through ControlNet with its own control image (control_references)
    for k in "cd":
        kv_k = gen.prepare_references(concepts, reference_seed=metas[k]["reference_seed"], mrsa=mrsa, **common,
                                      control_image=conditions[k], **cn_kw)
        expected[k] = gen.generate(metas[k]["prompt"], [metas[k]["seed"]], kv_k, control_image=conditions[k],
                                   control_references=True, output_type="np", **common, **cn_kw)[0]
    for k, s in samples.items():
        stored = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")).astype(np.int16)
        engine = (np.clip(expected[k], 0, 1) * 255).round().astype(np.int16)  # diffusers' numpy_to_pil
        assert np.array_equal(stored, engine), (k, np.abs(stored - engine).max())
    # the control image changes the image (the test would pass with ControlNet ignored otherwise)
    assert np.abs(expected["a"] - gen.generate(metas["a"]["prompt"], [metas["a"]["seed"]], kv, output_type="np",
                                               **common)[0]).max() > 1e-3


def test_control_options_reach_the_run_settings(tmp_path):
    """Without --controlnet the ControlNet options are refused before anything starts (exit 2)."""
    manifest = build_controlnet_example(tmp_path, size=64)
    for option in (["--control-references"], ["--canny-low", "10"]):
        result = runner.invoke(app, ["run", str(manifest), "-o", str(tmp_path / "out"), *option])
        assert result.exit_code == 2 and "need --controlnet" in result.output, result.output


@pytest.mark.slow
def test_review_shows_the_conditions(controlnet_run):
    """``review OUT`` of the run: each sample's condition as a labelled thumbnail of its control.png,
    described from the sample's real metadata (the run's canny thresholds, or the image as given)."""
    from pipeline.review import build_review

    root, out, _, _ = controlnet_run
    site = root / "site"
    assert build_review(str(out), str(site))["thumbnails_made"] == 4
    samples = _samples(out)
    thumbs = {p.name: p for p in (site / "thumbs").rglob("*.control.jpg")}
    assert sorted(thumbs) == sorted(f"{json.loads(s['json'])['key']}.control.jpg" for s in samples.values())
    for s in samples.values():
        condition = np.asarray(Image.open(io.BytesIO(s["control.png"])).convert("RGB"), np.float32)
        with Image.open(thumbs[f"{json.loads(s['json'])['key']}.control.jpg"]) as thumb:
            assert np.abs(np.asarray(thumb.convert("RGB"), np.float32) - condition).mean() < 12
    alts = {}
    for script in (site / "data").glob("*.js"):
        data = json.loads(script.read_text().removeprefix("window.REVIEW_DATA = ").rstrip(";\n"))
        for key, extras in zip(data["samples"]["key"], data["samples"]["extras"], strict=True):
            ((label, alt),) = [(data["extras"][i]["label"], data["extras"][i]["alt"]) for i in extras]
            alts[key.split("-")[0]] = (label, alt.replace("{key}", key))
    canny_alt = "the canny map (thresholds 40/120) of its control image, fed to the ControlNet"
    given_alt = "its control image as given, fed to the ControlNet"
    assert {k: (label, alt.split(": ", 1)[1]) for k, (label, alt) in alts.items()} == {
        "a": ("control", canny_alt), "b": ("control", given_alt), "c": ("control", canny_alt),
        "d": ("control", given_alt)}
