"""Evaluation: a run's best checkpoint -> test metrics, plots, the run directory and MLflow.

`evaluate_checkpoint` runs (`evaluate_best`: in the training driver, or a GPU task after GPU training) through the same
`inference.Predictor` as score and predict, over the whole validation and test splits (outside
any strategy, so no row is dropped): it fits the temperature on val (calibration.py) and
measures it on test, and keeps the test split's most confident mistakes with Grad-CAM maps of a
few (explain.py); `export_run` (driver) writes the run directory: model.keras (inference only),
labels.json (with the temperature), config.yaml, history.csv, metrics.json, plots
(reliability.png among them) and report.html (report.py), then logs to MLflow.
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
from emotion_ray.inference import LABELS_FILE, MODEL_FILE, TestTimeAugmentation
from emotion_ray.report import write_report

EVALUATION_BATCH = 256
RELIABILITY_PLOT = "reliability.png"
# report.html: the test split's most confident mistakes shown (a 4-wide grid), and how many of
# them get Grad-CAM maps (each costs a gradient pass; a handful is what a person looks at).
REPORT_MISTAKES, REPORT_CAMS = 12, 4


def _split_probabilities(predictor, dataset_uri: str, split: str, storage_cfg: StorageConfig,
                         image_size: int, num_classes: int, mistakes=None, temperature: float = 1.0):
    """(probabilities (N, classes) float32, label indices (N,) int64) of one split; 0 rows when
    the dataset has no such split. `mistakes` (an explain.WorstMistakes) is offered every batch's
    pixels, probabilities at `temperature` and paths as they pass."""
    import numpy as np

    from emotion_ray.calibration import apply_temperature
    from emotion_ray.dataset import iter_split_batches
    from emotion_ray.images import pixels_from_arrow

    probs, labels = [np.zeros((0, num_classes), np.float32)], [np.zeros(0, np.int64)]
    columns = ("image", "label_index") + (("path",) if mistakes is not None else ())
    # Read here, not through Ray Data: every row comes to this process anyway (see iter_split_batches).
    for batch in iter_split_batches(dataset_uri, split, storage_cfg, columns, EVALUATION_BATCH):
        images = pixels_from_arrow(batch["image"], image_size)
        probs.append(predictor.probabilities(images))
        labels.append(batch["label_index"].to_numpy().astype(np.int64))
        if mistakes is not None:
            mistakes.add(images, apply_temperature(probs[-1], temperature), labels[-1],
                         batch["path"].to_pylist())
    return np.concatenate(probs), np.concatenate(labels)


def _explained_mistakes(model, mistakes, cams: int) -> list[dict[str, Any]]:
    """`mistakes`' examples; the first `cams` with Grad-CAM maps (explain.grad_cam) of their
    predicted and true classes: `cam_predicted`, `cam_true`, (S, S) float32 in [0, 1]."""
    import numpy as np

    from emotion_ray.explain import grad_cam

    examples = mistakes.examples()
    shown = examples[:cams]
    if shown:
        images = np.stack([e["image"] for e in shown])
        # One pass for both classes: the images twice, predicted classes then true ones.
        maps = grad_cam(model, np.concatenate([images, images]),
                        [e["predicted"] for e in shown] + [e["true"] for e in shown])
        for e, predicted, true in zip(shown, maps[: len(shown)], maps[len(shown) :]):
            e["cam_predicted"], e["cam_true"] = predicted, true
    return examples


def evaluate_checkpoint(checkpoint, dataset_uri: str, storage_cfg: StorageConfig, classes: list[str],
                        image_size: int, explain: bool = True,
                        test_time: TestTimeAugmentation = TestTimeAugmentation()) -> dict[str, Any]:
    """Ray task: the best model's test metrics (metrics.classification_metrics), its
    temperature fitted on the validation split with the calibration figures on test
    (calibration.calibration_report: temperature, ece_before, ece_after, calibration), its
    file's bytes and the training state, and for report.html the test split's REPORT_MISTAKES
    most confident mistakes (explain.WorstMistakes; the first REPORT_CAMS with Grad-CAM maps,
    see _explained_mistakes; with `explain=False`, for a caller that writes no report, none:
    `mistakes` is []). A split the dataset lacks counts 0 rows (T = 1). Every probability averages
    the views of `test_time` (inference.TestTimeAugmentation), as the exported model's
    predictions will; `saved_model_val_accuracy` is val's accuracy with the same views."""
    from emotion_ray.calibration import calibration_report, choose_temperature
    from emotion_ray.explain import WorstMistakes
    from emotion_ray.inference import ModelBundle, Predictor
    from emotion_ray.metrics import classification_metrics, confusion_matrix
    from emotion_ray.train_worker import BEST_MODEL, STATE_FILE

    with checkpoint.as_directory() as ckpt_dir:
        with open(os.path.join(ckpt_dir, BEST_MODEL), "rb") as fh:
            model_bytes = fh.read()
        with open(os.path.join(ckpt_dir, STATE_FILE)) as fh:
            state = json.load(fh)
    # The raw softmax (T = 1): the temperature is fitted on these outputs.
    predictor = Predictor(ModelBundle(model_bytes, classes, image_size, "checkpoint", test_time=test_time),
                          EVALUATION_BATCH)
    val_probs, val_labels = _split_probabilities(predictor, dataset_uri, "val", storage_cfg, image_size, len(classes))
    # T first: the report's worst mistakes are ranked by the calibrated confidence score would write.
    fitted = choose_temperature(val_probs, val_labels)
    mistakes = WorstMistakes(REPORT_MISTAKES) if explain else None
    test_probs, test_labels = _split_probabilities(predictor, dataset_uri, "test", storage_cfg, image_size,
                                                   len(classes), mistakes, fitted[0])
    # A temperature never moves the argmax: these metrics hold for the calibrated model too.
    metrics = classification_metrics(confusion_matrix(test_labels, test_probs.argmax(axis=1), len(classes)), classes)
    metrics.update(calibration_report(val_probs, val_labels, test_probs, test_labels, fitted=fitted))
    # What a caller choosing inference settings (views, a threshold) may look at; test stays for the report.
    metrics["saved_model_val_accuracy"] = (float((val_probs.argmax(axis=1) == val_labels).mean())
                                           if len(val_labels) else None)
    return {"model_bytes": model_bytes, "state": state, "metrics": metrics,
            "mistakes": _explained_mistakes(predictor.model, mistakes, REPORT_CAMS) if explain else []}


def evaluate_best(checkpoint, dataset_uri: str, storage_cfg: StorageConfig, classes: list[str], image_size: int,
                  use_gpu: bool, explain: bool = True,
                  test_time: TestTimeAugmentation = TestTimeAugmentation()) -> dict[str, Any]:
    """evaluate_checkpoint's answer, computed where it costs least. After GPU training, as a Ray
    task on one GPU (outside any Tune trial's placement group, as the trainer's own actors are).
    Otherwise in this process: the driver (or Tune trial) that fitted the TensorflowTrainer has
    TensorFlow loaded already, where a task would start a process and import it again, seconds
    of every run (bench/RESULTS.md, run start-up)."""
    if not use_gpu:
        return evaluate_checkpoint(checkpoint, dataset_uri, storage_cfg, classes, image_size, explain, test_time)
    import ray

    task = ray.remote(num_cpus=1, num_gpus=1, scheduling_strategy="DEFAULT")(evaluate_checkpoint)
    return ray.get(task.remote(checkpoint, dataset_uri, storage_cfg, classes, image_size, explain, test_time))


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
    image = ax.imshow(cm["rows_true_cols_predicted"], cmap="Blues")
    labels = cm["labels"]
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, row in enumerate(cm["rows_true_cols_predicted"]):
        for j, value in enumerate(row):
            # White on the dark half of the colour map, black on the light half: every count readable.
            dark = image.norm(value) > 0.5
            ax.text(j, i, str(value), ha="center", va="center", color="white" if dark else "black")
    ax.set_title("Test confusion matrix")
    fig.savefig(os.path.join(export_dir, "confusion_matrix.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    _reliability_plot(plt, os.path.join(export_dir, RELIABILITY_PLOT), metrics)


def _reliability_plot(plt, path: str, metrics: dict[str, Any]) -> None:
    """Reliability diagram of the test split (Guo et al. 2017, fig. 1): per confidence bin, the
    accuracy before and after temperature scaling against the diagonal of perfect calibration,
    with each bin's share of the rows below."""
    cal = metrics["calibration"]
    before, after = cal["reliability_before"], cal["reliability_after"]
    edges = before["edges"]
    width = edges[1] - edges[0]
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    kept = "" if cal["fit"] == "nll_minimum" else " (not kept)"  # temperature_reason says why
    for stats, shift, colour, name in ((before, 0.0, "orange", f"raw softmax, ECE {fmt(metrics['ece_before'])}"),
                                       (after, 0.5, "teal", f"T = {metrics['temperature']:.2f}{kept}, "
                                                            f"ECE {fmt(metrics['ece_after'])}")):
        left = [e + shift * width for e, n in zip(edges[:-1], stats["count"]) if n]
        heights = [a for a, n in zip(stats["accuracy"], stats["count"]) if n]
        ax.bar(left, heights, width=width / 2, align="edge", color=colour, alpha=0.8, label=name)
        total = max(sum(stats["count"]), 1)
        counts.bar([e + shift * width for e in edges[:-1]], [n / total for n in stats["count"]], width=width / 2,
                   align="edge", color=colour, alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Test reliability ({sum(before['count'])} rows, {len(edges) - 1} bins)")
    ax.legend(loc="upper left")
    counts.set_xlabel("confidence (top probability)")
    counts.set_ylabel("share of rows")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def export_run(checkpoint, cfg: TrainConfig, dataset_uri: str, manifest: dict[str, Any], run_dir: str,
               mlflow_run_id: str | None) -> dict[str, Any]:
    """Evaluate the best model on the test split and write the run directory (and MLflow)."""
    classes, image_size = manifest["classes"], manifest["image_size"]
    test_time = TestTimeAugmentation.of(cfg.model)
    out = evaluate_best(checkpoint, dataset_uri, cfg.storage, classes, image_size, cfg.use_gpu, test_time=test_time)
    state, metrics = out["state"], out["metrics"]
    metrics.update(best_epoch=state["best_epoch"], epochs_run=state["epoch"], best_val_loss=state["best_val_loss"],
                   training_starts=state["starts"], **learning_verdict(cfg, manifest, state["best_val_loss"]))

    with tempfile.TemporaryDirectory() as export_dir:
        files = {
            MODEL_FILE: out["model_bytes"],
            LABELS_FILE: json.dumps({"classes": classes, "image_size": image_size,
                                     "input": "uint8 RGB, scaled inside the model",
                                     # inference.Predictor divides the log-probabilities by it
                                     "temperature": metrics["temperature"],
                                     **test_time.as_labels(),
                                     # score and predict crop faces the same way unless told otherwise
                                     "faces": manifest.get("faces") and {k: v for k, v in manifest["faces"].items()
                                                                         if k != "pictures_by_faces"}},
                                    indent=2).encode(),
            "config.yaml": yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode(),
            "metrics.json": json.dumps(metrics, indent=2).encode(),
            "history.csv": history_csv(state["history"]),
        }
        for name, data in files.items():
            with open(os.path.join(export_dir, name), "wb") as fh:
                fh.write(data)
        _plots(export_dir, state["history"], metrics)
        write_report(export_dir, os.path.basename(run_dir.rstrip("/")), metrics, manifest, out["mistakes"],
                     _run_details(cfg, dataset_uri, image_size))
        for name in sorted(os.listdir(export_dir)):
            storage.upload_file(os.path.join(export_dir, name), storage.join(run_dir, name), cfg.storage)
        if mlflow_run_id:
            from emotion_ray import tracking

            metrics["registered_model"] = tracking.finish_run(cfg.mlflow, mlflow_run_id, export_dir, metrics)
    return metrics


def learning_verdict(cfg: TrainConfig, manifest: dict[str, Any], best_val_loss: float | None) -> dict[str, Any]:
    """metrics.json's `chance_val_loss` (metrics.chance_loss of the val split; None without val rows)
    and `learned`: whether the best val_loss beat it by early_stopping_chance_margin (by anything
    when that is null; None when there is no chance level to beat). A run that has not learned
    answers at chance: the train summary says so."""
    from emotion_ray.early_stopping import learned_below
    from emotion_ray.metrics import chance_loss

    chance = chance_loss(manifest["counts"]["train"], manifest["counts"]["val"], manifest["classes"])
    learned = None
    if chance is not None and best_val_loss is not None:
        learned = bool(best_val_loss < learned_below(chance, cfg.early_stopping_chance_margin or 0.0))
    return {"chance_val_loss": chance, "learned": learned}


def _run_details(cfg: TrainConfig, dataset_uri: str, image_size: int) -> str:
    """The report's line under its title: what was trained, on what, how."""
    return (f"{cfg.model.architecture} at {image_size}x{image_size} px, {cfg.workers} worker(s), "
            f"up to {cfg.epochs} epochs, batch {cfg.batch_size}, learning rate {cfg.learning_rate:g}; "
            f"dataset {dataset_uri}" + (f"; fine-tuned from {cfg.model.init_from}" if cfg.model.init_from else ""))


def history_csv(history: list[dict[str, float]]) -> bytes:
    """A run's per-epoch rows (dicts) as history.csv's bytes: one column per key, in first-seen order."""
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for row in history for k in row))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue().encode()
