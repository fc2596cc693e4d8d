"""The driver's stderr filter drops exactly Ray's known constructor-argument line, nothing else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = r"""
import os, sys, time
from pipeline.quiet import filter_native_stderr
assert filter_native_stderr()
assert filter_native_stderr()  # once per process
os.write(2, b"[2026-11-29 16:08:35,920 E 2886 2886] core_worker.cc:2465: Actor with class name: "
            b"'MapWorker(MapBatches(SegmentStage))' and ID: 'c1' has constructor arguments in the object store "
            b"and max_restarts > 0. If the arguments in the object store go out of scope ...\n")
print("a warning of ours", file=sys.stderr)
os.write(2, b"\rprogress 30%")
time.sleep(0.3)
os.write(2, b"\n[2026-11-29 16:08:36,000 E 2886 2886] core_worker.cc:99: another C++ error\n")
os.write(2, b"no newline at the end")
"""


def test_only_the_known_line_is_dropped_the_rest_passes_in_order():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, timeout=60,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == (b"a warning of ours\n\rprogress 30%\n"
                           b"[2026-11-29 16:08:36,000 E 2886 2886] core_worker.cc:99: another C++ error\n"
                           b"no newline at the end")


def test_a_replaced_stderr_is_left_alone(capsys):
    from pipeline.quiet import filter_native_stderr

    assert filter_native_stderr() is False  # pytest's capture: not fd 2
