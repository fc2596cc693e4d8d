"""``manifest build``: the spec's checks (with lines), pools of every source, balanced compositions,
prompt templates, stable ids, the atomic Parquet folder, and bad input refused with exit 2 before
anything is written. No model: the rendering tests are in test_manifest_build_e2e.py."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import math
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from manifests.examples.catalog import write_catalog
from manifests.examples.pools import write_pools
from pipeline.cli import app
from pipeline.manifest_build import BuildOptions, build_manifest
from pipeline.manifest_build.compose import digits
from pipeline.manifest_build.prompts import TemplateError, compile_template
from pipeline.manifest_build.spec import parse_spec
from pipeline.manifest_files import read_manifest
from tests.test_object_storage import BUCKET, _upload, s3  # noqa: F401 (s3: the moto fixture)

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def build(*args: str):
    return runner.invoke(app, ["manifest", "build", *args])


def rows(out: Path) -> list[dict]:
    return read_manifest(str(out)).to_pylist()


def feed(spec_dir: Path) -> list[dict]:
    with open(spec_dir / "feed.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_feed(spec_dir: Path, products: list[dict]) -> None:
    with open(spec_dir / "feed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(products[0]))
        writer.writeheader()
        writer.writerows(products)


def nothing_written(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not [p for p in parent.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- the examples


def test_example_scripts_write_what_the_issue_names(tmp_path):
    for script, files in (("catalog.py", ["feed.csv", "images", "spec.yaml"]), ("pools.py", ["spec.yaml"])):
        folder = tmp_path / script
        done = subprocess.run(
            [sys.executable, str(REPO / "manifests" / "examples" / script), str(folder)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert all((folder / f).exists() for f in files)
        assert done.stdout.strip() == str(folder / "spec.yaml")
    assert len(list((tmp_path / "catalog.py" / "images").glob("SKU-*_mask.png"))) == 10


def test_catalog_builds_a_folder_that_validate_accepts(tmp_path):
    spec = write_catalog(tmp_path / "cat")
    out = tmp_path / "cat" / "manifest"
    result = build(str(spec), "-o", str(out), "--rows-per-file", "16", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    files = sorted(out.glob("part-*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [16, 16, 16, 2] and summary["files"] == 4
    table = rows(out)
    # 20 products x 2 templates of their category; the mug and sneaker counter/street templates have 2 variants
    assert len(table) == summary["rows"] == 50 and summary["samples"] == 100 and summary["concept_sets"] == 20
    by_sku = Counter(r["item_keys"][0] for r in table)
    assert set(by_sku) == {f"SKU-{n:04d}" for n in range(20)}
    assert {r["template"].split("_")[0] for r in table if r["item_keys"] == ["SKU-0001"]} == {"vase"}
    vase = next(r for r in table if r["item_keys"] == ["SKU-0001"])
    assert (
        vase["concepts"][0]["mask"].endswith("images/SKU-0001_mask.png")
        and vase["concepts"][0]["prompt"] == "a red vase"
    )
    mug = next(r for r in table if r["item_keys"] == ["SKU-0000"])
    assert mug["concepts"][0]["mask"] is None  # a cut-out: its alpha is the mask
    assert len({r["id"] for r in table}) == 50
    assert json.loads((out / "_build.json").read_text())["rows"] == 50
    check = runner.invoke(app, ["validate", str(out), "--json"])
    assert check.exit_code == 0 and json.loads(check.stdout.splitlines()[0])["valid"] == 50, check.output


def test_ids_stay_put_when_the_feed_changes_around_them(tmp_path):
    spec = write_catalog(tmp_path / "cat")
    assert build(str(spec), "-o", str(tmp_path / "m1.parquet")).exit_code == 0
    products = feed(tmp_path / "cat")
    products[3]["title"] = "blue lamp deluxe"  # changed
    products[0], products[7] = products[7], products[0]  # reordered
    removed = products.pop(11)
    products.append(dict(products[5], sku="SKU-9999", title="new product"))  # added
    write_feed(tmp_path / "cat", products)
    assert build(str(spec), "-o", str(tmp_path / "m2.parquet")).exit_code == 0
    before = {r["id"]: r for r in pq.read_table(tmp_path / "m1.parquet").to_pylist()}
    after = {r["id"]: r for r in pq.read_table(tmp_path / "m2.parquet").to_pylist()}
    assert {r["item_keys"][0] for i, r in before.items() if i not in after} == {removed["sku"]}
    assert {r["item_keys"][0] for i, r in after.items() if i not in before} == {"SKU-9999"}
    changed = {after[i]["item_keys"][0] for i in after.keys() & before.keys() if after[i] != before[i]}
    assert changed == {products[3]["sku"]}
    assert all("deluxe" in after[i]["prompt"] for i in after if after[i]["item_keys"] == [products[3]["sku"]])


def test_pools_example_is_balanced_and_pastes_accessories_onto_the_pet(tmp_path):
    spec = write_pools(tmp_path / "pools")
    result = build(str(spec), "--dry-run", "--json", "--seconds-per-image", "36")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert not (tmp_path / "pools" / "manifest").exists()
    one = summary["compositions"]["pet_accessory"]
    assert (
        one["sets"] == 6 and one["slots"]["pet"]["min_per_item"] == one["slots"]["pet"]["max_per_item"] == 2
    )
    assert (one["slots"]["accessory"]["min_per_item"], one["slots"]["accessory"]["max_per_item"]) == (1, 2)
    assert summary["samples"] == 9 and summary["gpu_hours"] == 0.09
    assert len(summary["sample"]) == 5 and all(
        "a photo of a " in line and "(onto 0)" in line for line in summary["sample"]
    )
    assert build(str(spec), "-o", str(tmp_path / "m")).exit_code == 0
    table = rows(tmp_path / "m")
    assert len({tuple(r["item_keys"]) for r in table}) == 9
    for r in table:
        pet, *accessories = r["concepts"]
        assert pet["mask"].endswith("_mask.png") and pet["context"] is None
        assert all(a["context"]["onto"] == "0" and a["mask"] is None for a in accessories)
        assert any(scene in r["prompt"] for scene in ("park", "living room", "garden", "beach"))
    assert {len(r["concepts"]) for r in table} == {2, 3}


# --------------------------------------------------------------------------- compositions


@pytest.mark.parametrize("radices", [(3, 4), (4, 6), (5, 5), (2, 3, 4), (6, 4, 2)])
def test_diagonal_walk_is_a_bijection_with_balanced_prefixes(radices):
    total = math.prod(radices)
    seen = [tuple(digits(i, radices)) for i in range(total)]
    assert len(set(seen)) == total and all(
        all(0 <= d < r for d, r in zip(s, radices, strict=True)) for s in seen
    )
    for prefix in range(1, total + 1):
        for j, r in enumerate(radices):
            counts = Counter(s[j] for s in seen[:prefix])
            counts = [counts.get(v, 0) for v in range(r)]
            assert max(counts) - min(counts) <= 1, (prefix, j, counts)


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def _folder_pool(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True)
    for n, name in enumerate(names):
        Image.new("RGBA", (16, 16), (n * 9 % 255, 40, 90, 255 if n % 2 else 128)).save(folder / f"{name}.png")


def test_a_capped_space_too_large_to_enumerate_is_sampled_balanced(tmp_path):
    for pool, n in (("a", 997), ("b", 1009), ("c", 1013)):
        _folder_pool(tmp_path / pool, [f"{pool}{i}" for i in range(n)])
    spec = _spec(
        tmp_path,
        """
pools:
  a: {folder: a, concept_prompt: "{name}"}
  b: {folder: b, concept_prompt: "{name}"}
  c: {folder: c, concept_prompt: "{name}"}
compositions:
  abc: {slots: {x: a, y: b, z: c}, cap: 3000}
templates:
  - {name: t, prompt: "{x.prompt} with {y.prompt} and {z.prompt}"}
""",
    )
    summary = build_manifest(str(spec), BuildOptions(sample_rows=0))
    assert summary["rows"] == 3000
    for slot, n in (("x", 997), ("y", 1009), ("z", 1013)):
        use = summary["compositions"]["abc"]["slots"][slot]
        assert use["items_used"] == n and use["max_per_item"] - use["min_per_item"] <= 1


@pytest.mark.parametrize("n, cap", [(8, 4), (10, 20), (12, 30), (9, 30), (5, 10)])
def test_k_of_one_pool_gives_distinct_balanced_sets(tmp_path, n, cap):
    _folder_pool(tmp_path / "acc", [f"a{i}" for i in range(n)])
    spec = _spec(
        tmp_path,
        f"""
pools:
  acc: {{folder: acc, concept_prompt: "{{name}}"}}
compositions:
  two: {{slots: {{pair: {{pool: acc, count: 2}}}}, cap: {cap}}}
templates:
  - {{name: t, prompt: "{{pair.prompt}}"}}
""",
    )
    summary = build_manifest(str(spec), BuildOptions(out=str(tmp_path / "m.parquet"), single_file=True))
    sets = [frozenset(r["item_keys"]) for r in pq.read_table(tmp_path / "m.parquet").to_pylist()]
    assert len(sets) == len(set(sets)) == cap and all(len(s) == 2 for s in sets)
    use = summary["compositions"]["two"]["slots"]["pair"]
    assert use["items_used"] == n and use["max_per_item"] - use["min_per_item"] <= (
        1 if cap * 2 < 3 * n else 2
    )


def test_sets_no_template_matches_are_counted_apart(tmp_path):
    _folder_pool(tmp_path / "p", ["a0", "a1", "a2"])
    spec = _spec(
        tmp_path,
        """
pools:
  p: {folder: p, concept_prompt: "{name}"}
compositions:
  one: {slots: {x: p}}
templates:
  - {name: t, prompt: "{prompt} alone", when: {name: a1}, seeds: 3}
""",
    )
    summary = build_manifest(str(spec), BuildOptions())
    assert (summary["rows"], summary["concept_sets"], summary["samples"], summary["reference_passes"]) == (
        1,
        1,
        3,
        1,
    )
    assert (
        summary["compositions"]["one"]["sets"] == 3
        and summary["compositions"]["one"]["sets_without_rows"] == 2
    )


# --------------------------------------------------------------------------- prompts


def test_templates_variants_wildcards_and_escapes():
    lists = {"scene": ("park", "beach")}
    t = compile_template("{{x}} a {title} {at|near} __scene__ {with a {red|blue} hat|}", lists)
    texts = sorted(t.fill(flat, lambda n: "MUG") for flat, _ in t.expansions("combinatorial", 1, b""))
    assert len(texts) == 2 * 2 * 3 and "{x} a MUG near beach with a blue hat" in texts
    assert "{x} a MUG at park" in texts
    one = t.expansions("random", 2, b"row-1")
    assert one == t.expansions("random", 2, b"row-1") and len(one) == 2 and one[0][1] != one[1][1]
    many = {t.expansions("random", 1, f"row-{i}".encode())[0][1] for i in range(40)}
    assert len(many) > 3
    with pytest.raises(TemplateError, match="never closed"):
        compile_template("a {b|c", lists)
    with pytest.raises(TemplateError, match="wildcard __sea__"):
        compile_template("a __sea__", lists)
    with pytest.raises(TemplateError, match=r"unknown slot \{colour\}"):
        compile_template("a {colour}", lists, known=lambda s: None if s == "color" else "no such attribute")


# --------------------------------------------------------------------------- the spec


CATALOG = """\
pools:
  products:
    table: feed.csv
    columns: {key: sku, image: image}
    attributes: [title, category]
    concept_prompt: "a {title}"
compositions:
  product:
    slots: {product: products}
templates:
  - name: counter
    prompt: "a {title} on a counter"
"""


@pytest.mark.parametrize(
    "edit, message",
    [
        (("    columns:", "    colums:"), r"spec.yaml:4: pools.products.colums: unknown key"),
        (
            ("    attributes: [title, category]", "    attributes: title"),
            r"spec.yaml:5: pools.products.attributes: expected a non-empty list",
        ),
        (
            ('    concept_prompt: "a {title}"\n', ""),
            r"spec.yaml:2: pools.products: missing required key 'concept_prompt'",
        ),
        (
            ('    prompt: "a {title} on a counter"', '    prompt: "a {titel} on a counter"'),
            r"spec.yaml:12: templates\[0\].prompt: unknown slot \{titel\}",
        ),
        (
            ("slots: {product: products}", "slots: {product: prodcts}"),
            r"spec.yaml:9: compositions.product.slots.product: no pool named 'prodcts'",
        ),
        (
            ("  product:\n", "  product:\n    cap: many\n"),
            r"spec.yaml:9: compositions.product.cap: expected an integer",
        ),
    ],
)
def test_spec_errors_name_the_line_and_key_path(tmp_path, edit, message):
    spec = _spec(tmp_path, CATALOG.replace(*edit))
    result = build(str(spec), "-o", str(tmp_path / "m"))
    assert result.exit_code == 2 and nothing_written(tmp_path, "m")
    assert re.search(message, result.output), result.output


def test_parse_spec_keeps_key_order_and_defaults():
    spec = parse_spec(CATALOG, source="s.yaml", base_dir="/data")
    assert spec.pools["products"].location == "/data/feed.csv" and spec.templates[0].seeds == 1
    assert spec.templates[0].compositions == ("product",)


# --------------------------------------------------------------------------- bad input


def _catalog_with(tmp_path: Path, spec_text: str | None = None, products: list[dict] | None = None) -> Path:
    spec = write_catalog(tmp_path / "cat")
    if spec_text is not None:
        spec.write_text(spec_text)
    if products is not None:
        write_feed(tmp_path / "cat", products)
    return spec


@pytest.mark.parametrize(
    "case",
    ["missing_column", "empty_after_filter", "duplicate_key", "cap_over_space", "duplicate_key_capped"],
)
def test_bad_input_exits_2_naming_the_place_and_writes_nothing(tmp_path, case):
    spec = _catalog_with(tmp_path)
    text = spec.read_text()
    products = feed(tmp_path / "cat")
    expected = {
        "missing_column": r"spec.yaml:\d+: pools.products: .*column\(s\) \['colour'\] not in .*feed.csv",
        "empty_after_filter": r"spec.yaml:\d+: pools.products.where: pool products is empty after its filter",
        "duplicate_key": r"feed.csv row 15: duplicate key 'SKU-0003' \(first at .*feed.csv row 4\)",
        "duplicate_key_capped": r"feed.csv row 15: duplicate key 'SKU-0003' \(first at .*feed.csv row 4\)",
        "cap_over_space": r"composition product: cap 21 is larger than its space of 20 sets",
    }[case]
    if case == "missing_column":
        text = text.replace("attributes: [title, category, color]", "attributes: [title, category, colour]")
        text = text.replace("{color}", "{colour}")
    elif case == "empty_after_filter":
        text = text.replace("    attributes:", "    where: {category: [teapot]}\n    attributes:")
    elif case.startswith("duplicate_key"):
        products[14]["sku"] = "SKU-0003"
        write_feed(tmp_path / "cat", products)
        if case == "duplicate_key_capped":
            text = text.replace("slots: {product: products}", "slots: {product: products}\n    cap: 5")
    elif case == "cap_over_space":
        text = text.replace("slots: {product: products}", "slots: {product: products}\n    cap: 21")
    spec.write_text(text)
    result = build(str(spec), "-o", str(tmp_path / "cat" / "manifest"))
    assert result.exit_code == 2, result.output
    assert re.search(expected, result.output), result.output
    assert nothing_written(tmp_path / "cat", "manifest")


def test_a_failed_rebuild_leaves_the_earlier_build_in_place(tmp_path):
    spec = _catalog_with(tmp_path)
    out = tmp_path / "cat" / "manifest"
    assert build(str(spec), "-o", str(out)).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    products = feed(tmp_path / "cat")
    products[19]["sku"] = products[0]["sku"]
    write_feed(tmp_path / "cat", products)
    assert build(str(spec), "-o", str(out)).exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == before and len(rows(out)) == 50
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = build(str(spec), "-o", str(foreign))
    assert (
        result.exit_code == 2 and "not an earlier build" in result.output and (foreign / "notes.txt").exists()
    )


@pytest.fixture
def served(tmp_path):
    """A local HTTP server over tmp_path/www (a missing file: 404)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_http_feed_with_urls_and_check_images_naming_the_404_row(tmp_path, served):
    www, base = served
    write_catalog(tmp_path / "cat")
    products = feed(tmp_path / "cat")
    for p in products:  # the images served too, the feed holding their URLs
        Path(www / p["image"]).parent.mkdir(exist_ok=True)
        Path(www / p["image"]).write_bytes((tmp_path / "cat" / p["image"]).read_bytes())
        p["image"] = f"{base}/{p['image']}"
        p["mask"] = ""
    products[6]["image"] = f"{base}/images/gone.png"
    write_feed(www, products)
    spec = _spec(tmp_path, CATALOG.replace("table: feed.csv", f"table: {base}/feed.csv"))
    result = build(str(spec), "-o", str(tmp_path / "m"), "--check-images")
    assert result.exit_code == 2 and nothing_written(tmp_path, "m"), result.output
    assert "1 unusable image(s)" in result.output and "feed.csv row 7: image: " in result.output
    assert "404" in result.output
    # without --check-images the build goes on: the image is a row error of the run later
    result = build(str(spec), "-o", str(tmp_path / "m"))
    assert result.exit_code == 0, result.output
    assert rows(tmp_path / "m")[6]["concepts"][0]["image"] == f"{base}/images/gone.png"


# --------------------------------------------------------------------------- sources


def test_tsv_jsonl_parquet_and_a_folder_with_masks_give_the_same_items(tmp_path):
    write_catalog(tmp_path / "cat")
    products = feed(tmp_path / "cat")
    table = pa.Table.from_pylist(products)
    pq.write_table(table, tmp_path / "cat" / "feed.parquet")
    with open(tmp_path / "cat" / "feed.tsv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(products[0]), delimiter="\t")
        w.writeheader()
        w.writerows(products)
    (tmp_path / "cat" / "feed.jsonl").write_text("".join(json.dumps(p) + "\n" for p in products))
    found = {}
    for name in ("feed.csv", "feed.tsv", "feed.jsonl", "feed.parquet"):
        spec = _spec(
            tmp_path / "cat",
            CATALOG.replace("table: feed.csv", f"table: {name}").replace(
                "columns: {key: sku, image: image}", "columns: {key: sku, image: image, mask: mask}"
            ),
        )
        out = tmp_path / f"{name}.parquet"
        assert build(str(spec), "-o", str(out)).exit_code == 0
        found[name] = [(r["id"], r["concepts"]) for r in pq.read_table(out).to_pylist()]
    assert found["feed.tsv"] == found["feed.csv"] == found["feed.jsonl"] == found["feed.parquet"]
    # a folder pool: the same pictures, masks found by the naming rule, keyed by name
    spec = _spec(
        tmp_path,
        CATALOG.replace("table: feed.csv", "folder: cat/images")
        .replace("    columns: {key: sku, image: image}\n    attributes: [title, category]\n", "")
        .replace("{title}", "{name}"),
    )
    summary = build_manifest(str(spec), BuildOptions(sample_rows=30))
    assert summary["rows"] == 20
    assert sum("(mask SKU-" in line for line in summary["sample"]) == 10


def test_a_folder_pool_knows_key_name_and_folder_and_filters_on_them(tmp_path):
    _folder_pool(tmp_path / "pets" / "dogs.v2", ["rex", "fido"])
    _folder_pool(tmp_path / "pets" / "cats", ["tom"])
    Image.new("RGB", (16, 16)).save(tmp_path / "pets" / "loose.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "pets" / "dogs.v2" / "rex_mask.png")
    spec = _spec(
        tmp_path,
        """
pools:
  pets: {folder: pets, where: {folder: [dogs.v2, ""]}, concept_prompt: "a {name} from {folder}"}
compositions:
  one: {slots: {pet: pets}}
templates:
  - {name: t, prompt: "{prompt}"}
""",
    )
    out = tmp_path / "m.parquet"
    assert build(str(spec), "-o", str(out)).exit_code == 0
    table = {r["item_keys"][0]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(table) == ["dogs.v2/fido", "dogs.v2/rex", "loose"]
    assert (
        table["dogs.v2/rex"]["prompt"] == "a rex from dogs.v2" and table["loose"]["prompt"] == "a loose from"
    )
    assert table["dogs.v2/rex"]["concepts"][0]["mask"].endswith("dogs.v2/rex_mask.png")
    assert table["dogs.v2/fido"]["concepts"][0]["mask"] is None


def test_a_datasets_folder_with_embedded_images_and_no_key_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    pictures = []
    for n in range(4):
        path = tmp_path / f"p{n}.png"
        Image.new("RGBA", (16, 16), (60 * n, 20, 200, 255 if n % 2 else 100)).save(path)
        pictures.append(str(path))
    ds = datasets.Dataset.from_dict({"image": pictures, "kind": ["cat", "dog", "cat", "bird"]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    spec = _spec(
        tmp_path,
        """
pools:
  animals: {dataset: hf, columns: {image: image}, attributes: [kind], where: {kind: [cat, dog]}, concept_prompt: "a {kind}"}
compositions:
  one: {slots: {animal: animals}}
templates:
  - {name: t, prompt: "a photo of {kind}", seeds: [5, 6]}
""",
    )
    out = tmp_path / "m"
    assert build(str(spec), "-o", str(out)).exit_code == 0
    table = rows(out)
    assert [r["concepts"][0]["prompt"] for r in table] == ["a cat", "a dog", "a cat"] and table[0][
        "seeds"
    ] == [5, 6]
    images = [Path(r["concepts"][0]["image"]) for r in table]
    assert all(p.parent == out / "_images" and p.is_file() for p in images)
    assert Image.open(images[1]).getpixel((0, 0)) == Image.open(pictures[1]).getpixel((0, 0))
    # keyed by the image's digest: the same picture keeps its id in another dataset order
    assert len({r["item_keys"][0] for r in table}) == 3
    assert build(str(spec), "--dry-run", "--check-images").exit_code == 0  # embedded bytes: nothing to read
    # --check-images reads them where the build wrote them (staged until it is committed), first build or not
    for fresh in (tmp_path / "m2", out):
        result = build(str(spec), "-o", str(fresh), "--check-images")
        assert result.exit_code == 0, result.output


def test_a_feed_on_object_storage_with_relative_image_paths(s3, tmp_path):  # noqa: F811 (the fixture)
    filesystem, _ = s3
    write_catalog(tmp_path / "cat")
    products = feed(tmp_path / "cat")
    pq.write_table(pa.Table.from_pylist(products), tmp_path / "cat" / "feed.parquet")
    _upload(filesystem, tmp_path / "cat", f"{BUCKET}/feeds/cat")
    spec = _spec(tmp_path, CATALOG.replace("table: feed.csv", f"table: s3://{BUCKET}/feeds/cat/feed.parquet"))
    out = tmp_path / "m.parquet"
    result = build(str(spec), "-o", str(out), "--check-images")
    assert result.exit_code == 0, result.output
    first = pq.read_table(out).to_pylist()[0]
    assert first["concepts"][0]["image"] == f"s3://{BUCKET}/feeds/cat/images/SKU-0000.png"
    filesystem.delete_file(f"{BUCKET}/feeds/cat/images/SKU-0005.png")
    result = build(str(spec), "-o", str(tmp_path / "m2.parquet"), "--check-images")
    assert result.exit_code == 2 and "feed.parquet row 6: image: file not found" in result.output, (
        result.output
    )


def test_template_overrides_become_manifest_columns(tmp_path):
    write_catalog(tmp_path / "cat")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "cat" / "layout.png")
    spec = _spec(
        tmp_path / "cat",
        CATALOG
        + """\
    negative_prompt: "blurry, text"
    height: 384
    width: 256
    guidance_scale: 5.5
    num_inference_steps: 30
    control: {image: layout.png, type: none, scale: 0.7}
    control_references: true
    mrsa_layers: [up_blocks.3.attentions.2.transformer_blocks.0.attn1]
    seeds: [11, 4]
  - name: plain
    prompt: "a {title}"
    mrsa_blocks: [4, 6]
""",
    )
    out = tmp_path / "m"
    assert build(str(spec), "-o", str(out)).exit_code == 0
    by_template = {r["template"]: r for r in rows(out)}
    counter, plain = by_template["counter"], by_template["plain"]
    assert (counter["negative_prompt"], counter["height"], counter["width"]) == ("blurry, text", 384, 256)
    assert (
        counter["guidance_scale"] == 5.5
        and counter["num_inference_steps"] == 30
        and counter["seeds"] == [11, 4]
    )
    assert counter["control"] == {
        "image": str(tmp_path / "cat" / "layout.png"),
        "type": "none",
        "scale": 0.7,
        "start": None,
        "end": None,
    }
    assert counter["control_references"] is True and counter["mrsa_layers"][0].endswith("attn1")
    assert plain["mrsa_blocks"] == [4, 6] and plain["height"] is None and plain["control"] is None
    summary = json.loads((out / "_build.json").read_text())
    assert summary["reference_passes"] == 2 * summary["concept_sets"]  # two K/V groups per product


def test_a_csv_row_malformed_past_the_first_block_exits_2_naming_the_pool_and_row(tmp_path):
    spec = _catalog_with(tmp_path)
    products = feed(tmp_path / "cat")
    many = [dict(products[i % len(products)], sku=f"SKU-{i:06d}") for i in range(30000)]  # > Arrow's 1 MiB block
    write_feed(tmp_path / "cat", many)
    with open(tmp_path / "cat" / "feed.csv", "a") as f:
        f.write(",".join(["SKU-bad", *list(products[0].values())[1:], "EXTRA"]) + "\n")
    result = build(str(spec), "-o", str(tmp_path / "cat" / "manifest"))
    assert result.exit_code == 2, result.output
    assert re.search(r"spec.yaml:\d+: pools.products: pool products: cannot read .*feed.csv: CSV parse error: "
                     r"Row #30002: Expected \d+ columns, got \d+", " ".join(result.output.split())), result.output
    assert nothing_written(tmp_path / "cat", "manifest")


def test_csv_cells_are_text_and_only_an_empty_cell_is_missing(tmp_path):
    spec = _catalog_with(tmp_path)
    products = feed(tmp_path / "cat")
    products[0]["color"], products[1]["sku"] = "N/A", "NA"
    write_feed(tmp_path / "cat", products)
    out = tmp_path / "cat" / "manifest"
    result = build(str(spec), "-o", str(out))
    assert result.exit_code == 0, result.output
    concepts = {r["item_keys"][0]: r["concepts"][0]["prompt"] for r in rows(out)}
    assert "N/A" in concepts[products[0]["sku"]] and "NA" in concepts


def test_an_option_listed_twice_gives_one_row_not_two_of_one_id(tmp_path):
    spec = _catalog_with(tmp_path)
    (tmp_path / "cat" / "scenes.txt").write_text("in a park\non a beach\nin a park\n")
    text = spec.read_text()
    assert "seeds: 2\n" in text and '"a {title} on a wooden desk next to a laptop"' in text
    text = text.replace("seeds: 2\n", "seeds: 2\nlists:\n  scene: scenes.txt\n", 1)
    spec.write_text(text.replace('"a {title} on a wooden desk next to a laptop"', '"a {title} on a wooden desk __scene__"'))
    out = tmp_path / "cat" / "manifest"
    assert build(str(spec), "-o", str(out)).exit_code == 0
    table = rows(out)
    ids = [r["id"] for r in table]
    assert len(ids) == len(set(ids))
    desk = Counter(r["item_keys"][0] for r in table if "wooden desk" in r["prompt"])
    assert desk and set(desk.values()) == {2}, desk  # in a park, on a beach: each product twice, not three times
    assert json.loads(runner.invoke(app, ["validate", str(out), "--json"]).stdout)["refused"] == 0
