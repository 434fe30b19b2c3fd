"""Reading a prepared dataset: only complete ones, one split at a time, at the manifest's size."""

from __future__ import annotations

import json
import shutil

import pytest

from emotion_ray.config import ConfigError
from emotion_ray.dataset import SPLITS, load_split, read_manifest
from tests.conftest import READERS, read_with_every_reader


@pytest.mark.fast
def test_incomplete_dataset_is_never_read(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ConfigError, match="not a complete prepared dataset"):
        read_manifest(str(tmp_path / "half"))


def test_load_split_gives_images_of_the_manifest_size(prepared_demo):
    import ray

    manifest = read_manifest(str(prepared_demo))
    callers_reader = ray.data.DataContext.get_current().use_datasource_v2
    ds = load_split(str(prepared_demo), "val")
    assert ray.data.DataContext.get_current().use_datasource_v2 == callers_reader  # left as it was
    batch = next(iter(ds.iter_batches(batch_size=4, batch_format="numpy")))
    assert len(batch["image"][0]) == manifest["image_size"] ** 2 * 3
    assert ds.count() == manifest["split_rows"]["val"]


def test_every_reader_reads_a_prepared_dataset_and_each_split(prepared_demo, tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads

    manifest = read_manifest(str(prepared_demo))
    data = prepared_demo / "data"
    for split in SPLITS:
        # Tens of MB per file by default: the demo's few hundred small images are one file a split.
        assert len(manifest["shards"][split]) == 1
        assert read_with_every_reader(data / f"split={split}") == dict.fromkeys(READERS, manifest["split_rows"][split])
    # data/ as a whole: hive-partitioned by split.
    expected = manifest["split_rows"]
    assert pd.read_parquet(data, columns=["label", "split"])["split"].value_counts().to_dict() == expected
    assert dict(pl.read_parquet(data, columns=["label", "split"])["split"].value_counts().iter_rows()) == expected
    assert dict(duckdb.sql(f"SELECT split, count(*) FROM read_parquet('{data}/*/*.parquet', hive_partitioning=true) "
                           "GROUP BY split").fetchall()) == expected
    whole = pads.dataset(data, format="parquet", partitioning="hive").to_table(columns=["split"])
    assert {r["split"]: r["split_count"] for r in whole.group_by("split").aggregate([("split", "count")]).to_pylist()} \
        == expected

    # A dataset from before data/ (splits at the top) still loads: readers go by the manifest.
    old = tmp_path / "old"
    shutil.copytree(prepared_demo, old)
    (old / "data").rename(old / "moved")
    for split in SPLITS:
        (old / "moved" / f"split={split}").rename(old / f"split={split}")
    old_manifest = {**manifest, "shards": {s: [rel.removeprefix("data/") for rel in manifest["shards"][s]]
                                           for s in SPLITS}}
    (old / "manifest.json").write_text(json.dumps(old_manifest))
    assert load_split(str(old), "train").count() == manifest["split_rows"]["train"]
