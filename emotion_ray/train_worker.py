"""What runs on each Ray Train worker: the training loop, its tf.data input, its epoch checkpoints.

Shipped to the workers by train.build_trainer; nothing here runs on the driver. Batch size is
global: each of N workers takes batch_size / N rows per step, and MultiWorkerMirroredStrategy
averages their gradients, so results do not depend on N.

Each epoch every worker reports its metrics and the chief (rank 0) attaches a checkpoint
(the latest model with its optimizer state, the best model so far without, the training
state). A replaced worker group, `--resume`, or a Tune trial restart all continue from it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from emotion_ray import model as model_lib
from emotion_ray.config import TrainConfig
from emotion_ray.early_stopping import learned_below, stops_early
from emotion_ray.errors import InputStallError
from emotion_ray.images import pixels_from_arrow

STATE_FILE = "state.json"
LATEST_MODEL = "model.keras"
BEST_MODEL = "best.keras"


def fresh_state() -> dict[str, Any]:
    """A run's training state before its first epoch (what a checkpoint's state.json holds).
    `reused_frozen`: with init_from, whether the reused layers are still frozen."""
    return {"epoch": 0, "best_val_loss": None, "best_epoch": None, "bad_epochs": 0, "history": [], "starts": [],
            "reused_frozen": False}


def watched(batches: Iterator, stall_timeout_s: float, what: str, read_cpus: float = 0.0) -> Iterator:
    """`batches`, drawn by a helper thread, with a watchdog: InputStallError (a StageError) once
    the caller has waited `stall_timeout_s` seconds for one batch. Ray Data's iterators have no
    timeout of their own: a read task that never gets its CPUs blocks the worker forever (issue 30).
    The clock runs only while the caller waits, so a slow consumer (training) never trips it.
    `what` names the input in the error (e.g. "the train split"); `read_cpus` is what each read asks."""
    import queue
    import threading

    items: queue.Queue = queue.Queue(maxsize=2)  # the next batches, as Ray Data's own prefetch
    stop = threading.Event()
    end = object()

    def offer(item) -> bool:
        """Queue `item` unless the consumer has gone; whether it was queued."""
        while not stop.is_set():
            try:
                items.put(item, timeout=1)
                return True
            except queue.Full:
                continue
        return False

    def draw() -> None:
        try:
            for item in batches:
                if not offer(item):
                    return
            offer(end)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            offer(exc)

    threading.Thread(target=draw, name="input-watchdog", daemon=True).start()
    try:
        while True:
            try:
                item = items.get(timeout=stall_timeout_s)
            except queue.Empty:
                raise InputStallError(stall_message(what, stall_timeout_s, read_cpus)) from None
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # an abandoned epoch (early stop, error): the helper stops at its next batch


def stall_message(what: str, waited_s: float, read_cpus: float) -> str:
    """The InputStallError's text: what waited, for how long, and the cluster's CPU reservations
    at that moment (runtime.cpu_reservations), so the person reading it sees who holds the CPUs."""
    from emotion_ray.runtime import cpu_reservations, describe_cpu_reservations

    try:
        held = describe_cpu_reservations(cpu_reservations())
    except Exception as exc:  # noqa: BLE001 - the stall is the error to report, not this query
        held = f"the reservations could not be read ({exc})"
    return (f"input stalled: no batch from {what} (Ray Data) in {waited_s:g} s; its read tasks ask {read_cpus:g} "
            f"CPU each. Cluster: {held}. A placement group holds its CPUs until removed, used or not; raise "
            "input_stall_timeout_s if the input is only slow")


def tf_dataset(shard, image_size: int, num_classes: int, batch_size: int, shuffle: bool, cache_rows: int = 0,
               stall_timeout_s: float | None = None, what: str = "the input", read_cpus: float = 0.0):
    """A tf.data pipeline of (uint8 images (B, size, size, 3), one-hot labels (B, classes))
    over this worker's Ray Data shard; re-iterated every epoch. With `stall_timeout_s`, a shard
    that delivers no batch for that long raises InputStallError (see `watched`; `what` and
    `read_cpus` word its message).

    With `cache_rows` (> 0: the shard fits in memory), the shard is read once, here, into two
    tensors in host memory, and every epoch gathers its batches from them in a new random order:
    on small data Ray Data's per-epoch start-up costs far more than the training itself. Without,
    every epoch streams the shard from Ray Data (with a local shuffle buffer).
    """
    from ray.train.tensorflow import prepare_dataset_shard

    eye = np.eye(num_classes, dtype=np.float32)

    def batches(local_shuffle: bool):
        # Arrow batches: the images are a view of the column's buffer, not a per-row copy.
        arrow = shard.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            local_shuffle_buffer_size=batch_size * 8 if local_shuffle else None,
            prefetch_batches=2,
        )
        if stall_timeout_s:
            arrow = watched(iter(arrow), stall_timeout_s, what, read_cpus)
        for batch in arrow:
            yield pixels_from_arrow(batch["image"], image_size), eye[batch["label_index"].to_numpy()]

    if cache_rows:
        # Not from_generator + cache(): a pipeline that starts in a Python generator trained the
        # face recipe far slower per image inside a Ray Train worker even once its cache was
        # full (bench/RESULTS.md, train, the face recipe); indices into in-memory tensors do not.
        empty = (np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros((0, num_classes), np.float32))
        parts = list(batches(False)) or [empty]
        with tf.device("/cpu:0"):  # host memory: tf.data runs on the CPU
            images, labels = (tf.constant(np.concatenate(column)) for column in zip(*parts))
        del parts
        rows = int(images.shape[0])
        ds = tf.data.Dataset.range(rows)
        if shuffle:
            ds = ds.shuffle(max(rows, 1), reshuffle_each_iteration=True)
        ds = ds.batch(batch_size).map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))
    else:
        ds = tf.data.Dataset.from_generator(
            lambda: batches(shuffle),
            output_signature=(
                tf.TensorSpec((None, image_size, image_size, 3), tf.uint8),
                tf.TensorSpec((None, num_classes), tf.float32),
            ),
        )
    # Each worker already reads only its own shard: switch TF's auto-sharding off.
    return prepare_dataset_shard(ds)


class EpochCheckpoint(tf.keras.callbacks.Callback):
    """Early stopping on val_loss (stops_early), best-model tracking, and a checkpoint + report every epoch.

    `state` (see fresh_state) is updated in place; `work_dir` holds this worker's best model;
    `bar`: learned_below's val_loss (None: none); `on_report(metrics, epoch)` runs on the chief
    before each report (live MLflow metrics); `progress` (a console.Tally handle, or None) gets
    the chief's epoch count for the driver's bar.
    """

    def __init__(self, state: dict[str, Any], work_dir: str, patience: int, rank: int, on_report=None,
                 progress=None, bar: float | None = None):
        super().__init__()
        self.state, self.work_dir, self.patience, self.rank = state, work_dir, patience, rank
        self.on_report, self.progress, self.bar = on_report, progress, bar
        self.started = self.cpu_started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        import ray.train

        state = self.state
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        metrics["epoch_seconds"] = time.perf_counter() - self.started
        # CPU seconds of this worker's process (all its threads): on a shared machine, what the epoch
        # cost rather than how long it waited for the cores.
        metrics["epoch_cpu_seconds"] = time.process_time() - self.cpu_started
        epoch_no = epoch + 1
        improved = state["best_val_loss"] is None or metrics["val_loss"] < state["best_val_loss"]
        if improved:
            state.update(best_val_loss=metrics["val_loss"], best_epoch=epoch_no, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch_no
        state["history"].append({"epoch": epoch_no, **metrics})
        # val_loss is all-reduced, so every worker takes the same stopping decision.
        if stops_early(state, self.patience, self.bar):
            self.model.stop_training = True

        # Every worker saves (saving may run collective ops); only the chief's is kept.
        ckpt_dir = os.path.join(self.work_dir, f"epoch_{epoch_no:04d}")
        os.makedirs(ckpt_dir, exist_ok=True)
        model_lib.save_model(self.model, os.path.join(ckpt_dir, LATEST_MODEL))
        if improved:  # the best model is only ever used for inference: no optimizer state
            model_lib.save_model(self.model, os.path.join(self.work_dir, BEST_MODEL), include_optimizer=False)
        shutil.copy(os.path.join(self.work_dir, BEST_MODEL), os.path.join(ckpt_dir, BEST_MODEL))
        with open(os.path.join(ckpt_dir, STATE_FILE), "w") as fh:
            json.dump(state, fh)
        report = {"epoch": epoch_no, **metrics, "best_val_loss": state["best_val_loss"]}
        if self.rank == 0:
            if self.on_report:
                self.on_report(metrics, epoch_no)
            if self.progress is not None:
                shown = {"val_loss": "val_loss", "val_acc": "val_categorical_accuracy"}
                self.progress.set.remote(epoch_no, {k: f"{metrics[m]:.3f}" for k, m in shown.items() if m in metrics})
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))
        else:
            ray.train.report(report, checkpoint=None)
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def _restore(checkpoint, work_dir: str):
    """(model with optimizer state, training state) from a Ray Train checkpoint."""
    with checkpoint.as_directory() as ckpt_dir:
        with open(os.path.join(ckpt_dir, STATE_FILE)) as fh:
            state = json.load(fh)
        shutil.copy(os.path.join(ckpt_dir, BEST_MODEL), os.path.join(work_dir, BEST_MODEL))
        return model_lib.load_model(os.path.join(ckpt_dir, LATEST_MODEL), compile=True), state


def _fine_tuning(cfg: TrainConfig, from_epoch: int) -> TrainConfig:
    """The options that compile a transferred model once its reused layers train: the fine-tune
    rate, over the epochs left (a new optimizer counts its steps from 0)."""
    return cfg.model_copy(update={"learning_rate": cfg.model.fine_tune_learning_rate or cfg.learning_rate / 10,
                                  "epochs": max(1, cfg.epochs - from_epoch), "warmup_epochs": 0.0})


def _initial_model(cfg: TrainConfig, classes: list[str], image_size: int, init_model, state: dict[str, Any],
                   steps_per_epoch: int, backbone_weights: bytes | None = None):
    """A compiled model for a run's first epoch: built from its config, or with init_from (a
    ModelBundle) the earlier model's layers and a classifier for `classes`. Its reused part (the
    earlier model's layers, or a backbone starting from `backbone_weights`) is frozen first when
    freeze_epochs is set, else trained at the fine-tuning rate. Call inside the strategy's scope."""
    if init_model is None:
        model = model_lib.build_model(cfg.model, len(classes), image_size, cfg.storage, backbone_weights)
        if not cfg.model.pretrained_backbone:  # nothing reused: every layer at the run's rate
            return model_lib.compile_for_training(model, cfg, steps_per_epoch)
    else:
        model = model_lib.reuse_for_classes(model_lib.load_model_bytes(init_model.model_bytes),
                                            init_model.classes, classes)
    if cfg.model.freeze_epochs:
        model_lib.set_reused_trainable(model, False)
        state["reused_frozen"] = True
        return model_lib.compile_for_training(model, cfg, steps_per_epoch)
    return model_lib.compile_for_training(model, _fine_tuning(cfg, 0), steps_per_epoch)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function. `loop_config`: train (a TrainConfig as JSON), classes,
    image_size, mlflow_run_id (or None), cache_rows_per_worker, init_model (a ModelBundle or None),
    backbone_weights (the bytes of the backbone's weights file, or None), steps_per_epoch (optimizer
    steps: ceil(train rows / global batch)), train_counts (rows per class), chance_val_loss
    (metrics.chance_loss of the val split, or None: early stopping's bar, see stops_early)."""
    import ray.train

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
    # cost it time (bench/RESULTS.md, train), so it takes the default strategy.
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()
    work_dir = tempfile.mkdtemp(prefix=f"emotion_ray_rank{rank}_")
    checkpoint = ray.train.get_checkpoint()
    with strategy.scope():
        if checkpoint:
            model, state = _restore(checkpoint, work_dir)
        else:
            state = fresh_state()
            model = _initial_model(cfg, classes, image_size, loop_config.get("init_model"), state,
                                   loop_config["steps_per_epoch"], loop_config.get("backbone_weights"))
    state["starts"].append(state["epoch"])
    # Before the first step is traced: the moving statistics then follow each epoch (small data).
    model_lib.fit_batchnorm_momentum(model, loop_config["steps_per_epoch"])

    per_worker_batch = cfg.batch_size // world
    cache_rows = loop_config["cache_rows_per_worker"]
    # Both shards before either is read: each starts its own Ray Data coordinator process, and
    # these then start side by side rather than one after the other.
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    watchdog = {"stall_timeout_s": cfg.input_stall_timeout_s, "read_cpus": cfg.data_read_cpus}
    train_ds = tf_dataset(train_shard, image_size, len(classes), per_worker_batch, True, cache_rows,
                          what="the train split", **watchdog)
    val_ds = tf_dataset(val_shard, image_size, len(classes), per_worker_batch, False, cache_rows,
                        what="the val split", **watchdog)

    on_report = None
    if loop_config.get("mlflow_run_id") and rank == 0:  # only the chief logs: MLflow costs others its import
        from emotion_ray import tracking

        def on_report(metrics: dict[str, float], epoch: int) -> None:
            tracking.log_metrics(cfg.mlflow.tracking_uri, loop_config["mlflow_run_id"], metrics, epoch)

    bar = learned_below(loop_config.get("chance_val_loss"), cfg.early_stopping_chance_margin)
    callback = EpochCheckpoint(state, work_dir, cfg.early_stopping_patience, rank, on_report,
                               loop_config.get("progress"), bar)
    weights = (model_lib.class_weights(loop_config["train_counts"], classes) if cfg.class_weight == "balanced"
               else None)

    def fit_until(epochs: int) -> None:
        model.fit(train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=state["epoch"], callbacks=[callback],
                  class_weight=weights, verbose=0)

    if state["reused_frozen"]:  # init_from or a pretrained backbone: the new classifier alone first
        fit_until(min(cfg.model.freeze_epochs, cfg.epochs))
        with strategy.scope():
            model_lib.set_reused_trainable(model, True)
            model = model_lib.compile_for_training(model, _fine_tuning(cfg, state["epoch"]),
                                                   loop_config["steps_per_epoch"])
        # Fine-tuning starts a new phase: its epochs get the full patience.
        state.update(reused_frozen=False, bad_epochs=0)
    if state["epoch"] < cfg.epochs and not stops_early(state, cfg.early_stopping_patience, bar):
        fit_until(cfg.epochs)
    else:
        # Restored after its last epoch: the driver died before the run was recorded as ended
        # (a Tune trial killed with its experiment). Report the final epoch again, so whoever
        # waits for metrics (Tune's scheduler, `train --resume`) gets them; its checkpoint is
        # already registered.
        ray.train.report({**state["history"][-1], "best_val_loss": state["best_val_loss"]}, checkpoint=None)
