"""Plot a ``benchmarks/core.py --sweep`` result as a PNG, with PIL only (no matplotlib needed).

    python benchmarks/plot.py benchmarks/results/sweep_cpu.json    # writes sweep_cpu.png beside it

Three panels, per image cost relative to plain Stable Diffusion (projected to the run's
``project_steps``), for release-style, inline and cached: against the number of concepts N,
against targets per concept set (log scale), and against resolution. Dashed lines: plain (1x)
and the 1.3x target.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

COLORS = {"release": (214, 39, 40), "inline": (44, 160, 44), "cached": (31, 119, 180), "plain": (90, 90, 90),
          "main (before)": (214, 39, 40), "streaming": (31, 119, 180)}
SCALE_BEFORE = {10_000: 243, 100_000: 281, 1_000_000: 662}  # driver peak RSS (MiB) on main, issue 22
PANELS = (
    ("concepts", "n", "concepts per set N", False),
    ("targets", "targets", "targets per concept set", True),
    ("resolution", "size", "resolution (side, px)", False),
)


def font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    step = (hi - lo) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(step)) if step > 0 else 1
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step), default=magnitude)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def dashed(draw, x0, y, x1, color, dash=8):
    for x in range(int(x0), int(x1), 2 * dash):
        draw.line((x, y, min(x + dash, x1), y), fill=color, width=1)


def panel(
    draw,
    box,
    series: dict[str, list[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    log_x: bool,
    ymax: float,
    y_suffix: str = "x",
    guides: tuple = ((1.0, COLORS["plain"]), (1.3, (230, 150, 0))),
):
    left, top, right, bottom = box
    small, big = font(13), font(15)
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left, top - 24), title, fill=(0, 0, 0), font=big)
    xs = sorted({x for points in series.values() for x, _ in points})
    if not xs:
        return

    def fx(x):
        lo, hi = (math.log2(xs[0]), math.log2(xs[-1])) if log_x else (xs[0], xs[-1])
        v = math.log2(x) if log_x else x
        return left + 30 + (v - lo) / ((hi - lo) or 1) * (right - left - 60)

    def fy(y):
        return bottom - y / ymax * (bottom - top)

    for y in nice_ticks(0, ymax):
        draw.line((left - 4, fy(y), left, fy(y)), fill=(0, 0, 0))
        draw.text((left - 8, fy(y)), f"{y:g}{y_suffix}", fill=(0, 0, 0), font=small, anchor="rm")
    for x in xs:
        draw.line((fx(x), bottom, fx(x), bottom + 4), fill=(0, 0, 0))
        draw.text((fx(x), bottom + 6), f"{x:g}", fill=(0, 0, 0), font=small, anchor="ma")
    draw.text(((left + right) / 2, bottom + 24), xlabel, fill=(0, 0, 0), font=small, anchor="ma")
    for y, color in guides:
        dashed(draw, left, fy(y), right, color)
    for name, points in series.items():
        pts = [(fx(x), fy(min(y, ymax))) for x, y in sorted(points)]
        if len(pts) > 1:
            draw.line(pts, fill=COLORS[name], width=3)
        for px, py in pts:
            draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=COLORS[name])


def plot(result: dict, out: Path) -> Path:
    from PIL import Image, ImageDraw

    rows = result["rows"]
    w, h = 1500, 560
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    s = result["settings"]
    machine = result["machine"]
    where = machine.get("gpu") or f"{machine.get('cpu_count')}-core CPU ({machine.get('cpu_model')})"
    draw.text(
        (20, 12),
        f"FreeCustom engine: per image cost relative to plain SD, projected to {s['project_steps']} steps "
        f"(measured at {s['steps']} step(s), {s['dtype']}, {where}, {machine.get('date_utc')})",
        fill=(0, 0, 0),
        font=font(16),
    )
    ymax = 1.0
    for row in rows:
        ymax = max(ymax, row["x_plain_projected"])
    ymax = math.ceil(ymax * 1.1 * 2) / 2
    width = (w - 120) // 3
    for i, (sweep, key, xlabel, log_x) in enumerate(PANELS):
        sub = [r for r in rows if r["sweep"] == sweep]
        series: dict[str, list[tuple[float, float]]] = {}
        for r in sub:
            if r["path"] != "plain":
                series.setdefault(r["path"], []).append((r[key], r["x_plain_projected"]))
        fixed = sorted({(r["n"], r["targets"], r["size"]) for r in sub})
        what = {
            "concepts": f"{fixed[0][1]} targets/set, {fixed[0][2]}px" if fixed else "",
            "targets": f"N={fixed[0][0]}, {fixed[0][2]}px" if fixed else "",
            "resolution": f"N={fixed[0][0]}, {fixed[0][1]} target(s)/set" if fixed else "",
        }[sweep]
        box = (70 + i * (width + 30), 90, 70 + i * (width + 30) + width - 40, h - 90)
        panel(draw, box, series, title=f"vs {xlabel} ({what})", xlabel=xlabel, log_x=log_x, ymax=ymax)
    x = 70
    for name in ("release", "inline", "cached"):
        draw.line((x, h - 30, x + 30, h - 30), fill=COLORS[name], width=3)
        draw.text(
            (x + 36, h - 30),
            name + (" (prepare amortised)" if name == "cached" else ""),
            fill=(0, 0, 0),
            font=font(14),
            anchor="lm",
        )
        x += 260
    dashed(draw, x, h - 30, x + 30, COLORS["plain"])
    draw.text((x + 36, h - 30), "plain = 1x", fill=(0, 0, 0), font=font(14), anchor="lm")
    dashed(draw, x + 160, h - 30, x + 190, (230, 150, 0))
    draw.text((x + 196, h - 30), "1.3x target", fill=(0, 0, 0), font=font(14), anchor="lm")
    image.save(out)
    return out


def plot_scale(rows: list[dict], before: dict[int, float], out: Path) -> Path:
    """``benchmarks/scale.py``'s rows (a ``--tag`` JSONL): the driver's peak RSS and the time to the first
    finished shard against manifest rows, with ``before`` (rows -> MiB measured on main, issue 22)."""
    from PIL import Image, ImageDraw

    w, h = 1100, 520
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    draw.text((20, 12), "benchmarks/scale.py: no-op generator, folder manifests of 8 files, 2-core CPU machine",
              fill=(0, 0, 0), font=font(16))
    rss = {"main (before)": sorted(before.items()),
           "streaming": sorted((r["rows"], r["driver_peak_rss_mib"]) for r in rows)}
    first = {"streaming": sorted((r["rows"], r["first_shard_s"]) for r in rows if r.get("first_shard_s"))}
    ymax_rss = math.ceil(max(y for pts in rss.values() for _, y in pts) * 1.1 / 100) * 100
    ymax_first = math.ceil(max(y for pts in first.values() for _, y in pts) * 1.2)
    panel(draw, (90, 90, 520, h - 90), rss, title="driver peak RSS (dashed: 300 MiB target)", xlabel="manifest rows",
          log_x=True, ymax=ymax_rss, y_suffix=" MiB", guides=((300, (230, 150, 0)),))
    panel(draw, (640, 90, 1070, h - 90), first, title="time to the first finished shard", xlabel="manifest rows",
          log_x=True, ymax=ymax_first, y_suffix=" s", guides=())
    x = 90
    for name in rss:
        draw.line((x, h - 30, x + 30, h - 30), fill=COLORS[name], width=3)
        draw.text((x + 36, h - 30), name, fill=(0, 0, 0), font=font(14), anchor="lm")
        x += 220
    image.save(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", type=Path, help="a JSON file written by benchmarks/core.py --sweep, or a "
                   "benchmarks/scale.py --tag JSONL (results/scale_TAG.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: beside the JSON)")
    args = p.parse_args(argv)
    if args.result.suffix == ".jsonl":
        rows = [json.loads(line) for line in args.result.read_text().splitlines() if line.strip()]
        print(plot_scale(rows, SCALE_BEFORE, args.out or args.result.with_suffix(".png")))
        return
    result = json.loads(args.result.read_text())
    if result.get("mode") != "sweep":
        raise SystemExit(f"{args.result}: not a --sweep result (mode {result.get('mode')!r})")
    print(plot(result, args.out or args.result.with_suffix(".png")))


if __name__ == "__main__":
    main()
