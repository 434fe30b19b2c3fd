"""Summaries for a person: each stage's last lines on the terminal (the CLI prints them, or
their JSON with --json), and `python -m emotion_ray.summary DEMO_DIR`, what `make demo`
produced and where to look."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def score_text(s: dict[str, Any]) -> str:
    """score's summary (its _SUCCESS.json) in a few lines."""
    if s["scored_now"]:
        rate, steady, start = s["images_per_second"], s["steady_images_per_second"], s["first_batch_seconds"]
        after = (f"; {steady:g} img/s after {start:.1f} s of start-up" if steady is not None  # measured (score.py)
                 else f", {start:.1f} s of it start-up" if start is not None else "")
        head = f"scored {s['scored_now']} images in {s['seconds']:.1f} s ({rate:g} img/s{after})"
        if s["already_scored"]:
            head += f"; {s['already_scored']} were already scored"
    else:
        head = f"nothing new to score: all {s['already_scored']} images were already scored"
    lines = [head, f"  labels       {_counts(s['labels'])}",
             f"  errors       {_counts(s['errors'])}" + ("  (rows whose `error` says why)" if s["errors"] else "")]
    if s["skipped_inputs"]:
        lines.append(f"  skipped      {_counts(s['skipped_inputs'])}")
    repaired = {"duplicate rows dropped": s["duplicate_rows_dropped"],
                "pictures rescored": s["incomplete_pictures_rescored"], "errors retried": s["errors_retried"]}
    if any(repaired.values()):
        lines.append(f"  repaired     {_counts({k: v for k, v in repaired.items() if v})}")
    rows = f"{s['rows']} rows" + (f" for {s['pictures']} pictures" if s["pictures"] != s["rows"] else "")
    lines += [f"  predictions  {s['output']}  (Parquet: {rows}; model {s['model_id']})",
              f"  read with    pandas.read_parquet(\"{s['output']}\")"]
    return "\n".join(lines)


def _mlflow_executable() -> str:
    """The mlflow beside this Python: a venv's bin/ is not on PATH unless activated."""
    return os.path.join(os.path.dirname(sys.executable), "mlflow")


def mlflow_ui_command(tracking_uri: str) -> str:
    """How to look at a tracking store: the UI command for a database, else its address."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"{_mlflow_executable()} ui --backend-store-uri {tracking_uri}  (then http://127.0.0.1:5000)"


def train_text(r: dict[str, Any], cfg) -> str:
    """train's summary (run_training's result) in a few lines; `cfg` is the TrainConfig."""
    epochs = f"{r['epochs_run']} epoch" + ("s" if r["epochs_run"] != 1 else "")
    if r["epochs_run"] < cfg.epochs:  # the epochs bar stops short of its total: say why
        epochs += (f" of {cfg.epochs} (early stopping: val_loss did not improve for "
                   f"{cfg.early_stopping_patience} epochs)")
    lines = [f"trained {r['run_dir']}: {epochs}, the best (epoch {r['best_epoch']}) saved",
             f"  test         accuracy {r['categorical_accuracy']:.3f}, macro precision {r['macro_precision']:.3f}, "
             f"macro recall {r['macro_recall']:.3f} on {r['test_rows']} images"]
    if r.get("learned") is False:  # a model at chance must not pass for a trained one
        margin = cfg.early_stopping_chance_margin or 0.0
        lines.append(f"  warning      not learned: the best val_loss {r['best_val_loss']:.3f} is not "
                     f"{margin:.0%} below chance level {r['chance_val_loss']:.3f}, so the model answers about "
                     "as well as guessing; train longer (--epochs) or on more pictures")
    if "temperature" in r:  # why T is what it is, and any held-out data it made worse
        lines.append("  calibration  " + (r.get("temperature_reason") or f"T = {r['temperature']:.2f}")
                     + ("" if r.get("ece_before") is None else
                        f"; test ECE {r['ece_before']:.3f} -> {r['ece_after']:.3f}"))
        lines += [f"  warning      {w}" for w in (r.get("calibration") or {}).get("warnings", [])]
    lines += [f"  run          {r['run_dir']}: model.keras, labels.json, metrics.json, history.csv, "
              "loss.png, accuracy.png, confusion_matrix.png",
              f"  report       {r['run_dir'].rstrip('/')}/report.html  (open it in a browser)"]
    if r.get("mlflow_run_id"):
        registered = f", registered as {r['registered_model']}" if r.get("registered_model") else ""
        lines += [f"  MLflow       run {r['mlflow_run_id']}{registered}",
                  f"  open with    {mlflow_ui_command(cfg.mlflow.tracking_uri)}"]
    return "\n".join(lines)


def tune_text(t: dict[str, Any]) -> str:
    """tune's summary (run_tuning's result) in a few lines."""
    metric = next(k for k in t if k.startswith("best_") and k not in (
        "best_trial", "best_config", "best_train_config", "best_model", "best_test_accuracy"))
    config = ", ".join(f"{k}={v}" for k, v in t["best_config"].items())
    lines = [f"tuned {t['trials']} trials: best {t['best_trial']} ({metric[5:]} {t[metric]:.4g}, "
             f"test accuracy {t['best_test_accuracy']:.3f})",
             f"  best config  {config}",
             *([f"  failed       {t['failed_trials']} of {t['trials']} trials (trials.csv's error column): "
                + "; ".join(f"{n} x {reason}" for reason, n in t.get("failure_reasons", {}).items())]
               if t.get("failed_trials") else []),
             f"  trials       {t['experiment']}/trials.csv (and .parquet), ranked",
             f"  best model   {t['best_model']}" + (f" (registered as {t['registered_model']})"
                                                    if t.get("registered_model") else ""),
             f"  train it     emotion-ray train --config {t['best_train_config']}"]
    return "\n".join(lines)


def _spread(stats: dict[str, Any]) -> str:
    return "n/a" if stats["mean"] is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def cv_text(r: dict[str, Any], cfg) -> str:
    """evaluate's summary (cv.json) in a few lines: mean ± sample std over folds, the pooled
    confusion matrix; `cfg` is the CrossValidationConfig."""
    spread, pooled = r["mean_std"], r["pooled"]
    sizes = ", ".join(str(f["rows"]["test"]) for f in r["per_fold"])
    lines = [f"cross-validated {r['folds']} folds on {r['dataset']}: {r['pool_rows']} rows of the {r['pool']} pool "
             f"in {r['pool_groups']} groups, held out {sizes} ({r['seconds']:.0f} s)",
             f"  accuracy     {_spread(spread['accuracy'])}   folds "
             + ", ".join(f"{v:.3f}" for v in spread["accuracy"]["values"]),
             f"  macro-F1     {_spread(spread['macro_f1'])}   folds "
             + ", ".join(f"{v:.3f}" for v in spread["macro_f1"]["values"]),
             "  recall       " + ", ".join(f"{c} {_spread(s)}" for c, s in spread["recall"].items()),
             f"  pooled       accuracy {pooled['categorical_accuracy']:.3f}, macro-F1 {pooled['macro_f1']:.3f} on "
             f"{pooled['test_rows']} held-out rows; confusion (rows true, columns predicted):"]
    classes = r["classes"]
    width = max(len(c) for c in classes) + 2
    lines.append("  " + " " * 13 + " " * width + "".join(f"{c:>{width}}" for c in classes))
    for c, row in zip(classes, pooled["confusion_matrix"]["rows_true_cols_predicted"]):
        lines.append("  " + " " * 13 + f"{c:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    lines.append("  (mean ± sample standard deviation over folds)")
    lines.append(f"  results      {r['output']}/cv.json; each fold's dataset and metrics in {r['output']}/folds/")
    if r.get("mlflow"):
        lines += [f"  MLflow       parent run {r['mlflow']['parent_run_id']}, a child run per fold",
                  f"  open with    {mlflow_ui_command(r['mlflow']['tracking_uri'])}"]
    return "\n".join(lines)


def main(demo_dir: str) -> int:
    root = Path(demo_dir).resolve()
    manifest = json.loads((root / "dataset" / "manifest.json").read_text())
    metrics = json.loads((root / "runs" / "demo" / "metrics.json").read_text())
    scores = json.loads((root / "predictions" / "_SUCCESS.json").read_text())
    print("\n=== emotion_ray demo ===")
    print(f"dataset      {root / 'dataset'}  ({manifest['rows']} images: {_counts(manifest['split_rows'])})")
    print(f"             Parquet: {root / 'dataset' / 'data'}  (pandas.read_parquet, polars, DuckDB, pyarrow)")
    print(f"model        {root / 'runs' / 'demo' / 'model.keras'}  (best epoch {metrics['best_epoch']} "
          f"of {metrics['epochs_run']})")
    print(f"test metrics accuracy {metrics['categorical_accuracy']:.3f}  macro precision "
          f"{metrics['macro_precision']:.3f}  macro recall {metrics['macro_recall']:.3f}  "
          f"({metrics['test_rows']} test images)")
    for label, m in metrics["per_class"].items():
        print(f"             {label:6s} precision {m['precision']:.3f}  recall {m['recall']:.3f}  n={m['support']}")
    if metrics.get("ece_before") is not None:
        print(f"calibration  temperature {metrics['temperature']:.2f}: test ECE "
              f"{metrics['ece_before']:.3f} -> {metrics['ece_after']:.3f}")
        if metrics.get("temperature_reason"):
            print(f"             {metrics['temperature_reason']}")
        for warning in metrics.get("calibration", {}).get("warnings", []):
            print(f"             warning: {warning}")
    print(f"predictions  {root / 'predictions'}  ({scores['rows']} rows: {_counts(scores['labels'])}; "
          f"errors {_counts(scores['errors'])})")
    print(f"             Parquet: {scores.get('parquet', root / 'predictions')}  columns: path, label, confidence, "
          "prob_<class>, model_id, width, height, error, scored_at")
    print(f"plots        {root / 'runs' / 'demo'}/{{loss,accuracy,confusion_matrix,reliability}}.png")
    print(f"MLflow UI    {_mlflow_executable()} ui --backend-store-uri sqlite:///{root / 'mlflow.db'} --port 5000")
    print(f"             then open {_experiment_url(root / 'mlflow.db')}")
    return 0


def _experiment_url(db: Path, experiment: str = "emotion_ray") -> str:
    """The UI's page of the training experiment in `db` (the UI's start page if it is not there), in the UI's
    model-training mode: MLflow 3's UI starts a new browser in its GenAI mode, which opens an experiment
    on an empty traces overview whatever the experiment's kind (bench/RESULTS.md, *MLflow UI check*)."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri=f"sqlite:///{db}").get_experiment_by_name(experiment) if db.exists() else None
    return (f"http://127.0.0.1:5000/#/experiments/{found.experiment_id}?workflowType=machine_learning" if found
            else "http://127.0.0.1:5000")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "demo_out"))
