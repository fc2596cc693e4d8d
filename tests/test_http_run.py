"""A run whose concept images are http:// URLs on a server the test starts on 127.0.0.1: good rows
render, a 404, a server too slow for the timeout and an image over the download limit are row errors
naming the URL; nothing else is lost."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.run import run
from pipeline.settings import RunSettings
from stages.params import GenParams

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _png(size: int, seed: int) -> bytes:
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((size // 5, size // 5, 4 * size // 5, 4 * size // 5), fill=(40 * seed % 255, 90, 160, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class _Catalog(BaseHTTPRequestHandler):
    files = {"/good.png": _png(64, 1), "/other.png": _png(64, 2),
             "/big.png": Image.effect_noise((400, 400), 90).convert("RGB").tobytes()}

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/slow.png":
            time.sleep(3)
        body = self.files.get(self.path if self.path != "/slow.png" else "/good.png")
        if body is None:
            self.send_error(404)
            return
        if self.path == "/big.png":  # a valid PNG over the run's download limit
            buf = io.BytesIO()
            Image.frombytes("RGB", (400, 400), body).save(buf, format="PNG")
            body = buf.getvalue()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout, size limit)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def catalog():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Catalog)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_concept_images_from_urls(catalog, tmp_path, tiny_model_dir, ray_session):
    def row(i, name):
        concept = {"image": f"{catalog}/{name}", "prompt": "a product", "mask": None, "weight": 3.0, "box": None,
                   "points": None, "label": None, "context": None}
        return {"id": f"r{i}", "prompt": f"a product in scene {i}", "seeds": [i], "concepts": [concept]}

    names = ["good.png", "missing.png", "slow.png", "big.png", "other.png"]
    manifest = tmp_path / "m.parquet"
    schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in ("id", "prompt", "seeds", "concepts")])
    pq.write_table(pa.Table.from_pylist([row(i, n) for i, n in enumerate(names)], schema=schema), manifest)
    settings = RunSettings(manifest=str(manifest), out=str(tmp_path / "out"), model=str(tiny_model_dir),
                           defaults=GenParams(num_inference_steps=2, height=64, width=64), samples_per_shard=4,
                           http_timeout=1.0, max_download_bytes=100_000)
    assert len(_Catalog.files["/good.png"]) < 100_000
    summary = run(settings)
    assert summary.stats["samples_written"] == 2 and summary.stats["rows_failed"] == 3
    errors = {e["id"]: e for e in pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()}
    assert set(errors) == {"r1", "r2", "r3"}
    for rid, name, why in (("r1", "missing.png", "404"), ("r2", "slow.png", "timed out"), ("r3", "big.png", "too big")):
        assert errors[rid]["field"] == "concepts[0].image" and f"{catalog}/{name}" in errors[rid]["reason"]
        assert why in errors[rid]["reason"], errors[rid]["reason"]
    metas = [json.loads(m) for m in pq.read_table(tmp_path / "out" / "shards" / "00000.parquet")["metadata"].to_pylist()]
    assert [m["concepts"][0]["image"] for m in metas] == [f"{catalog}/good.png", f"{catalog}/other.png"]
