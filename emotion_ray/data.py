"""prepare: list -> read bytes -> decode -> split -> sharded Parquet + manifest + rejects.

Output layout (local folder or s3:// prefix):
    split=train/*.parquet, split=val/*.parquet, split=test/*.parquet
        columns: image (binary: image_size*image_size*3 uint8 RGB, row-major HWC),
                 label_index (int32), label (string), path (string), content_hash (sha256 hex)
    rejects.parquet   path, reason, detail: every file that could not be used
    manifest.json     written last: a dataset without it is incomplete and is never read

Splits come from the sha256 of each file's bytes mapped to [0, 1): deterministic, exact
duplicates always share a split, and adding files never moves existing ones.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import posixpath
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from emotion_ray import __version__, storage
from emotion_ray.config import ConfigError, PrepareConfig, StorageConfig
from emotion_ray.images import Decoded, has_image_extension, pixels_to_arrow, read_and_decode

MANIFEST = "manifest.json"
OWNER_MARKER = "_emotion_ray_dataset"
REJECTS = "rejects.parquet"
SPLITS = ("train", "val", "test")
REJECTED = "rejected"
IMAGE_FORMAT = "raw uint8 RGB, HWC, row-major"
BLOCK_BYTES = 64 * 1024**2
READ_TASK_BYTES = 128 * 1024**2  # pixels one read task of `load_split` reads (several shards if small)

ROW_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("label_index", pa.int32()),
        ("label", pa.string()),
        ("path", pa.string()),
        ("content_hash", pa.string()),
        ("split", pa.string()),
        ("reject_reason", pa.string()),
    ]
)


@dataclass
class Listing:
    """What the input roots hold: usable files with labels, and everything skipped, by reason."""

    files: list[dict[str, Any]] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)
    found: int = 0


def _full_uri(root: str, stripped_path: str) -> str:
    return ("s3://" + stripped_path) if storage.is_s3(root) else stripped_path


def list_labelled_files(cfg: PrepareConfig) -> Listing:
    """Walk every root; label files by their first folder; count what is skipped and why."""
    listing = Listing()
    unknown: Counter = Counter()
    for root in cfg.inputs:
        fs = storage.filesystem(root, cfg.storage)
        base = storage.strip_scheme(root)
        if not fs.isdir(base):
            raise ConfigError(f"input {root} is not a folder (or cannot be read)")
        for path in sorted(fs.find(base, withdirs=False)):
            listing.found += 1
            parts = posixpath.relpath(path, base).split("/")
            if any(part.startswith(".") for part in parts):
                listing.ignored["hidden"] += 1
            elif len(parts) < 2:
                listing.ignored["not_in_class_folder"] += 1
            elif not has_image_extension(parts[-1]):
                listing.ignored["not_an_image_extension"] += 1
            elif parts[0] not in cfg.classes:
                if cfg.classes_given:
                    listing.ignored["class_not_selected"] += 1
                else:
                    unknown[parts[0]] += 1
            else:
                listing.files.append(
                    {"path": _full_uri(root, path), "label": parts[0], "label_index": cfg.classes.index(parts[0])}
                )
    if unknown:
        raise ConfigError(
            f"found class folders {sorted(unknown)} that are not among the classes {cfg.classes}; "
            "list the classes to keep with --classes (others are then skipped and counted)"
        )
    present = {f["label"] for f in listing.files}
    missing = [c for c in cfg.classes if c not in present]
    if missing:
        raise ConfigError(f"no images found for class(es) {missing} under {cfg.inputs}")
    return listing


def split_of(content_hash: str, fractions: dict[str, float]) -> str:
    """Map a sha256 hex digest to a split: the first 64 bits as a fraction of [0, 1)."""
    point = int(content_hash[:16], 16) / 2**64
    edge = 0.0
    for name in SPLITS:
        edge += fractions[name]
        if point < edge:
            return name
    return SPLITS[-1] if fractions[SPLITS[-1]] > 0 else "train"  # float rounding at the top edge


def decode_files(paths: list[str], image_size: int, max_pixels: int, max_file_bytes: int,
                 storage_cfg: StorageConfig) -> list[tuple[bytes | None, Decoded]]:
    """Read and decode each file (local, `s3://` or an archive member): its bytes (None when
    unreadable) and the decode result. Prepare and score both decode through here."""
    return [
        read_and_decode(lambda: storage.read_bytes(path, storage_cfg), image_size,
                        max_pixels=max_pixels, max_file_bytes=max_file_bytes)
        for path in paths
    ]


def decode_batch(
    batch: pa.Table,
    image_size: int,
    fractions: dict[str, float],
    max_pixels: int,
    max_file_bytes: int,
    storage_cfg: StorageConfig,
) -> pa.Table:
    """Ray Data UDF: read and decode a batch of listed files. Bad files become reject rows."""
    pixels, digests, splits, reasons = [], [], [], []
    for data, decoded in decode_files(batch["path"].to_pylist(), image_size, max_pixels, max_file_bytes, storage_cfg):
        digest = hashlib.sha256(data).hexdigest() if data is not None else None
        pixels.append(decoded.pixels)
        digests.append(digest)
        splits.append(split_of(digest, fractions) if decoded.pixels is not None else REJECTED)
        reasons.append(decoded.error)
    columns = [pixels_to_arrow(pixels),
               pa.array(batch["label_index"].to_pylist(), pa.int32()),
               pa.array(batch["label"].to_pylist(), pa.string()),
               pa.array(batch["path"].to_pylist(), pa.string()),
               pa.array(digests, pa.string()), pa.array(splits, pa.string()), pa.array(reasons, pa.string())]
    return pa.Table.from_arrays(columns, schema=ROW_SCHEMA)


def _claim_output(cfg: PrepareConfig) -> None:
    """Make `output` ours and empty. Never deletes anything that emotion_ray did not write."""
    names = storage.claim_folder(cfg.output, OWNER_MARKER, "prepare", cfg.storage)
    if MANIFEST in names and not cfg.overwrite:
        raise ConfigError(f"output {cfg.output} already holds a prepared dataset; pass --overwrite to replace it")
    # Manifest first, so a crash mid-cleanup never leaves a complete-looking dataset.
    for name in [n for n in names if n == MANIFEST] + [n for n in names if n not in (MANIFEST, OWNER_MARKER)]:
        storage.remove(storage.join(cfg.output, name), cfg.storage, recursive=True)


def _summarise(cfg: PrepareConfig, listing: Listing) -> dict[str, Any]:
    """Count what was written (Arrow aggregations over the small columns only: no pixels, no
    per-row Python objects), move rejects into rejects.parquet, and build the manifest."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    fs = storage.pyarrow_filesystem(cfg.output, cfg.storage)
    base = storage.strip_scheme(cfg.output)

    def shard_files(split: str) -> list[str]:
        info = fs.get_file_info(pa.fs.FileSelector(f"{base}/split={split}", allow_not_found=True, recursive=True))
        return sorted(i.path for i in info if i.type == pa.fs.FileType.File and i.path.endswith(".parquet"))

    def read(files: list[str], columns: list[str]) -> pa.Table:
        return pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns)

    shards = {split: shard_files(split) for split in SPLITS}
    counts = {s: {c: 0 for c in cfg.classes} for s in SPLITS}
    kept_tables = []
    for split in SPLITS:
        if shards[split]:
            t = read(shards[split], ["label", "content_hash"])
            for row in t.group_by("label").aggregate([("label", "count")]).to_pylist():
                counts[split][row["label"]] = row["label_count"]
            kept_tables.append(t)
    kept = pa.concat_tables(kept_tables) if kept_tables else pa.table({"label": pa.array([], pa.string()),
                                                                         "content_hash": pa.array([], pa.string())})
    groups = kept.group_by("content_hash").aggregate([("label", "count"), ("label", "count_distinct")])
    dup_groups = groups.filter(pc.greater(groups["label_count"], 1))

    rejected_files = shard_files(REJECTED)
    if rejected_files:
        r = read(rejected_files, ["path", "reject_reason"])
        detail = r["reject_reason"]
        reason = pc.list_element(pc.split_pattern(detail, ":", max_splits=1), 0)
        reject_table = pa.table({"path": r["path"], "reason": reason, "detail": detail})
    else:
        reject_table = pa.table({n: pa.array([], pa.string()) for n in ("path", "reason", "detail")})
    with fs.open_output_stream(f"{base}/{REJECTS}") as out:
        pq.write_table(reject_table, out)
    # The rejected partition only carried reject rows through the one streaming pass.
    storage.remove(storage.join(cfg.output, f"split={REJECTED}"), cfg.storage, recursive=True)

    rel = lambda p: posixpath.relpath(p, base)  # noqa: E731
    return {
        "format_version": 1,
        "written_by": f"emotion_ray {__version__}",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "classes": cfg.classes,
        "image_size": cfg.image_size,
        "image_format": IMAGE_FORMAT,
        "split_fractions": cfg.splits,
        "split_method": "sha256(file bytes)[:16 hex] / 2**64 against cumulative train, val, test fractions",
        "sources": cfg.inputs,
        "files_found": listing.found,
        "rows": kept.num_rows,
        "counts": counts,
        "split_rows": {s: sum(counts[s].values()) for s in SPLITS},
        "duplicates": {
            "duplicate_rows": int(pc.sum(pc.subtract(dup_groups["label_count"], 1)).as_py() or 0),
            "groups": dup_groups.num_rows,
            "groups_with_conflicting_labels": int(pc.sum(pc.greater(dup_groups["label_count_distinct"], 1)).as_py() or 0),
        },
        "rejects": {"count": reject_table.num_rows,
                    "by_reason": dict(Counter(reject_table["reason"].to_pylist()))},
        "ignored": {"count": sum(listing.ignored.values()), "by_reason": dict(listing.ignored)},
        "shards": {s: [rel(p) for p in shards[s]] for s in SPLITS},
    }


def listing_dataset(files: pa.Table, image_size: int):
    """A Ray Dataset over listed files, in blocks sized for decoding.

    Blocks hold ~64 MiB of decoded pixels: big enough that per-task overhead vanishes (this
    doubled throughput against 64-row blocks in bench/prepare.py), small enough to stream;
    and there are at least two per CPU so every core stays busy. The blocks are built
    directly, with no shuffle stage.
    """
    import ray

    n = files.num_rows
    rows_per_block = max(16, min(1000, BLOCK_BYTES // (image_size**2 * 3)))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    num_blocks = max(1, min(n, max(cpus * 2, math.ceil(n / rows_per_block))))
    step = math.ceil(n / num_blocks)
    return ray.data.from_arrow([files.slice(i, step) for i in range(0, n, step)])


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the prepare stage; returns the manifest. The input trees are only ever read."""
    from emotion_ray.runtime import init_ray

    listing = list_labelled_files(cfg)
    _claim_output(cfg)
    init_ray()

    # Shards in folder order would hold one class each; training streams shards with only a
    # local shuffle buffer, so mix the order once here (seeded: prepare stays deterministic).
    random.Random(0).shuffle(listing.files)
    ds = listing_dataset(pa.Table.from_pylist(listing.files), cfg.image_size)
    ds = ds.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=32,
        fn_kwargs={
            "image_size": cfg.image_size,
            "fractions": cfg.splits,
            "max_pixels": cfg.max_pixels,
            "max_file_bytes": cfg.max_file_bytes,
            "storage_cfg": cfg.storage,
        },
    )
    ds.write_parquet(
        storage.strip_scheme(cfg.output) if storage.is_s3(cfg.output) else cfg.output,
        filesystem=storage.pyarrow_filesystem(cfg.output, cfg.storage),
        partition_cols=["split"],
        max_rows_per_file=cfg.rows_per_shard,
    )
    manifest = _summarise(cfg, listing)
    storage.write_json_atomic(storage.join(cfg.output, MANIFEST), manifest, cfg.storage)
    return manifest


def read_manifest(dataset_uri: str, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    uri = storage.join(dataset_uri, MANIFEST)
    if not storage.exists(uri, storage_cfg):
        raise ConfigError(f"{dataset_uri} is not a complete prepared dataset (no {MANIFEST}); run `emotion-ray prepare`")
    return storage.read_json(uri, storage_cfg)


def is_prepared(dataset_uri: str, storage_cfg: StorageConfig | None = None) -> bool:
    return storage.exists(storage.join(dataset_uri, MANIFEST), storage_cfg)


def load_split(dataset_uri: str, split: str, storage_cfg: StorageConfig | None = None):
    """A Ray Dataset of one split's (image, label_index) rows, streamed from its shards."""
    import ray

    manifest = read_manifest(dataset_uri, storage_cfg)
    files = [storage.strip_scheme(storage.join(dataset_uri, rel)) for rel in manifest["shards"][split]]
    if not files:
        raise ConfigError(f"split {split!r} of {dataset_uri} is empty; add images or change the split fractions")
    # Ray starts one read task per shard by default, and each costs ~20 ms of CPU beyond the
    # reading: half of a streamed epoch's CPU on 160 shards of 5 MB. Group small shards into
    # tasks of ~READ_TASK_BYTES of pixels (bench/RESULTS.md, train).
    split_bytes = manifest["split_rows"][split] * manifest["image_size"] ** 2 * 3
    read_tasks = min(len(files), max(1, math.ceil(split_bytes / READ_TASK_BYTES)))
    # The manifest already names every shard, so skip the V2 Parquet reader: it lists the files
    # again in a task each time the dataset runs, and a training epoch streamed from Ray Data
    # took 5.5 s with it against 2.2 s without (bench/RESULTS.md, train).
    context = ray.data.DataContext.get_current()
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(
            files, filesystem=storage.pyarrow_filesystem(dataset_uri, storage_cfg), columns=["image", "label_index"],
            override_num_blocks=read_tasks,
        )
    finally:
        context.use_datasource_v2 = use_v2
