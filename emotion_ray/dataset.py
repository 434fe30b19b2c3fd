"""Reading a prepared dataset: its manifest, and one split as a Ray Dataset.

A dataset is complete exactly when its `manifest.json` exists (prepare writes it last); an
incomplete one is never read. Layout: see prepare.py (the Parquet files are under data/, or at the
top in datasets from before it; the manifest's shard list names them either way).
"""

from __future__ import annotations

import math
from typing import Any

from emotion_ray import storage
from emotion_ray.config import StorageConfig
from emotion_ray.errors import ConfigError

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
READ_TASK_BYTES = 128 * 1024**2  # pixels one read task of `load_split` reads (several shards if small)
# CPUs a read task of `load_split` reserves (Ray Data asks 1 by default). Reserved CPUs are only
# a scheduling token: the read shares the cores with the Train workers anyway. A whole CPU is
# what placement groups can leave unfree: a trial's driver (0.01) and its workers (0.99) leave
# exactly 1.0 on 2 CPUs, and an earlier trial's worker group still being removed, or workers
# that declare a whole CPU, then hold a CPU no one frees and the read waits forever (issue 30).
# 0 always fits; how many reads run at once is bounded by their count (READ_TASK_BYTES) and
# Ray Data's object-store budget, not by CPUs.
READ_TASK_CPUS = 0.0


def is_prepared(dataset_uri: str, storage_cfg: StorageConfig | None = None) -> bool:
    return storage.exists(storage.join(dataset_uri, MANIFEST), storage_cfg)


def read_manifest(dataset_uri: str, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    """The dataset's manifest; ConfigError when the dataset is missing or incomplete."""
    uri = storage.join(dataset_uri, MANIFEST)
    if not storage.exists(uri, storage_cfg):
        raise ConfigError(f"{dataset_uri} is not a complete prepared dataset (no {MANIFEST}); run `emotion-ray prepare`")
    return storage.read_json(uri, storage_cfg)


def manifest_sha256(dataset_uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """The sha256 of the dataset's manifest.json: the dataset's identity (its shards, counts, sources)."""
    import hashlib

    return hashlib.sha256(storage.read_bytes(storage.join(dataset_uri, MANIFEST), storage_cfg)).hexdigest()


def read_shard(dataset_uri: str, rel: str, storage_cfg: StorageConfig | None = None,
               columns: list[str] | None = None):
    """One shard of the dataset (`rel`: a path its manifest lists) as a pyarrow Table, read
    directly (no Ray): all columns, or `columns`. Asking for `group` in a dataset from before that
    column gives its `content_hash` under that name (exact copies, the same sha256, were the groups)."""
    import pyarrow.parquet as pq

    uri = storage.join(dataset_uri, rel)
    fs = storage.pyarrow_filesystem(uri, storage_cfg)
    path = storage.strip_scheme(uri)
    if columns is None:
        return pq.read_table(path, filesystem=fs)
    names = pq.read_schema(path, filesystem=fs).names
    columns = ["content_hash" if c == "group" and c not in names else c for c in columns]
    table = pq.read_table(path, filesystem=fs, columns=columns)
    return table.rename_columns(["group" if c == "content_hash" else c for c in table.column_names])


def load_split(dataset_uri: str, split: str, storage_cfg: StorageConfig | None = None,
               columns: tuple[str, ...] = ("image", "label_index"), read_cpus: float = READ_TASK_CPUS):
    """A Ray Dataset of one split's rows: `image` (binary, image_size² x 3 uint8 RGB) and
    `label_index` (int32), streamed from its shards; `columns` names others to read too (README,
    prepare: e.g. `path`). `read_cpus`: CPUs each read task reserves (see READ_TASK_CPUS).
    ConfigError when the split is empty."""
    import ray

    from emotion_ray.runtime import parquet_reader_v1

    manifest = read_manifest(dataset_uri, storage_cfg)
    files = [storage.strip_scheme(storage.join(dataset_uri, rel)) for rel in manifest["shards"][split]]
    if not files:
        raise ConfigError(f"split {split!r} of {dataset_uri} is empty; add images or change the split fractions")
    # Ray starts one read task per shard by default, and each costs CPU beyond the reading
    # (half of a streamed epoch on many small shards): group small shards into tasks of
    # ~READ_TASK_BYTES of pixels (bench/RESULTS.md, train).
    split_bytes = manifest["split_rows"][split] * manifest["image_size"] ** 2 * 3
    read_tasks = min(len(files), max(1, math.ceil(split_bytes / READ_TASK_BYTES)))
    with parquet_reader_v1():  # the manifest already names every shard
        return ray.data.read_parquet(
            files, filesystem=storage.pyarrow_filesystem(dataset_uri, storage_cfg), columns=list(columns),
            override_num_blocks=read_tasks, num_cpus=read_cpus,
        )


def iter_split_batches(dataset_uri: str, split: str, storage_cfg: StorageConfig | None = None,
                       columns: tuple[str, ...] = ("image", "label_index"), batch_size: int = 1024):
    """One split's rows as pyarrow RecordBatches of up to `batch_size` rows, read shard by shard in
    this process (no Ray): for a caller that consumes every row itself (evaluation). Ray Data would
    only add tasks that must be scheduled: its Parquet reader samples files in tasks asking a whole
    CPU, which wait forever inside a Tune trial on a 1-CPU machine (issue 30). Nothing for a split
    without shards."""
    import pyarrow.parquet as pq

    manifest = read_manifest(dataset_uri, storage_cfg)
    fs = storage.pyarrow_filesystem(dataset_uri, storage_cfg)
    for rel in manifest["shards"].get(split, []):
        path = storage.strip_scheme(storage.join(dataset_uri, rel))
        with fs.open_input_file(path) as fh:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=list(columns))
