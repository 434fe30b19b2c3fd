"""score: a saved model mapped over image folders, prefixes or path lists -> Parquet, one row per file.

Pipeline (Ray Data, streaming): listed paths (sources.list_images) -> read + decode on CPU
tasks (sources.decode_table, the very code prepare used) -> inference.Predictor on an actor
pool (model loaded once per actor, GPUs when asked) -> the driver writes rows to Parquet part
files in `<output>/data/` (only Parquet there: any reader can be pointed at it), each written
whole or not at all, of `rows_per_file` rows (or what `flush_seconds` gathered; small ones are
merged at the end).

Resumable and idempotent: a re-run with the same output, model and inference settings reads the
paths already written and scores only the rest, so an interrupted job ends with no duplicates and
no gaps. The output remembers its model (marker field "model": URI, sha256 of the model file,
labels) and how it scored with it (marker field "inference": InferenceSettings.record, i.e. faces,
test-time views, temperature, min_confidence); a re-run with another model or other settings
stops (ConfigError, naming what differs) unless `overwrite` starts over. An output written before
it recorded its settings counts as scored with the model's defaults (its labels.json faces, no
min_confidence). `_SUCCESS.json` (the
summary) is written last: output without it is incomplete. `_skipped.parquet` (path, reason),
beside it and outside data/, lists the files the inputs held that were not scored (hidden, not an
image, an unreadable archive, ...).

Output columns: path, label, confidence, prob_<class> per class, model_id, width, height (of the
original image), error (null when fine), scored_at (UTC).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import time
import uuid
from collections import Counter
from typing import Any

import pyarrow as pa

from emotion_ray import console, outputs, runtime, sources, storage
from emotion_ray.calibration import UNCERTAIN
from emotion_ray.config import ScoreConfig, StorageConfig
from emotion_ray.errors import ConfigError, StageError
from emotion_ray.inference import InferenceSettings, Predictor, inference_settings, resolve_model

SUCCESS = "_SUCCESS.json"
SKIPPED = "_skipped.parquet"
OWNER_MARKER = "_emotion_ray_scores"
PARQUET_DIR = outputs.PARQUET_DIR
PART_PATTERN = "part-*.parquet"
PART_PATTERNS = [f"{PARQUET_DIR}/{PART_PATTERN}", PART_PATTERN]  # the second: outputs from before data/
# Error reasons a re-run scores again (retry_errors): the file may be there, or readable, next time.
# Permanent ones (not_an_image, truncated, too_large, ...) are kept.
TRANSIENT_ERRORS = ("unreadable",)
WRITTEN_NAMES = [PART_PATTERN, "part-*.tmp-*", SUCCESS, SKIPPED]  # what score writes (for markers without a list)


class _PartWriter:
    """Buffers prediction rows in the driver and writes whole Parquet part files."""

    def __init__(self, output: str, storage_cfg: StorageConfig, rows_per_file: int, lock: outputs.OutputLock,
                 flush_seconds: float = float("inf")):
        self.output, self.storage_cfg, self.rows_per_file, self.lock = output, storage_cfg, rows_per_file, lock
        self.flush_seconds = flush_seconds  # rows wait at most this long: what an interruption can lose
        self.run_id = uuid.uuid4().hex[:8]
        self.pending: list[pa.Table] = []
        self.pending_rows = self.files = 0
        self.pending_since = 0.0

    def add(self, table: pa.Table) -> None:
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.rows_per_file or time.monotonic() - self.pending_since >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.pending_rows:
            return
        name = f"{PARQUET_DIR}/part-{self.run_id}-{self.files:05d}.parquet"
        self.lock.check()  # never write into an output another run has taken over
        outputs.record_written(self.output, OWNER_MARKER, [name], self.storage_cfg)
        storage.write_parquet_atomic(_uri(self.output, name), pa.concat_tables(self.pending), self.storage_cfg)
        self.files += 1
        self.pending, self.pending_rows = [], 0


def _uri(output: str, name: str) -> str:
    """The URI of `name`, a "/"-separated path relative to the output."""
    return storage.join(output, *name.split("/"))


def _part_files(output: str, storage_cfg: StorageConfig) -> list[str]:
    """The finished part files' names relative to `output`: in data/, then at the top (as versions
    before data/ wrote them)."""
    def parts(folder: str) -> list[str]:
        return [n for n in storage.listdir_names(folder, storage_cfg) if n.startswith("part-") and n.endswith(".parquet")]

    return [f"{PARQUET_DIR}/{n}" for n in parts(storage.join(output, PARQUET_DIR))] + parts(output)


def read_scores(output: str, storage_cfg: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """All rows written so far to `output` (complete or not); of `columns`, those the files have."""
    import pyarrow.dataset as pads

    storage_cfg = storage_cfg or StorageConfig()
    files = [storage.strip_scheme(_uri(output, n)) for n in _part_files(output, storage_cfg)]
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in (columns or ["path"])})
    dataset = pads.dataset(files, filesystem=storage.pyarrow_filesystem(output, storage_cfg), format="parquet")
    if columns is not None:
        columns = [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=columns)


def model_identity(cfg: ScoreConfig, bundle) -> dict[str, Any]:
    """What an output remembers of the model that scored it: the model as given, its model_id, the
    sha256 of the model file, and what its labels.json sets (classes, image size, faces)."""
    settings = {f.name: getattr(bundle, f.name) for f in dataclasses.fields(bundle)
                if f.name not in ("model_bytes", "model_id")}
    return {"uri": cfg.model, "model_id": bundle.model_id, "sha256": hashlib.sha256(bundle.model_bytes).hexdigest(),
            "settings": json.loads(json.dumps(settings, default=str))}


def _describe_model(model: dict[str, Any]) -> str:
    return (f"{model.get('uri')} (sha256 {str(model.get('sha256'))[:12]}, "
            f"classes {(model.get('settings') or {}).get('classes')})")


def _same_model_id(model_id: Any, model: dict[str, Any]) -> bool:
    """Whether a row's model_id (`URI#sha256=<12 hex>`, or a registry URI alone before) names `model`."""
    _, sep, digest = str(model_id).rpartition("#sha256=")
    return model["sha256"].startswith(digest) if sep else model_id in (model["model_id"], model["uri"])


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"faces": {"mode": "all"}} -> {"faces.mode": "all"}: settings as the error names them."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_same_settings(cfg: ScoreConfig, earlier: Any, settings: InferenceSettings, bundle) -> None:
    """ConfigError when the output's rows were made with other inference settings than this run's
    (the model being the same). `earlier`: the marker's record, or None for an output written
    before outputs recorded their settings, which counts as the model's defaults (the old code
    could only have used those unless told otherwise, and nothing says it was told)."""
    ours, assumed = settings.record(), not isinstance(earlier, dict)
    if assumed:
        earlier = inference_settings(bundle).record()
    theirs_flat, ours_flat = _flat(earlier), _flat(ours)
    # In the record's order (faces.mode first); a face setting one side lacks (its faces off) is
    # moot beside the mode that differs.
    differ = [key for key in dict.fromkeys([*ours_flat, *theirs_flat]) if theirs_flat.get(key) != ours_flat.get(key)
              and (key in theirs_flat and key in ours_flat or not key.startswith("faces."))]
    if not differ:
        return
    shown = lambda value: "unset" if value is None else value  # noqa: E731 - min_confidence off reads `unset`
    said = ", ".join(f"{key} {shown(theirs_flat.get(key))} there, {shown(ours_flat.get(key))} now" for key in differ)
    if assumed:
        said += "; the output predates recorded settings, so it counts as scored with the model's defaults"
    raise ConfigError(f"output {cfg.output} was scored by this model with other inference settings ({said}); a "
                      "re-run continues an output only with the settings that scored it: pass --overwrite to "
                      "delete the earlier predictions and score everything again with these settings, or choose "
                      "another output")


def _check_same_scoring(cfg: ScoreConfig, model: dict[str, Any], settings: InferenceSettings, bundle) -> None:
    """ConfigError when the output already holds predictions of another model, or of this model
    with other inference settings (_check_same_settings)."""
    if not _part_files(cfg.output, cfg.storage):
        return
    fields = outputs.marker_fields(cfg.output, OWNER_MARKER, cfg.storage)
    earlier = fields.get("model")
    if isinstance(earlier, dict):
        if (earlier.get("sha256"), earlier.get("settings")) == (model["sha256"], model["settings"]):
            return _check_same_settings(cfg, fields.get("inference"), settings, bundle)
        theirs = _describe_model(earlier)
    else:  # written before outputs remembered their model: the rows' model_id says which it was
        ids = set(read_scores(cfg.output, cfg.storage, ["model_id"])["model_id"].to_pylist())
        if all(_same_model_id(i, model) for i in ids):
            return _check_same_settings(cfg, None, settings, bundle)
        theirs = ", ".join(sorted(map(str, ids)))
    raise ConfigError(f"output {cfg.output} holds predictions of model {theirs}, not of this run's model "
                      f"{_describe_model(model)}; a re-run continues an output only with its own model: pass "
                      "--overwrite to delete the earlier predictions and score everything again, or choose "
                      "another output")


def _move_top_level_parts(cfg: ScoreConfig) -> None:
    """Part files of outputs from before data/ move into it (copied whole, then removed: a crash
    in between leaves duplicate rows, which the next run drops)."""
    for name in [n for n in _part_files(cfg.output, cfg.storage) if "/" not in n]:
        moved = f"{PARQUET_DIR}/{name}"
        outputs.record_written(cfg.output, OWNER_MARKER, [moved], cfg.storage)
        storage.write_bytes_atomic(_uri(cfg.output, moved), storage.read_bytes(_uri(cfg.output, name), cfg.storage),
                                   cfg.storage)
        storage.remove(_uri(cfg.output, name), cfg.storage)


def _claim_output(cfg: ScoreConfig, model: dict[str, Any], settings: InferenceSettings, bundle) -> None:
    """Make `output` ours and `model`'s with `settings`. Its finished part files stay (they are
    what a re-run resumes from), unless `overwrite` (then all score wrote goes); the summary and
    interrupted temp files go. An output of a different model, or of other settings, is refused.
    Nothing score did not write is touched."""
    outputs.claim_folder(cfg.output, OWNER_MARKER, "score", cfg.storage, inputs=cfg.inputs, legacy_names=WRITTEN_NAMES)
    if cfg.overwrite:
        outputs.remove_owned(cfg.output, OWNER_MARKER, cfg.storage)
    else:
        _check_same_scoring(cfg, model, settings, bundle)
        outputs.remove_owned(cfg.output, OWNER_MARKER, cfg.storage, keep=PART_PATTERNS)
    _move_top_level_parts(cfg)
    outputs.set_marker_fields(cfg.output, OWNER_MARKER, {"model": model, "inference": settings.record()},
                              cfg.storage)


def _row_keys(table: pa.Table) -> list[tuple]:
    """What makes a row unique: its path, and with faces on its face_index."""
    faces = table["face_index"].to_pylist() if "face_index" in table.column_names else [None] * table.num_rows
    return list(zip(table["path"].to_pylist(), faces))


def _repair_rows(cfg: ScoreConfig, writer: _PartWriter) -> dict[str, int]:
    """Rewrite the part files so that each (path, face) has one row (the first written) and every
    picture has all its face rows or none; returns what was dropped. Outputs written by older
    versions from two concurrent runs, or a run stopped between a picture's face rows, need it."""
    parts = _part_files(cfg.output, cfg.storage)
    table = read_scores(cfg.output, cfg.storage, ["path", "face_index", "faces_in_picture", "error"])  # keys only
    if not parts:
        return {"duplicate_rows": 0, "incomplete_pictures": 0, "errors_retried": 0}
    first: dict[tuple, int] = {}
    for row, key in enumerate(_row_keys(table)):
        first.setdefault(key, row)
    kept_rows = sorted(first.values())
    incomplete: set[str] = set()
    if "faces_in_picture" in table.column_names:
        expected = dict(zip(table["path"].to_pylist(), table["faces_in_picture"].to_pylist()))
        have = Counter(path for path, _ in first)
        incomplete = {p for p, n in expected.items() if have[p] < max(n or 0, 1)}
    retried = set()
    if cfg.retry_errors:  # transient failures (a missing file, credentials, the network) get another go
        retried = {p for p, e in zip(table["path"].to_pylist(), table["error"].to_pylist())
                   if e and e.split(":", 1)[0] in TRANSIENT_ERRORS}
    paths = table["path"].to_pylist()
    kept_rows = [r for r in kept_rows if paths[r] not in incomplete | retried]
    dropped = {"duplicate_rows": table.num_rows - len(first), "incomplete_pictures": len(incomplete),
               "errors_retried": len(retried)}
    if len(kept_rows) == table.num_rows:
        return dropped
    writer.add(read_scores(cfg.output, cfg.storage).take(pa.array(kept_rows, pa.int64())))
    writer.flush()  # the whole kept table first, then the old files go: a crash in between leaves
    for name in parts:  # rows that the next re-run drops again, never a lost one
        storage.remove(_uri(cfg.output, name), cfg.storage)
    return dropped


def _merge_small_parts(cfg: ScoreConfig, writer: _PartWriter) -> None:
    """Rewrite the part files under half of `rows_per_file` (what `flush_seconds` wrote in a slow
    run, or earlier runs of a resumed output) as files of `rows_per_file`: the new files first, then
    the old go (a crash in between leaves duplicate rows, which the next run drops)."""
    import pyarrow.dataset as pads

    fs = storage.pyarrow_filesystem(cfg.output, cfg.storage)
    names = {storage.strip_scheme(_uri(cfg.output, n)): n for n in _part_files(cfg.output, cfg.storage)}
    if len(names) < 2:
        return
    small = [f.path for f in pads.dataset(list(names), filesystem=fs, format="parquet").get_fragments()
             if f.metadata.num_rows < cfg.rows_per_file // 2]
    if len(small) < 2:
        return
    for batch in pads.dataset(small, filesystem=fs, format="parquet").to_batches():
        writer.add(pa.Table.from_batches([batch]))
    writer.flush()
    for path in small:
        storage.remove(_uri(cfg.output, names[path]), cfg.storage)


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

    paths, skipped = sources.list_images(cfg.inputs, cfg.storage)
    if not paths:
        raise ConfigError(f"no images found in {cfg.inputs}")
    bundle = resolve_model(cfg.model, cfg.storage, cfg.mlflow_tracking_uri)
    settings = inference_settings(bundle, cfg.faces, cfg.min_confidence, cfg.decode_limits())
    outputs.check_apart(cfg.output, cfg.inputs)  # before the lock creates the folder
    with outputs.OutputLock(cfg.output, f"score --output {cfg.output}", cfg.storage) as lock:
        return _score_locked(cfg, paths, skipped, bundle, settings, lock, show_progress)


def steady_rate(later_pictures: int, first_batch_s: float | None, last_batch_s: float | None, batches: int,
                elapsed: float) -> float | None:
    """Pictures per second after the first batch reached the driver, or None when not measured.

    Start-up (Ray, the predictors' TensorFlow import and model load) is paid once per run; the
    rate after it is what sizes a job of millions of files. It is measured only while batches
    kept arriving: 3 batches or more, the later ones spread over at least 1 s and a tenth of the
    run (`elapsed`, seconds). A small job's batches can all reach the driver at once after the
    start-up, which measures no rate. Times are seconds since the run started.
    """
    if batches < 3 or later_pictures <= 0 or first_batch_s is None or last_batch_s is None:
        return None
    span = last_batch_s - first_batch_s
    return round(later_pictures / span, 1) if span >= max(1.0, 0.1 * elapsed) else None


def _check_fits(cfg: ScoreConfig, image_size: int, faces) -> None:
    """StageError, before any work starts, for a decode task or predictor no node can hold."""
    nodes = runtime.node_capacities()
    sources.check_decode_fits(cfg.batch_size, image_size, faces, nodes)
    if nodes is not None and not runtime.fits_a_node({"CPU": cfg.cpus_per_predictor}, nodes):
        raise StageError(f"cpus_per_predictor {cfg.cpus_per_predictor:g}: no node has that many CPUs "
                         f"(the largest has {max(n.get('CPU', 0) for n in nodes):g})")


def _score_locked(cfg: ScoreConfig, paths: list[str], skipped: sources.Skipped, bundle, settings: InferenceSettings,
                  lock: outputs.OutputLock, show_progress: bool) -> dict[str, Any]:
    import ray

    model = model_identity(cfg, bundle)
    _claim_output(cfg, model, settings, bundle)
    console.keep_log_in(cfg.output)  # ours now: the CLI's log moves in
    faces, size = settings.faces, settings.image_size
    writer = _PartWriter(cfg.output, cfg.storage, cfg.rows_per_file, lock, cfg.flush_seconds)
    repaired = _repair_rows(cfg, writer)
    done = set(read_scores(cfg.output, cfg.storage, ["path"])["path"].to_pylist())
    todo = [p for p in paths if p not in done]

    started = time.perf_counter()
    first_batch_s, first_batch_pictures = None, 0  # when the first scored batch arrived, and its pictures
    last_batch_s, batches = None, 0
    if todo:
        runtime.init_ray()
        _check_fits(cfg, size, faces)
        ds = sources.listing_dataset(pa.table({"path": todo}), size)
        # Decoding outruns prediction on CPUs: without a cap the backlog of decoded images grows
        # with the input until it fills Ray Data's default budget (a large share of RAM).
        runtime.cap_inflight_bytes(ds, cfg.max_inflight_bytes)
        ds = ds.map_batches(
            settings.decode,  # predict's and the MLflow model's decode too
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            fn_kwargs={"storage_cfg": cfg.storage, "one_thread": True},
            # Decoding (and face detection) runs on every free CPU, not inside the few actors
            # that hold the model.
            **runtime.unfused_task_options(sources.decode_task_memory(cfg.batch_size, size, faces)),
        )
        ds = ds.map_batches(
            Predictor,
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            compute=_predictor_pool(cfg),
            # The model travels through the object store, not inside the UDF.
            fn_constructor_kwargs={"bundle": ray.put(bundle), "batch_size": cfg.batch_size, "settings": settings},
            num_gpus=cfg.gpus_per_predictor if cfg.use_gpu else 0,
            num_cpus=cfg.cpus_per_predictor,
        )
        if cfg.use_gpu:
            # Ray waits forever for resources no node has; give the autoscaler a bounded time.
            # (Ray Data then starts decoding once the initial predictors are up.)
            runtime.bound_actor_wait(ds, cfg.gpu_wait_seconds)
        try:
            with console.progress(total=len(todo), desc="scoring", unit="img", disable=not show_progress) as bar:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    if first_batch_s is None:
                        # With faces a picture has several rows: rates are pictures per second.
                        first_batch_s = time.perf_counter() - started
                        first_batch_pictures = len(set(batch["path"].to_pylist()))
                    last_batch_s, batches = time.perf_counter() - started, batches + 1
                    writer.add(batch)
                    bar.update(batch.num_rows)
        except ray.exceptions.GetTimeoutError:
            if not cfg.use_gpu:
                raise
            raise StageError(
                f"use_gpu: the GPU predictors ({cfg.gpus_per_predictor:g} GPU each) did not start within "
                f"{cfg.gpu_wait_seconds:g} s; the cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs "
                "(`ray status` shows pending demands). Add GPU nodes, raise gpu_wait_seconds, or score on "
                "CPUs without use_gpu."
            ) from None
        writer.flush()
    elapsed = time.perf_counter() - started
    _merge_small_parts(cfg, writer)

    table = read_scores(cfg.output, cfg.storage, ["path", "label", "error", "face_index"])
    written = table["path"].to_pylist()
    if len(set(_row_keys(table))) != table.num_rows or set(written) != set(paths) | done:
        raise StageError(f"output {cfg.output} does not hold exactly one row per input; re-run to repair")
    labels = Counter(label for label in table["label"].to_pylist() if label is not None)
    errors = Counter(e.split(":", 1)[0] for e in table["error"].to_pylist() if e)
    summary = {
        "output": cfg.output,
        "parquet": storage.join(cfg.output, PARQUET_DIR),  # only Parquet: point any reader at it
        "part_files": len(_part_files(cfg.output, cfg.storage)),
        "model_id": bundle.model_id,
        "model": {k: model[k] for k in ("uri", "sha256")},
        "inference": settings.record(),  # what the output continues only with (faces, views, min_confidence)
        "rows": table.num_rows,
        "scored_now": len(todo),
        "already_scored": len(paths) - len(todo),
        "pictures": len(set(written)),
        "duplicate_rows_dropped": repaired["duplicate_rows"],
        "incomplete_pictures_rescored": repaired["incomplete_pictures"],
        "errors_retried": repaired["errors_retried"],
        "labels": dict(sorted(labels.items())),
        "uncertain": labels[UNCERTAIN],  # rows below min_confidence (also among labels)
        "errors": dict(errors),
        "skipped_inputs": skipped.counts(),
        "skipped_listed_in": SKIPPED,
        "seconds": round(elapsed, 2),
        "images_per_second": round(len(todo) / elapsed, 1) if todo and elapsed > 0 else None,
        "first_batch_seconds": round(first_batch_s, 2) if first_batch_s is not None else None,
        "steady_images_per_second": steady_rate(len(todo) - first_batch_pictures, first_batch_s, last_batch_s,
                                                batches, elapsed),
        "completed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    lock.check()
    outputs.record_written(cfg.output, OWNER_MARKER, [SKIPPED, SUCCESS], cfg.storage)
    storage.write_parquet_atomic(storage.join(cfg.output, SKIPPED), skipped.table(), cfg.storage)
    storage.write_json_atomic(storage.join(cfg.output, SUCCESS), summary, cfg.storage)
    return summary
