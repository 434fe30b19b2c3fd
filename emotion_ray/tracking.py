"""MLflow glue: one run per training run, per-epoch metrics from the chief worker, and at the
end the artifacts plus a pyfunc model registered under a configurable name.

Open the UI on the default store with:  mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db
"""

from __future__ import annotations

import os
from typing import Any

from emotion_ray.config import MlflowConfig

RUN_NAME_TAG = "emotion_ray.run_name"


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(f"{prefix}.{key}" if prefix else key, value, out)
    else:
        out[prefix] = obj
    return out


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(cfg: MlflowConfig) -> str:
    c = client(cfg.tracking_uri)
    found = c.get_experiment_by_name(cfg.experiment)
    if found:
        return found.experiment_id
    artifact_location = None
    if cfg.tracking_uri.startswith("sqlite:///"):
        # Beside the database, not ./mlruns of whatever directory a command ran in (MLflow 3
        # also mistakes a ./mlruns folder for the retired file store).
        db = cfg.tracking_uri[len("sqlite:///"):]
        artifact_location = os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts", cfg.experiment)
    return c.create_experiment(cfg.experiment, artifact_location=artifact_location)


def start_run(cfg: MlflowConfig, run_name: str, params: dict[str, Any], parent_run_id: str | None = None,
              resume: bool = False) -> str:
    """Create the MLflow run for a training run (or find it again when resuming)."""
    c = client(cfg.tracking_uri)
    exp = experiment_id(cfg)
    if resume:
        runs = c.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
        if runs:
            c.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
    tags = {RUN_NAME_TAG: run_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp, run_name=run_name, tags=tags)
    flat = {k: str(v)[:6000] for k, v in _flatten("", params, {}).items()}
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client(tracking_uri).log_batch(
        run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    )


def finish_run(cfg: MlflowConfig, run_id: str, export_dir: str, test_metrics: dict[str, float]) -> str | None:
    """Log the run directory's files and the model; register it. Returns the model version URI."""
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    c = client(cfg.tracking_uri)
    log_metrics(cfg.tracking_uri, run_id, {f"test_{k}": v for k, v in test_metrics.items()}, step=0)
    for name in sorted(os.listdir(export_dir)):
        if name != "model.keras":
            c.log_artifact(run_id, os.path.join(export_dir, name))
    version_uri = None
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=EmotionPyfunc(),
            artifacts={"model": os.path.join(export_dir, "model.keras"),
                       "labels": os.path.join(export_dir, "labels.json")},
            registered_model_name=cfg.registered_model_name,
            pip_requirements=["emotion-ray", "tensorflow>=2.21,<2.22", "tf-keras>=2.21,<2.22", "pillow"],
        )
        if cfg.registered_model_name and info.registered_model_version:
            version_uri = f"models:/{cfg.registered_model_name}/{info.registered_model_version}"
    c.set_terminated(run_id, status="FINISHED")
    return version_uri


def download_model(model_uri: str, tracking_uri: str, dst: str) -> tuple[str, str]:
    """`models:/name/version` -> local (model.keras, labels.json) paths."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst)
    found: dict[str, str] = {}
    for folder, _, files in os.walk(local):
        for name in files:
            if name in ("model.keras", "labels.json"):
                found[name] = os.path.join(folder, name)
    if len(found) != 2:
        raise FileNotFoundError(f"{model_uri} holds no model.keras + labels.json; was it logged by emotion_ray?")
    return found["model.keras"], found["labels.json"]


try:
    import mlflow.pyfunc as _pyfunc

    class EmotionPyfunc(_pyfunc.PythonModel):
        """Serves the model from MLflow: input a DataFrame with a `path` column of image files."""

        def load_context(self, context):
            import json

            from emotion_ray.model import load_model

            self.model = load_model(context.artifacts["model"])
            with open(context.artifacts["labels"]) as fh:
                self.labels = json.load(fh)

        def predict(self, context, model_input, params=None):
            import numpy as np
            import pandas as pd

            from emotion_ray.images import decode_image

            size, classes = self.labels["image_size"], self.labels["classes"]
            rows = []
            for path in model_input["path"]:
                with open(path, "rb") as fh:
                    decoded = decode_image(fh.read(), size)
                if decoded.error:
                    rows.append({"label": None, "error": decoded.error, **{c: np.nan for c in classes}})
                    continue
                probs = self.model(decoded.pixels[None], training=False).numpy()[0]
                rows.append({"label": classes[int(probs.argmax())], "error": None, **dict(zip(classes, probs))})
            return pd.DataFrame(rows)

except ImportError:  # pragma: no cover - mlflow is a hard dependency; keep imports cheap elsewhere
    EmotionPyfunc = None  # type: ignore[assignment,misc]
