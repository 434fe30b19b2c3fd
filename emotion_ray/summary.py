"""`python -m emotion_ray.summary DEMO_DIR`: what `make demo` produced and where to look."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(demo_dir: str) -> int:
    root = Path(demo_dir).resolve()
    manifest = json.loads((root / "dataset" / "manifest.json").read_text())
    metrics = json.loads((root / "runs" / "demo" / "metrics.json").read_text())
    scores = json.loads((root / "predictions" / "_SUCCESS.json").read_text())
    print("\n=== emotion_ray demo ===")
    print(f"dataset      {root / 'dataset'}  ({manifest['rows']} images: {manifest['split_rows']})")
    print(f"             Parquet: {root / 'dataset' / 'data'}  (pandas.read_parquet, polars, DuckDB, pyarrow)")
    print(f"model        {root / 'runs' / 'demo' / 'model.keras'}  (best epoch {metrics['best_epoch']} "
          f"of {metrics['epochs_run']})")
    print(f"test metrics accuracy {metrics['categorical_accuracy']:.3f}  macro precision "
          f"{metrics['macro_precision']:.3f}  macro recall {metrics['macro_recall']:.3f}  "
          f"({metrics['test_rows']} test images)")
    for label, m in metrics["per_class"].items():
        print(f"             {label:6s} precision {m['precision']:.3f}  recall {m['recall']:.3f}  n={m['support']}")
    if metrics.get("ece_before") is not None:
        print(f"calibration  temperature {metrics['temperature']:.2f} (fitted on val): test ECE "
              f"{metrics['ece_before']:.3f} -> {metrics['ece_after']:.3f}")
    print(f"predictions  {root / 'predictions'}  ({scores['rows']} rows: {scores['labels']}, errors {scores['errors']})")
    print(f"             Parquet: {scores.get('parquet', root / 'predictions')}  columns: path, label, confidence, "
          "prob_<class>, model_id, width, height, error, scored_at")
    print(f"plots        {root / 'runs' / 'demo'}/{{loss,accuracy,confusion_matrix,reliability}}.png")
    print(f"MLflow UI    .venv/bin/mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'} --port 5000")
    print(f"             then open {_experiment_url(root / 'mlflow.db')}")
    return 0


def _experiment_url(db: Path, experiment: str = "emotion_ray") -> str:
    """The UI's page of the training experiment in `db` (the UI's start page if it is not there)."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri=f"sqlite:///{db}").get_experiment_by_name(experiment) if db.exists() else None
    return f"http://127.0.0.1:5000/#/experiments/{found.experiment_id}" if found else "http://127.0.0.1:5000"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "demo_out"))
