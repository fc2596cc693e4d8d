"""``FreeCustomGenerator.from_pretrained``: one entry point for every family (SD1.x/2.x, SDXL, BLIP-Diffusion,
FLUX.1), each tiny model loaded through it equal to its family's class used directly; refusals name the family
and the option; subclasses keep loading as themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from freecustom_core import BlipDiffusionFreeCustom, FluxFreeCustomGenerator, FreeCustomGenerator
from freecustom_core.families import checkpoint_family
from pipeline.tiny_model import build_tiny_sdxl
from tests.blip_tiny import build_tiny_blip_diffusion
from tests.conftest import draw_concept
from tests.flux_tiny import build_tiny_flux
from tests.model_variants import build_tiny_sd2

CPU = dict(torch_dtype=torch.float32, device="cpu")
SUBJECT = Image.fromarray((np.random.default_rng(5).random((30, 34, 3)) * 255).astype(np.uint8))
# per family: (builder, class used directly, extra generate arguments)
FAMILIES = {
    "sd": (build_tiny_sd2, FreeCustomGenerator, {}),
    "sdxl": (build_tiny_sdxl, FreeCustomGenerator, {}),
    "blip": (
        build_tiny_blip_diffusion,
        BlipDiffusionFreeCustom,
        dict(subject_image=SUBJECT, subject_category="dog"),
    ),
    "flux": (build_tiny_flux, FluxFreeCustomGenerator, {}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name, seed=0) for name, (build, _, _) in FAMILIES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_entry_point_equals_the_family_class(folders, family):
    _, cls, extra = FAMILIES[family]
    folder = str(folders[family])
    assert checkpoint_family(folder)[0] == family
    loaded = FreeCustomGenerator.from_pretrained(folder, **CPU)
    direct = cls.from_pretrained(folder, **CPU)
    assert type(loaded) is cls and loaded.family == direct.family
    assert loaded.model_fingerprint == direct.model_fingerprint
    concepts = [draw_concept("red", (6, 6, 30, 30), "a red cube", weight=2.0)]
    run = dict(num_inference_steps=2, height=64, width=64, reference_seed=3, output_type="latent", **extra)
    ours = loaded.generate(["a cube", "a toy"], [4, 9], concepts, **run)
    theirs = direct.generate(["a cube", "a toy"], [4, 9], concepts, **run)
    assert torch.equal(ours, theirs)
    other = direct.generate(["a cube", "a toy"], [4, 10], concepts, **run)
    assert not torch.equal(other, theirs), "the seed would go unnoticed: the comparison could not fail"


def test_options_a_family_does_not_take_are_refused_by_name(folders):
    with pytest.raises(ValueError, match=r"FLUX\.1 checkpoint \(FluxPipeline\).*scheduler='DDIMScheduler'"):
        FreeCustomGenerator.from_pretrained(str(folders["flux"]), scheduler="DDIMScheduler", **CPU)
    with pytest.raises(
        ValueError, match=r"BLIP-Diffusion checkpoint \(BlipDiffusionPipeline\).*channels_last"
    ):
        FreeCustomGenerator.from_pretrained(str(folders["blip"]), channels_last=True, **CPU)
    with pytest.raises(ValueError, match=r"BLIP-Diffusion checkpoint.*controlnet='cn'"):
        FreeCustomGenerator.from_pretrained(str(folders["blip"]), controlnet="cn", **CPU)
    flux = FreeCustomGenerator.from_pretrained(str(folders["flux"]), **CPU)
    concepts = [draw_concept("red", (6, 6, 30, 30), "a red cube")]
    for method in (flux.prepare_references, lambda c, **kw: flux.generate("a cube", [1], c, **kw)):
        with pytest.raises(ValueError, match=r"negative_prompt: does not apply to a FLUX\.1 model"):
            method(concepts, negative_prompt="blurry", num_inference_steps=1, height=64, width=64)


def test_a_subclass_loads_as_itself(folders):
    """Called on a subclass, ``from_pretrained`` loads that class (no dispatch on the family)."""

    class Mine(FreeCustomGenerator):
        pass

    assert type(Mine.from_pretrained(str(folders["sd"]), **CPU)) is Mine
    with pytest.raises(
        ValueError
    ):  # diffusers' SD loading refuses BLIP's components: no dispatch to BLIP's class
        Mine.from_pretrained(str(folders["blip"]), **CPU)
