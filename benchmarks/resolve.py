"""Resolving a concept group (segment, composite, previews: what the CPU actors do before generation):
the code as it is against how it encoded PNGs before (zlib level 6, every use of an image encoded again).

Variants, every one in this process, in a new random order each round:

- ``before``: rows and previews at level 6, and each use of an image encoded again (a concept's row after
  segmentation, its row after the composite, its reference preview; a composite scene once per concept
  that shares it);
- ``level1``: level 1 (``FAST_PNG_LEVEL``), each use still encoded again;
- ``now``: level 1, and each image encoded once (``composite.concept_rows``; previews take the rows' PNGs).

Each round resolves every sample case of ``../shared/data/freecustom-samples`` (photos up to
2680x2680) once per variant; each resolution writes its previews into a fresh folder (an existing
preview folder is never redrawn). Printed: the median seconds per round of each variant, the ratios
to ``before`` and the bytes written.

    python benchmarks/resolve.py               # 3 rounds
    python benchmarks/resolve.py --rounds 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def cases(samples: Path) -> list[dict]:
    from stages.inputs.concepts import ConceptSpec

    rows = []
    for case in sorted(p for p in samples.iterdir() if (p / "image").is_dir()):
        names = sorted(p.stem for p in (case / "image").iterdir())
        rows.append({"key": case.name, "base_dir": str(case),
                     "concepts": [ConceptSpec(image=f"image/{n}.jpg", prompt=f"a {n}", mask=f"mask/{n}.jpg").to_row()
                                  for n in names if (case / "mask" / f"{n}.jpg").exists()]})
    return rows


def _variant(name: str) -> None:
    """Set the PNG level and encoding path of ``name`` (module attributes: for this measurement only)."""
    from stages.inputs import concepts, control, subject
    from stages.masks import composite, previews

    level = 6 if name == "before" else _ORIGINAL[2]
    for module in (concepts, previews, control, subject):  # every user of the level
        module.FAST_PNG_LEVEL = level
    if name == "now":
        composite.concept_rows, previews.preview_files = _ORIGINAL[:2]
    else:  # every use encoded again: rows from to_row, previews from the images
        composite.concept_rows = lambda final, original, original_rows: [c.to_row() for c in final]
        previews.preview_files = lambda *a, rows=None, **k: _ORIGINAL[1](*a, **k)


def resolve_all(rows: list[dict], variant: str) -> tuple[float, int]:
    """Seconds to resolve every row as ``variant`` does, and the bytes written under the output folder."""
    from stages.base import to_column
    from stages.masks.composite import CompositeStage
    from stages.masks.segment import SegmentConfig
    from stages.masks.segment_stage import SegmentStage

    _variant(variant)
    identity = dict(model_id="tiny", height=512, width=512, num_inference_steps=50, reference_seed=0,
                    mrsa={"blocks": [5, 6]})
    with tempfile.TemporaryDirectory() as out:
        segment, composite = SegmentStage(SegmentConfig()), CompositeStage(out_dir=out, identity_defaults=identity)
        t0 = time.perf_counter()
        for row in rows:
            result = composite(segment({k: to_column([v]) for k, v in row.items()}))
            assert result["error_reason"][0] == "", result["error_reason"][0]
        seconds = time.perf_counter() - t0
        written = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return seconds, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=Path, default=ROOT.parent / "shared" / "data" / "freecustom-samples")
    args = parser.parse_args()
    from stages.inputs import concepts
    from stages.masks import composite, previews

    global _ORIGINAL
    _ORIGINAL = (composite.concept_rows, previews.preview_files, concepts.FAST_PNG_LEVEL)
    rows = cases(args.samples)
    variants = ("before", "level1", "now")
    times = {v: [] for v in variants}
    written = {}
    resolve_all(rows[:1], "now")  # warm-up: imports, the first file reads
    for _ in range(args.rounds):
        for v in random.sample(variants, len(variants)):
            seconds, written[v] = resolve_all(rows, v)
            times[v].append(seconds)
    med = {v: statistics.median(t) for v, t in times.items()}
    print(f"{len(rows)} sample cases, {sum(len(r['concepts']) for r in rows)} concepts, {args.rounds} rounds")
    for v in variants:
        print(f"{v:>6}: {med[v]:6.2f} s per round (all: {', '.join(f'{t:.2f}' for t in times[v])}), "
              f"{written[v] / 1e6:.1f} MB written; time {med[v] / med['before']:.2f}x, "
              f"bytes {written[v] / written['before']:.2f}x of before")


_ORIGINAL: tuple = ()  # concept_rows, preview_files and FAST_PNG_LEVEL as the code has them


if __name__ == "__main__":
    main()
