"""The concepts of a manifest row, checked without a model: files, weights, SAM prompts, context.

``ConceptChecker.concepts`` turns a row's ``concepts`` cell into ``ConceptSpec``s (paths resolved,
nothing decoded beyond what the checks need), reporting each problem through ``fail`` with the
field it concerns (``concepts[1].mask``). It remembers what it learnt about each file, so an
image shared by many rows is opened once. Used by ``pipeline.validate`` for every row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from stages.errors import RowError
from stages.inputs.concepts import ANCHORS, ConceptSpec, ContextSpec
from stages.inputs.read import InputSettings, is_uri, load_image, load_mask, probe_image, resolve_path
from stages.masks.segment import MASK_FIXES
from stages.params import DEFAULT_WEIGHT, Limits, is_finite_number, is_int

__all__ = ["ConceptChecker", "Fail", "check_text"]

Fail = Callable[[str, str], None]
"""How a check reports a problem: ``fail(field, reason)``."""

MAX_CONTEXT_SCALE = 4.0  # a pasted concept's size relative to its carrier's mask box
_INDEX = re.compile(r"[+-]?\d+")


def check_text(value: Any, field: str, what: str, max_chars: int, fail: Fail) -> str | None:
    """A required text field (a prompt): present, not blank, at most ``max_chars`` characters."""
    if value is None:
        fail(field, f"missing (null); {what}")
        return None
    if not value.strip():
        fail(field, f"empty or whitespace only; {what}")
        return None
    if len(value) > max_chars:
        fail(field, f"{len(value)} characters, over the limit of {max_chars}")
        return None
    return value


class ConceptChecker:
    """Checks the concepts of rows one by one; remembers what it learnt about files."""

    def __init__(self, *, limits: Limits, inputs: InputSettings, base_dir: str | None, check_files: bool,
                 mask_policy: str | None = None):
        """``mask_policy`` ``"fail"``: a concept with no mask, alpha, box, points or label is a problem (the
        run would fail its row); None or ``"whole_image"``: not checked."""
        self.limits = limits
        self.mask_policy = mask_policy
        self._alpha: dict[str, bool] = {}  # resolved image path -> has a mask in its alpha channel
        self.inputs = inputs
        self.base_dir = base_dir
        self.check_files = check_files
        self._sizes: dict[str, tuple[int, int] | str] = {}  # resolved path -> (W, H) or a reason
        self._masks: dict[tuple[str, tuple[int, int]], str | None] = {}  # -> None (good) or a reason
        self._checked: dict[str, tuple] = {}  # repr of a row's concepts -> (specs, problems)

    # -- files

    def _resolve(self, path: str, field: str, fail: Fail) -> str | None:
        try:
            return resolve_path(path, base_dir=self.base_dir, settings=self.inputs, field=field)
        except RowError as exc:
            fail(field, exc.reason)
            return None

    def _probe(self, resolved: str, field: str, fail: Fail) -> tuple[int, int] | None:
        """(W, H) of an image file, or None after reporting why it cannot be used."""
        if resolved not in self._sizes:
            try:
                self._sizes[resolved] = probe_image(
                    resolved, base_dir=None, settings=self.inputs, field=field
                )
            except RowError as exc:
                self._sizes[resolved] = exc.reason
        known = self._sizes[resolved]
        if isinstance(known, str):
            fail(field, known)
            return None
        return known

    def _check_mask(self, resolved: str, size: tuple[int, int], field: str, fail: Fail) -> None:
        key = (resolved, size)
        if key not in self._masks:
            try:
                load_mask(resolved, size, base_dir=None, settings=self.inputs, field=field)
                self._masks[key] = None
            except RowError as exc:
                self._masks[key] = exc.reason
        if self._masks[key] is not None:
            fail(field, self._masks[key])

    def _has_alpha_mask(self, resolved: str, field: str) -> bool:
        """The image has an alpha channel that is not fully opaque (decoded once per file). Images behind a
        URI are taken to have one: a second download per image is left to the run, which checks anyway."""
        if is_uri(resolved):
            return True
        if resolved not in self._alpha:
            try:
                self._alpha[resolved] = load_image(resolved, base_dir=None, settings=self.inputs, field=field).alpha is not None
            except RowError:  # unreadable: reported by the image's own checks
                self._alpha[resolved] = True
        return self._alpha[resolved]

    def _check_mask_source(self, c: Mapping[str, Any], image_path: str | None, prefix: str, fail: Fail) -> None:
        """Under ``mask_policy="fail"``, a concept needs a mask source the run can use without guessing."""
        if self.mask_policy != "fail" or not self.check_files or image_path is None:
            return
        if any(c.get(name) is not None for name in ("mask", "box", "points", "label")):
            return
        if not self._has_alpha_mask(image_path, f"{prefix}.image"):
            fail(f"{prefix}.mask", f"no mask source (no mask, box, points or label, and the image has no "
                                   f"transparency) under --mask-policy fail; {MASK_FIXES}")

    def image_file(self, path: str, field: str, fail: Fail) -> str | None:
        """An input image path resolved (and, with ``check_files``, probed), or None after reporting why
        it cannot be used (for inputs other than concepts: a row's control image)."""
        resolved = self._resolve(path, field, fail)
        if resolved is not None and self.check_files and self._probe(resolved, field, fail) is None:
            return None
        return resolved

    # -- concepts

    def concepts(self, value: Any, fail: Fail) -> tuple[ConceptSpec | None, ...]:
        """One ``ConceptSpec`` per concept of a row, None where that concept has a problem. Rows share few
        concept lists: each distinct list (by its ``repr``) is checked once, its problems replayed."""
        key = repr(value)
        known = self._checked.get(key)
        if known is None:
            found: list[tuple[str, str]] = []
            specs = self._concepts(value, lambda field, reason: found.append((field, reason)))
            if len(self._checked) >= 65536:
                self._checked.clear()
            known = self._checked[key] = (specs, found)
        for field, reason in known[1]:
            fail(field, reason)
        return known[0]

    def _concepts(self, value: Any, fail: Fail) -> tuple[ConceptSpec | None, ...]:
        limit = self.limits.max_concepts
        if value is None:
            fail("concepts", f"missing (null); a row needs 1 to {limit} concepts")
            return ()
        if not value:
            fail("concepts", f"no concepts; a row needs 1 to {limit}")
            return ()
        if len(value) > limit:
            fail("concepts", f"{len(value)} concepts; at most {limit} per row (Limits.max_concepts)")
        has_context = [isinstance(c, Mapping) and c.get("context") is not None for c in value]
        return tuple(self._concept(i, c, has_context, fail) for i, c in enumerate(value))

    def _concept(self, i: int, c: Any, has_context: list[bool], fail: Fail) -> ConceptSpec | None:
        prefix = f"concepts[{i}]"
        if not isinstance(c, Mapping):
            fail(prefix, "null concept; each concept needs at least image and prompt")
            return None
        image, image_path, size = c.get("image"), None, None
        if image is None or not image.strip():
            fail(f"{prefix}.image", "missing: every concept needs an image path")
        else:
            image_path = self._resolve(image, f"{prefix}.image", fail)
            if image_path is not None and self.check_files:
                size = self._probe(image_path, f"{prefix}.image", fail)
        prompt = check_text(
            c.get("prompt"),
            f"{prefix}.prompt",
            "each concept needs a prompt naming it, e.g. 'a cat'",
            self.limits.max_prompt_chars,
            fail,
        )
        mask, mask_path = c.get("mask"), None
        if mask is not None:
            if not mask.strip():
                fail(f"{prefix}.mask", "empty path; leave mask null to use the image's alpha or segmentation")
            else:
                mask_path = self._resolve(mask, f"{prefix}.mask", fail)
            if mask_path is not None and self.check_files:
                if size is not None:
                    self._check_mask(mask_path, size, f"{prefix}.mask", fail)
                else:  # no image size to compare with: at least the file must be a readable image
                    self._probe(mask_path, f"{prefix}.mask", fail)
        weight = c.get("weight")
        weight = DEFAULT_WEIGHT if weight is None else weight
        if not is_finite_number(weight):
            fail(
                f"{prefix}.weight",
                f"weight {weight!r} must be a finite number > 0 (default {DEFAULT_WEIGHT})",
            )
        elif weight <= 0:
            fail(
                f"{prefix}.weight",
                f"weight {weight!r} must be > 0: it is how strongly the concept's masked region is "
                f"attended (added to the attention logits in bias mode, multiplying them in scale "
                f"mode; default {DEFAULT_WEIGHT}); to weaken a concept use a smaller positive weight",
            )
        box = self._pixel_box(c.get("box"), size, f"{prefix}.box", fail)
        points = self._points(c.get("points"), size, f"{prefix}.points", fail)
        label = c.get("label")
        if label is not None and not label.strip():
            fail(f"{prefix}.label", "empty; leave label null or name the object for the detector")
        context = None
        if c.get("context") is not None:
            context = self._context(i, c["context"], has_context, f"{prefix}.context", fail)
        self._check_mask_source(c, image_path if size is not None else None, prefix, fail)  # after: it is advice
        if image_path is None or prompt is None:
            return None
        return ConceptSpec(
            image=image,
            prompt=prompt,
            image_path=image_path,
            mask=mask,
            mask_path=mask_path,
            weight=float(weight) if is_finite_number(weight) else DEFAULT_WEIGHT,
            box=box,
            points=points,
            label=label,
            context=context,
        )

    def _pixel_box(
        self, box: Any, size: tuple[int, int] | None, field: str, fail: Fail
    ) -> tuple[float, float, float, float] | None:
        if box is None:
            return None
        if len(box) != 4 or not all(is_finite_number(v) for v in box):
            fail(field, f"box must be 4 finite numbers [x0, y0, x1, y1] in pixels, got {box!r}")
            return None
        x0, y0, x1, y1 = box
        if x0 >= x1 or y0 >= y1:
            fail(field, f"box {list(box)} is empty or inverted: need x0 < x1 and y0 < y1")
            return None
        if x0 < 0 or y0 < 0 or (size is not None and (x1 > size[0] or y1 > size[1])):
            bounds = f"[0, 0, {size[0]}, {size[1]}]" if size is not None else "the image"
            fail(field, f"box {list(box)} is outside the image {bounds} (pixels, after EXIF rotation)")
            return None
        return (float(x0), float(y0), float(x1), float(y1))

    def _points(
        self, points: Any, size: tuple[int, int] | None, field: str, fail: Fail
    ) -> tuple[tuple[float, float], ...] | None:
        if points is None:
            return None
        if not points:
            fail(field, "empty; leave points null or give at least one [x, y]")
            return None
        parsed: list[tuple[float, float]] = []
        for k, pt in enumerate(points):
            if pt is None or len(pt) != 2 or not all(is_finite_number(v) for v in pt):
                fail(field, f"point {k} must be 2 finite numbers [x, y] in pixels, got {pt!r}")
                return None
            x, y = pt
            if x < 0 or y < 0 or (size is not None and (x >= size[0] or y >= size[1])):
                bounds = f"{size[0]}x{size[1]}" if size is not None else "image"
                fail(
                    field, f"point {k} {list(pt)} is outside the {bounds} image (pixels, after EXIF rotation)"
                )
                return None
            parsed.append((float(x), float(y)))
        return tuple(parsed)

    def _context(
        self, i: int, ctx: Mapping[str, Any], has_context: list[bool], field: str, fail: Fail
    ) -> ContextSpec | None:
        n = len(has_context)
        ok = True
        onto_raw, onto = ctx.get("onto"), None
        if onto_raw is None or (isinstance(onto_raw, str) and not onto_raw.strip()):
            fail(f"{field}.onto", "missing: give a concept index (e.g. '0') or a carrier image path")
            ok = False
        elif is_int(onto_raw) or _INDEX.fullmatch(onto_raw.strip()):
            k = int(onto_raw)
            if k == i:
                fail(
                    f"{field}.onto",
                    f"points to this concept itself ({k}); paste onto another concept or an image",
                )
                ok = False
            elif not 0 <= k < n:
                fail(
                    f"{field}.onto",
                    f"concept index {k} is out of range: this row has {n} concepts (0..{n - 1})",
                )
                ok = False
            elif has_context[k]:
                fail(
                    f"{field}.onto",
                    f"concept {k} is itself pasted (it has a context); a carrier must be a plain "
                    "concept (no chains or cycles)",
                )
                ok = False
            else:
                onto = k
        else:
            onto = self._resolve(onto_raw, f"{field}.onto", fail)
            if onto is None or (self.check_files and self._probe(onto, f"{field}.onto", fail) is None):
                ok = False

        anchor, rel_box = ctx.get("anchor"), ctx.get("box")
        if anchor is not None and rel_box is not None:
            fail(f"{field}.anchor", f"give either anchor ({anchor!r}) or box ({rel_box!r}), not both")
            ok = False
        elif anchor is not None and anchor not in ANCHORS:
            fail(
                f"{field}.anchor", f"unknown anchor {anchor!r}; use one of {list(ANCHORS)} or a relative box"
            )
            ok = False
        placed: str | tuple[float, float, float, float] = anchor if anchor is not None else "center"
        if rel_box is not None:
            problem = None
            if len(rel_box) != 4 or not all(is_finite_number(v) for v in rel_box):
                problem = f"box must be 4 finite numbers [x0, y0, x1, y1] in [0, 1], got {rel_box!r}"
            elif not all(0 <= v <= 1 for v in rel_box):
                problem = f"box {list(rel_box)} must lie in [0, 1] (relative to the carrier's mask box)"
            elif rel_box[0] >= rel_box[2] or rel_box[1] >= rel_box[3]:
                problem = f"box {list(rel_box)} is empty or inverted: need x0 < x1 and y0 < y1"
            if problem:
                fail(f"{field}.box", problem)
                ok = False
            else:
                placed = tuple(float(v) for v in rel_box)  # type: ignore[assignment]

        scale = ctx.get("scale")
        scale = 0.5 if scale is None else scale
        if not is_finite_number(scale) or not 0 < scale <= MAX_CONTEXT_SCALE:
            fail(
                f"{field}.scale",
                f"scale {scale!r} must be in (0, {MAX_CONTEXT_SCALE:g}] (relative to the carrier box)",
            )
            ok = False
        soft_edge = ctx.get("soft_edge")
        soft_edge = 0 if soft_edge is None else soft_edge
        if not is_int(soft_edge) or not 0 <= soft_edge <= self.limits.max_side:
            fail(
                f"{field}.soft_edge", f"soft_edge {soft_edge!r} must be in [0, {self.limits.max_side}] pixels"
            )
            ok = False
        if not ok:
            return None
        return ContextSpec(onto=onto, anchor=placed, scale=float(scale), soft_edge=soft_edge)
