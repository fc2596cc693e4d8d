"""Writes that fail half-way on a real full disk: a tmpfs of a few KiB, mounted in a private mount
namespace (``unshare -rm``: a user namespace, so no root is needed and nothing outside sees it).

- a K/V save that runs out of space (safetensors' own writer gets ENOSPC) raises and leaves no
  temporary file in the K/V store;
- overwriting a file of the output folder that runs out of space half-way leaves the old bytes
  under the final name: the final name never holds partial data.

Each case runs in a child process inside the namespace (the mount lives as long as it does).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MOUNT = "/mnt"  # inside the namespace only


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=16k tmpfs {MOUNT}"], capture_output=True
    )
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
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
