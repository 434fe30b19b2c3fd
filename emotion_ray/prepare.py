"""prepare: list -> read bytes -> decode -> split -> sharded Parquet + manifest + rejects (writes a dataset).

Output layout (local folder or s3:// prefix):
    data/split=train/*.parquet, data/split=val/*.parquet, data/split=test/*.parquet
        columns: image (binary: image_size*image_size*3 uint8 RGB, row-major HWC),
                 label_index (int32), label (string), path (string), content_hash (sha256 hex),
                 group (the row's group key), phash (uint64 pHash of its picture; null when off)
        data/ holds only Parquet (hive-partitioned by split): any Parquet reader reads it or a split
        folder. Datasets from before data/ hold split=*/ at the top; readers go by the manifest's
        shard list, which names either.
    rejects.parquet   path, reason, detail: every file that could not be used
    skipped.parquet   path, reason: every file found that is not an input (hidden, not an image, ...)
    manifest.json     written last: a dataset without it is incomplete and is never read

Splits come from a sha256 mapped to [0, 1): of each file's bytes, or with grouping (groups.py:
near-duplicates, group_pattern, group_file) of each group's canonical key, so a group never
straddles splits. Deterministic; exact duplicates always share a split; adding files never moves
a picture that joins no group. Grouping needs every picture's hashes before any split is known:
the decoded rows are held (Ray's object store, spilled to disk when large) while the driver
groups the small (path, sha256, pHash) columns, then written. Without grouping
(near_duplicate_distance 0, no group_pattern or group_file) rows stream straight to the shards.
"""

from __future__ import annotations

import datetime as dt
import logging
import posixpath
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from emotion_ray import __version__, console, groups, outputs, runtime, sources, storage
from emotion_ray.config import PrepareConfig
from emotion_ray.dataset import MANIFEST, SPLITS
from emotion_ray.errors import ConfigError
from emotion_ray.prepare_tasks import REJECTED, decode_and_split, decode_rows, split_of, with_split

log = logging.getLogger(__name__)

OWNER_MARKER = "_emotion_ray_dataset"
REJECTS = "rejects.parquet"
SKIPPED = "skipped.parquet"
IMAGE_FORMAT = "raw uint8 RGB, HWC, row-major"
DECODE_BATCH = 32
# A class with fewer rows than this trains badly and makes its test figures noise: prepare warns.
MIN_CLASS_ROWS = 20
# Every name prepare writes (a marker from before ownership lists owns only these).
WRITTEN_NAMES = ["split=*", REJECTS, SKIPPED, MANIFEST]  # (before data/, splits were at the top)
PARQUET_DIR = outputs.PARQUET_DIR


@dataclass
class Listing:
    """What the input roots hold: usable files with labels, and everything skipped, with why."""

    files: list[dict[str, Any]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    ignored: sources.Skipped = field(default_factory=sources.Skipped)
    found: int = 0
    # URI -> (its real name, path relative to its input root, path within its class folder), all
    # unescaped (storage.unescape): what group keys read.
    names: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    # split_by folder: the inputs with no val/ folder, whose train/ files prepare splits into train and val.
    val_from_train: list[str] = field(default_factory=list)


def list_labelled_files(cfg: PrepareConfig) -> Listing:
    """Walk every root; label files by their first folder (with split_by folder: the split's
    folder, then the class's); count what is skipped and why. With split_by folder, the train/
    files of a root with no val/ file get a null given split (their sha256 point, cut by
    cfg.split_fractions, makes them train or val) and the root is listed in `val_from_train`.

    Classes: `cfg.classes` matched case-insensitively against the folders (others are skipped
    as class_not_selected), or when unset every class folder found, sorted (as Keras'
    image_dataset_from_directory does); folders differing only in case are one class, spelt
    as the first of them. Raises ConfigError for fewer than two classes or a class with no file.
    """
    listing = Listing()
    candidates: list[tuple[str, str, str | None, str, str]] = []  # (uri, class folder, split, relative, in class)
    by_folder = cfg.split_by == "folder"
    for root in cfg.inputs:
        first = len(candidates)
        if not storage.filesystem(root, cfg.storage).isdir(storage.strip_scheme(root)):
            raise ConfigError(f"input {root} is not a folder (or cannot be read)")
        for relative, uri in sources.walk_folder(root, cfg.storage):
            listing.found += 1
            parts = [p for p in relative.split("/") if p not in ("", ".")]
            reason = sources.skip_reason(relative)
            split = None
            if not reason and by_folder:
                split, parts = parts[0], parts[1:]
                if split not in SPLITS:
                    reason = "not_in_split_folder"
            if reason:
                listing.ignored.add(uri, reason)
            elif len(parts) < 2:
                listing.ignored.add(uri, "not_in_class_folder")
            else:
                candidates.append((uri, parts[0], split, relative, "/".join(parts[1:])))
        if by_folder and not any(c[2] == "val" for c in candidates[first:]):
            # Kaggle's layout (train/ and test/ only): validation comes out of train/, by group.
            listing.val_from_train.append(root)
            candidates[first:] = [(u, f, None if split == "train" else split, r, i)
                                  for u, f, split, r, i in candidates[first:]]
    if cfg.classes is None:
        spelling: dict[str, str] = {}
        for folder in sorted({candidate[1] for candidate in candidates}):
            spelling.setdefault(folder.lower(), folder)
        classes = sorted(spelling.values())
    else:
        classes = list(cfg.classes)
    if len(classes) < 2:
        raise ConfigError(f"need at least two class folders under {cfg.inputs}, found {classes}")
    by_name = {c.lower(): i for i, c in enumerate(classes)}
    for uri, folder, split, relative, in_class in candidates:
        index = by_name.get(folder.lower())
        if index is None:
            listing.ignored.add(uri, "class_not_selected")
            continue
        listing.names[uri] = (storage.unescape(uri), storage.unescape(relative), storage.unescape(in_class))
        row = {"path": uri, "label": classes[index], "label_index": index}
        listing.files.append({**row, "given_split": split} if by_folder else row)
    present = {f["label"] for f in listing.files}
    missing = [c for c in classes if c not in present]
    if missing:
        raise ConfigError(f"no images found for class(es) {missing} under {cfg.inputs}")
    listing.classes = classes
    return listing


def _claim_output(cfg: PrepareConfig) -> None:
    """Make `output` ours and clear what an earlier prepare wrote there: only the names its
    marker lists (a user's files beside them stay). Refuses an output that overlaps an input."""
    names = outputs.claim_folder(cfg.output, OWNER_MARKER, "prepare", cfg.storage, inputs=cfg.inputs,
                                 legacy_names=WRITTEN_NAMES)
    if MANIFEST in names and not cfg.overwrite:
        raise ConfigError(f"output {cfg.output} already holds a prepared dataset; pass --overwrite to replace it")
    # Manifest first, so a crash mid-cleanup never leaves a complete-looking dataset.
    outputs.remove_owned(cfg.output, OWNER_MARKER, cfg.storage, first=[MANIFEST])
    # Recorded before writing, so a crash leaves them ours to delete next time.
    outputs.record_written(cfg.output, OWNER_MARKER, [PARQUET_DIR, REJECTS, SKIPPED, MANIFEST], cfg.storage)


def _summarise(cfg: PrepareConfig, listing: Listing) -> dict[str, Any]:
    """Count what was written (Arrow aggregations over the small columns only: no pixels, no
    per-row Python objects), move rejects into rejects.parquet, list the ignored files in
    skipped.parquet, and build the manifest."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs = storage.pyarrow_filesystem(cfg.output, cfg.storage)
    base = storage.strip_scheme(cfg.output)

    def shard_files(split: str) -> list[str]:
        info = fs.get_file_info(pa.fs.FileSelector(f"{base}/{PARQUET_DIR}/split={split}", allow_not_found=True,
                                                   recursive=True))
        return sorted(i.path for i in info if i.type == pa.fs.FileType.File and i.path.endswith(".parquet"))

    def read(files: list[str], columns: list[str]) -> pa.Table:
        return pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns)

    shards = {split: shard_files(split) for split in SPLITS}
    counts = {s: {c: 0 for c in cfg.classes} for s in SPLITS}
    kept_tables = []
    for split in SPLITS:
        if shards[split]:
            t = read(shards[split], ["label", "content_hash", "path"])
            t = t.append_column("split", pa.array([split] * t.num_rows, pa.string()))
            for row in t.group_by("label").aggregate([("label", "count")]).to_pylist():
                counts[split][row["label"]] = row["label_count"]
            kept_tables.append(t)
    kept = pa.concat_tables(kept_tables) if kept_tables else pa.table(
        {n: pa.array([], pa.string()) for n in ("label", "content_hash", "path")})
    empty = [c for c in cfg.classes if not any(counts[s][c] for s in SPLITS)]
    if empty:
        raise ConfigError(f"class(es) {empty} have no usable image after decoding (see {REJECTS} in {cfg.output} "
                          "for why each file was rejected); the dataset was not completed")
    # A picture's faces share its file: duplicates are files (paths) with the same bytes.
    groups = kept.group_by("content_hash").aggregate([("path", "count_distinct"), ("label", "count_distinct"),
                                                      ("split", "count_distinct")])
    dup_groups = groups.filter(pc.greater(groups["path_count_distinct"], 1))

    rejected_files = shard_files(REJECTED)
    if rejected_files:
        r = read(rejected_files, ["path", "reject_reason"])
        detail = r["reject_reason"]
        reason = pc.list_element(pc.split_pattern(detail, ":", max_splits=1), 0)
        reject_table = pa.table({"path": r["path"], "reason": reason, "detail": detail})
    else:
        reject_table = pa.table({n: pa.array([], pa.string()) for n in ("path", "reason", "detail")})
    storage.write_parquet_atomic(storage.join(cfg.output, REJECTS), reject_table, cfg.storage)
    storage.write_parquet_atomic(storage.join(cfg.output, SKIPPED), listing.ignored.table(), cfg.storage)
    # The rejected partition only carried reject rows through the one streaming pass.
    storage.remove(storage.join(cfg.output, PARQUET_DIR, f"split={REJECTED}"), cfg.storage, recursive=True)

    rel = lambda p: posixpath.relpath(p, base)  # noqa: E731
    return {
        "format_version": 1,
        "written_by": f"emotion_ray {__version__}",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "classes": cfg.classes,
        "image_size": cfg.image_size,
        "image_format": IMAGE_FORMAT,
        "split_fractions": cfg.split_fractions,
        "split_method": (("the inputs' train/val/test folders" + (
            f"; the train/ folder of {', '.join(listing.val_from_train)} (no val/ folder) split into train and "
            f"val ({cfg.val_from_train:g} of its groups) as hash splits are" if listing.val_from_train else ""))
                         if cfg.split_by == "folder" else
                         "per group (exact and near-duplicates, group keys): sha256(its smallest group_pattern/"
                         "group_file key, else its smallest file sha256 hex; a lone file: its bytes)[:16 hex] / "
                         "2**64 against cumulative train, val, test fractions" if cfg.grouping else
                         "sha256(file bytes)[:16 hex] / 2**64 against cumulative train, val, test fractions"),
        "sources": cfg.inputs,
        **({"val_from_train": listing.val_from_train} if cfg.split_by == "folder" else {}),
        "files_found": listing.found,
        "rows": kept.num_rows,
        "counts": counts,
        "split_rows": {s: sum(counts[s].values()) for s in SPLITS},
        "duplicates": {
            "duplicate_rows": int(pc.sum(pc.subtract(dup_groups["path_count_distinct"], 1)).as_py() or 0),
            "groups": dup_groups.num_rows,
            "groups_with_conflicting_labels": int(pc.sum(pc.greater(dup_groups["label_count_distinct"], 1)).as_py() or 0),
            # Only given splits (split_by folder) can put one picture's bytes in two splits: a leak.
            "groups_across_splits": int(pc.sum(pc.greater(dup_groups["split_count_distinct"], 1)).as_py() or 0),
        },
        "rejects": {"count": reject_table.num_rows,
                    "by_reason": dict(Counter(reject_table["reason"].to_pylist()))},
        "ignored": {"count": len(listing.ignored), "by_reason": listing.ignored.counts(), "listed_in": SKIPPED},
        "shards": {s: [rel(p) for p in shards[s]] for s in SPLITS},
        "small_classes": {c: n for c in cfg.classes if (n := sum(counts[s][c] for s in SPLITS)) < MIN_CLASS_ROWS},
        # The margin as used, not None: a model keeps its crops' framing if a detector's default moves.
        **({"faces": {**cfg.faces.model_dump(), "margin": cfg.faces.crop_margin,
                      "pictures_by_faces": _pictures_by_faces(kept, reject_table)}}
           if cfg.faces.enabled else {}),
    }


def _pictures_by_faces(kept: pa.Table, rejects: pa.Table) -> dict[str, int]:
    """How many pictures gave 0, 1 and several faces (0: rejected as no_face, or kept whole)."""
    faces = Counter(kept["path"].to_pylist())
    no_face = sum(1 for r in rejects["reason"].to_pylist() if r == "no_face")
    return {"0": no_face, "1": sum(1 for n in faces.values() if n == 1), "2+": sum(1 for n in faces.values() if n > 1)}


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the prepare stage; returns the manifest. The input trees are only ever read."""
    file_groups = read_group_file(cfg)  # a bad CSV fails before any listing or cluster work
    listing = list_labelled_files(cfg)
    cfg = cfg.model_copy(update={"classes": listing.classes})  # as found (or given), in label_index order
    keys = groups.user_keys(listing.names, cfg.group_pattern, file_groups)
    outputs.check_apart(cfg.output, cfg.inputs)  # before the lock creates the folder
    with outputs.OutputLock(cfg.output, f"prepare --output {cfg.output}", cfg.storage) as lock:
        _claim_output(cfg)
        console.keep_log_in(cfg.output)  # ours now: the CLI's log moves in
        runtime.init_ray()
        sources.check_decode_fits(DECODE_BATCH, cfg.image_size, cfg.faces, runtime.node_capacities())
        with console.remote_progress(len(listing.files), "decoding", "file") as progress:
            manifest = _write_dataset(cfg, listing, keys, progress)
        lock.check()  # still ours: another run did not take the output over while this one stalled
        storage.write_json_atomic(storage.join(cfg.output, MANIFEST), manifest, cfg.storage)
    return manifest


def read_group_file(cfg: PrepareConfig) -> dict[str, str] | None:
    """`group_file`'s path -> group rows (groups.read_group_file), or ConfigError naming the problem."""
    if cfg.group_file is None:
        return None
    try:
        data = storage.read_bytes(cfg.group_file, cfg.storage)
    except FileNotFoundError:
        raise ConfigError(f"group_file {cfg.group_file} not found") from None
    except OSError as exc:
        raise ConfigError(f"group_file {cfg.group_file} cannot be read: {exc}") from None
    try:
        return groups.read_group_file(data, cfg.group_file)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _write_dataset(cfg: PrepareConfig, listing: Listing, keys: groups.UserKeys, progress=None) -> dict[str, Any]:
    """Decode, split and shard every listed file into `cfg.output`; returns the manifest to write.
    `progress`: a console.Tally handle the decode tasks count files into, or None."""
    import ray

    # Shards in folder order would hold one class each; training streams shards with only a
    # local shuffle buffer, so mix the order once here (seeded: prepare stays deterministic).
    random.Random(0).shuffle(listing.files)
    ds = sources.listing_dataset(pa.Table.from_pylist(listing.files), cfg.image_size)
    runtime.share_resources_between_operators(ds)
    decode = dict(batch_format="pyarrow", batch_size=DECODE_BATCH,
                  fn_kwargs={"cfg": cfg.model_copy(update={"inputs": ["-"]}),  # the listing travels as data
                             "progress": progress},
                  memory=sources.decode_task_memory(DECODE_BATCH, cfg.image_size, cfg.faces))
    if cfg.grouping:
        decoded = ds.map_batches(decode_rows, **decode).materialize()
        plan = _plan_groups(cfg, decoded, keys)
        ds = decoded.map_batches(with_split, batch_format="pyarrow",
                                 fn_kwargs={"fractions": cfg.split_fractions, "plan": ray.put(plan.table)})
    else:
        ds = ds.map_batches(decode_and_split, **decode)
    data = storage.join(cfg.output, PARQUET_DIR)
    ds.write_parquet(
        storage.strip_scheme(data) if storage.is_s3(data) else data,
        filesystem=storage.pyarrow_filesystem(cfg.output, cfg.storage),
        partition_cols=["split"],
        # Decoding blocks are sized for decoding (~64 MiB, fewer rows at small image sizes); the
        # files are made of blocks gathered up to shard_bytes. (min_rows_per_file with
        # partition_cols is deprecated in this Ray.)
        min_bytes_per_file=cfg.shard_bytes,
    )
    manifest = _summarise(cfg, listing)
    manifest["groups"] = {"near_duplicate_distance": cfg.near_duplicate_distance, "group_pattern": cfg.group_pattern,
                          "group_file": cfg.group_file, **(plan.stats if cfg.grouping else {}),
                          **({"group_file_rows_unmatched": keys.file_rows_unmatched} if cfg.group_file else {})}
    if cfg.grouping and cfg.split_by == "folder" and plan.stats["groups_across_splits"]:
        log.warning("%d groups (near-duplicates or one group key) cross the given train/val/test folders: test "
                    "figures may measure memory (manifest.json, groups)", plan.stats["groups_across_splits"])
    return manifest


@dataclass
class Plan:
    table: pa.Table  # path, group, split: one row per kept picture
    stats: dict[str, Any]


def _plan_groups(cfg: PrepareConfig, decoded, keys: groups.UserKeys) -> Plan:
    """Group the decoded pictures (groups.plan_groups) from their small columns, gathered on the
    driver: one row per kept picture (a picture's faces share its path)."""
    import pyarrow.compute as pc
    import ray

    columns = ["path", "content_hash", "error"] + [c for c in ("phash", "given_split") if c in decoded.columns()]
    small = pa.concat_tables(ray.get(decoded.select_columns(columns).to_arrow_refs()))
    small = small.filter(pc.is_null(small["error"]))
    # One row per picture; sorted so the plan never depends on the order Ray returned blocks in.
    small = small.group_by("path", use_threads=False).aggregate([(c, "first") for c in columns if c not in ("path", "error")])
    small = small.rename_columns([c.removesuffix("_first") for c in small.column_names]).sort_by("path")
    column = lambda name: small[name].to_pylist() if name in small.column_names else None  # noqa: E731
    phashes = column("phash") or [None] * small.num_rows
    made = groups.plan_groups(column("path"), column("content_hash"), phashes, keys.by_path,
                              cfg.near_duplicate_distance, lambda digest: split_of(digest, cfg.split_fractions),
                              given_splits=column("given_split"))
    paths = column("path")
    table = pa.table({"path": paths, "group": [made.group[p] for p in paths], "split": [made.split[p] for p in paths]})
    return Plan(table, made.stats)
