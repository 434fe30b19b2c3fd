"""train: TensorflowTrainer + MultiWorkerMirroredStrategy over a prepared dataset.

Batch size is global: each of N workers takes batch_size / N rows per step, and
MultiWorkerMirroredStrategy averages their gradients, so results do not depend on N.

Each epoch every worker reports its metrics and the chief (rank 0) attaches a checkpoint
(latest model with optimizer state, best model so far, training state). A replaced worker
group, `--resume`, or a Tune trial restart all continue from that checkpoint.

After training, the best epoch's model is evaluated on the whole test split (outside the
strategy, so no row is dropped), and the run directory gets model.keras, labels.json,
config.yaml, history.csv, metrics.json and plots.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import shutil
import tempfile
import time
from typing import Any

import yaml

from emotion_ray import storage
from emotion_ray.config import ConfigError, PrepareConfig, StorageConfig, TrainConfig
from emotion_ray.runtime import WORKER_ENV, init_ray

STATE_FILE = "state.json"
LATEST_MODEL = "model.keras"
BEST_MODEL = "best.keras"


# ----------------------------------------------------------------------------- worker side
def _tf_dataset(shard, image_size: int, num_classes: int, batch_size: int, shuffle: bool, cache_rows: int = 0):
    """A tf.data pipeline over this worker's Ray Data shard; re-iterated every epoch.

    With `cache_rows`, the first epoch's rows are kept in memory and reshuffled every epoch:
    on small data Ray Data's per-epoch start-up costs far more than the training itself.
    """
    import numpy as np
    import tensorflow as tf
    from ray.train.tensorflow import prepare_dataset_shard

    from emotion_ray.images import pixels_from_arrow

    eye = np.eye(num_classes, dtype=np.float32)

    def batches():
        # Arrow batches: the images are a view of the column's buffer, not a per-row copy.
        for batch in shard.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            local_shuffle_buffer_size=batch_size * 8 if shuffle else None,
            prefetch_batches=2,
        ):
            yield pixels_from_arrow(batch["image"], image_size), eye[batch["label_index"].to_numpy()]

    ds = tf.data.Dataset.from_generator(
        batches,
        output_signature=(
            tf.TensorSpec((None, image_size, image_size, 3), tf.uint8),
            tf.TensorSpec((None, num_classes), tf.float32),
        ),
    )
    if cache_rows:
        ds = ds.unbatch().cache()
        if shuffle:
            ds = ds.shuffle(cache_rows, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size)
    # Each worker already reads only its own shard: switch TF's auto-sharding off.
    return prepare_dataset_shard(ds)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import tensorflow as tf

    from emotion_ray import model as model_lib
    from emotion_ray import tracking

    cfg = TrainConfig.model_validate(loop_config["train"])
    classes, image_size = loop_config["classes"], loop_config["image_size"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # The workers on a node share its cores (the CPU reservation is only a scheduling hint,
    # often below one CPU here to leave Ray Data room): one worker per node uses them all.
    threads = max(1, len(os.sched_getaffinity(0)) // ctx.get_local_world_size())
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.keras.utils.set_random_seed(cfg.seed)

    # One worker has one device and nobody to all-reduce with: MWMS's collectives would only
    # cost time (~13% of an epoch here, bench/RESULTS.md), so it takes the default strategy.
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()
    work_dir = tempfile.mkdtemp(prefix=f"emotion_ray_rank{rank}_")
    state = {"epoch": 0, "best_val_loss": None, "best_epoch": None, "bad_epochs": 0, "history": [], "starts": []}
    checkpoint = ray.train.get_checkpoint()
    with strategy.scope():
        if checkpoint:
            with checkpoint.as_directory() as ckpt_dir:
                with open(os.path.join(ckpt_dir, STATE_FILE)) as fh:
                    state = json.load(fh)
                shutil.copy(os.path.join(ckpt_dir, BEST_MODEL), os.path.join(work_dir, BEST_MODEL))
                model = tf.keras.models.load_model(os.path.join(ckpt_dir, LATEST_MODEL), safe_mode=True)
        else:
            model = model_lib.compile_model(
                model_lib.build_model(cfg.model, len(classes), image_size, cfg.storage), cfg.learning_rate
            )
    state["starts"].append(state["epoch"])

    per_worker_batch = cfg.batch_size // world
    cache_rows = loop_config["cache_rows_per_worker"]
    train_ds = _tf_dataset(ray.train.get_dataset_shard("train"), image_size, len(classes), per_worker_batch, True,
                           cache_rows)
    val_ds = _tf_dataset(ray.train.get_dataset_shard("val"), image_size, len(classes), per_worker_batch, False,
                         cache_rows)

    class ReportEachEpoch(tf.keras.callbacks.Callback):
        """Early stopping on val_loss, best-model tracking, checkpoint + report every epoch."""

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            metrics = {k: float(v) for k, v in (logs or {}).items()}
            metrics["epoch_seconds"] = time.perf_counter() - self.started
            epoch_no = epoch + 1
            improved = state["best_val_loss"] is None or metrics["val_loss"] < state["best_val_loss"]
            if improved:
                state.update(best_val_loss=metrics["val_loss"], best_epoch=epoch_no, bad_epochs=0)
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch_no
            state["history"].append({"epoch": epoch_no, **metrics})
            # val_loss is all-reduced, so every worker takes the same stopping decision.
            if state["bad_epochs"] >= cfg.early_stopping_patience:
                self.model.stop_training = True

            # Every worker saves (saving may run collective ops); only the chief's is kept.
            ckpt_dir = os.path.join(work_dir, f"epoch_{epoch_no:04d}")
            os.makedirs(ckpt_dir, exist_ok=True)
            self.model.save(os.path.join(ckpt_dir, LATEST_MODEL))
            if improved:
                self.model.save(os.path.join(work_dir, BEST_MODEL))
            shutil.copy(os.path.join(work_dir, BEST_MODEL), os.path.join(ckpt_dir, BEST_MODEL))
            with open(os.path.join(ckpt_dir, STATE_FILE), "w") as fh:
                json.dump(state, fh)
            report = {"epoch": epoch_no, **metrics, "best_val_loss": state["best_val_loss"]}
            if rank == 0:
                if loop_config.get("mlflow_run_id"):
                    tracking.log_metrics(cfg.mlflow.tracking_uri, loop_config["mlflow_run_id"], metrics, epoch_no)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))
            else:
                ray.train.report(report, checkpoint=None)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            if rank == 0:
                print(f"epoch {epoch_no}: fit {metrics['epoch_seconds']:.1f}s, "
                      f"checkpoint+report {time.perf_counter() - self.started - metrics['epoch_seconds']:.1f}s", flush=True)

    if state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.early_stopping_patience:
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=cfg.epochs,
            initial_epoch=state["epoch"],
            callbacks=[ReportEachEpoch()],
            verbose=0,
        )
    else:
        # Restored after its last epoch: the driver died before the run was recorded as ended
        # (a Tune trial killed with its experiment). Report the final epoch again, so whoever
        # waits for metrics (Tune's scheduler, `train --resume`) gets them; its checkpoint is
        # already registered.
        ray.train.report({**state["history"][-1], "best_val_loss": state["best_val_loss"]}, checkpoint=None)


# ----------------------------------------------------------------------------- driver side
def _run_storage(cfg: TrainConfig) -> tuple[str, Any]:
    """RunConfig's (storage_path, storage_filesystem) for `cfg.output`."""
    if storage.is_s3(cfg.output):
        if cfg.storage.s3_endpoint_url:
            return storage.strip_scheme(cfg.output), storage.pyarrow_filesystem(cfg.output, cfg.storage)
        return cfg.output, None
    return os.path.abspath(cfg.output), None


def resolve_dataset(cfg: TrainConfig, run_dir: str) -> tuple[str, dict[str, Any]]:
    """Use a prepared dataset, or prepare an image folder into the run directory first."""
    from emotion_ray.data import is_prepared, prepare, read_manifest

    if is_prepared(cfg.data, cfg.storage):
        manifest = read_manifest(cfg.data, cfg.storage)
        if cfg.image_size is not None and manifest["image_size"] != cfg.image_size:
            raise ConfigError(
                f"image_size {cfg.image_size} differs from the prepared dataset's {manifest['image_size']}; "
                "re-run prepare to change it"
            )
        return cfg.data, manifest
    dataset_uri = storage.join(run_dir, "dataset")
    if not is_prepared(dataset_uri, cfg.storage):
        prepare_cfg = PrepareConfig(inputs=[cfg.data], output=dataset_uri, image_size=cfg.image_size or 256,
                                    storage=cfg.storage, overwrite=True)
        prepare(prepare_cfg)
    return dataset_uri, read_manifest(dataset_uri, cfg.storage)


TRIAL_DRIVER_CPUS = 0.01  # what tune.py reserves for each trial's driver function


def worker_cpus(workers: int, use_gpu: bool, trials: int = 0) -> float:
    """Default CPU reservation per worker: 1, but on small CPU-only clusters less, so that one
    whole CPU stays free for Ray Data's read tasks (`trials` concurrent Tune trial drivers
    are counted too)."""
    import ray

    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    free = cluster_cpus - 1 - TRIAL_DRIVER_CPUS * trials
    groups = workers * max(trials, 1)
    if use_gpu or free >= groups:
        return 1.0
    if cluster_cpus <= 1:
        return 1.0  # an autoscaling cluster's head: workers arrive with their own CPUs
    return max(0.01, int(free / groups * 100) / 100)


CACHE_BYTES_PER_WORKER = 2 * 1024**3


def _cache_rows(cfg: TrainConfig, manifest: dict[str, Any]) -> int:
    """Rows each worker may cache in memory (0: stream from Ray Data every epoch)."""
    rows = manifest["split_rows"]["train"] + manifest["split_rows"]["val"]
    per_worker = -(-rows // cfg.workers)
    fits = per_worker * manifest["image_size"] ** 2 * 3 <= CACHE_BYTES_PER_WORKER
    return per_worker if (cfg.cache_in_memory if cfg.cache_in_memory is not None else fits) else 0


def build_trainer(
    cfg: TrainConfig,
    dataset_uri: str,
    manifest: dict[str, Any],
    run_name: str,
    mlflow_run_id: str | None = None,
    callbacks: list | None = None,
):
    """The TensorflowTrainer for one training run; tune.py builds its trials with this too."""
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from emotion_ray.data import load_split

    storage_path, storage_fs = _run_storage(cfg)
    cpus_per_worker = cfg.cpus_per_worker or worker_cpus(cfg.workers, cfg.use_gpu)
    resources = {"CPU": cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "classes": manifest["classes"],
            "image_size": manifest["image_size"],
            "mlflow_run_id": mlflow_run_id,
            "cache_rows_per_worker": _cache_rows(cfg, manifest),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        datasets={
            "train": load_split(dataset_uri, "train", cfg.storage).randomize_block_order(),
            "val": load_split(dataset_uri, "val", cfg.storage),
        },
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": dict(WORKER_ENV)},
            callbacks=callbacks or [],
        ),
    )


def _evaluate_and_export(checkpoint, dataset_uri: str, storage_cfg: StorageConfig, classes: list[str],
                         image_size: int) -> dict[str, Any]:
    """Ray task: the best model's test metrics, plus the model file and training state."""
    import numpy as np

    from emotion_ray.data import load_split
    from emotion_ray.images import pixels_from_arrow
    from emotion_ray.model import inference_function, load_model

    with checkpoint.as_directory() as ckpt_dir:
        with open(os.path.join(ckpt_dir, BEST_MODEL), "rb") as fh:
            model_bytes = fh.read()
        with open(os.path.join(ckpt_dir, STATE_FILE)) as fh:
            state = json.load(fh)
        model = load_model(os.path.join(ckpt_dir, BEST_MODEL))
    forward = inference_function(model)
    n = len(classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    try:
        test = load_split(dataset_uri, "test", storage_cfg)
    except ConfigError:
        test = None
    if test is not None:
        for batch in test.iter_batches(batch_size=256, batch_format="pyarrow"):
            probs = forward(pixels_from_arrow(batch["image"], image_size)).numpy()
            np.add.at(confusion, (batch["label_index"].to_numpy(), probs.argmax(axis=1)), 1)
    return {"model_bytes": model_bytes, "state": state, "metrics": classification_metrics(confusion, classes)}


def classification_metrics(confusion, classes: list[str]) -> dict[str, Any]:
    """Precision, recall, categorical accuracy overall (micro) and per class, from a confusion matrix.

    Overall precision and recall match Keras' Precision/Recall on one-hot labels with argmax
    predictions (micro averages); macro averages are reported beside them.
    """
    import numpy as np

    confusion = np.asarray(confusion)
    total = int(confusion.sum())
    true_pos = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(axis=0).astype(float), confusion.sum(axis=1).astype(float)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    accuracy = float(true_pos.sum() / total) if total else 0.0
    return {
        "test_rows": total,
        "categorical_accuracy": accuracy,
        "precision": accuracy,  # micro precision == micro recall == accuracy for single-label argmax
        "recall": accuracy,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "support": int(actual[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": {"labels": classes, "rows_true_cols_predicted": confusion.tolist()},
    }


def _plots(export_dir: str, history: list[dict[str, float]], metrics: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    for name, keys, title in (
        ("loss.png", ("loss", "val_loss"), "Loss"),
        ("accuracy.png", ("categorical_accuracy", "val_categorical_accuracy"), "Accuracy"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, colour in zip(keys, ("teal", "orange")):
            ax.plot(epochs, [h.get(key) for h in history], color=colour, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(loc="upper left")
        fig.savefig(os.path.join(export_dir, name), dpi=100, bbox_inches="tight")
        plt.close(fig)
    cm = metrics["confusion_matrix"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm["rows_true_cols_predicted"], cmap="Blues")
    labels = cm["labels"]
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, row in enumerate(cm["rows_true_cols_predicted"]):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center")
    ax.set_title("Test confusion matrix")
    fig.savefig(os.path.join(export_dir, "confusion_matrix.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)


def export_run(checkpoint, cfg: TrainConfig, dataset_uri: str, manifest: dict[str, Any], run_dir: str,
               mlflow_run_id: str | None) -> dict[str, Any]:
    """Evaluate the best model on the test split and write the run directory (and MLflow)."""
    import ray

    classes, image_size = manifest["classes"], manifest["image_size"]
    evaluate = ray.remote(num_cpus=1, num_gpus=1 if cfg.use_gpu else 0)(_evaluate_and_export)
    out = ray.get(evaluate.remote(checkpoint, dataset_uri, cfg.storage, classes, image_size))
    state, metrics = out["state"], out["metrics"]
    metrics.update(best_epoch=state["best_epoch"], epochs_run=state["epoch"], best_val_loss=state["best_val_loss"],
                   training_starts=state["starts"])

    with tempfile.TemporaryDirectory() as export_dir:
        files = {
            "model.keras": out["model_bytes"],
            "labels.json": json.dumps({"classes": classes, "image_size": image_size,
                                       "input": "uint8 RGB, scaled inside the model"}, indent=2).encode(),
            "config.yaml": yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode(),
            "metrics.json": json.dumps(metrics, indent=2).encode(),
            "history.csv": _history_csv(state["history"]),
        }
        for name, data in files.items():
            with open(os.path.join(export_dir, name), "wb") as fh:
                fh.write(data)
        _plots(export_dir, state["history"], metrics)
        for name in sorted(os.listdir(export_dir)):
            storage.upload_file(os.path.join(export_dir, name), storage.join(run_dir, name), cfg.storage)
        if mlflow_run_id:
            from emotion_ray import tracking

            metrics["registered_model"] = tracking.finish_run(cfg.mlflow, mlflow_run_id, export_dir,
                                                              {k: v for k, v in metrics.items()
                                                               if isinstance(v, float)})
    return metrics


def _history_csv(history: list[dict[str, float]]) -> bytes:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for row in history for k in row))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue().encode()


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Train, evaluate, export and track one run; returns its summary."""
    from emotion_ray import tracking

    run_name = cfg.run_name or "run_" + dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    run_dir = storage.join(cfg.output, run_name)
    exists = storage.exists(run_dir, cfg.storage)
    if exists and not cfg.resume:
        raise ConfigError(f"run {run_dir} already exists; pass --resume to continue it, or choose a new --run-name")
    if cfg.resume and not exists:
        raise ConfigError(f"cannot resume: no run at {run_dir}")
    init_ray()
    dataset_uri, manifest = resolve_dataset(cfg, run_dir)

    mlflow_run_id = None
    if cfg.mlflow.enabled:
        mlflow_run_id = tracking.start_run(cfg.mlflow, run_name, cfg.model_dump(mode="json"),
                                           parent_run_id=cfg.mlflow_parent_run_id, resume=cfg.resume)
    # Same name + storage path: Ray Train V2 restores the run's checkpoint state on its own.
    result = build_trainer(cfg, dataset_uri, manifest, run_name, mlflow_run_id).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {run_name} produced no checkpoint: {result.error}")
    metrics = export_run(result.checkpoint, cfg, dataset_uri, manifest, run_dir, mlflow_run_id)
    return {"run_dir": run_dir, "mlflow_run_id": mlflow_run_id, **metrics}
