"""The render stream's input: one pending shard per Ray Data block, whatever the driver hands it.

One block is one actor task: a file's shards in one block would all render on one generation actor (one
GPU of the cluster), and be written only once the whole file is done."""

from __future__ import annotations

import pytest

from pipeline.plan import Resources, shard_stream

pytestmark = pytest.mark.ray


def test_a_files_pending_shards_leave_the_driver_as_one_row_and_render_one_per_block(ray_session):
    files = [{"shard_base": 10, "plan": "s3://b/_plan/a.plan.parquet", "local": [0, 2, 3]},
             {"shard_base": 40, "plan": "s3://b/_plan/b.plan.parquet", "local": [1, 4, 5, 6, 9]}]
    ds = shard_stream(files, None, Resources(device="cpu")).materialize()
    blocks = [ray_session.get(ref) for ref in ds.to_arrow_refs()]
    assert [b.num_rows for b in blocks] == [1] * 8
    rows = sorted((r["shard_id"], r["local"], r["plan"]) for b in blocks for r in b.to_pylist())
    assert rows == [(10, 0, "s3://b/_plan/a.plan.parquet"), (12, 2, "s3://b/_plan/a.plan.parquet"),
                    (13, 3, "s3://b/_plan/a.plan.parquet")] + [
        (40 + n, n, "s3://b/_plan/b.plan.parquet") for n in (1, 4, 5, 6, 9)]


def test_nothing_pending_is_no_stream(ray_session):
    assert shard_stream([], None, Resources(device="cpu")) is None
