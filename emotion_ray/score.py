"""score: a saved model mapped over image folders, prefixes or path lists -> Parquet, one row per file.

Pipeline (Ray Data, streaming): listed paths -> read + decode on CPU tasks (images.decode_image,
the very code prepare used) -> `Predictor` on an actor pool (model loaded once per actor, GPUs
when asked) -> the driver writes rows to Parquet part files, each written whole or not at all.

Resumable and idempotent: a re-run with the same output reads the paths already written and
scores only the rest, so an interrupted job ends with no duplicates and no gaps. `_SUCCESS.json`
(the summary) is written last: output without it is incomplete.

Output columns: path, label, confidence, prob_<class> per class, model_id, width, height (of the
original image), error (null when fine), scored_at (UTC).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import posixpath
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from emotion_ray import storage
from emotion_ray.config import ConfigError, ScoreConfig, StorageConfig
from emotion_ray.data import decode_files, listing_dataset
from emotion_ray.images import has_image_extension, pixels_from_arrow, pixels_to_arrow

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
# A decode worker's own footprint; its batch's pixels come on top (see decode_task_memory).
DECODE_WORKER_MEMORY = 224 * 1024**2
OWNER_MARKER = "_emotion_ray_scores"
DECODED_SCHEMA = pa.schema(
    [("path", pa.string()), ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
     ("error", pa.string())]
)


@dataclass(frozen=True)
class ModelRef:
    """A model as shipped to predictor actors: the .keras bytes travel via the object store."""

    model_bytes: bytes
    classes: list[str]
    image_size: int
    model_id: str


def resolve_model(model: str, storage_cfg: StorageConfig, tracking_uri: str) -> ModelRef:
    """Run directory, `.keras` file (with labels.json beside it), or `models:/name/version`."""
    if model.startswith("models:/") or model.startswith("runs:/"):
        from emotion_ray.tracking import download_model

        with tempfile.TemporaryDirectory() as tmp:
            model_path, labels_path = download_model(model, tracking_uri, tmp)
            with open(model_path, "rb") as fh:
                data = fh.read()
            with open(labels_path) as fh:
                labels = json.load(fh)
        return ModelRef(data, labels["classes"], labels["image_size"], model)
    model_uri = model if model.endswith(".keras") else storage.join(model, "model.keras")
    labels_uri = storage.join(posixpath.dirname(model_uri) if storage.is_s3(model_uri)
                              else os.path.dirname(os.path.abspath(model_uri)), "labels.json")
    for uri in (model_uri, labels_uri):
        if not storage.exists(uri, storage_cfg):
            raise ConfigError(f"model {model}: {uri} not found (expected a run directory or a .keras file "
                              "with labels.json beside it)")
    data = storage.read_bytes(model_uri, storage_cfg)
    labels = storage.read_json(labels_uri, storage_cfg)
    return ModelRef(data, labels["classes"], labels["image_size"],
                    f"{model_uri}#sha256={hashlib.sha256(data).hexdigest()[:12]}")


def list_inputs(inputs: list[str], storage_cfg: StorageConfig) -> tuple[list[str], Counter]:
    """Every image to score, sorted and de-duplicated, and what was skipped by reason.

    Folders and prefixes contribute their image files; zip and tar archives (.zip, .tar,
    .tar.gz, .tgz, ...) their image members, read in place; hidden files and folders are
    skipped. A `.txt` file contributes every path it lists, image extension or not, since the
    user named them. An archive that cannot be opened is skipped and counted, not fatal.
    """
    paths: set[str] = set()
    skipped: Counter = Counter()

    def add_tree(names, base: str, to_uri) -> None:
        for name in names:
            rel = posixpath.relpath(name, base) if base else name
            if any(part.startswith(".") for part in rel.split("/")):
                skipped["hidden"] += 1
            elif not has_image_extension(name):
                skipped["not_an_image_extension"] += 1
            else:
                paths.add(to_uri(name))

    for item in inputs:
        fs = storage.filesystem(item, storage_cfg)
        base = storage.strip_scheme(item)
        scheme = "s3://" if storage.is_s3(item) else ""
        if item.endswith(".txt") and fs.isfile(base):
            for line in fs.cat_file(base).decode().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    paths.add(line)
        elif storage.archive_protocol(item) and fs.isfile(base):
            try:
                members = storage.archive_members(item, storage_cfg)
            except Exception as exc:  # noqa: BLE001 - a damaged archive is reported, not fatal
                log.warning("skipping archive %s: cannot read it (%s: %s)", item, type(exc).__name__, exc)
                skipped["unreadable_archive"] += 1
                continue
            add_tree(members, "", lambda member: storage.member_uri(item, member))
        elif fs.isdir(base):
            add_tree(fs.find(base, withdirs=False), base, lambda path: scheme + path)
        elif fs.isfile(base):
            paths.add(scheme + base)
        else:
            raise ConfigError(f"input {item} does not exist")
    return sorted(paths), skipped


def decode_paths(batch: pa.Table, image_size: int, max_pixels: int, max_file_bytes: int,
                 storage_cfg: StorageConfig) -> pa.Table:
    """Read and decode a batch of paths; a file that cannot be used becomes an error row."""
    paths = batch["path"].to_pylist()
    decoded = [d for _, d in decode_files(paths, image_size, max_pixels, max_file_bytes, storage_cfg)]
    columns = [
        pa.array(paths, pa.string()),
        pixels_to_arrow([d.pixels for d in decoded]),
        pa.array([d.width for d in decoded], pa.int32()),
        pa.array([d.height for d in decoded], pa.int32()),
        pa.array([d.error for d in decoded], pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=DECODED_SCHEMA)


def decode_task_memory(batch_size: int, image_size: int) -> int:
    """Memory a decode task holds: the worker, plus a batch's pixels about three times over
    (decoded arrays, the Arrow column, the block on its way out). Ray Data warns when a
    worker's peak is within 25 % of the declared memory: it saw 192 MiB at batches of 64 and
    254 MiB at 256 (256x256 images)."""
    return DECODE_WORKER_MEMORY + 3 * batch_size * image_size**2 * 3


class Predictor:
    """Actor-pool UDF: loads the model once, then turns decoded batches into prediction rows."""

    def __init__(self, model_ref: ModelRef, batch_size: int):
        from emotion_ray.model import inference_function, load_model, share_gpus

        share_gpus()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            with open(path, "wb") as fh:
                fh.write(model_ref.model_bytes)
            self.model = load_model(path)
        self.forward = inference_function(self.model)
        self.ref = model_ref
        self.batch_size = batch_size

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Model outputs in fixed-size chunks (padded), so a file's probabilities never depend
        on which other files share its batch: score and predict agree bit for bit."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            padded = np.zeros((self.batch_size, *chunk.shape[1:]), dtype=np.uint8)
            padded[: len(chunk)] = chunk
            out.append(self.forward(padded).numpy()[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, len(self.ref.classes)), dtype=np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        classes, size = self.ref.classes, self.ref.image_size
        column = batch["image"]
        good = column.is_valid().to_numpy(zero_copy_only=False)
        probs = np.full((len(column), len(classes)), np.nan, dtype=np.float32)
        if good.any():
            probs[good] = self.probabilities(pixels_from_arrow(column, size))
        best = np.nan_to_num(probs, nan=-1.0).argmax(axis=1)
        columns = {
            "path": batch["path"],
            "label": pa.array([classes[b] if g else None for b, g in zip(best, good)], pa.string()),
            "confidence": pa.array(np.where(good, np.nan_to_num(probs.max(axis=1, initial=-1.0)), np.nan),
                                   pa.float32(), mask=~good),
        }
        for j, c in enumerate(classes):
            columns[f"prob_{c}"] = pa.array(probs[:, j], pa.float32(), mask=~good)
        columns["model_id"] = pa.array([self.ref.model_id] * len(column), pa.string())
        columns["width"], columns["height"], columns["error"] = batch["width"], batch["height"], batch["error"]
        now = dt.datetime.now(dt.timezone.utc)
        columns["scored_at"] = pa.array([now] * len(column), pa.timestamp("us", tz="UTC"))
        return pa.table(columns)


class _PartWriter:
    """Buffers prediction rows in the driver and writes whole Parquet part files."""

    def __init__(self, output: str, storage_cfg: StorageConfig, rows_per_file: int):
        self.output, self.storage_cfg, self.rows_per_file = output, storage_cfg, rows_per_file
        self.run_id = uuid.uuid4().hex[:8]
        self.pending: list[pa.Table] = []
        self.pending_rows = self.files = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.pending_rows:
            return
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.concat_tables(self.pending), buf)
        name = f"part-{self.run_id}-{self.files:05d}.parquet"
        storage.write_bytes_atomic(storage.join(self.output, name), buf.getvalue(), self.storage_cfg)
        self.files += 1
        self.pending, self.pending_rows = [], 0


def _part_files(output: str, storage_cfg: StorageConfig) -> list[str]:
    return [n for n in storage.listdir_names(output, storage_cfg) if n.startswith("part-") and n.endswith(".parquet")]


def read_scores(output: str, storage_cfg: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """All rows written so far to `output` (complete or not)."""
    import pyarrow.dataset as pads

    storage_cfg = storage_cfg or StorageConfig()
    files = [storage.strip_scheme(storage.join(output, n)) for n in _part_files(output, storage_cfg)]
    if not files:
        return pa.table({c: [] for c in (columns or ["path"])})
    fs = storage.pyarrow_filesystem(output, storage_cfg)
    return pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns)


def _claim_output(cfg: ScoreConfig) -> None:
    """Make `output` ours; earlier part files stay (they are what a re-run resumes from)."""
    names = storage.claim_folder(cfg.output, OWNER_MARKER, "score", cfg.storage)
    if SUCCESS in names:
        storage.remove(storage.join(cfg.output, SUCCESS), cfg.storage)  # incomplete until this run ends
    for name in names:  # temp files of a write that was interrupted (ours; never complete)
        if ".tmp-" in name:
            storage.remove(storage.join(cfg.output, name), cfg.storage)


def _predictor_pool(cfg: ScoreConfig):
    """A fixed pool of `num_predictors`; unset on GPU, one predictor per GPU free now, and more
    while work queues as GPUs appear (Ray Data's requests also make an autoscaler add GPU
    nodes), so one job uses every GPU it can get."""
    import ray

    if cfg.num_predictors is not None:
        return ray.data.ActorPoolStrategy(size=cfg.num_predictors)
    free_now = int(ray.available_resources().get("GPU", 0) // cfg.gpus_per_predictor)
    return ray.data.ActorPoolStrategy(min_size=1, initial_size=max(1, free_now))


def score(cfg: ScoreConfig, show_progress: bool = True) -> dict[str, Any]:
    """Score every input file not already in `cfg.output`; returns the summary."""
    import ray
    from tqdm import tqdm

    from emotion_ray.runtime import init_ray

    paths, skipped = list_inputs(cfg.inputs, cfg.storage)
    if not paths:
        raise ConfigError(f"no images found in {cfg.inputs}")
    model_ref = resolve_model(cfg.model, cfg.storage, cfg.mlflow_tracking_uri)
    _claim_output(cfg)
    done = set(read_scores(cfg.output, cfg.storage, ["path"])["path"].to_pylist())
    todo = [p for p in paths if p not in done]

    started = time.perf_counter()
    first_batch_s, first_batch_rows = None, 0  # when the first scored batch arrived, and its size
    writer = _PartWriter(cfg.output, cfg.storage, cfg.rows_per_file)
    if todo:
        init_ray()
        ds = listing_dataset(pa.table({"path": todo}), model_ref.image_size)
        # Decoding outruns prediction on CPUs: without a cap the backlog of decoded images grows
        # with the input until it fills Ray Data's default budget (a large share of RAM).
        limits = ds.context.execution_options.resource_limits
        ds.context.execution_options.resource_limits = limits.copy(object_store_memory=cfg.max_inflight_bytes)
        ds = ds.map_batches(
            decode_paths,
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            # Declaring the pixels a decode task holds also keeps Ray Data from fusing decoding
            # into the predictor actors (identical remote args fuse): decoding then runs on
            # every free CPU instead of serially inside the few actors that hold the model.
            memory=decode_task_memory(cfg.batch_size, model_ref.image_size),
            fn_kwargs={"image_size": model_ref.image_size, "max_pixels": cfg.max_pixels,
                       "max_file_bytes": cfg.max_file_bytes, "storage_cfg": cfg.storage},
        )
        ds = ds.map_batches(
            Predictor,
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            compute=_predictor_pool(cfg),
            fn_constructor_kwargs={"model_ref": model_ref, "batch_size": cfg.batch_size},
            num_gpus=cfg.gpus_per_predictor if cfg.use_gpu else 0,
            num_cpus=cfg.cpus_per_predictor,
        )
        if cfg.use_gpu:
            # Ray waits forever for resources no node has; give the autoscaler a bounded time.
            # (Ray Data then starts decoding once the initial predictors are up.)
            ds.context.wait_for_min_actors_s = cfg.gpu_wait_seconds
        try:
            with tqdm(total=len(todo), desc="scoring", unit="img", disable=not show_progress) as bar:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    if first_batch_s is None:
                        first_batch_s, first_batch_rows = time.perf_counter() - started, batch.num_rows
                    writer.add(batch)
                    bar.update(batch.num_rows)
        except ray.exceptions.GetTimeoutError:
            if not cfg.use_gpu:
                raise
            raise ConfigError(
                f"use_gpu: the GPU predictors ({cfg.gpus_per_predictor:g} GPU each) did not start within "
                f"{cfg.gpu_wait_seconds:g} s; the cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs "
                "(`ray status` shows pending demands). Add GPU nodes, raise gpu_wait_seconds, or score on "
                "CPUs without use_gpu."
            ) from None
        writer.flush()
    elapsed = time.perf_counter() - started
    # Start-up (Ray, the predictors' TensorFlow import and model load) is paid once per run; the
    # steady rate after the first batch is what sizes a job of millions of files.
    steady_rows, steady_s = len(todo) - first_batch_rows, elapsed - (first_batch_s or elapsed)

    table = read_scores(cfg.output, cfg.storage, ["path", "label", "error"])
    written = table["path"].to_pylist()
    if len(written) != len(set(written)) or set(written) != set(paths) | done:
        raise RuntimeError(f"output {cfg.output} does not hold exactly one row per input; re-run to repair")
    labels = Counter(label for label in table["label"].to_pylist() if label is not None)
    errors = Counter(e.split(":", 1)[0] for e in table["error"].to_pylist() if e)
    summary = {
        "output": cfg.output,
        "model_id": model_ref.model_id,
        "rows": table.num_rows,
        "scored_now": len(todo),
        "already_scored": len(paths) - len(todo),
        "labels": dict(sorted(labels.items())),
        "errors": dict(errors),
        "skipped_inputs": dict(skipped),
        "seconds": round(elapsed, 2),
        "images_per_second": round(len(todo) / elapsed, 1) if todo and elapsed > 0 else None,
        "first_batch_seconds": round(first_batch_s, 2) if first_batch_s is not None else None,
        "steady_images_per_second": round(steady_rows / steady_s, 1) if steady_rows and steady_s > 0 else None,
        "completed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    storage.write_json_atomic(storage.join(cfg.output, SUCCESS), summary, cfg.storage)
    return summary


def predict(model: str, images: list[str], tracking_uri: str | None = None,
            storage_cfg: StorageConfig | None = None) -> list[dict[str, Any]]:
    """Predict a few images in this process, through the same decode and Predictor as `score`."""
    from emotion_ray.config import default_tracking_uri

    storage_cfg = storage_cfg or StorageConfig()
    ref = resolve_model(model, storage_cfg, tracking_uri or default_tracking_uri())
    defaults = ScoreConfig(model=model, inputs=images, output="-")
    decoded = decode_paths(pa.table({"path": images}), ref.image_size, defaults.max_pixels,
                           defaults.max_file_bytes, storage_cfg)
    rows = Predictor(ref, defaults.batch_size)(decoded).to_pylist()
    return [
        {
            "path": r["path"],
            "label": r["label"],
            "confidence": r["confidence"],
            "probabilities": {c: r[f"prob_{c}"] for c in ref.classes},
            "error": r["error"],
        }
        for r in rows
    ]
