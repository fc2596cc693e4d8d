"""Quality scores (stages/scoring/score.py) against a direct computation with the same tiny models, loaded
through transformers' from_pretrained, on the same images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.tiny_scorers import build_tiny_scorers
from stages.scoring.score import (
    MASK_FILL,
    distribution,
    failed_thresholds,
    masked_reference,
    parse_min_score,
    sample_value,
    summarize,
)
from stages.scoring.score_models import ScoreModels


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> ScoreModels:
    return build_tiny_scorers(tmp_path_factory.mktemp("scorers"))


@pytest.fixture(scope="module")
def scorer(models):
    from stages.scoring.score import Scorer

    return Scorer(models, device="cpu")


def concept(colour, box, size=(80, 60), seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 90).astype(np.uint8))
    ImageDraw.Draw(image).ellipse(box, fill=colour)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return image, mask


@pytest.fixture(scope="module")
def concept_set():
    return [concept("red", (10, 5, 50, 40), seed=1), concept("blue", (40, 20, 75, 58), seed=2)]


def generated(n, seed=7):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(n)]


PROMPTS = [
    "a dog wearing a red hat",
    "a blue cube on the beach",
    "the cat",
    "a photo",
    "an oil painting of a tree",
    "three hats on a table",
]


def direct_scores(models: ScoreModels, concepts, images, prompts):
    """The scores computed here, independently: each model called on its own, features compared with
    torch's cosine_similarity, CLIP-T through CLIPModel's forward (logits / logit scale = cosine)."""
    import torch
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    dino, dino_proc = AutoModel.from_pretrained(models.dino), AutoImageProcessor.from_pretrained(models.dino)
    clip_i, clip_i_proc = (
        CLIPModel.from_pretrained(models.clip_image),
        CLIPProcessor.from_pretrained(models.clip_image),
    )
    clip_t, clip_t_proc = (
        CLIPModel.from_pretrained(models.clip_text),
        CLIPProcessor.from_pretrained(models.clip_text),
    )

    def dino_feat(image):
        with torch.no_grad():
            return dino(**dino_proc(images=image, return_tensors="pt")).last_hidden_state.mean(dim=1)[0]

    def clip_feat(image):
        with torch.no_grad():
            return clip_i.get_image_features(**clip_i_proc(images=image, return_tensors="pt")).pooler_output[
                0
            ]

    def masked(image, mask):
        fill = Image.new("RGB", image.size, MASK_FILL)
        return Image.composite(image, fill, mask).crop(mask.getbbox())

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    out = []
    for image, prompt in zip(images, prompts, strict=True):
        d = [cos(dino_feat(ref), dino_feat(image)) for ref, _ in concepts]
        with torch.no_grad():
            inputs = clip_t_proc(text=[prompt], images=image, return_tensors="pt", padding=True)
            cosine = float(clip_t(**inputs).logits_per_image[0, 0] / clip_t.logit_scale.exp())
        out.append(
            {
                "dino": d,
                "dino_paper": [(s + 1) / 2 for s in d],
                "dino_masked": [
                    cos(dino_feat(masked(ref, mask)), dino_feat(image)) for ref, mask in concepts
                ],
                "clip_i": [cos(clip_feat(ref), clip_feat(image)) for ref, _ in concepts],
                "clip_t": 100 * max(cosine, 0.0),
                "cos_t": cosine,
            }
        )
    return out


def test_scores_equal_a_direct_computation(scorer, models, concept_set):
    images = generated(len(PROMPTS))
    refs = scorer.references("set-a", lambda: concept_set)
    got = scorer.score(images, PROMPTS, [refs] * len(images))
    want = direct_scores(models, concept_set, images, PROMPTS)
    for g, w in zip(got, want, strict=True):
        for name in ("dino", "dino_paper", "dino_masked", "clip_i"):
            assert len(g[name]) == 2
            np.testing.assert_allclose(g[name], w[name], atol=2e-5, err_msg=name)
        assert g["clip_t"] == pytest.approx(w["clip_t"], abs=2e-3)
    # both sides of CLIPScore's max(cos, 0) are exercised by these prompts
    assert any(w["cos_t"] < 0 for w in want) and any(w["cos_t"] > 0 for w in want)
    assert all(g["clip_t"] == 0 for g, w in zip(got, want, strict=True) if w["cos_t"] < 0)


def test_per_concept_scores_follow_the_concept_order(scorer, concept_set):
    """The generated image is concept 1's reference: concept 1 scores 1 on dino and clip_i, concept 0 less."""
    refs = scorer.reference_features(concept_set)
    [s] = scorer.score([concept_set[1][0]], ["x"], [refs])
    assert s["dino"][1] == pytest.approx(1.0, abs=1e-5) and s["clip_i"][1] == pytest.approx(1.0, abs=1e-5)
    assert s["dino"][0] < 0.999 and s["clip_i"][0] < 0.999
    assert s["dino_paper"][1] == pytest.approx(1.0, abs=1e-5)
    assert s["dino_masked"][1] < 0.999  # the masked reference is another image


def test_batching_does_not_change_scores(models, concept_set):
    from stages.scoring.score import Scorer

    images = generated(5, seed=3)
    prompts = PROMPTS[:5]
    one = Scorer(ScoreModels(models.dino, models.clip_image, models.clip_text, batch_size=1), device="cpu")
    many = Scorer(ScoreModels(models.dino, models.clip_image, models.clip_text, batch_size=3), device="cpu")
    a = one.score(images, prompts, [one.reference_features(concept_set)] * 5)
    b = many.score(images, prompts, [many.reference_features(concept_set)] * 5)
    for x, y in zip(a, b, strict=True):
        for name in x:
            np.testing.assert_allclose(x[name], y[name], atol=1e-4, err_msg=name)


def test_reference_features_once_per_concept_set(scorer, concept_set):
    loads = []

    def load():
        loads.append(1)
        return concept_set

    first = scorer.references("set-once", load)
    assert scorer.references("set-once", load) is first
    assert len(loads) == 1


def test_masked_reference_crops_to_the_mask_and_fills_outside():
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 200
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:7] = True
    mask[1, 2] = False  # a hole inside the bounding box
    out = np.asarray(masked_reference(Image.fromarray(rgb), mask))
    assert out.shape == (3, 5, 3)
    assert tuple(out[0, 0]) == MASK_FILL and tuple(out[1, 1]) == (200, 0, 0)
    lmask = Image.fromarray(np.where(mask, 255, 40).astype(np.uint8))  # an L mask: >= 128 is inside
    assert np.array_equal(np.asarray(masked_reference(Image.fromarray(rgb), lmask)), out)
    with pytest.raises(ValueError, match="empty mask"):
        masked_reference(Image.fromarray(rgb), np.zeros((6, 8), bool))
    with pytest.raises(ValueError, match="size"):
        masked_reference(Image.fromarray(rgb), np.ones((5, 8), bool))


def test_an_empty_mask_names_the_concept(scorer, concept_set):
    image, _ = concept_set[0]
    with pytest.raises(ValueError, match=r"concepts\[1\].mask: empty mask"):
        scorer.reference_features([concept_set[0], (image, Image.new("L", image.size, 0))])


def test_thresholds_use_the_minimum_over_concepts():
    scores = {"dino": [0.8, 0.3], "clip_i": [0.9, 0.7], "clip_t": 25.0}
    assert sample_value(scores, "dino") == 0.3 and sample_value(scores, "clip_t") == 25.0
    assert failed_thresholds(scores, {"dino": 0.5, "clip_t": 20.0, "clip_i": 0.7}) == ["dino<0.5"]
    assert failed_thresholds(scores, {"clip_t": 25.5}) == ["clip_t<25.5"]
    assert parse_min_score(" clip_t=21.5") == ("clip_t", 21.5)
    for bad, reason in (
        ("clip_t", "NAME=VALUE"),
        ("dinov2=0.3", "unknown score 'dinov2'"),
        ("dino=high", "not a number"),
        ("dino=nan", "finite"),
    ):
        with pytest.raises(ValueError, match=reason):
            parse_min_score(bad)


def test_distribution_and_summary():
    values = [0.1, 0.4, 0.35, 0.9, 0.3]
    d = distribution(values)
    assert d["n"] == 5 and d["mean"] == pytest.approx(np.mean(values))
    assert d["p25"] == pytest.approx(np.quantile(values, 0.25)) and d["p50"] == pytest.approx(0.35)
    assert d["min"] == 0.1 and d["max"] == 0.9
    assert distribution([]) == {"n": 0, "mean": None}
    s = summarize(
        [
            ("a", {"dino": [0.2, 0.6], "clip_t": 30.0}),
            ("a", {"dino": [0.4, 0.8], "clip_t": 10.0}),
            ("b", {"dino": [0.9], "clip_t": 20.0}),
        ]
    )
    assert s["all"]["samples"] == 3 and s["all"]["clip_t"]["mean"] == pytest.approx(20.0)
    a = s["concept_sets"]["a"]
    assert a["samples"] == 2 and a["dino"]["mean"] == pytest.approx(0.3)  # of the per-sample minimum
    assert a["dino"]["mean_per_concept"] == pytest.approx([0.3, 0.7])
    assert s["concept_sets"]["b"]["dino"]["max"] == 0.9


# --------------------------------------------------------------------------- score OUT


def score_cli(out, models, *extra):
    from typer.testing import CliRunner

    from pipeline.cli import app

    args = ["score", str(out), "--dino-model", models.dino, "--clip-image-model", models.clip_image]
    return CliRunner().invoke(app, [*args, "--clip-text-model", models.clip_text, "--device", "cpu", *extra])


def shard_bytes(folder):
    root = Path(folder.root)
    return {p.name: p.read_bytes() for p in sorted((root / "shards").iterdir())}


def test_score_command_writes_scores_next_to_the_shards(tmp_path, models, scorer):
    import pyarrow.parquet as pq

    from tests.review_output import build_output

    built = build_output(tmp_path / "out")
    folder = built["out"]
    before = shard_bytes(folder)
    result = score_cli(folder.root, models)
    assert result.exit_code == 0, result.output
    assert shard_bytes(folder) == before  # shards untouched
    scores = Path(folder.root) / "scores"
    assert sorted(p.name for p in scores.iterdir()) == [
        "00000.parquet",
        "00001.parquet",
        "00002.parquet",
        "_summary.json",
    ]
    rows = pq.read_table(sorted(scores.glob("0*.parquet"))).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(built["samples"])
    for r in rows:
        image, meta = built["samples"][r["key"]]
        refs = scorer.reference_features(built["concept_sets"][meta["concept_set_id"]])
        [want] = scorer.score([image], [meta["prompt"]], [refs])
        assert r["score_error"] is None and len(r["dino"]) == len(
            built["concept_sets"][meta["concept_set_id"]]
        )
        for name, value in want.items():
            np.testing.assert_allclose(r[name], value, rtol=1e-5, atol=1e-5, err_msg=f"{r['key']} {name}")
    summary = json.loads((scores / "_summary.json").read_text())
    assert summary["concept_sets"]["cs0"]["samples"] == 5 and summary["concept_sets"]["cs1"]["samples"] == 3
    cs1 = [r for r in rows if r["concept_set_id"] == "cs1"]
    assert summary["concept_sets"]["cs1"]["clip_t"]["mean"] == pytest.approx(
        np.mean([r["clip_t"] for r in cs1])
    )
    assert summary["concept_sets"]["cs1"]["dino"]["min"] == pytest.approx(min(min(r["dino"]) for r in cs1))
    assert "cs1" in result.output and "clip_t" in result.output

    # a rerun with the same models keeps the score files; other models redo them
    mtimes = {p.name: p.stat().st_mtime_ns for p in scores.glob("0*.parquet")}
    again = score_cli(folder.root, models, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["shards_kept"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in scores.glob("0*.parquet")} == mtimes
    other = ScoreModels(models.dino, models.clip_text, models.clip_text)
    redo = score_cli(folder.root, other, "--json")
    assert json.loads(redo.stdout)["shards_scored"] == 3


def test_score_command_errors(tmp_path, models):
    import shutil

    import pyarrow.parquet as pq

    from tests.review_output import build_output

    folder = build_output(tmp_path / "out")["out"]
    shutil.rmtree(Path(folder.root) / "references" / "cs1")
    result = score_cli(folder.root, models)
    assert result.exit_code == 1
    assert "not scored: cs1_row0-0: concept set cs1: no reference images in references/cs1/" in result.output
    rows = pq.read_table(sorted((Path(folder.root) / "scores").glob("0*.parquet"))).to_pylist()
    assert {r["key"] for r in rows if r["score_error"]} == {"cs1_row0-0", "cs1_row1-1", "cs1_row0-2"}
    assert all(r["clip_t"] is not None for r in rows if r["concept_set_id"] == "cs0")
    nothing = score_cli(tmp_path / "nowhere", models)
    assert nothing.exit_code == 2 and "not an output folder" in nothing.output


# --------------------------------------------------------------------------- the stage (run --score)


def test_score_stage_routes_samples_below_a_threshold(tmp_path, models, scorer):
    import io

    from stages.generation.generate import shard_row
    from stages.scoring.score_stage import ScoreStage, tar_members
    from tests.review_output import build_output

    built = build_output(tmp_path / "out", samples_per_set=(4, 3))
    samples = []
    for key, (image, meta) in sorted(built["samples"].items()):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        samples.append((key, "png", buf.getvalue(), meta))
    expected = {
        k: s
        for (k, _, _, m), s in zip(
            samples,
            scorer.score(
                [built["samples"][k][0] for k, *_ in samples],
                [m["prompt"] for *_, m in samples],
                [scorer.reference_features(built["concept_sets"][m["concept_set_id"]]) for *_, m in samples],
            ),
            strict=True,
        )
    }
    clip_t = sorted(s["clip_t"] for s in expected.values())
    limit = (clip_t[2] + clip_t[3]) / 2  # three samples below
    dino_limit = (
        sorted(min(s["dino"]) for s in expected.values())[1] + 1e-6
    )  # two below (by their worst concept)
    # further fields (a ControlNet condition) travel with their sample
    samples = [(k, ext, data, dict(m, control={"sources": [{}]})) for k, ext, data, m in samples]
    extras = {f"{k}.control.png": k.encode() for k, *_ in samples}
    batch = {c: [v] for c, v in shard_row(0, samples, [], expected=len(samples), extras=extras).items()}
    stage = ScoreStage(
        models, str(tmp_path / "out"), thresholds={"clip_t": limit, "dino": dino_limit}, device="cpu"
    )
    out = stage(batch)
    kept, rejected = json.loads(out["metas"][0]), json.loads(out["rejected_metas"][0])
    assert len(kept) + len(rejected) == len(samples)
    for m in kept + rejected:
        want = expected[m["key"]]
        np.testing.assert_allclose(m["scores"]["clip_t"], want["clip_t"], rtol=1e-5)
        reasons = [f"clip_t<{limit:g}"] * (want["clip_t"] < limit) + [f"dino<{dino_limit:g}"] * (
            min(want["dino"]) < dino_limit
        )
        assert m.get("rejected_by", []) == reasons, m["key"]
    assert {m["key"] for m in rejected} == {
        k for k, s in expected.items() if s["clip_t"] < limit or min(s["dino"]) < dino_limit
    }
    assert 3 <= len(rejected) < len(samples)
    kept_tar, rejected_tar = tar_members(out["tar"][0]), tar_members(out["rejected_tar"][0])
    assert sorted(kept_tar) == sorted(f"{m['key']}.{x}" for m in kept for x in ("png", "json", "control.png"))
    assert sorted(rejected_tar) == sorted(
        f"{m['key']}.{x}" for m in rejected for x in ("png", "json", "control.png")
    )
    assert all(t[f"{k[:-5]}.control.png"] == k[:-5].encode() for t in (kept_tar, rejected_tar) for k in t
               if k.endswith(".json"))
    by_key = {k: data for k, _, data, _ in samples}
    assert all(rejected_tar[f"{m['key']}.png"] == by_key[m["key"]] for m in rejected)  # image bytes unchanged
    assert json.loads(kept_tar[f"{kept[0]['key']}.json"])["scores"] == kept[0]["scores"]
    # without thresholds: scored, nothing rejected
    plain = ScoreStage(models, str(tmp_path / "out"), device="cpu")(batch)
    assert len(json.loads(plain["metas"][0])) == len(samples) and plain["rejected_tar"] == [b""]


def test_score_stage_keeps_the_attention_panels(tmp_path, models):
    """``run --save-attention --min-score``: kept and rejected samples both keep their ``<key>.attn.png``."""
    import io
    import tarfile

    from stages.generation.generate import shard_row
    from stages.scoring.score_stage import ScoreStage, tar_members
    from tests.review_output import build_output

    built = build_output(tmp_path / "out", samples_per_set=(1, 3), attention=True)  # cs1's samples have maps
    shards = {}
    for tar in sorted((tmp_path / "out" / "shards").glob("*.tar")):
        shards.update(tar_members(tar.read_bytes()))
    samples, extras = [], {}
    for key, (_, meta) in sorted(built["samples"].items()):
        samples.append((key, "png", shards[f"{key}.png"], meta))
        if "attention" in meta:
            extras[f"{key}.attn.png"] = shards[f"{key}.attn.png"]
    assert len(extras) == 3
    batch = {c: [v] for c, v in shard_row(0, samples, [], expected=len(samples), extras=extras).items()}
    with tarfile.open(fileobj=io.BytesIO(batch["tar"][0])) as tar:
        key = samples[1][0]
        assert tar.getnames()[2:5] == [f"{key}.png", f"{key}.attn.png", f"{key}.json"]  # a sample's fields together
    plain = json.loads(ScoreStage(models, str(tmp_path / "out"), device="cpu")(batch)["metas"][0])
    clip_t = sorted(m["scores"]["clip_t"] for m in plain if "attention" in m)
    limit = (clip_t[0] + clip_t[1]) / 2  # one sample with maps below
    out = ScoreStage(models, str(tmp_path / "out"), thresholds={"clip_t": limit}, device="cpu")(batch)
    kept, rejected = tar_members(out["tar"][0]), tar_members(out["rejected_tar"][0])
    rejected_maps = [name for name in rejected if name.endswith(".attn.png")]
    kept_maps = [name for name in kept if name.endswith(".attn.png")]
    assert len(rejected_maps) >= 1 and len(kept_maps) >= 1 and len(rejected_maps) + len(kept_maps) == 3
    for name in rejected_maps + kept_maps:
        assert (rejected.get(name) or kept.get(name)) == extras[name]
