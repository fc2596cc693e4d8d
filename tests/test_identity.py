"""stages.masks.identity: the concept-set id is a stable content hash: same content, same id;
any change that alters the reference K/V, another id; names, paths and key order, no change."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from PIL import Image

from stages.inputs.concepts import ResolvedConcept
from stages.inputs.read import image_digest, mask_digest
from stages.masks.identity import concept_set_id, concept_set_payload

SETTINGS = dict(
    model_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
    height=512,
    width=512,
    num_inference_steps=50,
    reference_seed=0,
    mrsa={"blocks": [5, 6], "start_step": 0, "end_step": None, "mask_mode": "bias", "style_fidelity": 1.0},
)


def concept(
    colour=(200, 10, 10), box=(4, 4, 12, 12), prompt="a dog", weight=3.0, path="dog.png", composite=None
):
    image = Image.new("RGB", (16, 16), colour)
    mask = np.zeros((16, 16), dtype=bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    return ResolvedConcept(
        image=image,
        mask=mask,
        prompt=prompt,
        weight=weight,
        mask_source="file",
        image_digest=image_digest(image),
        mask_digest=mask_digest(mask),
        image_path=path,
        composite=composite,
    )


RECIPE = {
    "role": "object",
    "concept": 1,
    "objects": [{"anchor": "top", "scale": 0.5, "paste_box": [1, 2, 3, 4]}],
}


def base_set():
    return [concept(), concept(colour=(0, 0, 250), prompt="a hat", path="hat.png", composite=RECIPE)]


def test_id_format_and_stability():
    first = concept_set_id(base_set(), **SETTINGS)
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert concept_set_id(base_set(), **SETTINGS) == first


def test_independent_of_key_order_paths_and_number_spelling():
    reference = concept_set_id(base_set(), **SETTINGS)
    reordered = dict(reversed(list(SETTINGS.items())))
    reordered["mrsa"] = dict(reversed(list(SETTINGS["mrsa"].items())))
    assert concept_set_id(base_set(), **reordered) == reference

    moved = [dataclasses.replace(c, image_path=f"/elsewhere/{i}.jpg") for i, c in enumerate(base_set())]
    assert concept_set_id(moved, **SETTINGS) == reference
    with_path = base_set()
    with_path[1].composite = {**RECIPE, "carrier_path": "/data/backdrop.png"}  # paths never count
    assert concept_set_id(with_path, **SETTINGS) == reference

    ints = base_set()
    ints[0].weight = 3  # 3 and 3.0 are the same weight
    spelled = dict(SETTINGS, mrsa={**SETTINGS["mrsa"], "blocks": (5, 6), "style_fidelity": 1})
    assert concept_set_id(ints, **spelled) == reference
    numpy_valued = dict(SETTINGS, height=np.int64(512), mrsa={**SETTINGS["mrsa"], "blocks": np.array([5, 6])})
    assert concept_set_id(base_set(), **numpy_valued) == reference


def test_every_input_that_changes_the_references_changes_the_id():
    reference = concept_set_id(base_set(), **SETTINGS)
    variants = {
        "image": [concept(colour=(201, 10, 10)), base_set()[1]],
        "mask": [concept(box=(4, 4, 12, 13)), base_set()[1]],
        "prompt": [concept(prompt="a puppy"), base_set()[1]],
        "weight": [concept(weight=2.5), base_set()[1]],
        "recipe": [concept(), dataclasses.replace(base_set()[1], composite={**RECIPE, "concept": 0})],
        "order": list(reversed(base_set())),
        "fewer": base_set()[:1],
    }
    ids = {name: concept_set_id(concepts, **SETTINGS) for name, concepts in variants.items()}
    for name, key, value in [
        ("model", "model_id", "other/model"),
        ("height", "height", 768),
        ("width", "width", 640),
        ("steps", "num_inference_steps", 25),
        ("seed", "reference_seed", 1),
        ("mrsa", "mrsa", {**SETTINGS["mrsa"], "mask_mode": "scale"}),
    ]:
        ids[name] = concept_set_id(base_set(), **{**SETTINGS, key: value})
    ids["extra"] = concept_set_id(base_set(), **SETTINGS, extra={"revision": "abc"})
    assert reference not in ids.values()
    assert len(set(ids.values())) == len(ids), ids


def test_mrsa_config_object_or_dict():
    core = pytest.importorskip("freecustom_core")
    config = core.MRSAConfig()
    assert concept_set_id(base_set(), **{**SETTINGS, "mrsa": config}) == concept_set_id(
        base_set(), **{**SETTINGS, "mrsa": config.to_dict()}
    )


def test_refusals():
    with pytest.raises(ValueError, match="NaN and infinities"):
        concept_set_id(base_set(), **{**SETTINGS, "mrsa": {"style_fidelity": float("nan")}})
    with pytest.raises(ValueError, match="at least one concept"):
        concept_set_id([], **SETTINGS)
    with pytest.raises(TypeError, match="no canonical form"):
        concept_set_id(base_set(), **SETTINGS, extra={"when": object()})


def test_payload_is_readable():
    payload = concept_set_payload(base_set(), **SETTINGS)
    assert payload["version"] == "freecustom-concept-set/1"
    assert payload["concepts"][1]["composite"] == RECIPE and payload["concepts"][0]["weight"] == 3
    assert "image_path" not in payload["concepts"][0]
