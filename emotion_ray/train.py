"""train (driver): dataset, resources, the TensorflowTrainer, and one run end to end.

`run_training` resolves the dataset (preparing an image folder on the fly), starts the MLflow
run, fits the trainer built by `build_trainer` (tune.py builds its trials with it too), and
hands the best checkpoint to evaluate.export_run. The training loop itself is in
train_worker.py, the only part shipped to the workers.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from typing import Any

from emotion_ray import console, outputs, storage
from emotion_ray.config import PrepareConfig, TrainConfig
from emotion_ray.errors import ConfigError, InputStallError, StageError
from emotion_ray.runtime import bound_worker_placement, init_ray, train_worker_runtime_env


def run_storage(cfg: TrainConfig) -> tuple[str, Any]:
    """RunConfig's (storage_path, storage_filesystem) for `cfg.output`."""
    if storage.is_s3(cfg.output):
        if cfg.storage.s3_endpoint_url:
            return storage.strip_scheme(cfg.output), storage.pyarrow_filesystem(cfg.output, cfg.storage)
        return cfg.output, None
    return os.path.abspath(cfg.output), None


def resolve_dataset(cfg: TrainConfig, run_dir: str) -> tuple[str, dict[str, Any]]:
    """Use a prepared dataset, or prepare an image folder into the run directory first."""
    from emotion_ray.dataset import is_prepared, read_manifest
    from emotion_ray.prepare import prepare

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


def worker_cpus(cluster_cpus: float, workers: int, use_gpu: bool, groups: int = 1, reserved: float = 0.0) -> float:
    """Default CPU reservation per worker: 1, but on small CPU-only clusters less, so that one
    whole CPU stays free for Ray Data (when there is more than one), and the workers fit at all.

    `groups` worker groups run at once (concurrent Tune trials), and `reserved` CPUs are held
    by others (their trial drivers). A cluster with no CPU is an autoscaling cluster's head:
    workers arrive with their own CPUs, so they ask for 1. A 1-CPU machine is a machine: its
    workers share what the trial drivers leave (reads need none: dataset.READ_TASK_CPUS).
    """
    wanted = workers * groups
    if use_gpu or cluster_cpus < 1:
        return 1.0
    free = cluster_cpus - 1 - reserved
    if free >= wanted:
        return 1.0
    if free <= 0:  # nothing to leave to Ray Data: the workers share what the drivers leave
        free = cluster_cpus - reserved
    return max(0.01, int(free / wanted * 100) / 100)


def input_stall(error: BaseException) -> InputStallError | None:
    """The InputStallError a Train worker raised, from the error `trainer.fit()` raised (Ray Train
    wraps each worker's exception in a WorkerGroupError, Ray a trial's in a RayTaskError whose text
    is the whole remote traceback), as a plain InputStallError of its one-line message; None if none."""
    chain, todo = [], [error]
    while todo:
        exc = todo.pop()
        if exc is None or any(exc is seen for seen in chain):
            continue
        chain.append(exc)
        todo += [exc.__cause__, exc.__context__, getattr(exc, "cause", None)]
        todo += list((getattr(exc, "worker_failures", None) or {}).values())
    # Its text, from wherever it is (a worker's exception may cross processes as text only).
    for exc in chain:
        match = _STALL.search(str(exc))
        if match:
            return InputStallError(match.group(0))
    return next((InputStallError(str(exc)) for exc in chain if isinstance(exc, InputStallError)), None)


_STALL = re.compile(r"input stalled: [^\n]*")


CACHE_BYTES_PER_WORKER = 2 * 1024**3


def _cache_rows(cfg: TrainConfig, manifest: dict[str, Any]) -> int:
    """Rows each worker may cache in memory (0: stream from Ray Data every epoch)."""
    rows = manifest["split_rows"]["train"] + manifest["split_rows"]["val"]
    per_worker = -(-rows // cfg.workers)
    fits = per_worker * manifest["image_size"] ** 2 * 3 <= CACHE_BYTES_PER_WORKER
    return per_worker if (cfg.cache_in_memory if cfg.cache_in_memory is not None else fits) else 0


def init_model(cfg: TrainConfig, manifest: dict[str, Any]):
    """The ModelBundle that `model.init_from` names (None without it); ConfigError when it is
    missing or made for another image size than the dataset's."""
    if not cfg.model.init_from:
        return None
    from emotion_ray.inference import resolve_model

    bundle = resolve_model(cfg.model.init_from, cfg.storage, cfg.mlflow.tracking_uri)
    if bundle.image_size != manifest["image_size"]:
        raise ConfigError(f"init_from {cfg.model.init_from} takes {bundle.image_size}px images but the dataset is "
                          f"{manifest['image_size']}px; prepare it with --image-size {bundle.image_size}")
    return bundle


def check_model_fits(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    """ConfigError when the architecture cannot take the dataset's image size (a prepared dataset's
    size is known only from its manifest)."""
    problem = cfg.model.image_size_problem(manifest["image_size"])
    if problem:
        raise ConfigError(f"{problem} (the dataset's size; prepare it with a larger --image-size)")


def _train_loop_on_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: TensorFlow is imported on the workers only, never here."""
    from emotion_ray.train_worker import train_loop_per_worker

    train_loop_per_worker(loop_config)


def training_datasets(cfg: TrainConfig, dataset_uri: str) -> dict[str, Any]:
    """{"train", "val"}: the Ray Datasets a run trains on. Build them where no placement group
    holds CPUs (a driver, before its Tune trials start) and hand them to the trials: building one
    runs Ray Data's Parquet sampling tasks, a whole CPU each, which inside a trial on a 1-CPU
    machine (its driver's 0.01 reserved) never start (issue 30)."""
    from emotion_ray.dataset import load_split

    return {split: load_split(dataset_uri, split, cfg.storage, read_cpus=cfg.data_read_cpus)
            for split in ("train", "val")}


def build_trainer(
    cfg: TrainConfig,
    dataset_uri: str,
    manifest: dict[str, Any],
    run_name: str,
    mlflow_run_id: str | None = None,
    callbacks: list | None = None,
    backbone_weights: bytes | None = None,
    progress=None,
    datasets: dict[str, Any] | None = None,
):
    """The TensorflowTrainer for one training run; tune.py builds its trials with this too.
    `datasets`: training_datasets(cfg, dataset_uri) as the caller built it outside any trial
    (built here when not given).
    `backbone_weights`: backbones.resolve_weights(cfg.model) as the caller read it once (read here
    when not given); every worker gets these bytes, none reads or downloads the file itself.
    `progress`: a console.Tally handle the chief reports each epoch to, or None."""
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from emotion_ray.backbones import resolve_weights
    from emotion_ray.metrics import chance_loss
    from emotion_ray.tf_backend import MultiWorkerTFConfig

    if backbone_weights is None:
        backbone_weights = resolve_weights(cfg.model, cfg.storage)
    datasets = datasets or training_datasets(cfg, dataset_uri)

    storage_path, storage_fs = run_storage(cfg)
    cpus_per_worker = cfg.cpus_per_worker or worker_cpus(ray.cluster_resources().get("CPU", 0), cfg.workers,
                                                         cfg.use_gpu)
    resources = {"CPU": cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return TensorflowTrainer(
        _train_loop_on_worker,
        tensorflow_config=MultiWorkerTFConfig(),  # spares Ray Train's controller a TensorFlow import
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "classes": manifest["classes"],
            "image_size": manifest["image_size"],
            "mlflow_run_id": mlflow_run_id,
            "cache_rows_per_worker": _cache_rows(cfg, manifest),
            "init_model": init_model(cfg, manifest),
            "backbone_weights": backbone_weights,
            "steps_per_epoch": -(-manifest["split_rows"]["train"] // cfg.batch_size),
            "train_counts": manifest["counts"]["train"],
            "chance_val_loss": chance_loss(manifest["counts"]["train"], manifest["counts"]["val"], manifest["classes"]),
            "progress": progress,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        datasets={"train": datasets["train"].randomize_block_order(), "val": datasets["val"]},
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            # CPU workers that cannot be placed for input_stall_timeout_s fail the run (train.fit);
            # GPU workers may wait for an autoscaler's nodes as long as it takes.
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.max_failures,
                **({} if cfg.use_gpu else bound_worker_placement(cfg.input_stall_timeout_s))),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env=train_worker_runtime_env(),
            callbacks=callbacks or [],
        ),
    )


def fit(trainer):
    """`trainer.fit()`, its stalls raised as StageErrors (one line, exit 2) rather than inside Ray
    Train's wrappers: a worker's InputStallError as itself, after Ray Train's own retries
    (max_failures); a worker group that could not be placed (runtime.bound_worker_placement) with
    the CPU reservations that kept it out."""
    try:
        return trainer.fit()
    except Exception as exc:
        stall = input_stall(exc)
        if stall is not None:
            raise stall from exc
        if "WorkerGroupStartupTimeoutError" in _names(exc) or "worker group startup timed out" in str(exc):
            from emotion_ray.runtime import cpu_reservations, describe_cpu_reservations

            raise StageError(f"the Train workers could not be placed: their start timed out "
                             f"{trainer.run_config.failure_config.controller_failure_limit} time(s). Cluster: "
                             f"{describe_cpu_reservations(cpu_reservations())}") from exc
        raise


def _names(exc: BaseException) -> set[str]:
    """The class names of `exc` and every exception it carries (causes, a ControllerError's failure)."""
    names, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or type(e).__name__ in names:
            continue
        names.add(type(e).__name__)
        todo += [e.__cause__, e.__context__, getattr(e, "controller_failure", None)]
    return names


def run_training(cfg: TrainConfig, mlflow_parent_run_id: str | None = None) -> dict[str, Any]:
    """Train, evaluate, export and track one run; returns its summary (metrics.json's figures,
    run_dir, mlflow_run_id). `mlflow_parent_run_id` hangs the MLflow run under another."""
    from emotion_ray import tracking
    from emotion_ray.backbones import resolve_weights
    from emotion_ray.evaluate import export_run

    run_name = cfg.run_name or "run_" + dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    run_dir = storage.join(cfg.output, run_name)
    # A run directory holding only the CLI's log is a run that stopped before it started.
    exists = any(not name.startswith(outputs.LOG_PREFIX) for name in storage.listdir_names(run_dir, cfg.storage))
    if exists and not cfg.resume:
        raise ConfigError(f"run {run_dir} already exists; pass --resume to continue it, or choose a new --run-name")
    if cfg.resume and not exists:
        raise ConfigError(f"cannot resume: no run at {run_dir}")
    backbone_weights = resolve_weights(cfg.model, cfg.storage)  # read (or downloaded) once, here
    init_ray()
    # The run's folder gets the CLI's log now, before an image folder is prepared into it (its
    # prepare keeps the log where it is). A folder left holding only the log is no run (above).
    console.keep_log_in(run_dir)
    dataset_uri, manifest = resolve_dataset(cfg, run_dir)
    check_model_fits(cfg, manifest)

    mlflow_run_id = None
    if cfg.mlflow.enabled:
        mlflow_run_id = tracking.start_run(cfg.mlflow, run_name, cfg.model_dump(mode="json"),
                                           parent_run_id=mlflow_parent_run_id, resume=cfg.resume)
        tracking.record_training_run(cfg, mlflow_run_id, run_name, dataset_uri, manifest)
        if cfg.model.init_from:  # the model this one started from (transfer learning)
            tracking.client(cfg.mlflow.tracking_uri).set_tag(mlflow_run_id, "emotion_ray.init_from",
                                                             cfg.model.init_from)
    # Same name + storage path: Ray Train V2 restores the run's checkpoint state on its own.
    with console.remote_progress(cfg.epochs, "training", "epoch") as progress:
        result = fit(build_trainer(cfg, dataset_uri, manifest, run_name, mlflow_run_id,
                                   backbone_weights=backbone_weights, progress=progress))
    if result.checkpoint is None:
        raise RuntimeError(f"training {run_name} produced no checkpoint: {result.error}")
    metrics = export_run(result.checkpoint, cfg, dataset_uri, manifest, run_dir, mlflow_run_id)
    return {"run_dir": run_dir, "mlflow_run_id": mlflow_run_id, **metrics}
