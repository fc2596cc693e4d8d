"""Model families (stages/reference/family.py): detection from config files, run defaults, row rules, and the
default MRSA blocks read from configs (freecustom_core/topology.py) against the loaded models' own."""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pytest

from freecustom_core.topology import (
    FREECUS_VITAL_LAYERS,
    flux_default_blocks,
    unet_default_blocks,
    vital_blocks,
)
from pipeline.validate import validate_table
from stages.params import GenParams
from stages.reference.family import ModelFamily, model_family
from tests.flux_tiny import build_tiny_flux


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from pipeline.tiny_model import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"), seed=0)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux"), seed=0, num_layers=3, num_single_layers=5)


def test_unet_blocks_from_config_equal_the_loaded_models(tiny_model_dir, sdxl_dir):
    from diffusers import UNet2DConditionModel

    from freecustom_core.layers import default_blocks

    for folder, expected in ((tiny_model_dir, (5, 6)), (sdxl_dir, (3, 4))):
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        assert unet_default_blocks(dict(unet.config)) == default_blocks(unet) == expected
    # a mid block without attention shifts the up blocks' numbers down by one
    config = {"down_block_types": ["CrossAttnDownBlock2D"] * 2, "mid_block_type": None,
              "up_block_types": ["CrossAttnUpBlock2D"] * 3}
    assert unet_default_blocks(config) == (3, 4)
    with pytest.raises(ValueError, match="no attention-bearing up block"):
        unet_default_blocks({"down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["UpBlock2D"]})


def test_flux_blocks_from_config_equal_the_loaded_transformers(flux_dir):
    from diffusers import FluxTransformer2DModel

    from freecustom_core.flux_attention import default_blocks

    transformer = FluxTransformer2DModel.from_pretrained(flux_dir, subfolder="transformer")
    assert flux_default_blocks(dict(transformer.config)) == default_blocks(transformer) == (0, 2, 4, 7)
    assert vital_blocks(19, 38) == FREECUS_VITAL_LAYERS


def test_families_and_their_defaults(tiny_model_dir, sdxl_dir, flux_dir, tmp_path):
    sd = model_family(str(tiny_model_dir))
    assert (sd.name, sd.class_name) == ("sd", "StableDiffusionPipeline")
    assert sd.defaults() == GenParams()  # SD1.5 outputs keep their identities
    assert sd.defaults(height=256, width=None) == GenParams(height=256)

    xl = model_family(str(sdxl_dir))
    assert xl.name == "sdxl"
    assert dataclasses.asdict(xl.defaults()) == dataclasses.asdict(GenParams(height=1024, width=1024, mrsa_blocks=(3, 4)))
    assert xl.defaults(height=128).height == 128 and xl.defaults(height=128).width == 1024

    flux = model_family(str(flux_dir))
    d = flux.defaults()
    assert flux.name == "flux"
    assert (d.num_inference_steps, d.guidance_scale, d.height, d.width, d.negative_prompt, d.mrsa_blocks) == (
        28, 3.5, 1024, 1024, "", (0, 2, 4, 7))
    assert flux.model_identity(d) == "|guidance=3.5" and sd.model_identity(sd.defaults()) == ""

    # a single file is of its --model-config's family; an unreadable hub id falls back to SD (its loader reports it)
    single = tmp_path / "flux.safetensors"
    single.write_bytes(b"")
    assert model_family(str(single), str(flux_dir)).name == "flux"
    assert model_family(str(single)).name == "sd"


def test_blip_defaults_are_the_release_blip_pipelines(tmp_path):
    """The release's pipeline_blip_diffusion_freecustom.py: self.scheduler (the checkpoint's), neg_prompt="",
    source_prompt="" (references with empty prompts, and the subject)."""
    from pipeline.settings import RunSettings

    folder = tmp_path / "blip"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "BlipDiffusionPipeline"}))
    blip = model_family(str(folder))
    d = blip.defaults()
    assert (blip.name, d.negative_prompt, d.null_ref_prompts, blip.default_scheduler) == ("blip", "", True, "checkpoint")
    assert (d.guidance_scale, d.num_inference_steps, d.height, d.style_fidelity) == (7.5, 50, 512, 1.0)
    settings = RunSettings(manifest="m.parquet", out=str(tmp_path / "out"), model=str(folder))
    assert settings.scheduler == "checkpoint" and settings.subject().references is True
    old = RunSettings(manifest="m.parquet", out=str(tmp_path / "out"), model=str(folder), scheduler="release",
                      blip_subject_references=False)
    assert old.scheduler == "release" and old.output_identity()["blip_subject_references"] is False
    assert settings.output_identity()["scheduler"] != old.output_identity()["scheduler"]
    assert "blip_subject_references" not in settings.output_identity()
    assert RunSettings(manifest="m.parquet", out=str(tmp_path / "out")).scheduler == "release"  # SD: unchanged
    assert model_family(str(folder)).defaults(negative_prompt="blurry").negative_prompt == "blurry"


def _row(i: int, **overrides) -> dict:
    columns = dict.fromkeys(("negative_prompt", "style_fidelity", "mask_mode", "guidance_scale"))
    return {"id": f"r{i}", "prompt": "a cube", "seeds": [1], "concepts": [{"image": "x.png", "prompt": "a cube"}],
            **columns, **overrides}


def test_flux_rows_that_need_an_unconditional_branch_are_refused_by_field():
    flux = ModelFamily("flux", "FluxPipeline", {"negative_prompt": "", "guidance_scale": 3.5})
    defaults = flux.defaults()
    table = pa.Table.from_pylist([
        _row(0),
        _row(1, negative_prompt="blurry"),
        _row(2, style_fidelity=0.3),
        _row(3, mask_mode="scale"),
        _row(4, guidance_scale=5.0),
        _row(5, guidance_scale=3.5, negative_prompt=""),
    ])
    good, problems = validate_table(table, defaults=defaults, check_files=False, family=flux)
    assert [r.id for r in good] == ["r0", "r5"]
    assert sorted((p.id, p.field) for p in problems) == [
        ("r1", "negative_prompt"), ("r2", "style_fidelity"), ("r3", "mask_mode"), ("r4", "guidance_scale")]
    assert "per run (--guidance-scale, now 3.5)" in next(p.reason for p in problems if p.id == "r4")
    # the same rows are fine on SD
    good, problems = validate_table(table, check_files=False)
    assert len(good) == 6 and not problems
    # run defaults that FLUX cannot follow are refused before any row is read
    with pytest.raises(ValueError, match="run defaults: negative_prompt"):
        validate_table(table, defaults=GenParams(), check_files=False, family=flux)


def test_actor_memory_follows_the_family(tmp_path):
    """K/V worst cases match docs/models.md's tables; an SDXL or FLUX run declares its own sizes."""
    from pipeline.plan_memory import actor_memory, kv_bytes_per_set
    from pipeline.settings import RunSettings
    from pipeline.validate import RowSpec

    mib = 2**20
    assert kv_bytes_per_set(height=512, width=512, steps=1, concepts=1) == 22.5 * mib  # SD1.5, fp16, per step
    assert kv_bytes_per_set(height=1024, width=1024, steps=1, concepts=1, family="sdxl") == 210 * mib
    assert kv_bytes_per_set(height=1024, width=1024, steps=1, concepts=1, family="flux") == 4096 * 122_880
    declared = {}
    for name, class_name in (("sd", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        settings = RunSettings(manifest="m.parquet", out=str(tmp_path / "out"), model=str(folder), dtype="float16")
        row = RowSpec(index=0, id="r", prompt="p", seeds=(1,), concepts=(None, None),
                      params=GenParams(height=1024, width=1024))
        declared[name] = actor_memory(settings, [row], device="cuda")
    files = (tmp_path / "sdxl" / "model_index.json").stat().st_size - (tmp_path / "sd" / "model_index.json").stat().st_size
    extra = declared["sdxl"] - declared["sd"] - files  # two K/V sets of two concepts, each the SDXL layers' size
    assert extra == 2 * 2 * (kv_bytes_per_set(height=1024, width=1024, steps=50, concepts=1, family="sdxl")
                              - kv_bytes_per_set(height=1024, width=1024, steps=50, concepts=1))


def test_validate_applies_the_models_family(flux_dir, tmp_path):
    """`validate --model` checks rows as a run of that model would, reading only its configs."""
    from PIL import Image
    from typer.testing import CliRunner

    from pipeline.cli import app

    Image.new("RGB", (32, 32), "red").save(tmp_path / "x.png")
    table = pa.Table.from_pylist([_row(0), _row(1, negative_prompt="blurry")])
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "m.parquet")
    runner = CliRunner()
    whole = ["--mask-policy", "whole_image"]  # x.png is an opaque photo without a mask
    plain = runner.invoke(app, ["validate", str(tmp_path / "m.parquet"), *whole])
    assert plain.exit_code == 0, plain.output
    flux = runner.invoke(app, ["validate", str(tmp_path / "m.parquet"), "--model", str(flux_dir), "--json", *whole])
    assert flux.exit_code == 1
    problems = json.loads(flux.stdout)["problems"]
    assert [(p["id"], p["field"]) for p in problems] == [("r1", "negative_prompt")]


def test_options_a_family_does_not_take_are_refused_before_a_run(flux_dir):
    from pipeline.settings import RunSettings

    flux = ModelFamily("flux", "FluxPipeline")
    refused = flux.refusals(scheduler="DPMSolverMultistepScheduler", channels_last=True, save_attention=True)
    assert [r.split(":")[0] for r in refused] == ["--channels-last", "--scheduler", "--save-attention"]
    assert flux.refusals(scheduler="release") == [] and ModelFamily().refusals(channels_last=True, compile=True) == []
    blip = ModelFamily("blip", "BlipDiffusionPipeline")
    # a BLIP-Diffusion run without --blip-subject is not refused: rows may bring their own (blip_subject)
    assert [r.split(":")[0] for r in blip.refusals(controlnet=("cn",))] == ["--controlnet"]
    assert ModelFamily().refusals(blip_subject="s.png")[0].startswith("--blip-subject")
    settings = RunSettings(manifest="m.parquet", out="/tmp/out-never-written", model=str(flux_dir), channels_last=True)
    with pytest.raises(ValueError, match="--channels-last: not supported with a FLUX.1 model"):
        settings.check_family()
