"""evaluate: group k-fold cross-validation of one train config, each fold a Ray Tune trial.

`run_cross_validation` (driver) reads the prepared dataset's pool (every labelled row, or the
train and val splits) with its `group` column, deals whole groups into K folds (folds.py), and
writes each fold as a prepared dataset of its own under `<output>/folds/fold_<k>/dataset`
(train: the other folds less their inner validation part, val: that part, test: the held-out
fold), so every fold trains and is evaluated exactly as `emotion-ray train` would do on it
(`emotion-ray train --data <output>/folds/fold_1/dataset` re-runs one). The rows are copied:
cross-validation exists for small data (hundreds of pictures), where K copies cost little.

Each fold is a Tune trial (`trials.fold_trial`, the Ray Train V2 pattern tune.py uses: a
function that builds a TensorflowTrainer with train.build_trainer and fits it), K of them run at
once as far as the cluster fits (tune.trial_concurrency). The trial then evaluates its best
checkpoint with evaluate.evaluate_best (inference.Predictor; temperature fitted on the inner
validation split, figures on the held-out fold) and writes `<output>/folds/fold_<k>/metrics.json`
and `history.csv`. No fold model is exported or registered: they are measurements, not products.

At the end `<output>/cv.json` holds per-fold figures and sizes, the mean and sample standard
deviation across folds of accuracy, macro-F1 and per-class recall, and the pooled confusion
matrix (every held-out row once); MLflow gets a parent run (the summary) with one child run
per fold (its epochs and held-out figures).
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import time
from typing import Any

import numpy as np

from emotion_ray import console, outputs, storage
from emotion_ray.config import CrossValidationConfig, StorageConfig
from emotion_ray.dataset import MANIFEST, SPLITS, is_prepared, manifest_sha256, read_manifest, read_shard
from emotion_ray.errors import ConfigError, StageError
from emotion_ray.folds import FoldPlan, plan_folds, summarize

OWNER_MARKER = "_emotion_ray_cv"
RESULT = "cv.json"
FOLDS_DIR = "folds"
TRAIN_RUNS = "train_runs"
TUNE_DIR = "tune"
WRITTEN = [FOLDS_DIR, TRAIN_RUNS, TUNE_DIR, RESULT]
FOLD_METRICS, FOLD_HISTORY = "metrics.json", "history.csv"
ASSIGNMENT = ("stratified group k-fold: whole groups (prepare's `group` column) dealt largest first (ties by "
              "the sha256 of the key) to the fold holding least of their classes relative to each class's total, "
              "then fewest rows; each fold's training groups dealt the same way into inner_parts parts, part 0 its "
              "validation split")


def fold_dir(output: str, k: int) -> str:
    return storage.join(output, FOLDS_DIR, f"fold_{k}")


def _pool_files(manifest: dict[str, Any], pool: str) -> list[str]:
    """The pool's shard files (relative to the dataset), in a fixed order: split by split, as listed."""
    splits = SPLITS if pool == "all" else ("train", "val")
    return [rel for split in splits for rel in manifest["shards"].get(split, [])]


def read_pool(dataset_uri: str, manifest: dict[str, Any], pool: str, storage_cfg: StorageConfig):
    """(group keys, label indices) of every pool row, in _pool_files order (one read of two small
    columns; ConfigError when the pool is empty)."""
    keys, labels = [], []
    for rel in _pool_files(manifest, pool):
        table = read_shard(dataset_uri, rel, storage_cfg, ["group", "label_index"])
        keys += table["group"].to_pylist()
        labels.append(table["label_index"].to_numpy())
    if not keys:
        raise ConfigError(f"the {pool} pool of {dataset_uri} holds no rows")
    return np.asarray(keys, dtype=object), np.concatenate(labels).astype(np.int64)


def plan_for(cfg: CrossValidationConfig) -> tuple[dict[str, Any], np.ndarray, np.ndarray, FoldPlan]:
    """Everything checked before any cluster work: (manifest, group keys, labels, plan), or ConfigError."""
    if not is_prepared(cfg.data, cfg.storage):
        raise ConfigError(f"evaluate needs a prepared dataset; {cfg.data} has no {MANIFEST} (run `emotion-ray "
                          "prepare` first)")
    manifest = read_manifest(cfg.data, cfg.storage)
    if cfg.image_size is not None and cfg.image_size != manifest["image_size"]:
        raise ConfigError(f"image_size {cfg.image_size} differs from the prepared dataset's {manifest['image_size']}")
    keys, labels = read_pool(cfg.data, manifest, cfg.pool, cfg.storage)
    groups = len(set(keys.tolist()))
    if cfg.folds > groups:
        raise ConfigError(f"folds={cfg.folds} but the pool holds {groups} group(s)")
    plan = plan_folds(keys, labels, cfg.folds, cfg.inner_parts, manifest["classes"])
    return manifest, keys, labels, plan


def _fold_manifests(cfg: CrossValidationConfig, manifest: dict[str, Any], keys: np.ndarray, labels: np.ndarray,
                    plan: FoldPlan) -> list[dict[str, Any]]:
    classes = manifest["classes"]
    shard = f"{outputs.PARQUET_DIR}/split={{split}}/part-0.parquet"
    made = []
    for k in range(cfg.folds):
        roles = plan.role(k)
        kept = {key: value for key, value in manifest.items()
                if key not in ("shards", "counts", "split_rows", "rows", "groups", "duplicates", "created_at")}
        made.append({
            **kept,
            "rows": len(roles),
            "split_rows": {s: int((roles == s).sum()) for s in SPLITS},
            "counts": {s: {c: int(((roles == s) & (labels == i)).sum()) for i, c in enumerate(classes)} for s in SPLITS},
            "shards": {s: [shard.format(split=s)] for s in SPLITS},
            "cross_validation": {"dataset": cfg.data, "dataset_manifest_sha256": manifest_sha256(cfg.data, cfg.storage),
                                 "fold": k, "folds": cfg.folds, "pool": cfg.pool, "inner_parts": cfg.inner_parts,
                                 "groups": {s: len(set(keys[roles == s].tolist())) for s in SPLITS},
                                 "assignment": ASSIGNMENT},
        })
    return made


def write_fold_datasets(cfg: CrossValidationConfig, manifest: dict[str, Any], keys: np.ndarray,
                        labels: np.ndarray, plan: FoldPlan) -> list[tuple[str, dict[str, Any]]]:
    """Write each fold's prepared dataset (shards, then manifest.json last) from the pool's shards,
    read one at a time; returns [(dataset URI, manifest)] by fold."""
    import pyarrow.parquet as pq

    manifests = _fold_manifests(cfg, manifest, keys, labels, plan)
    uris = [storage.join(fold_dir(cfg.output, k), "dataset") for k in range(cfg.folds)]
    roles = [plan.role(k) for k in range(cfg.folds)]
    writers: dict[tuple[int, str], Any] = {}
    schema = None
    offset = 0
    try:
        for rel in _pool_files(manifest, cfg.pool):
            table = read_shard(cfg.data, rel, cfg.storage)
            schema = schema or table.schema
            table = table.select(schema.names).cast(schema)
            rows = slice(offset, offset + table.num_rows)
            offset += table.num_rows
            for k in range(cfg.folds):
                for split in SPLITS:
                    mask = roles[k][rows] == split
                    if not mask.any():
                        continue
                    if (k, split) not in writers:
                        uri = storage.join(uris[k], manifests[k]["shards"][split][0])
                        fs = storage.pyarrow_filesystem(uri, cfg.storage)
                        path = storage.strip_scheme(uri)
                        if not storage.is_s3(uri):
                            os.makedirs(posixpath.dirname(path), exist_ok=True)
                        writers[k, split] = pq.ParquetWriter(path, schema, filesystem=fs)
                    writers[k, split].write_table(table.filter(mask))
    finally:
        for writer in writers.values():
            writer.close()
    for k in range(cfg.folds):
        for split in SPLITS:
            if (k, split) not in writers:  # an empty split (a pool without test rows): no shard at all
                manifests[k]["shards"][split] = []
        storage.write_json_atomic(storage.join(uris[k], MANIFEST), manifests[k], cfg.storage)
    return list(zip(uris, manifests))


def _fold_entry(k: int, metrics: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "fold": k,
        "rows": manifest["split_rows"],
        "groups": manifest["cross_validation"]["groups"],
        "heldout_counts": manifest["counts"]["test"],
        "accuracy": metrics["categorical_accuracy"],
        **{key: metrics[key] for key in ("macro_f1", "macro_precision", "macro_recall", "per_class",
                                         "confusion_matrix", "temperature", "temperature_reason", "ece_before",
                                         "ece_after", "best_epoch", "epochs_run", "learned", "mlflow_run_id")
           if key in metrics},
    }


def _log_parent(cfg: CrossValidationConfig, run_id: str, result: dict[str, Any]) -> None:
    from emotion_ray import tracking

    spread = result["mean_std"]
    figures = {}
    for name in ("accuracy", "macro_f1"):
        figures[f"cv_{name}_mean"], figures[f"cv_{name}_std"] = spread[name]["mean"], spread[name]["std"]
    for c, stats in spread["recall"].items():
        if stats["mean"] is not None:
            figures[f"cv_recall_{c}_mean"], figures[f"cv_recall_{c}_std"] = stats["mean"], stats["std"]
    figures.update(pooled_accuracy=result["pooled"]["categorical_accuracy"],
                   pooled_macro_f1=result["pooled"]["macro_f1"], folds=cfg.folds)
    tracking.log_metrics(cfg.mlflow.tracking_uri, run_id, figures, step=0)
    c = tracking.client(cfg.mlflow.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, RESULT)
        with open(path, "wb") as fh:
            fh.write(storage.read_bytes(storage.join(cfg.output, RESULT), cfg.storage))
        c.log_artifact(run_id, path)
    tracking.describe_run(cfg.mlflow, run_id, (
        f"emotion_ray {cfg.folds}-fold group cross-validation of `{cfg.model.architecture}` on `{cfg.data}` "
        f"({result['pool_rows']} rows of the {cfg.pool} pool, {result['pool_groups']} groups). "
        f"Accuracy {spread['accuracy']['mean']:.3f} ± {spread['accuracy']['std']:.3f}, macro-F1 "
        f"{spread['macro_f1']['mean']:.3f} ± {spread['macro_f1']['std']:.3f} (mean ± sample std over folds); "
        "each fold is a child run."))
    c.set_terminated(run_id, status="FINISHED")


def run_cross_validation(cfg: CrossValidationConfig) -> dict[str, Any]:
    """Run the K folds of `cfg` and write `<output>/cv.json` (also returned, with `output`).
    ConfigError (exit 2) before any cluster work for a dataset or pool that cannot make K folds, a
    model that does not fit the dataset, or an output that is not ours; StageError when a fold fails."""
    from emotion_ray.backbones import resolve_weights
    from emotion_ray.train import check_model_fits

    started = time.perf_counter()
    manifest, keys, labels, plan = plan_for(cfg)
    check_model_fits(cfg, manifest)
    weights = resolve_weights(cfg.model, cfg.storage)  # read (or downloaded) once, here
    outputs.check_apart(cfg.output, [cfg.data])
    with outputs.OutputLock(cfg.output, f"evaluate --output {cfg.output}", cfg.storage):
        earlier = outputs.claim_folder(cfg.output, OWNER_MARKER, "evaluate", cfg.storage, inputs=[cfg.data])
        if any(n != OWNER_MARKER and not n.startswith(outputs.LOG_PREFIX) for n in earlier):
            if not cfg.overwrite:
                raise ConfigError(f"{cfg.output} already holds a cross-validation; pass --overwrite to replace it")
            outputs.remove_owned(cfg.output, OWNER_MARKER, cfg.storage, first=[RESULT])
        outputs.record_written(cfg.output, OWNER_MARKER, WRITTEN, cfg.storage)
        return _run_locked(cfg, manifest, keys, labels, plan, weights, started)


def _run_locked(cfg: CrossValidationConfig, manifest: dict[str, Any], keys: np.ndarray, labels: np.ndarray,
                plan: FoldPlan, weights: bytes | None, started: float) -> dict[str, Any]:
    import ray.tune

    from emotion_ray import tracking
    from emotion_ray.config import TrainConfig
    from emotion_ray.runtime import init_ray
    from emotion_ray.train import run_storage, training_datasets
    from emotion_ray.trials import fold_trial
    from emotion_ray.tune import TRIAL_DRIVER_CPUS, error_reason, trial_concurrency, trials_bar

    datasets = write_fold_datasets(cfg, manifest, keys, labels, plan)
    init_ray()
    console.keep_log_in(cfg.output)
    concurrency, cpus_per_worker = trial_concurrency(cfg.workers, cfg.use_gpu, cfg.cpus_per_worker,
                                                     cfg.max_concurrent_trials)
    cfg = cfg.model_copy(update={"cpus_per_worker": cpus_per_worker})  # one decision for every fold, made here
    name = cfg.run_name or "cv_" + posixpath.basename(cfg.output.rstrip("/"))
    parent_run_id = None
    if cfg.mlflow.enabled:
        parent_run_id = tracking.start_run(cfg.mlflow, name, cfg.model_dump(mode="json"))
        tracking.log_dataset(cfg.mlflow, parent_run_id, cfg.data, manifest, cfg.storage)
    setup = {"cv": cfg.model_dump(mode="json"), "datasets": datasets, "name": name, "parent_run_id": parent_run_id,
             "source_tags": tracking.source_tags() if cfg.mlflow.enabled else None}
    storage_path, storage_fs = run_storage(TrainConfig(data=cfg.data, output=cfg.output, storage=cfg.storage))
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(ray.tune.with_parameters(
            fold_trial, backbone_weights=weights,
            # built here, before any fold holds CPUs (train.training_datasets)
            datasets=[training_datasets(cfg.fold_train_config(k, uri, cfg.output), uri)
                      for k, (uri, _) in enumerate(datasets)]),
            {"cpu": TRIAL_DRIVER_CPUS}),
        param_space={"fold": ray.tune.grid_search(list(range(cfg.folds))), "_setup": setup},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=min(concurrency, cfg.folds)),
        run_config=ray.tune.RunConfig(name=TUNE_DIR, storage_path=storage_path, storage_filesystem=storage_fs,
                                      verbose=0, callbacks=[trials_bar("folds", "fold")]),
    )
    grid = tuner.fit()

    per_fold, failed = [], []
    for k in range(cfg.folds):
        uri = storage.join(fold_dir(cfg.output, k), FOLD_METRICS)
        if storage.exists(uri, cfg.storage):
            per_fold.append(storage.read_json(uri, cfg.storage))
        else:
            failed.append(k)
    if failed:
        errors = [error_reason(r.error) for r in grid if r.error is not None]
        if parent_run_id:
            tracking.client(cfg.mlflow.tracking_uri).set_terminated(parent_run_id, status="FAILED")
        raise StageError(f"fold(s) {failed} of {cfg.folds} failed" + (f": {errors[0]}" if errors else "")
                         + "; see the log")
    classes = manifest["classes"]
    spread = summarize(per_fold, classes)
    pooled = spread.pop("pooled")
    result = {
        "output": cfg.output,
        "dataset": cfg.data,
        "dataset_manifest_sha256": manifest_sha256(cfg.data, cfg.storage),
        "classes": classes,
        "image_size": manifest["image_size"],
        "folds": cfg.folds,
        "pool": cfg.pool,
        "pool_rows": int(len(keys)),
        "pool_groups": len(set(keys.tolist())),
        "inner_parts": cfg.inner_parts,
        "assignment": ASSIGNMENT,
        "std": "sample standard deviation across folds (ddof=1)",
        "per_fold": [_fold_entry(k, m, datasets[k][1]) for k, m in enumerate(per_fold)],
        "mean_std": spread,
        "pooled": pooled,
        "train_config": cfg.fold_train_config(0, cfg.data, cfg.output).model_dump(
            mode="json", exclude={"data", "output", "run_name", "resume"}),
        "mlflow": {"tracking_uri": cfg.mlflow.tracking_uri, "parent_run_id": parent_run_id,
                   "fold_run_ids": [m.get("mlflow_run_id") for m in per_fold]} if parent_run_id else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    storage.write_json_atomic(storage.join(cfg.output, RESULT), result, cfg.storage)
    if parent_run_id:
        _log_parent(cfg, parent_run_id, result)
    return result
