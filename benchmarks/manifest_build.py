"""``manifest build`` at scale: rows per second and peak memory (RSS) at 100k, 1M and 10M rows.

The parent writes a synthetic product feed (Parquet: sku, title, category, image path; the images
are never read) of ``rows / templates`` products and a spec whose composition streams that pool
through ``templates`` scene templates (two seeds each). Each size builds in its own process, so its
peak RSS (``VmHWM``) belongs to that size alone; a child that only imports the build code is the
baseline, and the ratio of the two peaks is printed with the figures.

    python benchmarks/manifest_build.py --quick                 # 100k rows
    python benchmarks/manifest_build.py                         # 100k and 1M rows
    python benchmarks/manifest_build.py --rows 100000 1000000 10000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEMPLATES = 10
SPEC = """\
seeds: 2
pools:
  products:
    table: feed.parquet
    columns: {key: sku, image: image}
    attributes: [title, category]
    concept_prompt: "a {title}"
compositions:
  product:
    slots: {product: products}
templates:
"""


def write_feed(folder: Path, products: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    categories = ["mug", "vase", "lamp", "sneaker", "chair"]
    with pq.ParquetWriter(
        folder / "feed.parquet",
        pa.schema(
            [("sku", pa.string()), ("title", pa.string()), ("category", pa.string()), ("image", pa.string())]
        ),
    ) as w:
        for start in range(0, products, 500_000):
            n = range(start, min(products, start + 500_000))
            w.write_table(
                pa.table(
                    {
                        "sku": [f"SKU-{i:09d}" for i in n],
                        "title": [f"product number {i}" for i in n],
                        "category": [categories[i % 5] for i in n],
                        "image": [f"images/{i % 1000}/{i}.png" for i in n],
                    }
                )
            )
    templates = "".join(
        f'  - name: scene{t}\n    prompt: "a {{title}} in scene {t}, {{morning|evening}} light"\n'
        f"    mode: random\n"
        for t in range(TEMPLATES)
    )
    spec = folder / "spec.yaml"
    spec.write_text(SPEC + templates)
    return spec


def child(spec: str, out: str, baseline: bool) -> None:
    from pipeline.manifest_build import BuildOptions, build_manifest

    start = time.perf_counter()
    rows = 0
    if not baseline:
        rows = build_manifest(spec, BuildOptions(out=out, sample_rows=0))["rows"]
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": rows, "seconds": seconds, "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak RSS: ``VmHWM``, which starts afresh at exec. (``ru_maxrss`` does not on Linux:
    a child started by a parent holding the feed would report the parent's size.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # not Linux: KiB on Linux, bytes on macOS


def measure(folder: Path, rows: int) -> dict:
    spec = write_feed(folder, rows // TEMPLATES)
    results = {}
    for name, baseline in (("baseline", True), ("build", False)):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(spec),
                str(folder / "manifest"),
                *(["--baseline"] if baseline else []),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    build = results["build"]
    files = len(list((folder / "manifest").glob("part-*.parquet")))
    return {
        "rows": build["rows"],
        "seconds": round(build["seconds"], 1),
        "rows_per_s": round(build["rows"] / build["seconds"]),
        "peak_rss_mib": round(build["peak_rss_mib"]),
        "baseline_rss_mib": round(results["baseline"]["peak_rss_mib"]),
        "rss_ratio": round(build["peak_rss_mib"] / results["baseline"]["peak_rss_mib"], 2),
        "files": files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"))
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(*args.child, baseline=args.baseline)
        return
    sizes = [100_000] if args.quick else args.rows
    print(
        f"{'rows':>10} {'seconds':>8} {'rows/s':>8} {'peak RSS MiB':>12} {'baseline MiB':>12} {'ratio':>6} files"
    )
    for rows in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
            r = measure(Path(tmp), rows)
        print(
            f"{r['rows']:>10} {r['seconds']:>8} {r['rows_per_s']:>8} {r['peak_rss_mib']:>12} "
            f"{r['baseline_rss_mib']:>12} {r['rss_ratio']:>6} {r['files']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
