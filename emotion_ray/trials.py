"""What runs in a Ray Tune trial's process: a search trial (tune.py) and a cross-validation fold
(crossval.py). The drivers in those modules build the Tuner; these functions are its trainables.

Ray Train V2 pattern: a trial is a function that builds a TensorflowTrainer with
train.build_trainer (the same training loop as `emotion-ray train`) and fits it. `_setup` in the
trial's config is what its driver decided once for every trial (configs, dataset, MLflow parent).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from emotion_ray import storage
from emotion_ray.config import CrossValidationConfig, TuneConfig


def search_trial(config: dict[str, Any], backbone_weights: dict[tuple[str, str], bytes] | None = None,
                 datasets: dict[str, Any] | None = None) -> None:
    """One Tune trial: the same TensorflowTrainer `emotion-ray train` builds, fitted once.
    `backbone_weights`: see tune.backbone_weights() (Tune ships them through the object store once);
    `datasets`: train.training_datasets as the driver built them (None: built here)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from emotion_ray import tracking
    from emotion_ray.train import build_trainer, fit

    setup = config["_setup"]
    tcfg = TuneConfig.model_validate(setup["tune"])
    # Named after the trial id (no timestamps): a restored trial finds its own run and checkpoint.
    run_name = f"trial_{ray.tune.get_context().get_trial_id()}"
    sampled = {k: v for k, v in config.items() if k != "_setup"}
    cfg = tcfg.train_config(sampled, run_name=run_name)
    mlflow_run_id = None
    if tcfg.mlflow.enabled:
        mlflow_run_id = tracking.start_run(tcfg.mlflow, run_name, {**cfg.model_dump(mode="json"), **sampled},
                                           parent_run_id=setup["parent_run_id"], resume=True,
                                           source=setup["source_tags"])
        tracking.record_training_run(cfg, mlflow_run_id, run_name, setup["dataset_uri"], setup["manifest"])
    weights = (backbone_weights or {}).get((cfg.model.architecture, cfg.model.backbone_weights))
    if datasets is not None and cfg.data_read_cpus != tcfg.train_config({}).data_read_cpus:
        datasets = None  # the driver built them for the base's data_read_cpus; this trial samples its own
    trainer = build_trainer(cfg, setup["dataset_uri"], setup["manifest"], run_name, mlflow_run_id,
                            callbacks=[TuneReportCallback()], backbone_weights=weights, datasets=datasets)
    fit(trainer)  # a stalled input ends the trial with its InputStallError; the search goes on
    if mlflow_run_id:
        tracking.client(tcfg.mlflow.tracking_uri).set_terminated(mlflow_run_id, status="FINISHED")


def fold_trial(config: dict[str, Any], backbone_weights: bytes | None = None,
               datasets: list[dict[str, Any]] | None = None) -> None:
    """One fold as a Tune trial: train on its dataset (train.build_trainer), evaluate its best
    checkpoint on the held-out fold (evaluate.evaluate_best), write the fold's metrics.json
    and history.csv, and track it as a child MLflow run. `datasets`: each fold's
    train.training_datasets as the driver built them (None: built here)."""
    import ray.tune

    from emotion_ray import tracking
    from emotion_ray.crossval import FOLD_HISTORY, FOLD_METRICS, TRAIN_RUNS, fold_dir
    from emotion_ray.evaluate import evaluate_best, history_csv
    from emotion_ray.inference import TestTimeAugmentation
    from emotion_ray.train import build_trainer, fit

    setup, k = config["_setup"], config["fold"]
    cv = CrossValidationConfig.model_validate(setup["cv"])
    dataset_uri, manifest = setup["datasets"][k]
    cfg = cv.fold_train_config(k, dataset_uri, storage.join(cv.output, TRAIN_RUNS))
    classes, image_size = manifest["classes"], manifest["image_size"]
    run_id = None
    if cv.mlflow.enabled:
        run_id = tracking.start_run(cv.mlflow, f"{setup['name']}_fold_{k}",
                                    {**cfg.model_dump(mode="json"), "cv": {"fold": k, "folds": cv.folds}},
                                    parent_run_id=setup["parent_run_id"], source=setup["source_tags"])
        tracking.record_training_run(cfg, run_id, cfg.run_name, dataset_uri, manifest)
    result = fit(build_trainer(cfg, dataset_uri, manifest, cfg.run_name, run_id, backbone_weights=backbone_weights,
                               datasets=datasets[k] if datasets else None))
    if result.checkpoint is None:
        raise RuntimeError(f"fold {k} produced no checkpoint: {result.error}")
    # A fold writes no report.html: no mistakes gathered, no Grad-CAM.
    out = evaluate_best(result.checkpoint, dataset_uri, cfg.storage, classes, image_size, cfg.use_gpu, explain=False,
                        test_time=TestTimeAugmentation.of(cfg.model))
    state, metrics = out["state"], out["metrics"]
    metrics.update(fold=k, best_epoch=state["best_epoch"], epochs_run=state["epoch"],
                   best_val_loss=state["best_val_loss"], mlflow_run_id=run_id)
    where = fold_dir(cv.output, k)
    history = history_csv(state["history"])
    storage.write_json_atomic(storage.join(where, FOLD_METRICS), metrics, cv.storage)
    storage.write_bytes_atomic(storage.join(where, FOLD_HISTORY), history, cv.storage)
    if run_id:
        figures = {"heldout_accuracy": metrics["categorical_accuracy"], "heldout_macro_f1": metrics["macro_f1"],
                   **{f"heldout_recall_{c}": m["recall"] for c, m in metrics["per_class"].items()}}
        tracking.log_metrics(cv.mlflow.tracking_uri, run_id, figures, step=0)
        c = tracking.client(cv.mlflow.tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in ((FOLD_METRICS, storage.read_bytes(storage.join(where, FOLD_METRICS), cv.storage)),
                               (FOLD_HISTORY, history)):
                with open(os.path.join(tmp, name), "wb") as fh:
                    fh.write(data)
                c.log_artifact(run_id, os.path.join(tmp, name))
        c.set_terminated(run_id, status="FINISHED")
    ray.tune.report({"fold": k, "accuracy": metrics["categorical_accuracy"], "macro_f1": metrics["macro_f1"]})
