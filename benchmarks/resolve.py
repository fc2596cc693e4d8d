"""Resolving a concept group (segment, composite, previews: what the CPU actors do before generation)
at the PNG level rows and previews use now (``FAST_PNG_LEVEL``) against the level they used before (6).

Each round resolves every sample case of ``../shared/data/freecustom-samples`` (photos up to
2680x2680) once per level, the levels in a new random order each round, in this process; each
resolution writes its previews into a fresh folder (an existing preview folder is never redrawn).
Printed: the median seconds per round of each level, their ratio, and the bytes written.

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

BEFORE = 6  # the zlib level of every PNG before FAST_PNG_LEVEL


def cases(samples: Path) -> list[dict]:
    from stages.inputs.concepts import ConceptSpec

    rows = []
    for case in sorted(p for p in samples.iterdir() if (p / "image").is_dir()):
        names = sorted(p.stem for p in (case / "image").iterdir())
        rows.append({"key": case.name, "base_dir": str(case),
                     "concepts": [ConceptSpec(image=f"image/{n}.jpg", prompt=f"a {n}", mask=f"mask/{n}.jpg").to_row()
                                  for n in names if (case / "mask" / f"{n}.jpg").exists()]})
    return rows


def resolve_all(rows: list[dict], level: int) -> tuple[float, int]:
    """Seconds to resolve every row with PNGs at ``level``, and the bytes written under the output folder."""
    from stages.base import to_column
    from stages.inputs import concepts, control, subject
    from stages.masks import previews
    from stages.masks.composite import CompositeStage
    from stages.masks.segment import SegmentConfig
    from stages.masks.segment_stage import SegmentStage

    for module in (concepts, previews, control, subject):  # every user of the level, for this measurement only
        module.FAST_PNG_LEVEL = level
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
    from stages.inputs.concepts import FAST_PNG_LEVEL

    rows = cases(args.samples)
    levels = (BEFORE, FAST_PNG_LEVEL)
    times = {lvl: [] for lvl in levels}
    written = {}
    resolve_all(rows[:1], FAST_PNG_LEVEL)  # warm-up: imports, the first file reads
    for _ in range(args.rounds):
        for lvl in random.sample(levels, len(levels)):
            seconds, written[lvl] = resolve_all(rows, lvl)
            times[lvl].append(seconds)
    med = {lvl: statistics.median(v) for lvl, v in times.items()}
    print(f"{len(rows)} sample cases, {sum(len(r['concepts']) for r in rows)} concepts, {args.rounds} rounds")
    for lvl in levels:
        print(f"level {lvl}: {med[lvl]:6.2f} s per round (all: {', '.join(f'{t:.2f}' for t in times[lvl])}), "
              f"{written[lvl] / 1e6:.1f} MB written")
    print(f"ratio level {FAST_PNG_LEVEL} / level {BEFORE}: time {med[FAST_PNG_LEVEL] / med[BEFORE]:.2f}x, "
          f"bytes {written[FAST_PNG_LEVEL] / written[BEFORE]:.2f}x")


if __name__ == "__main__":
    main()
