"""A new user's first hour: mistakes a first run meets are refused before anything starts (exit 2, one
line naming the option and the fix), and what validate accepts, run accepts.

Covers ``pipeline.preflight`` (model, scorers' models, object storage), ``pipeline.manifest_columns``
(misspelled columns), validate's ``--mask-policy``, and resume comparing ``--model`` as resolved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.preflight import resolve_model
from pipeline.run import run
from pipeline.settings import RunSettings
from stages.masks.segment import SegmentConfig, Segmenter
from stages.output.folder import OutputRefused
from stages.output.layout import RUN_FILE
from tests.conftest import authors_layout
from tests.test_object_storage import s3 as moto_s3  # noqa: F401 - moto S3 on 127.0.0.1, bucket catalog

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> tuple[int, str, str, float]:
    """The real command in a subprocess: (exit code, stdout, stderr, seconds)."""
    full = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    full.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - started


def _model_folder(folder: Path) -> Path:
    """A diffusers folder as far as the start-up checks look (model_index.json); no weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def _concept(image: str, **fields) -> dict:
    return (
        {"image": image, "prompt": "a thing", "weight": 3.0}
        | dict.fromkeys(("mask", "box", "points", "label", "context"))
        | fields
    )


def _manifest(folder: Path, rows: list[dict], extra: dict[str, pa.DataType] | None = None) -> Path:
    fields = [MANIFEST_SCHEMA.field(n) for n in ("id", "prompt", "seeds", "concepts")]
    schema = pa.schema(fields + [pa.field(name, t) for name, t in (extra or {}).items()])
    path = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    """photo.jpg (opaque, no mask), cutout.png (RGBA with transparency), opaque.png (RGBA, all opaque)."""
    Image.new("RGB", (48, 40), (120, 90, 60)).save(tmp_path / "photo.jpg")
    cutout = Image.new("RGBA", (48, 40), (0, 0, 0, 0))
    ImageDraw.Draw(cutout).ellipse((8, 6, 40, 34), fill=(200, 10, 10, 255))
    cutout.save(tmp_path / "cutout.png")
    Image.new("RGBA", (48, 40), (10, 200, 10, 255)).save(tmp_path / "opaque.png")
    return tmp_path


@pytest.fixture
def refused_rows(tmp_path) -> Path:
    """A manifest whose every row is refused (no seeds): a run plans no shard and starts no Ray."""
    Image.new("RGB", (32, 32), "red").save(tmp_path / "c.png")
    rows = [{"id": "a", "prompt": "p", "seeds": [], "concepts": [_concept("c.png", mask="c.png")]}]
    return _manifest(tmp_path, rows)


# --------------------------------------------------------------------------- 1. --model checked first


def test_run_with_a_missing_model_exits_2_before_ray_or_run_json(tmp_path, refused_rows):
    out = tmp_path / "out"
    code, stdout, stderr, seconds = _cli(
        "run", str(refused_rows), "-o", str(out), "--model", "/no/such/model"
    )
    assert code == 2, stderr
    assert stderr.strip().count("\n") == 0, stderr  # one line, no traceback
    assert stderr.startswith("error: --model /no/such/model: no such file or folder"), stderr
    assert not out.exists()  # no _run.json left to refuse the corrected rerun
    assert seconds < 30  # Python and the CLI's imports; no Ray start

    # an uncached hub id offline: the cache is asked, the network never
    code, _, stderr, _ = _cli(
        "run",
        str(refused_rows),
        "-o",
        str(out),
        "--model",
        "someone/not-cached",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert code == 2 and stderr.strip().count("\n") == 0, stderr
    assert "--model someone/not-cached: not a local path and not in the Hugging Face cache" in stderr
    assert "HF_HUB_OFFLINE" in stderr and not out.exists()


def test_validate_checks_the_model_the_same_way(tmp_path, refused_rows):
    result = runner.invoke(app, ["validate", str(refused_rows), "--model", str(tmp_path / "nothing-here")])
    assert result.exit_code == 2 and "--model" in result.stderr and "no such file or folder" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["validate", str(refused_rows), "--model", str(empty)])
    assert result.exit_code == 2 and "a folder without model_index.json" in result.stderr


def test_a_model_resolves_to_an_absolute_path_or_a_cached_hub_revision(tmp_path, monkeypatch, offline):
    model = _model_folder(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("m").value == resolve_model("./m").value == str(model)
    assert resolve_model("m").revision is None
    (tmp_path / "w.ckpt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"--model w.ckpt: a file"):
        resolve_model("w.ckpt")

    # a hub id is looked up in the cache only (offline fixture: any connection fails the test)
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--sd" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (cache / "models--org--sd" / "refs").mkdir()
    (cache / "models--org--sd" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model("org/sd") == type(resolve_model("org/sd"))("org/sd", "0123abcd")
    with pytest.raises(ValueError, match="org/other: not a local path and not in the Hugging Face cache"):
        resolve_model("org/other")


class _Hub(BaseHTTPRequestHandler):
    """A Hugging Face hub on 127.0.0.1 that knows one repo, ``org/known`` (commit ``c0ffee``)."""

    requests: list[str] = []

    def do_HEAD(self):
        _Hub.requests.append(self.path)
        known = self.path == "/org/known/resolve/main/model_index.json"
        self.send_response(200 if known else 404)
        if known:
            self.send_header("X-Repo-Commit", "c0ffee")
            self.send_header("ETag", '"e1"')
        else:
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "2")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_online_an_uncached_hub_id_is_asked_of_the_hub_once(tmp_path, monkeypatch, refused_rows):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        _Hub.requests.clear()
        assert resolve_model("org/known").revision == "c0ffee"
        with pytest.raises(
            ValueError, match="--model org/unknown: not a local path, not in the Hugging Face cache"
        ):
            resolve_model("org/unknown")
        assert _Hub.requests == [
            "/org/known/resolve/main/model_index.json",
            "/org/unknown/resolve/main/model_index.json",
        ]
    finally:
        server.shutdown()
    # no network (nothing listens at the endpoint): one try, at once
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    started = time.perf_counter()
    with pytest.raises(ValueError, match="ConnectError"):
        resolve_model("org/known")
    assert time.perf_counter() - started < 1  # huggingface_hub's download retries for half a minute
    # run: the model family (read before the settings exist) asks once too, then the one-line refusal
    started = time.perf_counter()
    result = runner.invoke(
        app, ["run", str(refused_rows), "-o", str(tmp_path / "out"), "--model", "org/typo"]
    )
    assert result.exit_code == 2 and "--model org/typo: not a local path" in result.stderr
    assert time.perf_counter() - started < 3 and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 6. resume by what --model is


def test_resume_compares_the_model_as_resolved_and_a_refusal_shows_both(tmp_path, monkeypatch, refused_rows):
    model = _model_folder(tmp_path / "m")
    other = _model_folder(tmp_path / "other")
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    run(RunSettings(manifest=str(refused_rows), out=out, model="./m"))
    assert json.loads((tmp_path / "out" / RUN_FILE).read_text())["model"] == str(model)
    summary = run(RunSettings(manifest=str(refused_rows), out=out, model=str(model)))  # resumes, not refused
    assert summary.stats["rows_failed"] == 1
    with pytest.raises(OutputRefused) as refused:
        run(RunSettings(manifest=str(refused_rows), out=out, model=str(other)))
    assert f'model was "{model}", now "{other}"' in str(refused.value)


def test_a_refusal_shows_the_entries_of_settings_that_differ(tmp_path, refused_rows):
    model = str(_model_folder(tmp_path / "m"))
    out = str(tmp_path / "out")
    run(RunSettings(manifest=str(refused_rows), out=out, model=model))
    from stages.params import GenParams

    with pytest.raises(OutputRefused, match=r"defaults.num_inference_steps was 50, now 3\b"):
        run(
            RunSettings(
                manifest=str(refused_rows), out=out, model=model, defaults=GenParams(num_inference_steps=3)
            )
        )


# --------------------------------------------------------------------------- 2. masks: validate as run


def test_validate_reports_photos_without_a_mask_source_under_mask_policy_fail(images):
    rows = [
        {"id": "photo", "prompt": "p", "seeds": [1], "concepts": [_concept("photo.jpg")]},
        {"id": "opaque_rgba", "prompt": "p", "seeds": [1], "concepts": [_concept("opaque.png")]},
        {"id": "cutout", "prompt": "p", "seeds": [1], "concepts": [_concept("cutout.png")]},
        {
            "id": "boxed",
            "prompt": "p",
            "seeds": [1],
            "concepts": [_concept("photo.jpg", box=[2.0, 2.0, 30.0, 30.0])],
        },
        {"id": "labelled", "prompt": "p", "seeds": [1], "concepts": [_concept("photo.jpg", label="a cup")]},
    ]
    manifest = str(_manifest(images, rows))
    result = runner.invoke(app, ["validate", manifest])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("row ")]
    assert [line.split(" ")[2] for line in lines] == ["(id=photo):", "(id=opaque_rgba):"]
    for fix in ("mask file", "RGBA cut-out", "box or points", "label", "--mask-policy whole_image"):
        assert fix in lines[0], lines[0]
    assert lines[0].startswith("row 0 (id=photo): concepts[0].mask: no mask source")
    assert runner.invoke(app, ["validate", manifest, "--mask-policy", "whole_image"]).exit_code == 0


def test_the_runs_mask_error_names_the_fixes(images):
    from stages.masks.segment import MaskItem

    [error] = Segmenter(SegmentConfig()).resolve_masks([MaskItem(image=Image.open(images / "photo.jpg"))])
    assert error.field == "concepts[0].mask"
    for fix in ("mask file", "RGBA cut-out", "box or points", "label", "--mask-policy whole_image"):
        assert fix in error.reason, error.reason


def test_run_refuses_a_photo_without_mask_source_at_validation(images, tmp_path):
    rows = [{"id": "photo", "prompt": "p", "seeds": [1], "concepts": [_concept("photo.jpg")]}]
    manifest = str(_manifest(images, rows))
    model = str(_model_folder(tmp_path / "m"))
    summary = run(RunSettings(manifest=manifest, out=str(tmp_path / "out"), model=model))  # no shard: no Ray
    [error] = summary.errors
    assert (error["stage"], error["field"]) == ("validate", "concepts[0].mask")
    assert "--mask-policy whole_image" in error["reason"]


# --------------------------------------------------------------------------- 3. misspelled columns


def test_a_misspelled_override_column_is_a_validate_problem_and_a_run_refusal(images, tmp_path):
    rows = [
        {
            "id": "a",
            "prompt": "p",
            "seeds": [],
            "concepts": [_concept("cutout.png")],
            "guidance_scal": 3.0,
            "negative_promt": "blurry",
            "num_inference_step": 4,
            "x_guidance_scal": 1.0,
            "sku": "HAT-1",
        }
    ]
    manifest = str(
        _manifest(
            images,
            rows,
            {
                "guidance_scal": pa.float64(),
                "negative_promt": pa.string(),
                "num_inference_step": pa.int64(),
                "x_guidance_scal": pa.float64(),
                "sku": pa.string(),
            },
        )
    )
    result = runner.invoke(app, ["validate", manifest, "--json"])
    answer = json.loads(result.stdout)
    columns = {p["field"]: p["reason"] for p in answer["problems"] if p["row"] is None}
    assert result.exit_code == 1 and set(columns) == {"guidance_scal", "negative_promt", "num_inference_step"}
    assert "looks like 'guidance_scale'" in columns["guidance_scal"]
    assert "--passthrough guidance_scal" in columns["guidance_scal"]

    model = str(_model_folder(tmp_path / "m"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", manifest, "-o", str(out), "--model", model])
    assert result.exit_code == 2 and "'negative_promt' is not a manifest column" in result.stderr
    assert not out.exists()

    declared = [
        arg for c in ("guidance_scal", "negative_promt", "num_inference_step") for arg in ("--passthrough", c)
    ]
    result = runner.invoke(app, ["validate", manifest, *declared, "--json"])
    assert not [p for p in json.loads(result.stdout)["problems"] if p["row"] is None]
    result = runner.invoke(app, ["run", manifest, "-o", str(out), "--model", model, *declared])
    assert result.exit_code == 1 and (out / RUN_FILE).exists()  # started: its one row has no seeds


# --------------------------------------------------------------------------- 5. score without models


def test_score_without_reachable_models_names_the_option(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_FILE).write_text("{}")
    dino = _model_folder(tmp_path / "dino")  # config.json is what a transformers folder needs
    (dino / "config.json").write_text("{}")
    started = time.perf_counter()
    result = runner.invoke(app, ["score", str(out), "--dino-model", str(tmp_path / "no-dino")])
    assert result.exit_code == 2 and f"--dino-model {tmp_path / 'no-dino'}: no such file" in result.stderr
    result = runner.invoke(
        app,
        ["score", str(out), "--dino-model", str(dino), "--clip-image-model", "org/clip"],
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.exit_code == 2 and "--clip-image-model org/clip: not a local path" in result.stderr
    result = runner.invoke(
        app,
        [
            "score",
            str(out),
            "--dino-model",
            str(dino),
            "--clip-image-model",
            str(dino),
            "--clip-text-model",
            str(tmp_path),
        ],
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert (
        result.exit_code == 2
        and "--clip-text-model" in result.stderr
        and "without config.json" in result.stderr
    )
    assert time.perf_counter() - started < 10  # no retries


def test_run_with_score_checks_the_scorers_before_it_starts(tmp_path, refused_rows, monkeypatch, offline):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = str(_model_folder(tmp_path / "m"))
    settings = RunSettings(
        manifest=str(refused_rows), out=str(tmp_path / "out"), model=model, min_score=(("dino", 0.3),)
    )
    with pytest.raises(ValueError, match="--dino-model facebook/dinov2-base: not a local path"):
        run(settings)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 4. object storage


def _s3_env(endpoint: str | None) -> dict:
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return env | ({"AWS_ENDPOINT_URL": endpoint} if endpoint else {})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_object_storage_problems_exit_2_at_start_with_the_fix(tmp_path, refused_rows, moto_s3, monkeypatch):  # noqa: F811
    model = str(_model_folder(tmp_path / "m"))
    base = ["run", str(refused_rows), "--model", model]
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)

    # a missing bucket, for OUT and for the K/V cache
    result = runner.invoke(
        app, [*base, "-o", "s3://no-such-bucket/out"], env=_s3_env(moto_s3[1]["AWS_ENDPOINT_URL"])
    )
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "-o/--out s3://no-such-bucket/out: bucket 'no-such-bucket' not found" in result.stderr
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [*base, "-o", str(out), "--kv-cache", "s3://no-such-bucket/kv"],
        env=_s3_env(moto_s3[1]["AWS_ENDPOINT_URL"]),
    )
    assert result.exit_code == 2 and "--kv-cache s3://no-such-bucket/kv: bucket" in result.stderr
    assert not out.exists()
    # the bucket there: the run starts (and writes _run.json on S3); in a process of its own, as its Ray
    # tasks (which plan the file) see the environment the Ray they start with has
    code, stdout, stderr, _ = _cli(*base, "-o", "s3://catalog/out", env=_s3_env(moto_s3[1]["AWS_ENDPOINT_URL"]),
                                   timeout=300)
    assert code == 1, stdout + stderr  # its one row has no seeds

    # an endpoint where nothing listens (no network): seconds, not a minute of retries
    started = time.perf_counter()
    result = runner.invoke(
        app, [*base, "-o", "s3://catalog/out"], env=_s3_env(f"http://127.0.0.1:{_free_port()}")
    )
    assert time.perf_counter() - started < 5
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "-o/--out s3://catalog/out:" in result.stderr and "AWS_ENDPOINT_URL" in result.stderr

    # an endpoint that accepts connections and never answers (a hung network): one short try
    import socket

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        started = time.perf_counter()
        result = runner.invoke(
            app, [*base, "-o", "s3://catalog/out"], env=_s3_env(f"http://127.0.0.1:{hung.getsockname()[1]}")
        )
        assert time.perf_counter() - started < 7  # the filesystem's own retries take 10 s
    assert result.exit_code == 2 and "Timeout" in result.stderr and "AWS_ENDPOINT_URL" in result.stderr

    # a region that is none (AWS itself, no endpoint): refused before any request
    result = runner.invoke(app, [*base, "-o", "s3://catalog/out?region=mars-9"], env=_s3_env(None))
    assert result.exit_code == 2 and "'mars-9' is no AWS region" in result.stderr
    assert "AWS_DEFAULT_REGION" in result.stderr


def test_storage_advice_names_the_variables_of_each_failure():
    from stages.output.storage_check import storage_advice

    assert "AWS_ENDPOINT_URL" in storage_advice(
        "AWS Error NETWORK_CONNECTION during HeadBucket operation: curlCode: 7"
    )
    assert "AWS_ACCESS_KEY_ID" in storage_advice("AWS Error ACCESS_DENIED during HeadBucket operation: 403")
    assert "AWS_DEFAULT_REGION" in storage_advice("AWS Error UNKNOWN (HTTP status 301) PermanentRedirect")


# --------------------------------------------------------------------------- 7. manifests that move


def test_from_config_writes_paths_relative_to_the_manifest_so_the_folder_can_move(tmp_path):
    root, configs = authors_layout(tmp_path / "work", cases=["cat_necklace", "dog_flower"])
    manifest = tmp_path / "work" / "manifests" / "authors.parquet"
    result = runner.invoke(
        app, ["manifest", "from-config", *map(str, configs), "--root", str(root), "-o", str(manifest)]
    )
    assert result.exit_code == 0, result.output
    concepts = [c for row in pq.read_table(manifest).to_pylist() for c in row["concepts"]]
    assert concepts and all(c["image"].startswith("../FreeCustom/dataset/") for c in concepts)
    assert all(c["mask"].startswith("../FreeCustom/dataset/") for c in concepts)

    (tmp_path / "work").rename(tmp_path / "moved")
    result = runner.invoke(app, ["validate", str(tmp_path / "moved" / "manifests" / "authors.parquet")])
    assert result.exit_code == 0, result.output


def test_review_and_inspect_name_concept_sets_by_their_rows_and_concepts(tmp_path):
    from pipeline.review import build_review
    from tests.review_output import build_output

    build_output(tmp_path / "out", samples_per_set=(3, 4))
    build_review(str(tmp_path / "out"))
    index = (tmp_path / "out" / "review" / "index.html").read_text()
    assert "concept 0 + concept 1</a>" in index and "rows: cs1_row0, cs1_row1" in index
    assert "rows: cs0_row0, cs0_row1" in index
    page = (tmp_path / "out" / "review" / "sets" / "cs1.html").read_text()
    assert "<h1>concept 0 + concept 1 <code>cs1</code></h1>" in page and "rows: cs1_row0, cs1_row1" in page

    result = runner.invoke(app, ["inspect", str(tmp_path / "out")])
    assert '  cs1  "concept 0" + "concept 1" (rows: cs1_row0, cs1_row1)' in result.stdout, result.output


@pytest.mark.parametrize("limit", [12, 21, 30])
def test_contact_sheet_captions_are_cut_at_word_boundaries(limit):
    from stages.masks.previews import fit_caption

    caption = "0 reference: a dog wearing a red hat in a park"
    short = fit_caption(caption, limit)
    assert len(short) <= limit and short.endswith("...")
    kept = short.removesuffix("...")
    assert caption.startswith(kept) and caption[len(kept)] in " ,;:"  # the next character ends a word
    assert fit_caption("a red hat", limit) == "a red hat"


# --------------------------------------------------------------------------- 8. progress a person can follow


def test_progress_counts_concept_sets_while_they_resolve_and_says_when_nothing_is_left(monkeypatch):
    from pipeline.progress import ProgressLog

    now = [1000.0]
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: now[0])
    lines: list[str] = []
    log = ProgressLog(lines.append, every=10.0)
    log.phase("validate")
    log.planned(shards=4, images=40, rows_failed=0, complete=0)
    log.concept_sets(3)  # as run() reports: the total, then the phase starts
    log.phase("resolve")
    assert lines == ["freecustom-pipeline: resolve: concept sets 0/3 resolved, shards 0/4, failed rows 0"]
    now[0] += 11
    log.concept_set()  # 11 s since the last line: one
    log.concept_set()  # 0 s: none
    assert lines[-1] == "freecustom-pipeline: resolve: concept sets 1/3 resolved, shards 0/4, failed rows 0"
    log.concept_set()  # the last: a line at once
    assert len(lines) == 3 and "concept sets 3/3 resolved" in lines[-1]
    log.phase("generate_and_write")
    assert lines[-1].startswith("freecustom-pipeline: generate_and_write: shards 0/4, images 0/40")

    resumed: list[str] = []
    ProgressLog(resumed.append).planned(shards=0, images=0, rows_failed=1, complete=4)
    assert resumed == [
        "freecustom-pipeline: nothing to do: all 4 shards are complete (a resumed run); "
        "the report is rewritten"
    ]


# --------------------------------------------------------------------------- 9. set-up without chromium


@pytest.mark.parametrize("apt_get", ["fails", "absent"])
def test_setup_succeeds_where_chromium_cannot_be_installed(tmp_path, apt_get):
    """setup.sh's last step on a machine without the package (apt-get fails) or without apt-get: a note,
    and the set-up still finishes (its Python step stubbed: no venv is built here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "id").write_text("#!/bin/sh\necho 0\n")  # root: the step tries apt-get
    if apt_get == "fails":
        (bin_dir / "apt-get").write_text(
            f'#!/bin/sh\necho "$@" >> {tmp_path}/apt-get.calls\n[ "$1" = update ] && exit 0\n'
            'echo "E: Unable to locate package chromium" >&2\n'
            "exit 100\n"
        )
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    done = subprocess.run(
        ["/bin/bash", "-c", "source scripts/setup.sh; install_python_env() { :; }; main; echo finished"],
        env={"PATH": str(bin_dir)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == [
        "setup done: activate with 'source .venv/bin/activate'",
        "finished",
    ]
    assert "note: chromium not installed" in done.stderr and "optional" in done.stderr
    if apt_get == "fails":
        assert "install -y -qq chromium" in (tmp_path / "apt-get.calls").read_text()
        assert "the package is not available here" in done.stderr
    else:
        assert "no apt-get on this machine" in done.stderr
