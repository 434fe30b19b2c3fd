"""Evaluation: a run's best checkpoint -> test metrics, plots, the run directory and MLflow.

`evaluate_checkpoint` runs as a Ray task (on a GPU when training had them) through the same
`inference.Predictor` as score and predict, over the whole test split (outside any strategy,
so no row is dropped); `export_run` (driver) writes the run directory: model.keras (inference
only), labels.json, config.yaml, history.csv, metrics.json and plots, then logs to MLflow.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from typing import Any

import yaml

from emotion_ray import storage
from emotion_ray.config import StorageConfig, TrainConfig
from emotion_ray.errors import ConfigError
from emotion_ray.inference import LABELS_FILE, MODEL_FILE

EVALUATION_BATCH = 256


def evaluate_checkpoint(checkpoint, dataset_uri: str, storage_cfg: StorageConfig, classes: list[str],
                        image_size: int) -> dict[str, Any]:
    """Ray task: the best model's test metrics (metrics.classification_metrics), its file's
    bytes and the training state. A dataset without a test split gets metrics over 0 rows."""
    from emotion_ray.dataset import load_split
    from emotion_ray.images import pixels_from_arrow
    from emotion_ray.inference import ModelBundle, Predictor
    from emotion_ray.metrics import classification_metrics, confusion_matrix
    from emotion_ray.train_worker import BEST_MODEL, STATE_FILE

    with checkpoint.as_directory() as ckpt_dir:
        with open(os.path.join(ckpt_dir, BEST_MODEL), "rb") as fh:
            model_bytes = fh.read()
        with open(os.path.join(ckpt_dir, STATE_FILE)) as fh:
            state = json.load(fh)
    predictor = Predictor(ModelBundle(model_bytes, classes, image_size, "checkpoint"), EVALUATION_BATCH)
    confusion = confusion_matrix([], [], len(classes))
    try:
        test = load_split(dataset_uri, "test", storage_cfg)
    except ConfigError:
        test = None
    if test is not None:
        for batch in test.iter_batches(batch_size=EVALUATION_BATCH, batch_format="pyarrow"):
            probs = predictor.probabilities(pixels_from_arrow(batch["image"], image_size))
            confusion += confusion_matrix(batch["label_index"].to_numpy(), probs.argmax(axis=1), len(classes))
    return {"model_bytes": model_bytes, "state": state, "metrics": classification_metrics(confusion, classes)}


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
    evaluate = ray.remote(num_cpus=1, num_gpus=1 if cfg.use_gpu else 0)(evaluate_checkpoint)
    out = ray.get(evaluate.remote(checkpoint, dataset_uri, cfg.storage, classes, image_size))
    state, metrics = out["state"], out["metrics"]
    metrics.update(best_epoch=state["best_epoch"], epochs_run=state["epoch"], best_val_loss=state["best_val_loss"],
                   training_starts=state["starts"])

    with tempfile.TemporaryDirectory() as export_dir:
        files = {
            MODEL_FILE: out["model_bytes"],
            LABELS_FILE: json.dumps({"classes": classes, "image_size": image_size,
                                     "input": "uint8 RGB, scaled inside the model",
                                     # score and predict crop faces the same way unless told otherwise
                                     "faces": manifest.get("faces") and {k: v for k, v in manifest["faces"].items()
                                                                         if k != "pictures_by_faces"}},
                                    indent=2).encode(),
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

            metrics["registered_model"] = tracking.finish_run(cfg.mlflow, mlflow_run_id, export_dir, metrics)
    return metrics


def _history_csv(history: list[dict[str, float]]) -> bytes:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for row in history for k in row))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue().encode()
