"""stages.params: GenParams' defaults and rules, its row form, and what it hands the engine and the output."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest

from freecustom_core.config import DEFAULT_NEGATIVE_PROMPT, MRSAConfig
from freecustom_core.generator import FreeCustomGenerator
from pipeline.manifest import OVERRIDE_TYPES
from stages.params import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_HEIGHT,
    DEFAULT_STEPS,
    DEFAULT_WIDTH,
    FIELD_NAMES,
    GenParams,
    Limits,
)

CUSTOM = GenParams(
    negative_prompt="ugly",
    guidance_scale=5.0,
    num_inference_steps=30,
    height=256,
    width=384,
    reference_seed=7,
    style_fidelity=0.3,
    mask_mode="scale",
    start_step=2,
    end_step=20,
    null_ref_prompts=True,
    mrsa_blocks=(4, 5, 6),
    mrsa_layers=("up_blocks.3.attentions.2.transformer_blocks.0.attn1",),
)
CUSTOM_MRSA = {
    "blocks": [4, 5, 6],
    "layers": ["up_blocks.3.attentions.2.transformer_blocks.0.attn1"],
    "start_step": 2,
    "end_step": 20,
    "mask_mode": "scale",
    "style_fidelity": 0.3,
    "null_ref_prompts": True,
}
DEFAULT_MRSA = {
    "blocks": [5, 6],
    "layers": None,
    "start_step": 0,
    "end_step": None,
    "mask_mode": "bias",
    "style_fidelity": 1.0,
    "null_ref_prompts": False,
}


# --------------------------------------------------------------------------- defaults and rules


def test_gen_params_defaults_are_the_papers():
    p = GenParams()
    assert p.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert DEFAULT_NEGATIVE_PROMPT.startswith("lowres, bad anatomy") and DEFAULT_NEGATIVE_PROMPT.endswith(
        "blurry"
    )
    assert (p.guidance_scale, p.num_inference_steps, p.height, p.width) == (7.5, 50, 512, 512)
    assert (DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, DEFAULT_HEIGHT, DEFAULT_WIDTH) == (7.5, 50, 512, 512)
    assert (p.style_fidelity, p.mask_mode, p.start_step, p.end_step) == (1.0, "bias", 0, None)
    assert (p.mrsa_blocks, p.mrsa_layers, p.null_ref_prompts, p.reference_seed) == ((5, 6), None, False, 0)


def test_gen_params_validate_on_construction_and_overrides():
    with pytest.raises(ValueError, match="height"):
        GenParams(height=100)
    with pytest.raises(ValueError, match="mask_mode"):
        GenParams(mask_mode="x")
    with pytest.raises(ValueError, match="not GenParams fields"):
        GenParams().with_overrides({"colour": "red"})
    p = GenParams().with_overrides({"height": 256, "mrsa_blocks": [1, 2], "guidance_scale": None})
    assert (p.height, p.mrsa_blocks, p.guidance_scale) == (256, (1, 2), 7.5)
    with pytest.raises(ValueError, match="max_side"):
        Limits(max_side=0)


def test_every_field_is_one_manifest_override_column():
    assert FIELD_NAMES == tuple(f.name for f in dataclasses.fields(GenParams))
    assert tuple(OVERRIDE_TYPES) == FIELD_NAMES


def test_importing_params_does_not_import_torch():
    code = "import stages.params, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- row form


@pytest.mark.parametrize(
    "params",
    [
        GenParams(),
        CUSTOM,
        GenParams(mrsa_blocks=(6,), end_step=49, guidance_scale=1, style_fidelity=0),
    ],
)
def test_to_row_is_json_safe_and_round_trips(params):
    row = params.to_row()
    assert list(row) == list(FIELD_NAMES)
    assert not any(isinstance(v, tuple) for v in row.values())
    assert json.loads(json.dumps(row)) == row
    assert GenParams.from_row(row) == params
    assert GenParams.from_row(json.loads(json.dumps(row))) == params


def test_from_row_takes_tuples_lists_and_ignores_other_keys():
    row = dataclasses.asdict(CUSTOM)  # tuples
    assert GenParams.from_row(row) == CUSTOM
    assert GenParams.from_row({**CUSTOM.to_row(), "id": "r1", "seeds": [0, 1]}) == CUSTOM


def test_from_row_takes_numpy_values_as_ray_hands_them_over():
    row = {
        **CUSTOM.to_row(),
        "guidance_scale": np.float64(5.0),
        "num_inference_steps": np.int64(30),
        "height": np.int32(256),
        "width": np.int64(384),
        "reference_seed": np.uint64(7),
        "style_fidelity": np.float64(0.3),
        "mask_mode": np.str_("scale"),
        "start_step": np.int64(2),
        "end_step": np.int64(20),
        "null_ref_prompts": np.bool_(True),
        "mrsa_blocks": np.array([4, 5, 6], dtype=np.int64),
        "mrsa_layers": np.array(["up_blocks.3.attentions.2.transformer_blocks.0.attn1"], dtype=object),
    }
    p = GenParams.from_row(row)
    assert p == CUSTOM
    assert type(p.num_inference_steps) is int and type(p.null_ref_prompts) is bool
    assert p.mrsa_blocks == (4, 5, 6) and all(type(b) is int for b in p.mrsa_blocks)
    assert p.mrsa_layers == CUSTOM.mrsa_layers


def test_from_row_reads_nan_as_null_where_a_field_may_be_null():
    row = {**GenParams().to_row(), "end_step": float("nan"), "mrsa_layers": float("nan")}
    assert GenParams.from_row(row) == GenParams()
    with pytest.raises(ValueError, match="guidance_scale"):
        GenParams.from_row({**GenParams().to_row(), "guidance_scale": float("nan")})


def test_from_row_names_missing_fields():
    row = GenParams().to_row()
    del row["height"], row["mrsa_layers"]
    with pytest.raises(ValueError, match=r"missing \['height', 'mrsa_layers'\]"):
        GenParams.from_row(row)


# --------------------------------------------------------------------------- the engine's view


def test_mrsa_config_carries_every_mrsa_field():
    assert CUSTOM.mrsa_config() == MRSAConfig(
        blocks=(4, 5, 6),
        layers=("up_blocks.3.attentions.2.transformer_blocks.0.attn1",),
        start_step=2,
        end_step=20,
        mask_mode="scale",
        style_fidelity=0.3,
        null_ref_prompts=True,
    )
    assert GenParams().mrsa_config() == MRSAConfig()


def test_mrsa_dict_is_the_config_dict_computed_once_per_parameter_set():
    assert CUSTOM.mrsa_dict() == CUSTOM_MRSA
    assert GenParams().mrsa_dict() == DEFAULT_MRSA
    assert GenParams(height=256).mrsa_dict() is GenParams(height=256).mrsa_dict()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            CUSTOM,  # style_fidelity 0.3: the unconditional references use the negative prompt
            {
                "num_inference_steps": 30,
                "height": 256,
                "width": 384,
                "reference_seed": 7,
                "mrsa": CUSTOM_MRSA,
                "negative_prompt": "ugly",
            },
        ),
        (
            dataclasses.replace(CUSTOM, style_fidelity=1.0),  # no unconditional references: no prompt
            {
                "num_inference_steps": 30,
                "height": 256,
                "width": 384,
                "reference_seed": 7,
                "mrsa": {**CUSTOM_MRSA, "style_fidelity": 1.0},
                "negative_prompt": None,
            },
        ),
        (
            GenParams(),
            {
                "num_inference_steps": 50,
                "height": 512,
                "width": 512,
                "reference_seed": 0,
                "mrsa": DEFAULT_MRSA,
                "negative_prompt": None,
            },
        ),
        (
            GenParams(style_fidelity=0.0, reference_seed=3),
            {
                "num_inference_steps": 50,
                "height": 512,
                "width": 512,
                "reference_seed": 3,
                "mrsa": {**DEFAULT_MRSA, "style_fidelity": 0.0},
                "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
            },
        ),
    ],
)
def test_reference_params_are_what_concept_set_ids_hash(params, expected):
    got = params.reference_params()
    assert got == expected
    assert list(got) == list(expected)


def test_reference_kwargs():
    kwargs = CUSTOM.reference_kwargs()
    assert kwargs == {
        "num_inference_steps": 30,
        "height": 256,
        "width": 384,
        "reference_seed": 7,
        "mrsa": CUSTOM.mrsa_config(),
        "negative_prompt": "ugly",
    }
    # read only when style_fidelity < 1; an empty one falls back to the default there
    assert dataclasses.replace(CUSTOM, style_fidelity=1.0).reference_kwargs()["negative_prompt"] == (
        DEFAULT_NEGATIVE_PROMPT
    )
    assert dataclasses.replace(CUSTOM, negative_prompt="").reference_kwargs()["negative_prompt"] == (
        DEFAULT_NEGATIVE_PROMPT
    )


def test_generate_kwargs():
    assert CUSTOM.generate_kwargs() == {
        "num_inference_steps": 30,
        "height": 256,
        "width": 384,
        "guidance_scale": 5.0,
        "negative_prompt": "ugly",
    }
    assert dataclasses.replace(CUSTOM, negative_prompt="").generate_kwargs()["negative_prompt"] == ""


def test_engine_kwargs_are_arguments_of_the_engine():
    prepare = inspect.signature(FreeCustomGenerator.prepare_references).parameters
    generate = inspect.signature(FreeCustomGenerator.generate).parameters
    assert set(CUSTOM.reference_kwargs()) <= {n for n, p in prepare.items() if p.kind is p.KEYWORD_ONLY}
    assert set(CUSTOM.generate_kwargs()) <= {n for n, p in generate.items() if p.kind is p.KEYWORD_ONLY}


def test_sample_meta_keys_and_values():
    meta = CUSTOM.sample_meta()
    expected = {
        "negative_prompt": "ugly",
        "guidance_scale": 5.0,
        "num_inference_steps": 30,
        "height": 256,
        "width": 384,
        "reference_seed": 7,
        "mrsa": CUSTOM_MRSA,
    }
    assert meta == expected
    assert list(meta) == list(expected)  # sample JSON bytes follow this order
    assert json.dumps(GenParams().sample_meta()) == (
        json.dumps({"negative_prompt": DEFAULT_NEGATIVE_PROMPT})[:-1]
        + ', "guidance_scale": 7.5, "num_inference_steps": 50, "height": 512, "width": 512, '
        '"reference_seed": 0, "mrsa": {"blocks": [5, 6], "layers": null, "start_step": 0, '
        '"end_step": null, "mask_mode": "bias", "style_fidelity": 1.0, "null_ref_prompts": false}}'
    )
