"""prepare: list -> read bytes -> decode -> split -> sharded Parquet + manifest + rejects (writes a dataset).

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
import posixpath
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from emotion_ray import __version__, console, outputs, sources, storage
from emotion_ray.config import PrepareConfig
from emotion_ray.dataset import MANIFEST, SPLITS
from emotion_ray.errors import ConfigError

OWNER_MARKER = "_emotion_ray_dataset"
REJECTS = "rejects.parquet"
REJECTED = "rejected"
IMAGE_FORMAT = "raw uint8 RGB, HWC, row-major"
DECODE_BATCH = 32
# The columns a shard holds, in order (`split` becomes the folder, `error` goes to rejects).
# A class with fewer rows than this trains badly and makes its test figures noise: prepare warns.
MIN_CLASS_ROWS = 20
# Every name prepare writes (a marker from before ownership lists owns only these).
WRITTEN_NAMES = ["split=*", REJECTS, MANIFEST]
SHARD_COLUMNS = ["image", "label_index", "label", "path", "content_hash", "split", "reject_reason"]
FACE_SHARD_COLUMNS = ["face_index", "box_x", "box_y", "box_w", "box_h", "face_score"]  # with faces on


@dataclass
class Listing:
    """What the input roots hold: usable files with labels, and everything skipped, by reason."""

    files: list[dict[str, Any]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)
    found: int = 0


def list_labelled_files(cfg: PrepareConfig) -> Listing:
    """Walk every root; label files by their first folder (with split_by folder: the split's
    folder, then the class's); count what is skipped and why.

    Classes: `cfg.classes` matched case-insensitively against the folders (others are skipped
    as class_not_selected), or when unset every class folder found, sorted (as Keras'
    image_dataset_from_directory does); folders differing only in case are one class, spelt
    as the first of them. Raises ConfigError for fewer than two classes or a class with no file.
    """
    listing = Listing()
    candidates: list[tuple[str, str, str | None]] = []  # (uri, class folder, given split)
    by_folder = cfg.split_by == "folder"
    for root in cfg.inputs:
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
                listing.ignored[reason] += 1
            elif len(parts) < 2:
                listing.ignored["not_in_class_folder"] += 1
            else:
                candidates.append((uri, parts[0], split))
    if cfg.classes is None:
        spelling: dict[str, str] = {}
        for folder in sorted({folder for _, folder, _ in candidates}):
            spelling.setdefault(folder.lower(), folder)
        classes = sorted(spelling.values())
    else:
        classes = list(cfg.classes)
    if len(classes) < 2:
        raise ConfigError(f"need at least two class folders under {cfg.inputs}, found {classes}")
    by_name = {c.lower(): i for i, c in enumerate(classes)}
    for uri, folder, split in candidates:
        index = by_name.get(folder.lower())
        if index is None:
            listing.ignored["class_not_selected"] += 1
            continue
        row = {"path": uri, "label": classes[index], "label_index": index}
        listing.files.append({**row, "given_split": split} if by_folder else row)
    present = {f["label"] for f in listing.files}
    missing = [c for c in classes if c not in present]
    if missing:
        raise ConfigError(f"no images found for class(es) {missing} under {cfg.inputs}")
    listing.classes = classes
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


def decode_and_split(batch: pa.Table, cfg: PrepareConfig, progress=None) -> pa.Table:
    """Ray Data UDF: decode listed files (sources.decode_table: faces too, when on) and give
    each row its split (or `rejected`), in shard column order; counts the files into `progress`
    (a console.Tally handle) when given."""
    decoded = sources.decode_table(batch, cfg.image_size, cfg.decode_limits(), cfg.storage, cfg.faces, one_thread=True,
                                   hash_files=True)  # splits and duplicates come from the bytes' hash
    if progress is not None:
        progress.add.remote(batch.num_rows)
    return with_split(decoded, cfg.splits)


def with_split(batch: pa.Table, fractions: dict[str, float]) -> pa.Table:
    """Each decoded row's split (or `rejected`), in shard column order."""
    decoded = batch["image"].is_valid().to_pylist()
    given = batch["given_split"].to_pylist() if "given_split" in batch.column_names else [None] * batch.num_rows
    splits = [(split or split_of(digest, fractions)) if ok else REJECTED
              for digest, ok, split in zip(batch["content_hash"].to_pylist(), decoded, given)]
    batch = batch.append_column("split", pa.array(splits, pa.string()))
    batch = batch.append_column("reject_reason", batch["error"])
    return batch.select(SHARD_COLUMNS + [c for c in FACE_SHARD_COLUMNS if c in batch.column_names])


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
    outputs.record_written(cfg.output, OWNER_MARKER, [f"split={s}" for s in (*SPLITS, REJECTED)]
                           + [REJECTS, MANIFEST], cfg.storage)


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
        "split_method": ("the inputs' train/val/test folders" if cfg.split_by == "folder" else
                         "sha256(file bytes)[:16 hex] / 2**64 against cumulative train, val, test fractions"),
        "sources": cfg.inputs,
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
        "ignored": {"count": sum(listing.ignored.values()), "by_reason": dict(listing.ignored)},
        "shards": {s: [rel(p) for p in shards[s]] for s in SPLITS},
        "small_classes": {c: n for c in cfg.classes if (n := sum(counts[s][c] for s in SPLITS)) < MIN_CLASS_ROWS},
        **({"faces": {**cfg.faces.model_dump(), "pictures_by_faces": _pictures_by_faces(kept, reject_table)}}
           if cfg.faces.enabled else {}),
    }


def _pictures_by_faces(kept: pa.Table, rejects: pa.Table) -> dict[str, int]:
    """How many pictures gave 0, 1 and several faces (0: rejected as no_face, or kept whole)."""
    faces = Counter(kept["path"].to_pylist())
    no_face = sum(1 for r in rejects["reason"].to_pylist() if r == "no_face")
    return {"0": no_face, "1": sum(1 for n in faces.values() if n == 1), "2+": sum(1 for n in faces.values() if n > 1)}


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the prepare stage; returns the manifest. The input trees are only ever read."""
    from emotion_ray import runtime

    listing = list_labelled_files(cfg)
    cfg = cfg.model_copy(update={"classes": listing.classes})  # as found (or given), in label_index order
    outputs.check_apart(cfg.output, cfg.inputs)  # before the lock creates the folder
    with outputs.OutputLock(cfg.output, f"prepare --output {cfg.output}", cfg.storage) as lock:
        _claim_output(cfg)
        console.keep_log_in(cfg.output)  # ours now: the CLI's log moves in
        runtime.init_ray()
        sources.check_decode_fits(DECODE_BATCH, cfg.image_size, cfg.faces, runtime.node_capacities())
        with console.remote_progress(len(listing.files), "decoding", "file") as progress:
            manifest = _write_dataset(cfg, listing, progress)
        lock.check()  # still ours: another run did not take the output over while this one stalled
        storage.write_json_atomic(storage.join(cfg.output, MANIFEST), manifest, cfg.storage)
    return manifest


def _write_dataset(cfg: PrepareConfig, listing: Listing, progress=None) -> dict[str, Any]:
    """Decode, split and shard every listed file into `cfg.output`; returns the manifest to write.
    `progress`: a console.Tally handle the decode tasks count files into, or None."""
    # Shards in folder order would hold one class each; training streams shards with only a
    # local shuffle buffer, so mix the order once here (seeded: prepare stays deterministic).
    random.Random(0).shuffle(listing.files)
    ds = sources.listing_dataset(pa.Table.from_pylist(listing.files), cfg.image_size)
    ds = ds.map_batches(decode_and_split, batch_format="pyarrow", batch_size=DECODE_BATCH,
                        fn_kwargs={"cfg": cfg.model_copy(update={"inputs": ["-"]}),  # the listing travels as data
                                   "progress": progress},
                        memory=sources.decode_task_memory(DECODE_BATCH, cfg.image_size, cfg.faces))
    ds.write_parquet(
        storage.strip_scheme(cfg.output) if storage.is_s3(cfg.output) else cfg.output,
        filesystem=storage.pyarrow_filesystem(cfg.output, cfg.storage),
        partition_cols=["split"],
        max_rows_per_file=cfg.rows_per_shard,
    )
    return _summarise(cfg, listing)
