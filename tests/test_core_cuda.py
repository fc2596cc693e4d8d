"""The engine on a CUDA device (skipped without one): the paths a CPU run cannot exercise.

Pinned host K/V copied to the device a step at a time (non-blocking), fp16 attention kernels,
K/V kept on the device (``storage=``), and compile with inductor. Run on a lent GPU machine with
``python3 -m pytest -q tests/test_core_cuda.py`` (see benchmarks/README.md for carrying diffusers).
"""

from __future__ import annotations

import pytest
import torch

from freecustom_core import FreeCustomGenerator, ReferenceKV

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def cuda_generator(tiny_model_dir):
    return FreeCustomGenerator.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float16, device="cuda")


COMMON = dict(num_inference_steps=4, height=64, width=64)


def test_pinned_host_kv_streamed_equals_kv_on_the_device_and_inline(cuda_generator, concepts):
    gen = cuda_generator
    host = gen.prepare_references(concepts, **COMMON)
    assert host.device.type == "cpu" and all(t.is_pinned() for t in host.k.values())
    device = gen.prepare_references(concepts, storage=gen.device, **COMMON)
    assert device.device.type == "cuda"
    pageable = gen.prepare_references(
        concepts, pin_memory=False, **COMMON
    )  # the reference stage's (save only)
    assert pageable.device.type == "cpu" and not any(t.is_pinned() for t in pageable.k.values())
    for layer in host.layers:
        assert torch.equal(host.k[layer], device.k[layer].cpu()) and torch.equal(
            host.v[layer], device.v[layer].cpu()
        )
        assert torch.equal(host.k[layer], pageable.k[layer]) and torch.equal(host.v[layer], pageable.v[layer])
    a = gen.generate(["x", "y"], [1, 2], host, output_type="latent", **COMMON)
    b = gen.generate(["x", "y"], [1, 2], device, output_type="latent", **COMMON)
    c = gen.generate(["x", "y"], [1, 2], concepts, output_type="latent", **COMMON)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, atol=2e-3, rtol=2e-3)  # inline: same math, other kernel batching in fp16
    assert torch.isfinite(a).all()


def test_kv_file_loaded_pinned_on_a_gpu_generator(cuda_generator, concepts, tmp_path):
    gen = cuda_generator
    kv = gen.prepare_references(concepts[:2], **COMMON)
    kv.save(tmp_path / "kv.safetensors")
    loaded = ReferenceKV.load(tmp_path / "kv.safetensors", device="cpu").pin_memory()
    assert all(t.is_pinned() for t in loaded.v.values())
    a = gen.generate("x", [3], kv, output_type="latent", **COMMON)
    assert torch.equal(a, gen.generate("x", [3], loaded, output_type="latent", **COMMON))


def test_compiled_generation_on_the_gpu(tiny_model_dir, cuda_generator, concepts):
    compiled = FreeCustomGenerator.from_pretrained(
        str(tiny_model_dir), torch_dtype=torch.float16, device="cuda", compile=True
    )
    kv = cuda_generator.prepare_references(concepts, **COMMON)
    a = cuda_generator.generate(["x", "y"], [1, 2], kv, output_type="latent", **COMMON)
    b = compiled.generate(["x", "y"], [1, 2], kv, output_type="latent", **COMMON)
    torch.testing.assert_close(b, a, atol=5e-3, rtol=5e-3)
