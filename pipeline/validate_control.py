"""A row's ControlNet input, checked without a model: ``control`` / ``controls`` / ``control_references``.

In a run with ``--controlnet`` every row needs a control (one struct per ControlNet, in option order);
a row without one is refused, not rendered without layout (say "no layout" with a blank image of type
``none``). In a run without ``--controlnet`` a row with a control is refused (its layout would be
silently ignored). Problems name the field (``control.image``, ``controls[1].scale``).
"""

from __future__ import annotations

from typing import Any

from pipeline.validate_concepts import ConceptChecker, Fail
from stages.inputs.control import ControlEntry, ControlSettings, RowControl, entry_problems

__all__ = ["ControlChecker"]


class ControlChecker:
    """Checks rows' control columns under a run's ``ControlSettings`` (a row's ``control_references``
    wins over the run's ``--control-references``)."""

    def __init__(self, files: ConceptChecker, settings: ControlSettings):
        self.files = files
        self.controlnet = settings.controlnet
        self.canny = (float(settings.canny[0]), float(settings.canny[1]))
        self.references = settings.references

    def control(self, row: dict[str, Any], fail: Fail) -> tuple[bool, RowControl | None]:
        """``(ok, the row's RowControl or None)``; every problem reported through ``fail``."""
        single, several, refs = row.get("control"), row.get("controls"), row.get("control_references")
        before = []
        local_fail = _Counting(fail, before)
        nets = self.controlnet
        column = "controls" if single is None and several is not None else "control"
        given = single if column == "control" else several
        if single is not None and several is not None:
            local_fail("controls", "give control (one ControlNet) or controls (one per ControlNet), not both")
            return False, None
        if nets is not None and not nets:
            if given is not None:
                local_fail(column, "this run has no --controlnet, so the control would be ignored; run with "
                           "--controlnet ID_OR_FOLDER or leave the column null")
            if refs:
                local_fail("control_references", "true, but this run has no --controlnet")
            return not before, None
        if given is None:
            if nets:
                local_fail("control", f"this run has --controlnet {' '.join(nets)}; give the row a control image "
                           "(type none with a blank image for no layout)")
            elif refs:
                local_fail("control_references", "true, but the row has no control")
            return not before, None
        structs = [given] if column == "control" else list(given)
        if nets is not None:
            if column == "control" and len(nets) > 1:
                local_fail("control", f"this run has {len(nets)} ControlNets; give controls, a list of "
                           f"{len(nets)} structs in --controlnet order")
                return False, None
            if len(structs) != len(nets):
                local_fail("controls", f"{len(structs)} entries for {len(nets)} ControlNets (--controlnet "
                           "order: one entry each)")
                return False, None
        if not structs:
            local_fail("controls", "empty; give one struct per ControlNet")
            return False, None
        entries = []
        for k, struct in enumerate(structs):
            where = "control" if column == "control" else f"controls[{k}]"
            problems = entry_problems(struct, where=where)
            for field, reason in problems:
                local_fail(field, reason)
            if problems:
                continue
            path = self.files.image_file(struct["image"], f"{where}.image", local_fail)
            if path is None:
                continue
            kind = struct["type"]
            entries.append(ControlEntry(
                image=struct["image"], image_path=path, type=kind,
                scale=float(_default(struct.get("scale"), 1.0)), start=float(_default(struct.get("start"), 0.0)),
                end=float(_default(struct.get("end"), 1.0)), canny=self.canny if kind == "canny" else None))
        if before:
            return False, None
        references = self.references if refs is None else bool(refs)
        return True, RowControl(entries=tuple(entries), references=references, column=column)


def _default(value, default):
    return default if value is None else value


class _Counting:
    """``fail`` that also remembers that something failed."""

    def __init__(self, fail: Fail, seen: list):
        self.fail, self.seen = fail, seen

    def __call__(self, field: str, reason: str) -> None:
        self.seen.append(field)
        self.fail(field, reason)
