"""Inputs: what files a run sees, and reading + decoding them in Ray Data tasks.

Listing runs in the driver; `decode_table` is the Ray Data UDF that prepare and score (and
predict, in-process) map over listed paths. One skip rule serves every listing: hidden files
and folders, and files without an image extension, are listed with their reason (`Skipped`),
never silently lost. Listed paths are text as the `path` column writes them (storage.escape: a
name that is not UTF-8 is escaped, losslessly) and are read by their real names (read_listed).

Inputs: folders and `s3://` prefixes (`walk_folder`), zip and tar archives read in place
(members named by fsspec's chained URL, see storage.member_uri), and `.txt` files listing one
path per line (`#` comments and blank lines skipped).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa

from emotion_ray import storage
from emotion_ray.config import DecodeLimits, FaceConfig, StorageConfig
from emotion_ray.errors import ConfigError, StageError
from emotion_ray.images import (decode_image, has_image_extension, open_image, pixels_to_arrow, read_and_decode,
                                read_error, to_rgb_array)

log = logging.getLogger(__name__)

# Columns `decode_table` adds to a batch of listed paths.
DECODED_FIELDS = [("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()), ("error", pa.string()),
                  ("content_hash", pa.string())]
# With faces on, a row per face: where it is in the displayed picture, the detector's
# confidence, and how many faces its picture gave (a re-run checks a picture's rows are all there).
FACE_FIELDS = [("face_index", pa.int32()), ("box_x", pa.int32()), ("box_y", pa.int32()), ("box_w", pa.int32()),
               ("box_h", pa.int32()), ("face_score", pa.float32()), ("faces_in_picture", pa.int32())]
# A decode worker's own footprint; its batch's pixels come on top (see decode_task_memory).
DECODE_WORKER_MEMORY = 224 * 1024**2
# A detector in every decode worker (bench/RESULTS.md, faces: MTCNN brings TensorFlow).
DETECTOR_MEMORY = {"blazeface": 96 * 1024**2, "haar": 64 * 1024**2, "mtcnn": 896 * 1024**2}
BLOCK_BYTES = 64 * 1024**2


def skip_reason(relative_path: str) -> str | None:
    """Why a listed file is not an input (None: it is one). `relative_path` is '/'-separated,
    relative to the folder, prefix or archive root; `.` parts (`./happy/a.jpg`) are the folder itself."""
    parts = [p for p in relative_path.split("/") if p not in ("", ".")]
    if any(part.startswith(".") for part in parts):
        return "hidden"
    if not parts or not has_image_extension(parts[-1]):
        return "not_an_image_extension"
    return None


@dataclass
class Skipped:
    """Files the inputs hold that are not inputs, each with why (path as listed, reason): the
    counts by reason in a summary and the rows of its skipped.parquet come from this one list."""

    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str, reason: str) -> None:
        self.rows.append((path, reason))

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.rows))

    def table(self) -> pa.Table:
        return pa.table({"path": pa.array([p for p, _ in self.rows], pa.string()),
                         "reason": pa.array([r for _, r in self.rows], pa.string())})


def walk_folder(root: str, storage_cfg: StorageConfig) -> Iterator[tuple[str, str]]:
    """(path relative to `root`, full URI) of every file under a folder or `s3://` prefix, sorted;
    both as text for a `path` column (storage.escape: a name that is not UTF-8 is escaped).

    Local folder links are followed (a linked album is part of the tree), each real folder
    once: a link back up (`loop -> .`) neither hangs nor lists a file twice.
    """
    if not storage.is_s3(root):
        for relative, path in _walk_local(storage.strip_scheme(root)):
            yield storage.escape(relative), storage.escape(path)
        return
    fs = storage.filesystem(root, storage_cfg)
    base = storage.strip_scheme(root)
    for path in sorted(fs.find(base, withdirs=False)):
        yield storage.escape(posixpath.relpath(path, base)), storage.escape("s3://" + path)


def _walk_local(base: str) -> Iterator[tuple[str, str]]:
    seen: set[str] = set()
    found: list[tuple[str, str]] = []
    for folder, dirs, files in os.walk(base, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []  # a folder reached again through a link
            continue
        seen.add(real)
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path):  # a dangling link is no file
                found.append((os.path.relpath(path, base).replace(os.sep, "/"), path))
    yield from sorted(found)


def read_path_list(list_uri: str, storage_cfg: StorageConfig) -> tuple[list[str], Skipped]:
    """The paths a `.txt` list names (as listed: storage.as_listed): one per line, UTF-8 (a BOM
    is dropped), `#` comments and blank lines skipped, CRLF fine; a relative path is relative to
    the list's own folder. Lines that are not valid UTF-8 are skipped and listed
    (`undecodable_list_line`, the line's path escaped)."""
    fs = storage.filesystem(list_uri, storage_cfg)
    skipped = Skipped()
    folder = posixpath.dirname(list_uri) if storage.is_s3(list_uri) else os.path.dirname(os.path.abspath(list_uri))
    paths = []
    for raw in fs.cat_file(storage.strip_scheme(list_uri)).removeprefix(b"\xef\xbb\xbf").splitlines():
        line = raw.decode("utf-8", "surrogateescape").strip()
        if not line or line.startswith("#"):
            continue
        absolute = storage.is_s3(line) or line.startswith(("zip://", "tar://")) or os.path.isabs(line)
        path = storage.as_listed(line if absolute else storage.join(folder, line))
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.add(path, "undecodable_list_line")
            continue
        paths.append(path)
    return paths, skipped


def list_images(inputs: list[str], storage_cfg: StorageConfig) -> tuple[list[str], Skipped]:
    """Every image to score (as listed: escaped), sorted and de-duplicated, and what was skipped, with why.

    Folders and prefixes contribute their image files; zip and tar archives (.zip, .tar,
    .tar.gz, .tgz, ...) their image members, read in place. A `.txt` file contributes every
    path it lists, image extension or not, since the user named them. An archive that cannot
    be opened is skipped and counted, not fatal. Raises ConfigError for an input that does not exist.
    """
    paths: set[str] = set()
    skipped = Skipped()

    def add(relative: str, uri: str) -> None:
        reason = skip_reason(relative)
        if reason:
            skipped.add(uri, reason)
        else:
            paths.add(uri)

    for item in inputs:
        fs = storage.filesystem(item, storage_cfg)
        base = storage.strip_scheme(item)
        if item.endswith(".txt") and fs.isfile(base):
            listed, undecodable = read_path_list(item, storage_cfg)
            paths.update(listed)
            skipped.rows += undecodable.rows
        elif storage.archive_protocol(item) and fs.isfile(base):
            try:
                members = storage.archive_members(item, storage_cfg)
            except Exception as exc:  # noqa: BLE001 - a damaged archive is reported, not fatal
                log.warning("skipping archive %s: cannot read it (%s: %s)", item, type(exc).__name__, exc)
                skipped.add(storage.escape(item), "unreadable_archive")
                continue
            for member in members:
                add(member, storage.member_uri(item, member))
        elif fs.isdir(base):
            for relative, uri in walk_folder(item, storage_cfg):
                add(relative, uri)
        elif fs.isfile(base):
            paths.add(storage.escape(("s3://" if storage.is_s3(item) else "") + base))
        else:
            raise ConfigError(f"input {item} does not exist")
    return sorted(paths), skipped


def _given_bytes(batch: pa.Table) -> tuple[pa.Table, list[bytes | None]]:
    """`batch` without its optional `data` column, and that column's values (None: read the path)."""
    if "data" not in batch.column_names:
        return batch, [None] * batch.num_rows
    return batch.drop_columns(["data"]), batch["data"].to_pylist()


def _read(path: str, given: bytes | None, storage_cfg: StorageConfig, max_bytes: int):
    """A reader of one file's bytes that refuses, unread, a file declaring more than max_bytes."""
    if given is not None:
        return lambda: given
    return lambda: storage.read_listed(path, storage_cfg, max_bytes=max_bytes)


def _sha256(data: bytes | None, wanted: bool) -> str | None:
    return hashlib.sha256(data).hexdigest() if wanted and data is not None else None


def _phash(picture, wanted: bool) -> int | None:
    from emotion_ray.groups import perceptual_hash

    return perceptual_hash(picture) if wanted and picture is not None else None


def decode_table(batch: pa.Table, image_size: int, limits: DecodeLimits, storage_cfg: StorageConfig,
                 faces: FaceConfig | None = None, one_thread: bool = False, hash_files: bool = False,
                 perceptual_hash: bool = False) -> pa.Table:
    """Ray Data UDF: read and decode every `path` of `batch` (local, `s3://` or archive member;
    as listed, i.e. escaped: storage.as_listed).

    A `data` column (binary), where present and not null, holds a file's bytes already (the
    MLflow model receives images this way); it is dropped from the result.

    Returns `batch`'s columns plus `image` (binary, image_size² x 3 uint8 RGB, null on error),
    `width`/`height` (the displayed original's pixels), `error` (null, or "reason: detail") and
    `content_hash` (sha256 hex of the file's bytes with `hash_files`, which costs about a tenth of
    a JPEG's decode; else null; null when unreadable). Never raises for a
    bad file: it becomes a row with an error. With `perceptual_hash`, a last column `phash`
    (uint64, groups.perceptual_hash of the picture as decoded, null on error).

    With `faces` on (see decode_faces), a picture gives a row per face instead, with FACE_FIELDS
    before those columns. `one_thread`: this runs in a one-CPU Ray task (detector libraries
    otherwise start a thread per core in every task).
    """
    if faces is not None and faces.enabled:
        return decode_faces(batch, image_size, limits, storage_cfg, faces, one_thread, hash_files, perceptual_hash)
    batch, given = _given_bytes(batch)
    pixels, widths, heights, errors, digests, phashes = [], [], [], [], [], []
    for path, data in zip(batch["path"].to_pylist(), given):
        data, decoded = read_and_decode(_read(path, data, storage_cfg, limits.max_file_bytes), image_size,
                                        max_pixels=limits.max_pixels, max_file_bytes=limits.max_file_bytes)
        pixels.append(decoded.pixels)
        widths.append(decoded.width)
        heights.append(decoded.height)
        errors.append(decoded.error)
        digests.append(_sha256(data, hash_files))
        phashes.append(_phash(decoded.pixels, perceptual_hash))
    added = [pixels_to_arrow(pixels), pa.array(widths, pa.int32()), pa.array(heights, pa.int32()),
             pa.array(errors, pa.string()), pa.array(digests, pa.string())]
    for (name, _), column in zip(DECODED_FIELDS, added):
        batch = batch.append_column(name, column)
    return batch.append_column("phash", pa.array(phashes, pa.uint64())) if perceptual_hash else batch


def decode_faces(batch: pa.Table, image_size: int, limits: DecodeLimits, storage_cfg: StorageConfig,
                 faces: FaceConfig, one_thread: bool = False, hash_files: bool = False,
                 perceptual_hash: bool = False) -> pa.Table:
    """`decode_table` with faces on: each picture gives one row per face it keeps.

    The picture is decoded at up to max(640, 4 x image_size) px on its shorter side (JPEG draft
    mode), EXIF-rotated; faces are detected (faces.get_detector: once per process), selected
    (`largest` or `all`, left to right), cropped square with `margin` and resized to image_size.
    Boxes (`box_*`) are pixels of the displayed original. A picture without a face gives one row:
    an error `no_face`, or with `no_face: whole_image` the whole picture and a null face_index.
    A picture that cannot be decoded gives one error row. Columns: as decode_table's, with
    FACE_FIELDS after `batch`'s own; every row of a picture has the whole picture's `phash`.
    """
    from emotion_ray import faces as faces_lib

    if one_thread:
        faces_lib.use_one_thread(faces.detector)
    detector = faces_lib.get_detector(faces.detector, tiles=faces.tiles)
    batch, given = _given_bytes(batch)
    source_rows, pixels, face_columns, decoded_columns, phashes = [], [], [], [], []
    for i, (path, data) in enumerate(zip(batch["path"].to_pylist(), given)):
        try:
            data = _read(path, data, storage_cfg, limits.max_file_bytes)()
        except Exception as exc:  # noqa: BLE001 - an unreadable file is a row, not a crash
            data, opened = None, None
            error = read_error(exc)
        else:
            opened = open_image(data, max(faces_lib.DEFAULT_MAX_SIDE, 4 * image_size),
                                max_pixels=limits.max_pixels, max_file_bytes=limits.max_file_bytes)
            error = opened.error
        digest = _sha256(data, hash_files)
        size = (opened.width, opened.height) if opened is not None else (None, None)
        if error:
            chosen, phash = [], None
        else:
            rgb = to_rgb_array(opened.image)
            phash = _phash(rgb, perceptual_hash)
            scale = opened.scale
            chosen = faces_lib.select_faces(detector.detect(rgb), faces.mode, min_size=round(faces.min_size / scale))
        for index, face in enumerate(chosen):
            source_rows.append(i)
            pixels.append(faces_lib.crop_face(rgb, face, image_size, faces.crop_margin))
            face_columns.append((index, round(face.x * scale), round(face.y * scale), round(face.w * scale),
                                 round(face.h * scale), face.score, len(chosen)))
            decoded_columns.append((*size, None, digest))
            phashes.append(phash)
        if not chosen:
            source_rows.append(i)
            face_columns.append((None,) * 6 + (0,))
            if error is None and faces.no_face == "whole_image":
                pixels.append(decode_image(data, image_size, max_pixels=limits.max_pixels,
                                           max_file_bytes=limits.max_file_bytes).pixels)
            else:
                pixels.append(None)
                error = error or f"no_face: the {faces.detector} detector found no face"
            decoded_columns.append((*size, error, digest))
            phashes.append(phash)
    out = batch.take(pa.array(source_rows, pa.int64()))
    for j, (name, kind) in enumerate(FACE_FIELDS):
        out = out.append_column(name, pa.array([row[j] for row in face_columns], kind))
    out = out.append_column("image", pixels_to_arrow(pixels))
    for j, (name, kind) in enumerate(DECODED_FIELDS[1:]):
        out = out.append_column(name, pa.array([row[j] for row in decoded_columns], kind))
    return out.append_column("phash", pa.array(phashes, pa.uint64())) if perceptual_hash else out


def decode_task_memory(batch_size: int, image_size: int, faces: FaceConfig | None = None) -> int:
    """Bytes a decode task holds: the worker (and its face detector), plus a batch's pixels
    about three times over (decoded arrays, the Arrow column, the block on its way out). Ray
    Data warns when a worker's peak comes within 25 % of what it declared (figures:
    bench/RESULTS.md, score)."""
    detector = DETECTOR_MEMORY[faces.detector] if faces is not None and faces.enabled else 0
    return DECODE_WORKER_MEMORY + detector + 3 * batch_size * image_size**2 * 3


def check_decode_fits(batch_size: int, image_size: int, faces: FaceConfig | None,
                      nodes: list[dict[str, float]] | None) -> None:
    """Raise StageError when no node in `nodes` (runtime.node_capacities; None: unknown, no
    check) has the memory a decode task of `batch_size` pictures declares to Ray, naming the
    largest batch that fits. Without the check Ray waits forever for such a node."""
    from emotion_ray import runtime

    need = decode_task_memory(batch_size, image_size, faces)
    if nodes is None or runtime.fits_a_node({"CPU": 1, "memory": need}, nodes):
        return
    largest = max((n.get("memory", 0) for n in nodes if n.get("CPU", 0) >= 1), default=0)
    per_picture = 3 * image_size**2 * 3
    fits = max(0, int((largest - decode_task_memory(0, image_size, faces)) // per_picture))
    raise StageError(
        f"a decode task of {batch_size} pictures at {image_size} px needs {need / 2**30:.1f} GiB and no node has it "
        f"(the largest has {largest / 2**30:.1f} GiB): lower batch_size"
        + (f" to at most {fits}" if fits else " or image_size") + ", or add a bigger node"
    )


def listing_dataset(files: pa.Table, image_size: int):
    """A Ray Dataset over listed files, in blocks sized for decoding.

    Blocks hold ~64 MiB of decoded pixels: big enough that per-task overhead vanishes, small
    enough to stream (bench/RESULTS.md, prepare); and there are at least two per CPU so every
    core stays busy. The blocks are built directly, with no shuffle stage.
    """
    import ray

    n = files.num_rows
    rows_per_block = max(16, min(1000, BLOCK_BYTES // (image_size**2 * 3)))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    num_blocks = max(1, min(n, max(cpus * 2, math.ceil(n / rows_per_block))))
    step = math.ceil(n / num_blocks)
    return ray.data.from_arrow([files.slice(i, step) for i in range(0, n, step)])
