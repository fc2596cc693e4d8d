"""The model fingerprint follows the weights in use: stale reference K/V are refused after any change.

The LoRA tests load a random LoRA written by the test through diffusers' own API
(``save_lora_weights`` / ``load_lora_weights``) with peft, a dependency.
"""

from __future__ import annotations

import pytest
import torch

from freecustom_core import FreeCustomGenerator, ReferenceKVError

COMMON = dict(num_inference_steps=2, height=64, width=64)


@pytest.fixture
def gen(tiny_model_dir):
    """A generator of the test's own: these tests change its weights."""
    return FreeCustomGenerator.from_pretrained(str(tiny_model_dir), device="cpu")


def _refused(gen, kv) -> bool:
    try:
        gen.generate("x", [1], kv, output_type="latent", **COMMON)
    except ReferenceKVError as e:
        assert "model" in str(e)
        return True
    return False


def test_fingerprint_is_stable_and_shared_by_the_same_weights(gen, generator):
    assert gen.model_fingerprint == gen.model_fingerprint == generator.model_fingerprint


def test_in_place_writes_and_swaps_change_the_fingerprint(gen, other_model_dir, concepts):
    kv = gen.prepare_references(concepts[:1], **COMMON)
    before = gen.model_fingerprint
    weight = gen.unet.up_blocks[3].attentions[2].transformer_blocks[0].attn1.to_q.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.data += 1e-3  # through .data, as LoRA fusing writes: no version counter moves
    assert gen.model_fingerprint != before and _refused(gen, kv)
    with torch.no_grad():
        weight.data.copy_(saved)
    assert gen.model_fingerprint == before and not _refused(gen, kv)

    other = FreeCustomGenerator.from_pretrained(str(other_model_dir), device="cpu")
    own_unet = gen.pipe.unet
    gen.pipe.unet = other.pipe.unet  # a swapped UNet
    assert gen.model_fingerprint != before and _refused(gen, kv)
    gen.pipe.unet = own_unet
    gen.pipe.text_encoder.load_state_dict(other.pipe.text_encoder.state_dict())  # new text encoder weights
    assert gen.model_fingerprint != before and _refused(gen, kv)


def _write_random_lora(tiny_model_dir, folder, seed: int):
    """A rank-2 LoRA on the UNet's attention projections, random weights, saved as diffusers does."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = FreeCustomGenerator.from_pretrained(str(tiny_model_dir), device="cpu").unet
    donor.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in donor.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(donor), safe_serialization=True
    )
    return folder


def test_lora_load_scale_fuse_and_unload_change_the_fingerprint(gen, tiny_model_dir, concepts, tmp_path):
    lora = _write_random_lora(tiny_model_dir, tmp_path / "lora", seed=0)
    base_fp = gen.model_fingerprint
    base_kv = gen.prepare_references(concepts[:1], **COMMON)

    gen.pipe.load_lora_weights(str(lora), adapter_name="a")
    loaded_fp = gen.model_fingerprint
    assert loaded_fp != base_fp and _refused(gen, base_kv)
    lora_kv = gen.prepare_references(concepts[:1], **COMMON)
    assert lora_kv.meta["model"] == loaded_fp and not _refused(gen, lora_kv)
    assert any(not torch.equal(lora_kv.k[n], base_kv.k[n]) for n in lora_kv.layers)  # the LoRA acts

    gen.pipe.set_adapters(["a"], adapter_weights=[0.5])  # another scale, no tensor changes
    assert gen.model_fingerprint not in (base_fp, loaded_fp) and _refused(gen, lora_kv)
    gen.pipe.set_adapters(["a"], adapter_weights=[1.0])
    assert gen.model_fingerprint == loaded_fp

    gen.pipe.fuse_lora()
    gen.pipe.unload_lora_weights()  # the LoRA stays in the weights, the module tree is the base one again
    fused_fp = gen.model_fingerprint
    assert fused_fp not in (base_fp, loaded_fp) and _refused(gen, base_kv) and _refused(gen, lora_kv)
