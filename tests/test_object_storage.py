"""Manifest, images, OUT and --kv-cache on object storage: a local S3 server (moto, on 127.0.0.1).

Runs are subprocesses (their embedded Ray inherits the S3 endpoint and credentials from the
environment, as on a cluster); everything is read back through ``pyarrow.fs.S3FileSystem``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.examples import write_example_manifest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUCKET = "catalog"
RUN = ["--num-inference-steps", "2", "--height", "64", "--width", "64", "--samples-per-shard", "3",
       "--scheduler", "DDIMScheduler", "--max-workers", "1"]


@pytest.fixture(scope="module")
def s3():
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    filesystem = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], region="us-east-1",
                                   access_key="testing", secret_key="testing", scheme="http")
    yield filesystem, env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _upload(filesystem, local: Path, prefix: str) -> None:
    for path in local.rglob("*"):
        if path.is_file():
            with filesystem.open_output_stream(f"{prefix}/{path.relative_to(local).as_posix()}") as f:
                f.write(path.read_bytes())


def _cli(env: dict, *args, faults: dict | None = None, **popen) -> subprocess.Popen:
    full = dict(os.environ, **env, PYTHONPATH=str(REPO))
    full.pop("RAY_ADDRESS", None)
    if faults:
        full["FREECUSTOM_FAULTS"] = json.dumps(faults)
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def _run(env, *args, timeout=900, **kw) -> tuple[int, str, str]:
    proc = _cli(env, *args, **kw)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _objects(filesystem, prefix: str) -> dict[str, bytes]:
    infos = filesystem.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File and not info.path.endswith(("_stats.json", "README.md")):
            with filesystem.open_input_stream(info.path) as f:
                out[info.path.split(f"{prefix}/", 1)[1]] = f.read()
    return out


def test_a_run_on_object_storage_is_complete_resumable_and_exactly_once(s3, tmp_path, tiny_model_dir):
    filesystem, env = s3
    manifest = write_example_manifest(tmp_path / "inputs")  # relative image paths: resolved on S3
    _upload(filesystem, tmp_path / "inputs", f"{BUCKET}/inputs")
    manifest_uri = f"s3://{BUCKET}/inputs/{manifest.name}"
    model = str(tiny_model_dir)

    # a clean run: manifest, images, OUT and the K/V cache on S3
    code, _, err = _run(env, "run", manifest_uri, "-o", f"s3://{BUCKET}/clean", "--model", model,
                        "--kv-cache", f"s3://{BUCKET}/kv", *RUN)
    assert code == 0, err[-3000:]
    clean = _objects(filesystem, "clean")
    tars = sorted(k for k in clean if k.startswith("shards/") and k.endswith(".tar"))
    assert len(tars) >= 3 and not Path("s3:").exists() and not (REPO / "s3:").exists()
    stats = json.loads(filesystem.open_input_stream(f"{BUCKET}/clean/_stats.json").read())
    assert stats["complete"] and stats["samples_written"] == stats["samples_expected"] == 8
    assert stats["reference_passes"] == stats["concept_sets"]
    keys = []
    for name in sorted(k for k in clean if k.endswith(".parquet") and k.startswith("shards/")):
        keys += pq.read_table(io.BytesIO(clean[name]))["key"].to_pylist()
    assert len(keys) == len(set(keys)) == 8
    marker = json.loads(clean["_progress/00000.json"])
    assert marker["files"]["tar"]["size"] == len(clean["shards/00000.tar"])
    assert not any(k.startswith("_kv/") for k in clean)  # the run's store is gone once complete
    assert _objects(filesystem, "kv")  # the persistent K/V cache is on S3

    # the same run, killed (SIGKILL) after a shard's tar is written and before its marker
    faults = {"dir": str(tmp_path / "faults"), "points": {"write.tar": {"after": 2, "action": "hang", "seconds": 600}}}
    proc = _cli(env, "run", manifest_uri, "-o", f"s3://{BUCKET}/killed", "--model", model,
                "--kv-cache", f"s3://{BUCKET}/kv", *RUN, faults=faults)
    reached = tmp_path / "faults" / "write.tar.reached"
    deadline = time.monotonic() + 600
    while not reached.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert reached.exists(), proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    os.kill(int(reached.read_text()), signal.SIGKILL)  # the hanging write task (its own Ray session)
    partial = _objects(filesystem, "killed")
    torn = [k for k in partial if k.endswith(".tar") and f"_progress/{Path(k).stem}.json" not in partial]
    assert torn, sorted(partial)  # a tar object without its marker: not counted as done
    code, _, err = _run(env, "run", manifest_uri, "-o", f"s3://{BUCKET}/killed", "--model", model,
                        "--kv-cache", f"s3://{BUCKET}/kv", *RUN)
    assert code == 0, err[-3000:]
    resumed = _objects(filesystem, "killed")
    assert {k: v for k, v in resumed.items() if k != "_run.json"} == {k: v for k, v in clean.items() if k != "_run.json"}
    stats = json.loads(filesystem.open_input_stream(f"{BUCKET}/killed/_stats.json").read())
    assert stats["reference_passes"] == 0  # every concept set's K/V came from the S3 cache

    # inspect reads it there
    code, out, err = _run(env, "inspect", f"s3://{BUCKET}/killed")
    assert code == 0, err[-2000:]
    assert "samples_written: 8" in out and "00000.tar" in out


@pytest.mark.parametrize("option, value", [("-o", "s3:/x"), ("-o", "foo://x"), ("--kv-cache", "ftp://x")])
def test_unsupported_locations_are_refused_before_anything_is_created(tmp_path, option, value, tiny_model_dir):
    manifest = write_example_manifest(tmp_path / "inputs")
    args = ["run", str(manifest), "--model", str(tiny_model_dir)]
    args += [option, value] if option == "-o" else ["-o", str(tmp_path / "out"), option, value]
    code, _, err = _run({}, *args, cwd=tmp_path, timeout=120)
    assert code == 2, err[-2000:]
    assert value in err and option.lstrip("-").split("/")[0] in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_a_sam_checkpoint_on_object_storage_loads_through_the_safe_loader(s3, tmp_path):
    import torch
    from safetensors.torch import save_file

    from stages.masks.segment_models import load_state_dict_safely

    filesystem, _ = s3
    state = {"image_encoder.w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_file(state, str(tmp_path / "sam.safetensors"))
    with filesystem.open_output_stream(f"{BUCKET}/models/sam.safetensors") as f:
        f.write((tmp_path / "sam.safetensors").read_bytes())
    loaded = load_state_dict_safely(f"s3://{BUCKET}/models/sam.safetensors", cache_dir=str(tmp_path / "cache"))
    assert torch.equal(loaded["image_encoder.w"], state["image_encoder.w"])
    with pytest.raises(ValueError, match="no such object"):
        load_state_dict_safely(f"s3://{BUCKET}/models/missing.safetensors", cache_dir=str(tmp_path / "cache"))


class RefusingProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server that answers ``403 AccessDenied`` (an error
    S3 clients do not retry) to PUTs of keys ending in one of ``refuse``, and forwards everything else.
    ``puts`` lists the keys of the PUTs it forwarded."""

    def __init__(self, upstream: str):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        proxy, target = self, urlsplit(upstream)
        self.refuse: tuple[str, ...] = ()
        self.puts: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def body(self) -> bytes:
                """The request body as sent (a chunked one with its chunk lines and trailer, forwarded raw)."""
                if "chunked" not in self.headers.get("Transfer-Encoding", ""):
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raw = b""
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0], 16)
                    if size == 0:
                        while (trailer := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                            raw += trailer
                        return raw + b"\r\n"
                    raw += self.rfile.read(size + 2)

            def forward(self):
                body = self.body()
                key = self.path.split("?", 1)[0]
                if self.command == "PUT" and proxy.refuse and key.endswith(proxy.refuse):
                    error = b"<Error><Code>AccessDenied</Code><Message>refused by the test</Message></Error>"
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                if self.command == "PUT":
                    proxy.puts.append(key)
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}  # answered here
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_folder_write_that_failed_after_its_first_file_is_rewritten_whole(s3):
    """On object storage a folder is written file by file; one that failed after its first file must
    not count as there (one object exists under its prefix): the retry writes every file."""
    from stages.output.folder import OutputFolder

    filesystem, env = s3
    proxy = RefusingProxy(env["AWS_ENDPOINT_URL"])
    try:
        through_proxy = pafs.S3FileSystem(endpoint_override=proxy.url, region="us-east-1", access_key="testing",
                                          secret_key="testing", scheme="http")
        out = OutputFolder(f"{BUCKET}/folders", filesystem=through_proxy)
        files = {"0.png": b"first", "1.png": b"second", "sheet.png": b"third", "index.json": b"{}"}
        proxy.refuse = ("/1.png",)  # the store refuses the second file
        with pytest.raises(OSError, match="AccessDenied|refused|403"):
            out.write_folder("references/abc", files)
        assert sorted(_objects(filesystem, "folders")) == ["references/abc/0.png"]  # written before the failure
        proxy.refuse, proxy.puts = (), []
        assert out.write_folder("references/abc", files) is True  # not taken as there: written again, whole
        assert [put.rsplit("/", 1)[1] for put in proxy.puts] == list(files)
        assert _objects(filesystem, "folders") == {f"references/abc/{name}": data for name, data in files.items()}
        assert out.write_folder("references/abc", files) is False  # complete now: kept as it is
    finally:
        proxy.close()


def _split_example(tmp_path: Path) -> tuple[Path, list[dict]]:
    """The example manifest's rows split into a hive-partitioned folder (``kind=pairs`` / ``kind=single``)."""
    manifest = write_example_manifest(tmp_path / "inputs")
    table = pq.read_table(manifest)
    rows = table.to_pylist()
    for r in rows:  # image paths relative to the manifest's folder: absolute on S3 below
        for c in r["concepts"]:
            for key in ("image", "mask"):
                if c.get(key):
                    c[key] = f"s3://{BUCKET}/inputs/{c[key]}"
    return manifest, rows


def test_a_prefix_manifest_on_object_storage_lists_digests_and_validates(s3, tmp_path):
    from pipeline.manifest_files import ManifestSource, read_manifest

    filesystem, env = s3
    manifest, rows = _split_example(tmp_path)
    _upload(filesystem, tmp_path / "inputs", f"{BUCKET}/inputs")
    local = tmp_path / "shop"
    for kind, part in (("pairs", rows[:2]), ("single", rows[2:])):
        (local / f"kind={kind}").mkdir(parents=True)
        pq.write_table(pq.read_table(manifest).from_pylist(part, schema=pq.read_schema(manifest)),
                       local / f"kind={kind}" / "part-0.parquet")
    (local / "_SUCCESS").write_text("")
    _upload(filesystem, local, f"{BUCKET}/shop")
    source = ManifestSource.open(f"s3://{BUCKET}/shop/")
    assert [p.name for p in source.parts] == ["kind=pairs/part-0.parquet", "kind=single/part-0.parquet"]
    assert source.parts[0].location == f"s3://{BUCKET}/shop/kind=pairs/part-0.parquet"
    digests = source.digests()
    import hashlib

    assert digests["kind=single/part-0.parquet"] == hashlib.sha256(
        (local / "kind=single" / "part-0.parquet").read_bytes()).hexdigest()
    table = read_manifest(f"s3://{BUCKET}/shop")
    assert table.column("kind").to_pylist() == ["pairs"] * 2 + ["single"] * (len(rows) - 2)
    code, out, err = _run(env, "validate", f"s3://{BUCKET}/shop/", "--json", timeout=300)
    assert code == 0, err[-2000:]
    assert json.loads(out) == {"rows": len(rows), "valid": len(rows), "refused": 0, "problems": []}
