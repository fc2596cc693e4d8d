"""Every reader of docs/outputs.md "Reading the output" on a real output folder of a real tiny run.

The run is end to end (``pipeline.run.run`` on a manifest with typed pass-through columns): the
driver hands the manifest's pass-through schema to the write stage and writes the dataset card.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.examples import write_example_manifest
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.run import run
from pipeline.settings import RunSettings
from stages.output.layout import CARD_FILE, SHARDS
from stages.output.write import write_batch
from stages.params import GenParams

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PRICES = {"dog_hat_park": 19.5, "dog_hat_beach": 19.5, "mug_kitchen": 7.25, "hat_product": 21.0}
LAUNCH = dt.date(2026, 3, 1)
TYPES = {"sku": pa.string(), "price": pa.float64(), "launch": pa.date32(), "qty": pa.int32()}


def typed_manifest(folder: Path) -> tuple[Path, pa.Schema]:
    """The example manifest plus ``price`` (float64), ``launch`` (date32), ``qty`` (int32); ``sku`` is
    there already (string). Returns its path and its pass-through schema."""
    path = write_example_manifest(folder)
    table = pq.read_table(path)
    ids = table.column("id").to_pylist()
    table = table.append_column(
        pa.field("price", pa.float64()), pa.array([PRICES[i] for i in ids], pa.float64())
    )
    table = table.append_column(pa.field("launch", pa.date32()), pa.array([LAUNCH] * len(ids), pa.date32()))
    table = table.append_column(pa.field("qty", pa.int32()), pa.array(range(1, len(ids) + 1), pa.int32()))
    pq.write_table(table, path)
    passthrough = pa.schema([f for f in table.schema if f.name not in MANIFEST_SCHEMA.names])
    return path, passthrough


@pytest.fixture(scope="module")
def output(tmp_path_factory, tiny_model_dir, ray_session) -> dict:
    """A real output folder: the run's, plus the card and (until the driver passes the schema) typed Parquet."""
    root = tmp_path_factory.mktemp("readers")
    manifest, passthrough = typed_manifest(root / "in")
    out = root / "out"
    settings = RunSettings(
        str(manifest),
        str(out),
        model=str(tiny_model_dir),
        defaults=GenParams(num_inference_steps=2, height=64, width=64),
        samples_per_shard=3,
    )
    summary = run(settings)
    assert summary.exit_code == 0, summary.errors
    # the driver wrote typed pass-through columns and the dataset card itself
    for path in sorted((out / SHARDS).glob("*.parquet")):
        assert {"sku", "price", "launch", "qty"} <= set(pq.read_schema(path).names), path
    assert (out / CARD_FILE).is_file()
    samples = summary.stats["samples_written"]
    assert samples == 8 and summary.stats["shards"] == 3
    return {"out": out, "samples": samples}


def check_meta(meta: dict) -> None:
    """A sample's JSON as a reader decoded it: the pass-through values in their JSON-safe form."""
    assert meta["passthrough"]["price"] == PRICES[meta["id"]]
    assert isinstance(meta["passthrough"]["price"], float)
    assert meta["passthrough"]["launch"] == LAUNCH.isoformat()


def check_columns(rows: list[dict]) -> None:
    """Parquet rows as a reader typed them: the pass-through columns with the manifest's types."""
    for row in rows:
        assert row["price"] == PRICES[row["id"]] and isinstance(row["price"], float)
        assert row["sku"] in ("HAT-001", "MUG-042")
        assert row["key"] == f"{row['id']}-{row['seed']}"


def test_webdataset(output):
    wds = pytest.importorskip("webdataset")
    tars = sorted(glob.glob(str(output["out"] / SHARDS / "*.tar")))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == output["samples"]
    for s in samples:
        assert s["png"].size == (64, 64)
        check_meta(s["json"])


def test_ray_read_webdataset(output, ray_session):
    ds = ray_session.data.read_webdataset(str(output["out"] / SHARDS), file_extensions=["tar"])
    rows = ds.take_all()
    assert len(rows) == output["samples"]
    for row in rows:
        assert row["png"].shape == (64, 64, 3)
        meta = row["json"] if isinstance(row["json"], dict) else json.loads(row["json"])
        check_meta(meta)


def test_hf_datasets_load_dataset(output, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="datasets does not install here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    ds = datasets.load_dataset(str(output["out"]), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == output["samples"]  # the samples, not the reference previews
    assert set(ds.column_names) >= {"png", "json"}
    for row in ds:
        assert row["png"].size == (64, 64)
        check_meta(row["json"])


def test_pyarrow_dataset(output):
    # the shards folder holds tars too: pq.read_table(OUT/shards) fails on them; a dataset skips them
    # with exclude_invalid_files=True (it opens every file once to tell), or takes the .parquet files only
    for ds in (
        pads.dataset(str(output["out"] / SHARDS), format="parquet", exclude_invalid_files=True),
        pads.dataset(sorted(glob.glob(str(output["out"] / SHARDS / "*.parquet"))), format="parquet"),
    ):
        table = ds.to_table()
        assert table.num_rows == output["samples"]
        for name, dtype in TYPES.items():
            assert table.schema.field(name).type == dtype, name
        assert set(table.column("launch").to_pylist()) == {LAUNCH}
        check_columns(table.to_pylist())
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(str(output["out"] / SHARDS))


def test_pandas_read_parquet(output):
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(sorted(glob.glob(str(output["out"] / SHARDS / "*.parquet"))))
    assert len(df) == output["samples"]
    assert df["price"].dtype == "float64" and str(df["qty"].dtype) == "int32"
    assert set(df["launch"]) == {LAUNCH}
    check_columns(df.to_dict("records"))


def test_duckdb(output):
    duckdb = pytest.importorskip("duckdb", reason="duckdb does not install here")
    pattern = str(output["out"] / SHARDS / "*.parquet")
    rel = duckdb.sql(f"SELECT id, seed, key, sku, price, launch, qty FROM '{pattern}'")
    assert [str(t) for t in rel.types] == [
        "VARCHAR",
        "BIGINT",
        "VARCHAR",
        "VARCHAR",
        "DOUBLE",
        "DATE",
        "INTEGER",
    ]
    rows = [dict(zip(rel.columns, r, strict=True)) for r in rel.fetchall()]
    assert len(rows) == output["samples"]
    assert {r["launch"] for r in rows} == {LAUNCH}
    check_columns(rows)


def test_write_batch_passes_the_schema(output, tmp_path):
    """The stage's own argument (what the driver will pass): a shard rewritten by ``write_batch`` from
    the run's tar and metadata carries the typed pass-through columns, the built-in columns unchanged."""
    shard = output["out"] / SHARDS / "00000.parquet"
    before = pq.read_table(shard)
    metas = [json.loads(m) for m in before.column("metadata").to_pylist()]
    schema = pa.schema([pa.field(n, t) for n, t in TYPES.items()] + [pa.field("key", pa.string())])
    batch = {
        "shard_id": [0],
        "tar": [(output["out"] / SHARDS / "00000.tar").read_bytes()],
        "metas": [json.dumps(metas)],
        "errors": ["[]"],
        "expected": [len(metas)],
        "reference_passes": [0],
    }
    result = write_batch(batch, str(tmp_path), passthrough_schema=schema.serialize().to_pybytes())
    assert json.loads(result["marker"][0])["status"] == "complete"
    table = pq.read_table(tmp_path / SHARDS / "00000.parquet")
    assert table.column("key") == before.column("key")  # a pass-through "key" does not clobber the sample key
    assert table.schema.field("passthrough.key").type == pa.string()
    assert table.column("passthrough.key").null_count == len(metas)  # no such manifest column: nulls
    for name, dtype in TYPES.items():
        assert table.schema.field(name).type == dtype
    check_columns(table.to_pylist())
