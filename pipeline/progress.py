"""Progress a person can follow where a run is watched: a bar on a terminal, plain lines in a job log.

``run`` reports to a progress object (``phase``, ``planned``, ``shard``); under ``ray job submit``
or KubeRay stderr is not a terminal, and ``ProgressLog`` prints a line at each phase change after
validation and at least every ``every`` seconds (never more often than that between phases):
``shards D/T``, images done/total, failed rows, images/s and an ETA. Validation, the first phase,
is reported only when it lasts ``every`` seconds: a run refused at once (a bad manifest) prints its
error alone. While concept sets are resolved (masks, composites, reference K/V: no image is made yet)
a line counts concept sets instead of images, and one is printed when the last is resolved (runs that
resolve them before rendering; a streamed run resolves them between its shards and counts shards and
images from the start); a resumed
run with every shard complete says it has nothing to do.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLog:
    def __init__(self, write: Callable[[str], None] | None = None, *, every: float = 10.0):
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.every = every
        self.phase_name = "start"
        self.shards_done = self.shards_total = self.images_done = self.images_total = 0
        self.failed_rows: set = set()
        self.sets_done = self.sets_total = 0
        self.validation_failed = 0
        self._render_started: float | None = None
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what run() reports

    def phase(self, name: str) -> None:
        with self._lock:
            first = self.phase_name == "start"
            self.phase_name = name
            if name == "generate_and_write":
                self._render_started = time.monotonic()
        if not first:
            self._line()

    def planned(self, *, shards: int, images: int, rows_failed: int, complete: int = 0) -> None:
        """``shards`` to render now (``complete``: shards a previous run finished)."""
        with self._lock:
            self.shards_total, self.images_total, self.validation_failed = shards, images, rows_failed
        if not shards and complete:
            self.write(f"freecustom-pipeline: nothing to do: all {complete} shards are complete "
                       "(a resumed run); the report is rewritten")

    def concept_sets(self, total: int) -> None:
        """``total`` concept sets to resolve before rendering starts."""
        with self._lock:
            self.sets_done, self.sets_total = 0, total

    def concept_set(self, row: dict | None = None) -> None:
        """One concept set resolved (``row``: its output row, unused); a line when it was the last."""
        with self._lock:
            self.sets_done += 1
            last = self.sets_done == self.sets_total
        if last or time.monotonic() - self._last >= self.every:
            self._line()

    def shard(self, marker: dict) -> None:
        with self._lock:
            self.shards_done += 1
            self.images_done += marker.get("samples", 0) + marker.get("rejected", 0)
            self.failed_rows.update(e.get("row") for e in marker.get("errors", []))
        if time.monotonic() - self._last >= self.every:
            self._line()

    # -- lines

    def line(self) -> str:
        with self._lock:
            rate = eta = None
            if self._render_started is not None:
                elapsed = time.monotonic() - self._render_started
                rate = self.images_done / elapsed if elapsed > 0 else 0.0
                left = self.images_total - self.images_done
                eta = left / rate if rate else None
            if self._render_started is None and self.sets_total:  # resolving: no image is made yet
                return (f"freecustom-pipeline: {self.phase_name}: concept sets {self.sets_done}/{self.sets_total} "
                        f"resolved, shards 0/{self.shards_total}, "
                        f"failed rows {self.validation_failed + len(self.failed_rows)}")
            return (f"freecustom-pipeline: {self.phase_name}: shards {self.shards_done}/{self.shards_total}, "
                    f"images {self.images_done}/{self.images_total}, "
                    f"failed rows {self.validation_failed + len(self.failed_rows)}, "
                    f"{(rate or 0.0):.2f} images/s, ETA {_eta(eta)}")

    def _line(self) -> None:
        self._last = time.monotonic()
        self.write(self.line())

    def __enter__(self) -> ProgressLog:
        def beat():
            while not self._stop.wait(self.every / 4):
                if time.monotonic() - self._last >= self.every:
                    self._line()

        self._thread = threading.Thread(target=beat, name="progress-log", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
