"""Writes that fail half-way leave nothing torn under a final name.

On a real full disk: a tmpfs of a few KiB, mounted in a private mount namespace (``unshare -rm``: a
user namespace, so no root is needed and nothing outside sees it):

- a K/V save that runs out of space (safetensors' own writer gets ENOSPC) raises and leaves no
  temporary file in the K/V store;
- overwriting a file of the output folder that runs out of space half-way leaves the old bytes
  under the final name: the final name never holds partial data.

Each case runs in a child process inside the namespace (the mount lives as long as it does).

On object storage (a local S3 server, moto on 127.0.0.1):

- an output URI with a query (``?endpoint_override=...&scheme=http``, ``?region=...``, as the storage
  checks advise) names its files by ``OutputFolder.uri`` with the query kept at the end: another
  process reading ``uri(rel)`` opens the object that was written;
- ``errors.parquet`` written as a stream whose tables raise part-way is not stored (an earlier one
  stays as it was).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from stages.output.folder import OutputFolder
from stages.output.layout import ERRORS_FILE, ERRORS_SCHEMA
from stages.output.locations import join_location, read_location
from tests.test_object_storage import BUCKET, s3  # noqa: F401 - s3: the moto server fixture

REPO = Path(__file__).resolve().parents[1]
MOUNT = "/mnt"  # inside the namespace only


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=16k tmpfs {MOUNT}"], capture_output=True
    )
    return probe.returncode == 0


small_disk = pytest.mark.skipif(
    not _namespaces_work(), reason="no user/mount namespaces to mount a small tmpfs"
)


def in_small_disk(script: str, *, size_kib: int, args: dict) -> dict:
    """Run ``script`` (Python; ``ARGS`` holds ``args``, ``DISK`` the mount) in a child whose ``/mnt`` is a
    fresh tmpfs of ``size_kib`` KiB; the child prints one JSON line, returned."""
    code = f"import json, sys\nsys.path.insert(0, {str(REPO)!r})\nDISK = {MOUNT!r}\nARGS = json.loads(sys.argv[1])\n"
    code += textwrap.dedent(script)
    shell = f'mount -t tmpfs -o size={size_kib}k tmpfs {MOUNT} && exec "$0" -c "$1" "$2"'
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", shell, sys.executable, code, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@small_disk
def test_a_kv_save_that_runs_out_of_space_leaves_no_temporary_file(generator, concepts, tmp_path):
    kv = generator.prepare_references(concepts[:2], num_inference_steps=2, height=128, width=128)
    source = tmp_path / "kv.safetensors"
    kv.save(source)
    size = source.stat().st_size
    assert size > 48 * 1024, "the K/V must not fit the small disk"
    result = in_small_disk(
        """
        import os
        from freecustom_core import ReferenceKV
        from stages.reference.reference_kv import KVFile, kv_location

        kv = ReferenceKV.load(ARGS["source"], device="cpu")
        store = os.path.join(DISK, "kv-cache")
        os.makedirs(store)
        with open(os.path.join(store, "other.safetensors"), "wb") as f:
            f.write(b"a K/V of another concept set")
        try:
            KVFile(kv_location(store, "0123456789abcdef")).save(kv)
            error = None
        except Exception as e:  # safetensors' writer reports ENOSPC as its own error type
            error = f"{type(e).__name__}: {e}"
        print(json.dumps({"error": error, "store": sorted(os.listdir(store))}))
        """,
        size_kib=32,
        args={"source": str(source)},
    )
    assert result["error"] and "No space left on device" in result["error"], result
    assert result["store"] == ["other.safetensors"]  # no temporary, no torn K/V under the final name


@small_disk
def test_an_overwrite_that_fails_half_way_keeps_the_old_bytes(tmp_path):
    old = bytes(range(256)) * 16  # 4 KiB
    new = b"\x07" * (96 * 1024)  # does not fit: the write fails half-way
    result = in_small_disk(
        """
        import os
        from stages.output.folder import OutputFolder

        out = OutputFolder(os.path.join(DISK, "out"))
        out.write("_run.json", bytes.fromhex(ARGS["old"]))
        final = os.path.join(DISK, "out", "_run.json")
        inode = os.stat(final).st_ino
        try:
            out.write("_run.json", b"\\x07" * ARGS["new_size"])
            error = None
        except OSError as e:
            error = str(e)
        with open(final, "rb") as f:
            after = f.read()
        same_file = os.stat(final).st_ino == inode
        listing = sorted(os.listdir(os.path.join(DISK, "out")))
        out.write("_run.json", b"new")  # with space again: replaced whole
        with open(final, "rb") as f:
            replaced = f.read()
        print(json.dumps({"error": error, "after": after.hex(), "same_file": same_file, "listing": listing,
                          "replaced": replaced.hex()}))
        """,
        size_kib=64,
        args={"old": old.hex(), "new_size": len(new)},
    )
    assert result["error"] and "No space left on device" in result["error"], result
    assert bytes.fromhex(result["after"]) == old  # neither truncated nor partly new
    assert result["same_file"]  # never opened for writing under its final name
    assert result["listing"] == ["_run.json"]  # the temporary is gone
    assert bytes.fromhex(result["replaced"]) == b"new"


# -- object storage (moto)


def test_uri_joins_the_path_before_the_query():
    out = OutputFolder("s3://bucket/out/?region=us-east-1&scheme=http")  # no request is made
    assert (
        out.uri("_kv/reuse-index.json") == "s3://bucket/out/_kv/reuse-index.json?region=us-east-1&scheme=http"
    )
    filesystem, path = OutputFolder.open_file(out.uri("_kv/reuse-index.json"))
    assert path == out.path("_kv/reuse-index.json") == "bucket/out/_kv/reuse-index.json"
    assert filesystem.region == "us-east-1"
    assert join_location("s3://bucket/out/", "shards/00000.tar") == "s3://bucket/out/shards/00000.tar"
    assert join_location("gs://bucket/out#v", "a b.json") == "gs://bucket/out/a%20b.json#v"
    assert join_location("/data/out", "shards/00000.tar") == "/data/out/shards/00000.tar"


def _query(env: dict) -> str:
    """The URI query that reaches the moto server without ``AWS_ENDPOINT_URL``."""
    return f"endpoint_override={env['AWS_ENDPOINT_URL'].removeprefix('http://')}&scheme=http&region=us-east-1"


@pytest.mark.parametrize("query", ["endpoint", "region"])
def test_a_file_in_an_output_uri_with_a_query_reads_back_by_its_uri(s3, monkeypatch, query):  # noqa: F811
    filesystem, env = s3
    if query == "endpoint":  # the endpoint only in the URI: the query must reach open_location whole
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        location = f"s3://{BUCKET}/query-endpoint?{_query(env)}"
    else:
        location = f"s3://{BUCKET}/query-region?region=us-east-1"
    out = OutputFolder(location)
    data = {
        "_kv/reuse-index.json": b'{"record": 1}',
        out.plan_file("0000000000-0123456789abcdef.parquet"): b"plan",
    }
    for rel, content in data.items():
        out.write(rel, content)
    for rel, content in data.items():
        assert read_location(out.uri(rel)) == content, out.uri(rel)
        _, path = OutputFolder.open_file(out.uri(rel))
        assert path == f"{BUCKET}/query-{query}/{rel}"
    with filesystem.open_input_stream(f"{BUCKET}/query-{query}/_kv/reuse-index.json") as f:
        assert f.read() == b'{"record": 1}'  # the object itself, under the folder's prefix
    # what other processes build from such a folder: a K/V file's location, a --reuse entry's shard
    from stages.generation.reuse import ReusedShards
    from stages.reference.reference_kv import kv_location

    kv = kv_location(out.uri("_kv"), "set0")
    assert kv.startswith(f"s3://{BUCKET}/query-{query}/_kv/set0.safetensors?")
    out.write("_kv/set0.safetensors", b"kv")
    assert read_location(kv) == b"kv"
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        for name, content in (("k-1.json", b'{"key": "k-1"}'), ("k-1.png", b"png")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    out.write("shards/00000.tar", tar.getvalue())
    image, meta, _ = ReusedShards().sample({"tar": out.uri("shards/00000.tar"), "key": "k-1", "ext": "png"})
    assert (image, meta) == (b"png", {"key": "k-1"})


def _error_rows(ids: list[str]) -> pa.Table:
    return pa.table(
        {
            "id": ids,
            "row": list(range(len(ids))),
            "stage": ["validate"] * len(ids),
            "field": ["id"] * len(ids),
            "reason": ["bad"] * len(ids),
            "seeds": [[1]] * len(ids),
        },
        schema=ERRORS_SCHEMA,
    )


def _keys(filesystem, prefix: str) -> list[str]:
    infos = filesystem.get_file_info(
        pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    )
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def test_an_errors_stream_that_raises_part_way_stores_no_errors_parquet(s3):  # noqa: F811
    filesystem, _ = s3
    out = OutputFolder(f"s3://{BUCKET}/errors-stream")
    out.makedirs()

    def failing():
        yield _error_rows(["a", "b"])
        raise OSError("reading the next part's errors failed")

    with pytest.raises(OSError, match="next part"):
        out.write_errors_stream(failing())
    assert not out.exists(ERRORS_FILE)  # no truncated errors.parquet
    assert _keys(filesystem, "errors-stream") == []  # and nothing else left behind

    assert out.write_errors_stream(iter([_error_rows(["a", "b"]), _error_rows([]), _error_rows(["c"])])) == 3
    before = out.read(ERRORS_FILE)
    assert pq.read_table(out.path(ERRORS_FILE), filesystem=out.fs)["id"].to_pylist() == ["a", "b", "c"]
    with pytest.raises(OSError, match="next part"):
        out.write_errors_stream(failing())
    assert out.read(ERRORS_FILE) == before  # the complete one is left as it was
    assert _keys(filesystem, "errors-stream") == [f"{BUCKET}/errors-stream/{ERRORS_FILE}"]
