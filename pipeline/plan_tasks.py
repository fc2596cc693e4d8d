"""The planning steps of ``pipeline.part_plan`` as plain Ray tasks, one per file (or piece), and the error a
task's node raises when it does not see OUT.

Plain Ray tasks rather than a Ray Data execution: one task per file, nothing to stream, and a task
starts in milliseconds. ``probe``: checked on the task's node first (``plan.check_shared_storage``).
"""

from __future__ import annotations

import re

from pipeline.manifest_files import ManifestPart
from pipeline.part_plan import Checks, PartRecord, pieces_ids, plan_part
from stages.output.probe import NotShared, StorageProbe


class EarlierFiles:
    """What each new file (or piece) is planned against (``plan_part``'s ``earlier``): the files before it,
    as ``(record, location)``. One list for all (``chain``: the kept files, then the new ones in order),
    so a run of many pieces ships it once, not a growing copy per job: ``self[k]`` is ``chain[:base +
    index[k]]`` (``index``: which new file job k is; all of them, in order, by default)."""

    def __init__(self, chain: list[tuple[PartRecord, str]], base: int, index: list[int] | None = None):
        self.chain, self.base, self.index = chain, base, index

    def __getitem__(self, k: int) -> list[tuple[PartRecord, str]]:
        return self.chain[: self.base + (k if self.index is None else self.index[k])]

    def __len__(self) -> int:
        return len(self.chain) - self.base if self.index is None else len(self.index)

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def select(self, index: list[int]) -> EarlierFiles:
        """The same for these new files only (job k is new file ``index[k]``)."""
        return EarlierFiles(self.chain, self.base, [i if self.index is None else self.index[i] for i in index])


def not_shared_in(error: BaseException | str) -> NotShared | None:
    """The ``NotShared`` an actor or task raised on its node, out of the Ray error that carries it."""
    match = re.search(r"NotShared: (.*?Nothing was written from that node\.)", str(error), re.S)
    return NotShared(match.group(1)) if match else None


def _on_a_node(fn, probe: StorageProbe | None, *args):
    """``fn(*args)`` in a Ray task, once this node sees ``probe`` (a planning task writes into OUT)."""
    if probe is not None:
        probe.check()
    return fn(*args)


def _gather(refs: list) -> list:
    """``ray.get(refs)``; a task's ``NotShared`` (its node does not see OUT) raised as itself: exit 2."""
    import ray

    try:
        return ray.get(refs)
    except Exception as e:
        if (refused := not_shared_in(e)) is not None:
            raise refused from None
        raise


def part_infos(jobs: list[tuple[ManifestPart, PartRecord]], out_dir: str, limits=None,
               probe: StorageProbe | None = None, first: tuple | None = None) -> list[dict]:
    """Step 1 of ``pipeline.part_plan`` for each new file or piece of a file, one task per file (its columns
    read once): the ids hashed to ``_plan/``, and what the driver numbers the shards by (``part_ids``'s
    answer, in the order of ``jobs``). ``first``: ``(checks, earlier)`` to plan ``jobs[0]`` too, in a task
    started first, beside the others (its plan needs no ids of later files): its summary (``plan_part``'s)
    is the first answer's ``planned``."""
    import ray

    files: dict[str, list[int]] = {}  # a file's pieces in one task: its columns read once
    for i, (part, _) in enumerate(jobs):
        files.setdefault(part.location, []).append(i)
    task = ray.remote(num_cpus=1)(_on_a_node)
    planned = [task.remote(plan_part, probe, *jobs[0], first[0], out_dir, first[1])] if first else []
    answers = _gather(planned + [task.remote(pieces_ids, probe, jobs[js[0]][0], [jobs[j][1] for j in js], out_dir,
                                             limits) for js in files.values()])
    summary = answers.pop(0) if first else None
    found = {j: info for js, answer in zip(files.values(), answers, strict=True) for j, info in zip(js, answer, strict=True)}
    return [dict(found[i], planned=summary) if i == 0 and first else found[i] for i in range(len(jobs))]


def plan_parts(jobs: list[tuple[ManifestPart, PartRecord]], earlier: EarlierFiles | list[list[tuple[PartRecord, str]]],
               checks: Checks, out_dir: str, probe: StorageProbe | None = None) -> list[dict]:
    """Step 2 of ``pipeline.part_plan`` for each new file, one Ray task each, before anything renders (the
    runs that resolve every concept group first): each file validated and planned against the files
    before it (``earlier[i]``). Returns each file's summary, in order; the driver never holds a row."""
    import ray

    task = ray.remote(num_cpus=1)(_on_a_node)
    return _gather([task.remote(plan_part, probe, part, record, checks, out_dir, before)
                    for (part, record), before in zip(jobs, earlier, strict=True)])
