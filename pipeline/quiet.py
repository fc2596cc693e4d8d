"""Known noise out of the driver's stderr, and nothing else.

Ray Data creates every actor of a pool with its DataContext and map transformer as object-store
arguments, and Ray core logs, once per run, from C++ straight to file descriptor 2: "Actor ... has
constructor arguments in the object store and max_restarts > 0" (ray-project/ray#57733, open; the
actors' restarts are Ray Data's fault tolerance, which the pipeline keeps). Nothing on our side causes
it and no Ray setting turns that one line off, so the CLI's driver filters exactly that line out of
fd 2; every other byte passes through unchanged, in order.
"""

from __future__ import annotations

import os
import re
import sys
import threading

NOISE = (re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store "
                    rb"and max_restarts > 0"),)

GLOG_START = re.compile(rb"\[(\d|$)")  # how Ray's C++ log lines begin: "[2026-11-29 16:08:35,920 E ..."

_installed = False


def filter_native_stderr(patterns=NOISE) -> bool:
    """Route fd 2 through a pipe whose reader drops whole lines matching ``patterns``. Only for a
    process whose ``sys.stderr`` is fd 2 (the CLI); returns whether the filter is on."""
    global _installed
    if _installed:
        return True
    try:
        if sys.stderr is None or sys.stderr.fileno() != 2:
            return False
    except (AttributeError, OSError, ValueError):  # a captured or replaced stderr: leave it alone
        return False
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    os.set_inheritable(2, True)

    def pump():
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                kept = b"".join(line + b"\n" for line in lines if not any(p.search(line) for p in patterns))
                if pending and not GLOG_START.match(pending):  # a progress bar's \r-line: out at once
                    kept, pending = kept + pending, b""
                if kept:
                    os.write(original, kept)
            if pending:
                os.write(original, pending)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore():  # at exit: the filter's last lines out, then fd 2 back to what it was
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end held by this process
        thread.join(timeout=2)

    import atexit

    atexit.register(restore)
    _installed = True
    return True
