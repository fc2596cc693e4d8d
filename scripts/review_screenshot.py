"""Make ``docs/review.png``: the review gallery of a real (tiny) run, as a new user's first run shows it.

    python scripts/review_screenshot.py [--output docs/review.png] [--work DIR]

1. the demo's inputs (``pipeline.examples``): a tiny random-weight SD1.5-topology model, drawn concept
   images, the example manifest; tiny random-weight scorer models (``pipeline.tiny_scorers``);
2. ``run --score`` on them (the real pipeline on a local Ray);
3. a threshold between the lowest two clip_t of the largest concept set, and ``run --reuse`` of that
   output with ``--min-score clip_t=THRESHOLD``: the same samples (copied), one marked rejected;
4. ``review`` of it, and the concept set's page, sorted by clip_t, screenshot by headless chromium
   (Debian's ``chromium``; ``apt-get install chromium``) at 1000 x 800.

The images are noise (random weights): the screenshot shows the gallery, not image quality.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.dataset as pads

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's pipeline, installed or not

from pipeline.examples import write_example_manifest  # noqa: E402
from pipeline.tiny_model import build_tiny_sd15  # noqa: E402
from pipeline.tiny_scorers import build_tiny_scorers  # noqa: E402

CLI = [sys.executable, "-m", "pipeline.cli"]
SIZE = (1000, 800)


def cli(*args: str) -> str:
    """One command of the real CLI (quiet); its stdout."""
    done = subprocess.run([*CLI, *args, "-q"], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return done.stdout


def rejecting_threshold(out: Path) -> tuple[str, float]:
    """The largest concept set, and a clip_t threshold that rejects exactly its lowest sample."""
    table = pads.dataset(out / "shards", format="parquet", exclude_invalid_files=True).to_table(
        columns=["concept_set_id", "clip_t"]
    )
    by_set: dict[str, list[float]] = {}
    for cs, clip_t in zip(table["concept_set_id"].to_pylist(), table["clip_t"].to_pylist(), strict=True):
        by_set.setdefault(cs, []).append(clip_t)
    concept_set, values = max(by_set.items(), key=lambda item: len(item[1]))
    low, second = sorted(values)[:2]
    if second <= low:
        raise SystemExit(
            f"concept set {concept_set}: its two lowest clip_t are equal ({low}); nothing to separate"
        )
    return concept_set, round((low + second) / 2, 4)


def screenshot(chromium: str, page: str, shot: Path, work: Path) -> None:
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={work / 'chromium-profile'}",
            "--virtual-time-budget=5000",
            f"--window-size={SIZE[0]},{SIZE[1]}",
            f"--screenshot={shot}",
            f"file://{page}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0 or not shot.is_file():
        raise SystemExit(f"chromium: exit {done.returncode}\n{done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "review.png")
    parser.add_argument("--work", type=Path, help="keep the run here (default: a temporary folder)")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs chromium: apt-get install chromium")
    work = args.work or Path(tempfile.mkdtemp(prefix="review-screenshot-"))
    try:
        # 1. inputs: the demo's, and tiny scorers
        model = build_tiny_sd15(work / "tiny-sd15")
        scorers = build_tiny_scorers(work / "scorers")
        manifest = write_example_manifest(work / "inputs")
        common = [
            "--model",
            str(model),
            "--num-inference-steps",
            "4",
            "--height",
            "128",
            "--width",
            "128",
            "--samples-per-shard",
            "4",
            "--dino-model",
            scorers.dino,
            "--clip-image-model",
            scorers.clip_image,
            "--clip-text-model",
            scorers.clip_text,
        ]
        # 2. a scored run
        cli("run", str(manifest), "-o", str(work / "scored"), "--score", *common)
        # 3. the same samples with a threshold that rejects one
        concept_set, threshold = rejecting_threshold(work / "scored")
        final = work / "final"
        cli(
            "run",
            str(manifest),
            "-o",
            str(final),
            "--reuse",
            str(work / "scored"),
            "--min-score",
            f"clip_t={threshold}",
            *common,
        )
        # 4. the gallery and its screenshot
        cli("review", str(final))
        page = final / "review" / "sets" / f"{concept_set}.html"
        screenshot(chromium, f"{page}#sort=clip_t&dir=desc", args.output, work)
        print(f"{args.output}: concept set {concept_set}, --min-score clip_t={threshold} ({final})")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
