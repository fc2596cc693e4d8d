"""Fault injection for the reliability tests: off unless a plan is given, and cheap when off.

A plan maps a point name to what happens there on its ``after``-th call (counted across
processes through files in ``dir``, and fired once: a restarted actor does not fail again):

    {"dir": "/tmp/faults", "points": {"generate.unit": {"after": 2, "action": "exit"}}}

Actions: ``exit`` (the process dies, as when an actor or a node is lost), ``raise`` (an
exception in the stage), ``enospc`` (``OSError(ENOSPC)``, a full disk), ``oom``
(``torch.OutOfMemoryError``), ``hang`` (sleep, so a test can SIGKILL the driver there; a file
``<point>.reached`` says when). Points: ``reference_kv.unit``,
``generate.unit``, ``write.tar`` (between writing a shard's tar and its Parquet).

The plan travels as JSON in the environment variable ``FREECUSTOM_FAULTS`` (read in each
process) or is handed to stages explicitly; production runs never set it.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

ENV = "FREECUSTOM_FAULTS"


def _plan(plan: dict | None) -> dict | None:
    if plan is not None:
        return plan
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else None


def _count(folder: Path, point: str) -> int:
    """Atomically take the next call number of ``point`` (one file per call, O_EXCL)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        try:
            fd = os.open(folder / f"{point}.call-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            return n
        except FileExistsError:
            n += 1


def fault_point(point: str, plan: dict | None = None) -> None:
    """Called by stages at named points; does nothing unless a plan names this point."""
    plan = _plan(plan)
    if not plan or point not in plan.get("points", {}):
        return
    spec = plan["points"][point]
    folder = Path(plan["dir"])
    if _count(folder, point) != int(spec.get("after", 1)):
        return
    action = spec.get("action", "raise")
    (folder / f"{point}.reached").write_text(str(os.getpid()))
    if action == "exit":
        os._exit(17)
    if action == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory (injected)")
    if action == "hang":
        time.sleep(float(spec.get("seconds", 120)))
        return
    raise RuntimeError(f"injected fault at {point}")
