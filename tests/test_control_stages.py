"""The stages' side of ``run --controlnet`` with ``control_references``, Ray-free:

- ``CompositeStage``: a group whose references go through ControlNet gets its condition into the
  concept-set id (one id per control image, the plain id without), its previews (``control_0.png``,
  a contact-sheet row) and a ``control_condition`` for the reference request; an unreadable control
  image fails the group on ``control.image``;
- ``ReferenceKVStage`` / ``ensure_reference_kv``: K/V computed through ControlNet name the condition, and
  a cached file is reused only for the same condition (another control image recomputes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stages.inputs.concepts import ConceptSpec
from stages.inputs.control import ControlEntry, RowControl
from stages.inputs.read import InputSettings
from stages.masks.composite import CompositeStage
from stages.reference.models import load_generator
from stages.reference.reference_kv import KVFile, ReferenceKVStage, ReferenceRequest, ensure_reference_kv
from tests.test_generate_wiring import GEN, _resolved

IDENTITY = dict(model_id="tiny", height=64, width=64, num_inference_steps=2, reference_seed=0, mrsa={"blocks": [5, 6]})


def _layout(path, box) -> str:
    image = Image.new("RGB", (64, 64), (20, 20, 20))
    ImageDraw.Draw(image).rectangle(box, fill=(230, 230, 230))
    image.save(path)
    return str(path)


def _control(path: str, kind: str = "canny", scale: float = 0.6) -> RowControl:
    entry = ControlEntry(image=path, image_path=path, type=kind, scale=scale,
                         canny=(100.0, 200.0) if kind == "canny" else None)
    return RowControl(entries=(entry,), references=True)


def _column(control: RowControl | None) -> str:
    return "" if control is None else json.dumps(dict(control.to_row(), controlnet=["cn"]))


def test_composite_names_the_condition_in_the_id_and_the_previews(tmp_path, concepts):
    a, b = _layout(tmp_path / "a.png", (8, 8, 30, 40)), _layout(tmp_path / "b.png", (30, 20, 60, 60))
    controls = [None, _control(a), _control(b), _control(a, scale=0.9), _control(str(tmp_path / "gone.png"))]
    n = len(controls)
    spec = [ConceptSpec(image="x.png", prompt=c.prompt, image_path="x.png").to_row() for c in concepts[:1]]
    batch = {"concepts": [spec] * n, "resolved": [_resolved(concepts[:1])] * n, "base_dir": [str(tmp_path)] * n,
             "control": [_column(c) for c in controls]}
    stage = CompositeStage(out_dir=tmp_path / "out", identity_defaults=IDENTITY, input_settings=InputSettings())
    out = stage(batch)
    ids = list(out["concept_set_id"])
    plain = CompositeStage(out_dir=tmp_path / "out", identity_defaults=IDENTITY)(
        {k: v for k, v in batch.items() if k != "control"})["concept_set_id"][0]
    assert ids[0] == plain  # no control: the id of a run without ControlNet
    assert len(set(ids[:4])) == 4  # control image and scale each change the id
    assert (out["error_stage"][4], out["error_field"][4]) == ("composite", "control.image")
    assert "file not found" in out["error_reason"][4] and ids[4] is None
    assert out["control_condition"][0] == ""
    condition = json.loads(out["control_condition"][1])
    assert condition["controlnet_conditioning_scale"] == [0.6] and len(condition["png"]) == 1
    previews = tmp_path / "out" / "references"
    assert (previews / ids[1] / "control_0.png").is_file() and not (previews / ids[0] / "control_0.png").exists()
    plain_sheet = Image.open(previews / ids[0] / "contact_sheet.png")
    assert Image.open(previews / ids[1] / "contact_sheet.png").height > plain_sheet.height  # the control row


@pytest.fixture(scope="module")
def cn_dir(tiny_model_dir, tmp_path_factory):
    from pipeline.tiny_model import build_tiny_controlnet

    return str(build_tiny_controlnet(tiny_model_dir, tmp_path_factory.mktemp("cn") / "cn", seed=2))


@pytest.mark.slow
def test_kv_through_controlnet_are_cached_per_condition(tiny_model_dir, cn_dir, concepts, tmp_path):
    a, b = _layout(tmp_path / "a.png", (8, 8, 30, 40)), _layout(tmp_path / "b.png", (30, 20, 60, 60))
    stage_in = CompositeStage(identity_defaults=IDENTITY, input_settings=InputSettings())
    spec = [ConceptSpec(image="x.png", prompt=concepts[0].prompt, image_path="x.png").to_row()]
    composed = stage_in({"concepts": [spec] * 2, "resolved": [_resolved(concepts[:1])] * 2,
                         "control": [_column(_control(a)), _column(_control(b))]})
    cond_a, cond_b = composed["control_condition"]
    resolved = _resolved(concepts[:1])
    # the reference stage of a run with several generation actors
    stage = ReferenceKVStage(str(tiny_model_dir), store_dir=str(tmp_path / "store"), controlnet=[cn_dir])
    out = stage({"concept_set_id": ["set_a"], "resolved": [resolved], "gen_params": [json.dumps(GEN.to_row())],
                 "control_condition": [cond_a]})
    assert out["error_reason"][0] == "" and out["reference_pass"][0] == 1
    target = KVFile(out["kv_path"][0])
    kv = target.load(verify=True)
    assert kv.meta["control"]["controlnet"] == [cn_dir] and kv.meta["control"]["scale"] == [0.6]
    # the generation actor's path (one actor): the same condition is a cache hit, another recomputes
    gen = load_generator(str(tiny_model_dir), controlnet=[cn_dir])
    assert ensure_reference_kv(gen, ReferenceRequest("set_a", resolved, GEN, cond_a), target)[0] == 0
    passes, kv_b = ensure_reference_kv(gen, ReferenceRequest("set_a", resolved, GEN, cond_b), target)
    assert passes == 1 and kv_b.meta["control"]["image_digests"] != kv.meta["control"]["image_digests"]
    passes, plain = ensure_reference_kv(gen, ReferenceRequest("set_a", resolved, GEN), target)
    assert passes == 1 and "control" not in plain.meta  # without the condition: the plain references
    assert not np.allclose(next(iter(plain.k.values())).numpy(), next(iter(kv_b.k.values())).numpy())


@pytest.mark.slow
def test_generate_stage_with_two_controlnets_equals_the_engine(tiny_model_dir, cn_dir, concepts, tmp_path):
    """Two ControlNets (``controls``): each target gets one condition per net, in --controlnet order; targets
    with other scales render in another engine call; an unreadable control image fails its own target."""
    import io
    import tarfile

    import torch

    from freecustom_core.controlnet import canny
    from pipeline.tiny_model import build_tiny_controlnet
    from stages.generation.generate import GenerateStage
    from stages.generation.units import Group, Target, WorkUnit, group_meta

    cn2 = str(build_tiny_controlnet(tiny_model_dir, tmp_path / "cn2", seed=5))
    a, b = _layout(tmp_path / "a.png", (8, 8, 30, 40)), _layout(tmp_path / "b.png", (30, 20, 60, 60))

    def two(first: str, second: str, scale: float) -> dict:
        entries = (ControlEntry(image=first, image_path=first, type="canny", scale=scale, canny=(100.0, 200.0)),
                   ControlEntry(image=second, image_path=second, type="none", scale=0.4, start=0.5))
        return RowControl(entries=entries, column="controls").to_row()

    request = tmp_path / "s.request.json"
    request.write_bytes(ReferenceRequest("s", _resolved(concepts[:1]), GEN).to_json())
    group = Group(params=GEN, meta=group_meta(GEN, shard_id=0, concept_set_id="s", concepts=[]),
                  kv_path=str(tmp_path / "s.safetensors"), reference=str(request))
    controls = [two(a, b, 0.8), two(b, a, 0.8), two(a, a, 0.3), two(a, str(tmp_path / "gone.png"), 0.8)]
    targets = [Target(group=0, row=i, id=f"r{i}", key=f"r{i}-{i}", prompt="a cube", seed=i, control=c)
               for i, c in enumerate(controls)]
    stage = GenerateStage(str(tiny_model_dir), controlnet=[cn_dir, cn2], batch_size=4, dtype="float32", device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the stage and the engine below on one thread: the same floats
    try:
        out = stage({"shard_id": [0], "unit": [WorkUnit(0, [group], targets).encode()]})
    finally:
        torch.set_num_threads(threads)
    errors = json.loads(out["errors"][0])
    assert [(e["id"], e["field"], e["stage"]) for e in errors] == [("r3", "controls[1].image", "generate")]
    with tarfile.open(fileobj=io.BytesIO(bytes(out["tar"][0]))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert {"r0-0.control.png", "r0-0.control1.png"} <= set(members)
    metas = {m["id"]: m for m in json.loads(out["metas"][0])}
    assert metas["r0"]["control"]["controlnet"] == [cn_dir, cn2] and metas["r0"]["control"]["scale"] == [0.8, 0.4]
    assert [s["type"] for s in metas["r0"]["control"]["sources"]] == ["canny", "none"]

    gen = stage.generator
    kv = KVFile(group.kv_path).load(verify=False)
    photo = {p: Image.open(p).convert("RGB") for p in (a, b)}
    cond = {p: (canny(photo[p]), photo[p]) for p in (a, b)}  # net 0 gets the canny map, net 1 the image
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = gen.generate(["a cube"] * 2, [0, 1], kv, num_inference_steps=2, height=64, width=64,
                             control_image=[[cond[a][0], cond[b][0]], [cond[b][1], cond[a][1]]],
                             controlnet_conditioning_scale=[0.8, 0.4], control_guidance_start=[0.0, 0.5],
                             control_guidance_end=[1.0, 1.0])
        third = gen.generate(["a cube"], [2], kv, num_inference_steps=2, height=64, width=64,
                             control_image=[cond[a][0], cond[a][1]], controlnet_conditioning_scale=[0.3, 0.4],
                             control_guidance_start=[0.0, 0.5], control_guidance_end=[1.0, 1.0])
    finally:
        torch.set_num_threads(threads)
    for key, image in (("r0-0", first[0]), ("r1-1", first[1]), ("r2-2", third[0])):
        stored = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB"))
        assert np.array_equal(stored, np.asarray(image)), key
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(members["r1-1.control1.png"])).convert("RGB")),
                          np.asarray(photo[a]))
    # --reuse: a previous output's samples with the same record (condition digests included) are copied, and
    # their conditions written again beside them; another control image is not the same record
    from stages.generation.reuse import sample_record
    from stages.output.layout import extra_fields

    stored = {m["key"]: m for m in json.loads(out["metas"][0])}
    stage._reuse = {sample_record(m, "png"): {"tar": "previous", "key": k, "ext": "png"} for k, m in stored.items()}
    stage._reused.sample = lambda entry: (members[f"{entry['key']}.png"], stored[entry["key"]], {
        name: members[f"{entry['key']}.{name}"] for name in extra_fields(stored[entry["key"]])})
    changed = dict(targets[2].__dict__, control=two(b, a, 0.3))
    again = stage({"shard_id": [0], "unit": [WorkUnit(0, [group], [*targets[:2], Target(**changed)]).encode()]})
    assert again["reused"][0] == 2  # r2's control image changed: rendered, not copied
    with tarfile.open(fileobj=io.BytesIO(bytes(again["tar"][0]))) as tar:
        copied = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name in ("r0-0.png", "r0-0.control.png", "r0-0.control1.png", "r1-1.control1.png"):
        assert copied[name] == members[name], name
    assert copied["r2-2.control.png"] != members["r2-2.control.png"]
