"""The review gallery (pipeline/review.py) rendered in headless Chromium (Debian's `chromium`, which
scripts/setup.sh installs): every thumbnail loads, counts equal the output's samples, sorting by a
score reorders them, filters and pages work, a 100k-sample concept set renders in under a second."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.review import Site, write_assets, write_set_page
from pipeline.review_samples import Sample
from pipeline.scoring import score_output
from pipeline.tiny_scorers import build_tiny_scorers
from tests.review_output import build_output

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (scripts/setup.sh installs it)"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium(tmp_path: Path, url: str, *args: str) -> str:
    """Chromium's stdout for ``url`` (a file path, with an optional #hash)."""
    profile = tmp_path / "chromium-profile"
    result = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            *args,
            f"file://{url}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def dom(tmp_path: Path, url: str) -> str:
    return chromium(tmp_path, url, "--dump-dom")


def keys_in(html: str) -> list[str]:
    return re.findall(r'<figure class="sample[^"]*" tabindex="0" data-key="([^"]+)"', html)


def attr(html: str, name: str) -> str:
    found = re.findall(rf'{name}="([^"]*)"', html)
    assert found, name
    return found[0]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    from typer.testing import CliRunner

    from pipeline.cli import app

    root = tmp_path_factory.mktemp("review")
    built = build_output(root / "out", samples_per_set=(6, 3), rejected=1)
    models = build_tiny_scorers(root / "models")
    score_output(built["out"], models, device="cpu")
    result = CliRunner().invoke(app, ["review", str(root / "out"), "-o", str(root / "site"), "--json"])
    assert result.exit_code == 0, result.output
    return {**built, "site": root / "site", "answer": json.loads(result.stdout)}


def test_index_counts_and_images(gallery, tmp_path):
    answer = gallery["answer"]
    assert answer["samples"] == 9 and answer["rejected"] == 1 and answer["concept_sets"] == 2
    assert answer["thumbnails_made"] == 9
    html = dom(tmp_path, str(gallery["site"] / "index.html"))
    assert attr(html, 'id="totals" data-samples') == "9"
    counts = dict(re.findall(r'data-concept-set="(\w+)".*?data-samples="(\d+)"', html, re.S))
    assert counts == {"cs0": "6", "cs1": "3"}
    assert re.search(r'data-concept-set="cs0".*?data-rejected="1"', html, re.S)
    assert (
        attr(html, "data-images-loaded") == "2" and attr(html, "data-images-broken") == "0"
    )  # contact sheets
    alts = re.findall(r'<img [^>]*alt="([^"]*)"', html)
    assert len(alts) == 2 and all(a.startswith("Contact sheet of concept set") for a in alts)
    assert "clip_t" in html and "dino_masked*" in html  # score summaries


def test_set_page_thumbnails_sorting_filters(gallery, tmp_path):
    page = str(gallery["site"] / "sets" / "cs0.html")
    html = dom(tmp_path, page)
    expected = sorted(
        [k for k, (_, m) in gallery["samples"].items() if m["concept_set_id"] == "cs0"] + ["cs0_row0-0"]
    )
    assert keys_in(html) == expected  # every sample of the set, by key; the rejected one included
    assert attr(html, 'id="count" role="status" aria-live="polite" data-matching') == "6"
    assert attr(html, "data-images-loaded") == "6" and attr(html, "data-images-broken") == "0"
    alts = re.findall(r'<img src="../thumbs[^"]+" alt="([^"]*)"', html)
    assert len(alts) == 6 and all(a.startswith("Sample cs0_") and ": " in a for a in alts)
    assert re.findall(
        r'data-key="([^"]+)"><img[^>]*>.{0,200}?<span class="badge">rejected: clip_t&lt;20', html
    )
    assert html.count('class="badge"') == 1

    scores = pq.read_table(
        sorted((gallery["out"].root + "/scores/" + n) for n in ("00000.parquet", "00001.parquet"))
    )
    clip_t = {r["key"]: r["clip_t"] for r in scores.to_pylist() if r["concept_set_id"] == "cs0"}
    by_score = sorted(clip_t, key=lambda k: -clip_t[k])
    desc = keys_in(dom(tmp_path, page + "#sort=clip_t&dir=desc"))
    assert desc == [*by_score, "cs0_row0-0"]  # the unscored (rejected here) sample last
    assert desc != expected
    assert keys_in(dom(tmp_path, page + "#sort=clip_t&dir=asc")) == [*by_score[::-1], "cs0_row0-0"]
    dino = {r["key"]: min(r["dino"]) for r in scores.to_pylist() if r["concept_set_id"] == "cs0"}
    assert keys_in(dom(tmp_path, page + "#sort=dino&dir=desc"))[:5] == sorted(dino, key=lambda k: -dino[k])

    limit = (clip_t[by_score[1]] + clip_t[by_score[2]]) / 2  # between the 2nd and 3rd best
    filtered = keys_in(dom(tmp_path, page + f"#filter=clip_t&min={limit}"))
    assert filtered == sorted(by_score[:2])
    assert keys_in(dom(tmp_path, page + "#status=rejected")) == ["cs0_row0-0"]
    assert len(keys_in(dom(tmp_path, page + "#status=accepted"))) == 5


def test_screenshots(gallery, tmp_path):
    for name, url in (("index", "index.html"), ("set", "sets/cs1.html#sort=clip_t&dir=desc")):
        shot = tmp_path / f"{name}.png"
        chromium(tmp_path, str(gallery["site"] / url), f"--screenshot={shot}", "--window-size=1000,700")
        with Image.open(shot) as image:
            assert image.size == (1000, 700)
            pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
            assert len(np.unique(pixels, axis=0)) > 50  # more than a blank page


def test_thumbnails_are_made_once(gallery):
    from pipeline.review import build_review

    thumbs = sorted((gallery["site"] / "thumbs").rglob("*.jpg"))
    assert len(thumbs) == 9 and {p.parent.parent.name for p in thumbs} == {"shards", "rejected"}
    for p in thumbs:
        with Image.open(p) as image:
            assert image.format == "JPEG" and max(image.size) <= 160
    before = {p: p.stat().st_mtime_ns for p in thumbs}
    again = build_review(gallery["out"].root, str(gallery["site"]))
    assert again["thumbnails_made"] == 0 and {p: p.stat().st_mtime_ns for p in thumbs} == before


def test_no_external_resources(gallery):
    for path in gallery["site"].rglob("*"):
        if path.suffix in (".html", ".js", ".css"):
            assert not re.search(r"(https?:)?//[a-z]", path.read_text()), path


def test_100k_samples_open_in_a_second(tmp_path):
    rng = np.random.default_rng(0)
    n = 100_000
    clip_t = np.round(rng.random(n) * 40, 2)  # ties too: they keep the data's order, as a stable sort
    samples = [
        Sample(
            f"row{i // 4}-{i % 4}",
            i % 4,
            f"prompt {i % 97}",
            "big",
            "thumbs/shards/00000",
            None,
            {"dino": [float(x) for x in rng.random(2)], "clip_t": float(clip_t[i])},
        )
        for i in range(n)
    ]
    site = Site(str(tmp_path / "site"))
    write_set_page(site, "big", samples)
    write_assets(site)
    html = dom(tmp_path, str(tmp_path / "site" / "sets" / "big.html") + "#sort=clip_t&dir=desc&page=7")
    keys = keys_in(html)
    order = np.argsort(-clip_t, kind="stable")
    assert keys == [samples[i].key for i in order[600:700]]
    assert attr(html, "data-pages") == "1000" and attr(html, "data-page") == "7"
    assert int(attr(html, "data-render-ms")) < 1000


def test_attention_panels_load(tmp_path):
    from pipeline.review import build_review

    built = build_output(tmp_path / "out", samples_per_set=(2, 2), attention=True)  # cs1's samples have maps
    result = build_review(built["out"].root, str(tmp_path / "site"))
    assert result["thumbnails_made"] == 4  # sample thumbnails; the attention panels come on top
    panels = sorted((tmp_path / "site" / "thumbs").rglob("*.attn.jpg"))
    assert [p.name for p in panels] == sorted(
        f"{k}.attn.jpg" for k in built["samples"] if k.startswith("cs1")
    )
    with Image.open(panels[0]) as image:
        assert image.size == (2 * 64 + 4, 64)  # two panels side by side, small enough to stay as they are
    html = dom(tmp_path, str(tmp_path / "site" / "sets" / "cs1.html"))
    attn = re.findall(r'<img class="attn" src="([^"]+)" alt="([^"]*)"', html)
    assert sorted(src.rsplit("/", 1)[1] for src, _ in attn) == [p.name for p in panels]
    assert all(alt.startswith("Attention maps of sample cs1_") for _, alt in attn)
    assert (
        attr(html, "data-images-loaded") == "4" and attr(html, "data-images-broken") == "0"
    )  # 2 samples + 2 maps
    plain = dom(tmp_path, str(tmp_path / "site" / "sets" / "cs0.html"))
    assert 'class="attn"' not in plain and attr(plain, "data-images-loaded") == "2"


def test_control_conditions_load(tmp_path):
    """run --controlnet with two ControlNets (and --save-attention): each sample of cs1 shows its attention
    panels and both conditions as labelled thumbnails, made once; cs0 (no further fields) shows none."""
    from pipeline.review import build_review

    built = build_output(tmp_path / "out", samples_per_set=(2, 2), attention=True, control=2)
    site = tmp_path / "site"
    result = build_review(built["out"].root, str(site))
    assert result["thumbnails_made"] == 4  # sample thumbnails only
    cs1 = sorted(k for k in built["samples"] if k.startswith("cs1"))
    extras = {p.name: p for p in (site / "thumbs").rglob("*.*.jpg")}
    assert sorted(extras) == sorted(f"{k}.{f}.jpg" for k in cs1 for f in ("attn", "control", "control1"))
    members = {}
    for path in sorted(Path(built["out"].root, "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    for key in cs1:
        for field in ("control", "control1"):
            png = Image.open(io.BytesIO(members[f"{key}.{field}.png"])).convert("RGB")
            with Image.open(extras[f"{key}.{field}.jpg"]) as thumb:
                assert thumb.format == "JPEG" and thumb.size == png.size  # small enough to stay as they are
                diff = np.abs(np.asarray(thumb.convert("RGB"), np.float32) - np.asarray(png, np.float32))
                assert diff.mean() < 8, (key, field)  # the condition itself, not another field
    html = dom(tmp_path, str(site / "sets" / "cs1.html"))
    controls = re.findall(r'<img class="control" src="([^"]+)" alt="([^"]*)"', html)
    assert sorted(src.rsplit("/", 1)[1] for src, _ in controls) == sorted(
        f"{k}.{f}.jpg" for k in cs1 for f in ("control", "control1")
    )
    assert [alt for _, alt in controls] == [
        f"Control condition of sample {k}: " + what
        for k in cs1
        for what in (
            "the canny map (thresholds 50/150) of its control image, fed to ControlNet 1 of 2",
            "its control image as given, fed to ControlNet 2 of 2",
        )
    ]
    labels = re.findall(r'<div class="extra-label">([^<]*)</div>', html)
    assert labels == ["attention", "control", "control 1"] * 2
    assert attr(html, "data-images-loaded") == "8"  # 2 samples + 2 attention panels + 4 conditions
    assert attr(html, "data-images-broken") == "0"
    assert "data:" not in html and ".png" not in (site / "data" / "cs1.js").read_text()  # thumbnails, no PNG
    plain = dom(tmp_path, str(site / "sets" / "cs0.html"))
    assert 'class="extras"' not in plain and 'class="control"' not in plain
    assert attr(plain, "data-images-loaded") == "2" and attr(plain, "data-images-broken") == "0"
    before = {p: p.stat().st_mtime_ns for p in extras.values()}
    assert build_review(built["out"].root, str(site))["thumbnails_made"] == 0
    assert {p: p.stat().st_mtime_ns for p in extras.values()} == before  # made once


def test_extras_of_a_single_controlnet():
    from pipeline.review_samples import extras_of

    meta = {"control": {"sources": [{"image": "/data/pose.png", "type": "none"}]}}
    (control,) = extras_of(meta)
    assert (control.field, control.thumb, control.label) == ("control.png", "control.jpg", "control")
    assert control.alt == (
        "Control condition of sample {key}: its control image as given, fed to the ControlNet"
    )
    assert extras_of({}) == ()


def test_boxes_of_annotate_are_drawn_and_toggle(tmp_path):
    """run --annotate's boxes over the thumbnails of cs1 (in the image's pixels), hidden by the checkbox's
    state (#boxes=off); presence and overlap sortable; cs0 (not annotated) has neither."""
    from pipeline.review import build_review

    built = build_output(tmp_path / "out", samples_per_set=(2, 2), annotate=True)
    build_review(built["out"].root, str(tmp_path / "site"))
    page = str(tmp_path / "site" / "sets" / "cs1.html")
    html = dom(tmp_path, page)
    rects = re.findall(
        r'<rect x="(\d+)" y="(\d+)" width="(\d+)" height="(\d+)" stroke="([^"]+)" '
        r'data-concept="(\d)"',
        html,
    )
    expected = []
    for key in keys_in(html):
        for j, (x0, y0, x1, y1) in enumerate(n["box"] for n in built["samples"][key][1]["annotations"]):
            expected.append((str(x0), str(y0), str(x1 - x0), str(y1 - y0), ["#ff4040", "#40a0ff"][j], str(j)))
    assert len(expected) == 4 and rects == expected
    assert html.count('viewBox="0 0 64 64"') == 2
    assert re.search(r'<input id="show-boxes" type="checkbox"', html)
    assert 'class="grid"' in html and "hide-boxes" not in html
    assert '<option value="overlap">overlap</option>' in html
    off = dom(tmp_path, page + "#boxes=off")
    assert 'class="grid hide-boxes"' in off
    # the pixels: concept 0's red outline is on the screen only with the boxes shown
    shots = {}
    for name, url in (("on", page), ("off", page + "#boxes=off")):
        shots[name] = tmp_path / f"{name}.png"
        chromium(tmp_path, url, f"--screenshot={shots[name]}", "--window-size=1000,700")

    def red(path):
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int(
            (
                (abs(rgb[..., 0] - 255) < 30) & (abs(rgb[..., 1] - 64) < 30) & (abs(rgb[..., 2] - 64) < 30)
            ).sum()
        )

    assert red(shots["on"]) > red(shots["off"]) + 100
    assert len(list((tmp_path / "site" / "thumbs").rglob("*.ann0.mask.jpg"))) == 2  # the masks, as thumbnails
    plain = dom(tmp_path, str(tmp_path / "site" / "sets" / "cs0.html"))
    assert "<rect" not in plain and "show-boxes" not in plain and '<option value="overlap">' not in plain
