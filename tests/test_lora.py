"""LoRA adapters: ``run --lora PATH_OR_ID[:SCALE]`` and the manifest's ``loras`` column.

Random LoRAs saved as safetensors by diffusers' ``save_lora_weights`` and loaded through the real
``load_lora_weights`` (PEFT backend). Rows with different adapter sets get different concept sets
(K/V) and batches; the fingerprint follows the set and its scales; stale K/V are recomputed, never
used; a LoRA that does not load fails its rows alone, naming ``loras[i].path``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from freecustom_core import FreeCustomGenerator
from freecustom_core.lora import LoRAError, active_loras, use_loras
from pipeline.cli_common import parse_lora_option
from pipeline.manifest import FIELD_PATTERN, MANIFEST_SCHEMA
from pipeline.validate import validate_table
from stages.errors import RowError
from stages.params import GenParams
from stages.reference.models import apply_loras
from stages.reference.reference_kv import KVFile, ReferenceRequest, ensure_reference_kv
from tests.model_variants import write_random_lora

COMMON = dict(num_inference_steps=2, height=64, width=64)


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two random UNet LoRAs for the tiny model."""
    root = tmp_path_factory.mktemp("loras")
    return write_random_lora(tiny_model_dir, root / "a", seed=1), write_random_lora(tiny_model_dir, root / "b", seed=2)


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return FreeCustomGenerator.from_pretrained(str(tiny_model_dir), device="cpu")


# ---- the parameter record and the manifest column


def test_loras_in_the_parameter_set():
    p = GenParams(loras=[{"path": "/l/a.safetensors", "scale": 0.3}, {"path": "org/lcm-lora", "scale": None}])
    assert p.loras == (("/l/a.safetensors", 0.3), ("org/lcm-lora", 1.0))
    assert GenParams.from_row(json.loads(json.dumps(p.to_row()))) == p
    assert p.reference_params()["loras"] == [["/l/a.safetensors", 0.3], ["org/lcm-lora", 1.0]]
    assert p.sample_meta()["loras"] == [{"path": "/l/a.safetensors", "scale": 0.3}, {"path": "org/lcm-lora", "scale": 1.0}]
    assert "loras" not in GenParams().reference_params() and "loras" not in GenParams().sample_meta()  # ids stay
    assert GenParams(loras=[("x.safetensors", 0.3)]) != GenParams(loras=[("x.safetensors", 0.5)])


@pytest.mark.parametrize(("loras", "field", "reason"), [
    ([{"path": "w.bin", "scale": 1.0}], "loras[0].path", "safetensors only"),
    ([{"path": None, "scale": 1.0}], "loras[0].path", "LoRA file, folder or hub id"),
    ([{"path": "a.safetensors", "scale": float("nan")}], "loras[0].scale", "finite"),
    ([{"path": "a.safetensors", "scale": 1}, {"path": "a.safetensors", "scale": 2}], "loras", "listed twice"),
])
def test_bad_loras_are_refused_by_field(loras, field, reason):
    with pytest.raises(ValueError, match=reason):
        GenParams(loras=loras)
    assert FIELD_PATTERN.fullmatch(field)


def _table(rows: list[dict]) -> pa.Table:
    base = {"prompt": "a cube", "seeds": [1], "concepts": [{"image": "c.png", "prompt": "a cube"}]}
    return pa.Table.from_pylist([dict(base, **r) for r in rows])


def test_manifest_column_validates_and_resolves_paths(tmp_path, loras):
    (tmp_path / "mine.safetensors").write_bytes(loras[0].read_bytes())
    Image.new("RGBA", (64, 64), (255, 0, 0, 255)).save(tmp_path / "c.png")
    table = _table([
        {"id": "ok", "loras": [{"path": "mine.safetensors", "scale": 0.3}]},
        {"id": "hub", "loras": [{"path": "org/lcm-lora-sdv1-5", "scale": None}]},
        {"id": "none", "loras": None},
        {"id": "missing", "loras": [{"path": "gone.safetensors", "scale": 1.0}]},
        {"id": "pickle", "loras": [{"path": "x.safetensors", "scale": 1.0}, {"path": "w.pt", "scale": 1.0}]},
    ])
    assert table.schema.field("loras").type.value_type.names == ["path", "scale"]
    good, bad = validate_table(table, base_dir=str(tmp_path), defaults=GenParams(loras=[("run.safetensors", 0.5)]),
                               check_files=True)
    rows = {r.id: r for r in good}
    problems = {(p.id, p.field): p.reason for p in bad}
    assert problems[("missing", "loras[0].path")].startswith("no such LoRA file")
    assert "safetensors only" in problems[("pickle", "loras[1].path")]
    assert not any(i in ("ok", "hub", "none") for i, _ in problems)
    assert rows["ok"].params.loras == ((str(tmp_path / "mine.safetensors"), 0.3),)
    assert rows["hub"].params.loras == (("org/lcm-lora-sdv1-5", 1.0),)
    assert rows["none"].params.loras == (("run.safetensors", 0.5),)  # null: the run's --lora
    assert MANIFEST_SCHEMA.field("loras").type == pa.list_(pa.struct([("path", pa.string()), ("scale", pa.float64())]))


def test_lora_option():
    assert parse_lora_option("org/lcm-lora-sdv1-5") == ("org/lcm-lora-sdv1-5", 1.0)
    assert parse_lora_option("org/lcm-lora-sdv1-5:0.3") == ("org/lcm-lora-sdv1-5", 0.3)
    assert parse_lora_option("hf:weird:name") == ("hf:weird:name", 1.0)
    with pytest.raises(ValueError, match="finite"):
        parse_lora_option("a.safetensors:inf")


# ---- the engine: exactly the set asked for, a fingerprint per set and scale


def test_fingerprint_follows_the_adapter_set_and_scale(gen, loras):
    a, b = (str(p) for p in loras)
    base = gen.model_fingerprint
    use_loras(gen.pipe, [(a, 1.0)])
    fp_a = gen.model_fingerprint
    use_loras(gen.pipe, [(a, 0.3)])
    fp_a3 = gen.model_fingerprint
    use_loras(gen.pipe, [(b, 1.0), (a, 0.3)])
    fp_ba = gen.model_fingerprint
    assert len({base, fp_a, fp_a3, fp_ba}) == 4
    use_loras(gen.pipe, [(a, 1.0)])
    assert gen.model_fingerprint == fp_a  # a set's fingerprint does not depend on what was loaded before
    use_loras(gen.pipe, [])
    assert gen.model_fingerprint == base and active_loras(gen.pipe) == ()


def test_a_bad_lora_names_its_index_and_leaves_no_adapter(gen, loras, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    base = gen.model_fingerprint
    with pytest.raises(LoRAError) as e:
        use_loras(gen.pipe, [(str(loras[0]), 1.0), (str(broken), 1.0)])
    assert e.value.index == 1 and "broken.safetensors" in str(e.value)
    assert gen.model_fingerprint == base and active_loras(gen.pipe) == ()
    with pytest.raises(RowError) as row_error:
        apply_loras(gen, ((str(tmp_path / "gone.safetensors"), 1.0),))
    assert row_error.value.field == "loras[0].path" and "no such LoRA file" in row_error.value.reason


def _resolved(concept) -> dict:
    from stages.inputs.concepts import ResolvedConcept

    mask = np.asarray(concept.mask.resize(concept.image.size)) >= 128
    return ResolvedConcept(image=concept.image, mask=mask, prompt=concept.prompt, weight=concept.weight,
                           mask_source="file", image_digest="i", mask_digest="m").to_row()


def test_a_text_encoder_lora_acts_on_the_prompts(gen, tiny_model_dir, tmp_path):
    lora = write_random_lora(tiny_model_dir, tmp_path / "te", seed=3, text_encoder=True)
    base, embeds = gen.model_fingerprint, gen.encode_prompts(["a cube"], "", cfg=False)
    use_loras(gen.pipe, [(str(lora), 0.3)])
    assert gen.model_fingerprint != base
    assert not torch.allclose(gen.encode_prompts(["a cube"], "", cfg=False), embeds)
    use_loras(gen.pipe, [])
    assert gen.model_fingerprint == base
    torch.testing.assert_close(gen.encode_prompts(["a cube"], "", cfg=False), embeds, atol=0, rtol=0)


def test_stale_kv_are_recomputed_under_another_adapter_set(gen, loras, concepts, tmp_path):
    """The same K/V file asked for with a LoRA: its fingerprint does not fit, so it is computed again."""
    resolved = [_resolved(concepts[0])]
    target = KVFile(tmp_path / "set.safetensors")
    plain = GenParams(**COMMON)
    with_lora = GenParams(**COMMON, loras=[(str(loras[0]), 0.3)])
    passes, kv = ensure_reference_kv(gen, ReferenceRequest("s", resolved, plain), target)
    assert passes == 1 and ensure_reference_kv(gen, ReferenceRequest("s", resolved, plain), target)[0] == 0
    passes, kv_lora = ensure_reference_kv(gen, ReferenceRequest("s", resolved, with_lora), target)
    assert passes == 1 and active_loras(gen.pipe) == ((str(loras[0]), 0.3),)
    assert kv_lora.meta["model"] == gen.model_fingerprint != kv.meta["model"]
    assert ensure_reference_kv(gen, ReferenceRequest("s", resolved, with_lora), target)[0] == 0
    passes, _ = ensure_reference_kv(gen, ReferenceRequest("s", resolved, plain), target)
    assert passes == 1 and active_loras(gen.pipe) == ()  # back to the base weights: recomputed again


# ---- end to end: the run's --lora and the manifest's loras column through `run` on a local Ray


def _concept_png(path: Path, color: str) -> None:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (40, 40), color), (12, 12))
    image.save(path)


@pytest.mark.ray
@pytest.mark.slow
def test_run_with_lora_option_and_column(tiny_model_dir, loras, ray_session, tmp_path):
    from pipeline.cli import app

    runner = CliRunner()
    (tmp_path / "lora.safetensors").write_bytes(loras[0].read_bytes())
    (tmp_path / "broken.safetensors").write_bytes(b"not a LoRA")
    _concept_png(tmp_path / "cube.png", "red")
    concept = [{"image": "cube.png", "prompt": "a red cube"}]
    row = {"prompt": "a red cube on grass", "seeds": [3], "concepts": concept}
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([
        dict(row, id="plain", loras=None),
        dict(row, id="lora", loras=[{"path": "lora.safetensors", "scale": 0.3}]),
        dict(row, id="broken", loras=[{"path": "broken.safetensors", "scale": 1.0}]),
    ]), manifest)
    common = ["--model", str(tiny_model_dir), "--num-inference-steps", "2", "--height", "64", "--width", "64"]
    result = runner.invoke(app, ["run", str(manifest), "-o", str(tmp_path / "out"), *common])
    assert result.exit_code == 1, result.output  # one row failed, the others completed
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    assert [(e["id"], e["field"]) for e in errors] == [("broken", "loras[0].path")]
    metas = {m["id"]: m for m in (json.loads(s) for s in _metadata(tmp_path / "out"))}
    assert set(metas) == {"plain", "lora"}
    assert metas["lora"]["loras"] == [{"path": str(tmp_path / "lora.safetensors"), "scale": 0.3}]
    assert metas["lora"]["concept_set_id"] != metas["plain"]["concept_set_id"]  # K/V of their own
    assert metas["lora"]["model"]["fingerprint"] != metas["plain"]["model"]["fingerprint"]

    # the run's --lora gives the plain row what the column gave the lora row: the same image
    pq.write_table(pa.Table.from_pylist([dict(row, id="lora")]), tmp_path / "one.parquet")
    result = runner.invoke(app, ["run", str(tmp_path / "one.parquet"), "-o", str(tmp_path / "opt"), *common,
                                 "--lora", f"{tmp_path / 'lora.safetensors'}:0.3"])
    assert result.exit_code == 0, result.output
    assert _images(tmp_path / "opt") == {k: v for k, v in _images(tmp_path / "out").items() if k.startswith("lora")}


def _metadata(out: Path) -> list[str]:
    return [m for f in sorted((out / "shards").glob("*.parquet")) for m in pq.read_table(f)["metadata"].to_pylist()]


def _images(out: Path) -> dict[str, bytes]:
    import tarfile

    images = {}
    for f in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(f) as tar:
            images.update({m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")})
    return images


def test_output_identity_without_loras_is_unchanged(tmp_path):
    """Output folders written before the loras field existed still resume: no key for an empty set."""
    from pipeline.settings import RunSettings

    plain = RunSettings(manifest="m.parquet", out=str(tmp_path / "o"))
    assert "loras" not in plain.output_identity()["defaults"]
    with_lora = RunSettings(manifest="m.parquet", out=str(tmp_path / "o"), defaults=GenParams(loras=[("a.safetensors", 0.3)]))
    assert with_lora.output_identity()["defaults"]["loras"] == (("a.safetensors", 0.3),)
