"""What runs in prepare's Ray Data tasks: decode the listed files, then give each row its group
and split (prepare.py, the driver, plans the groups and writes the shards).

A row's split is its sha256 (of the file's bytes, or of its group's key) mapped to [0, 1) and
cut by the split fractions (`split_of`, which the driver's group plan uses too): deterministic,
and a group never straddles splits (groups.py). With split_by folder a row keeps its folder's
split (prepare warns when a group then crosses them), except the train/ files of an input with
no val/ folder, whose given split is null: their sha256 point, cut by PrepareConfig.split_fractions,
makes them train or val.
"""

from __future__ import annotations

import pyarrow as pa

from emotion_ray import sources
from emotion_ray.config import PrepareConfig
from emotion_ray.dataset import SPLITS

REJECTED = "rejected"
# The columns a shard holds, in order (`split` becomes the folder, `error` goes to rejects).
SHARD_COLUMNS = ["image", "label_index", "label", "path", "content_hash", "group", "phash", "split", "reject_reason"]
FACE_SHARD_COLUMNS = ["face_index", "box_x", "box_y", "box_w", "box_h", "face_score"]  # with faces on


def split_of(content_hash: str, fractions: dict[str, float]) -> str:
    """Map a sha256 hex digest to a split: the first 64 bits as a fraction of [0, 1)."""
    point = int(content_hash[:16], 16) / 2**64
    edge = 0.0
    for name in SPLITS:
        edge += fractions[name]
        if point < edge:
            return name
    return SPLITS[-1] if fractions[SPLITS[-1]] > 0 else "train"  # float rounding at the top edge


def decode_rows(batch: pa.Table, cfg: PrepareConfig, progress=None) -> pa.Table:
    """Ray Data UDF: decode listed files (sources.decode_table: faces too, when on), with the
    sha256 of their bytes and, for near-duplicate grouping, their picture's pHash; counts the
    files into `progress` (a console.Tally handle) when given."""
    decoded = sources.decode_table(batch, cfg.image_size, cfg.decode_limits(), cfg.storage, cfg.faces, one_thread=True,
                                   hash_files=True,  # splits and duplicates come from the bytes' hash
                                   perceptual_hash=cfg.near_duplicate_distance > 0)
    if progress is not None:
        progress.add.remote(batch.num_rows)
    return decoded


def decode_and_split(batch: pa.Table, cfg: PrepareConfig, progress=None) -> pa.Table:
    """Ray Data UDF without grouping: decode_rows, then each row's split from its own sha256
    (or `rejected`), in shard column order."""
    return with_split(decode_rows(batch, cfg, progress), cfg.split_fractions)


def with_split(batch: pa.Table, fractions: dict[str, float], plan=None) -> pa.Table:
    """Each decoded row's group and split (or `rejected`), in shard column order: from `plan`
    (an ObjectRef of a (path, group, split) table: see prepare._plan_groups), else from its sha256."""
    decoded = batch["image"].is_valid().to_pylist()
    given = batch["given_split"].to_pylist() if "given_split" in batch.column_names else [None] * batch.num_rows
    digests = batch["content_hash"].to_pylist()
    if plan is None:
        keys = [digest if ok else None for digest, ok in zip(digests, decoded)]
        splits = [(split or split_of(digest, fractions)) if ok else REJECTED
                  for digest, ok, split in zip(digests, decoded, given)]
    else:
        by_path = _plan_lookup(plan)
        rows = [by_path[path] if ok else (None, REJECTED) for path, ok in zip(batch["path"].to_pylist(), decoded)]
        keys, splits = [r[0] for r in rows], [r[1] for r in rows]
    batch = batch.append_column("group", pa.array(keys, pa.string()))
    if "phash" not in batch.column_names:
        batch = batch.append_column("phash", pa.nulls(batch.num_rows, pa.uint64()))
    batch = batch.append_column("split", pa.array(splits, pa.string()))
    batch = batch.append_column("reject_reason", batch["error"])
    return batch.select(SHARD_COLUMNS + [c for c in FACE_SHARD_COLUMNS if c in batch.column_names])


_PLANS: dict[str, dict[str, tuple[str, str]]] = {}


def _plan_lookup(plan) -> dict[str, tuple[str, str]]:
    """path -> (group, split) of a plan in the object store, fetched once per worker process."""
    import ray

    key = plan.hex()
    if key not in _PLANS:
        _PLANS.clear()
        table = ray.get(plan)
        _PLANS[key] = dict(zip(table["path"].to_pylist(), zip(table["group"].to_pylist(), table["split"].to_pylist())))
    return _PLANS[key]
