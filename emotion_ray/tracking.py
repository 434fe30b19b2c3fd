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


def _pip_requirements() -> list[str]:
    """What the logged model needs on a fresh machine: the package itself travels with the model
    (code_paths), so only its public dependencies are named, at the versions installed here."""
    from importlib.metadata import version

    names = ["tensorflow", "tf-keras", "numpy", "pillow", "pyarrow", "pydantic", "pyyaml", "fsspec", "pandas"]
    return [f"{name}=={version(name)}" for name in names]


def _example_image() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def _signature(classes: list[str]):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)])
    outputs = Schema([ColSpec("string", "path"), ColSpec("string", "label"), ColSpec("float", "confidence")]
                     + [ColSpec("float", f"prob_{c}") for c in classes]
                     + [ColSpec("integer", "width"), ColSpec("integer", "height"), ColSpec("string", "error")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def finish_run(cfg: MlflowConfig, run_id: str, export_dir: str, metrics: dict[str, Any]) -> str | None:
    """Log the run directory's files, the test metrics (and which epoch the saved model is),
    and the model as a pyfunc; register it. Returns the model version URI."""
    import json

    import mlflow
    import pandas as pd

    import emotion_ray

    mlflow.set_tracking_uri(cfg.tracking_uri)
    c = client(cfg.tracking_uri)
    log_metrics(cfg.tracking_uri, run_id, {f"test_{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=0)
    if metrics.get("best_epoch") is not None:
        # The saved model is the best epoch's, not the last one's that the run page shows.
        log_metrics(cfg.tracking_uri, run_id, {"saved_model_epoch": metrics["best_epoch"]}, step=0)
        c.set_tag(run_id, "emotion_ray.saved_model_epoch", str(metrics["best_epoch"]))
    for name in sorted(os.listdir(export_dir)):
        if name != "model.keras":
            c.log_artifact(run_id, os.path.join(export_dir, name))
    with open(os.path.join(export_dir, "labels.json")) as fh:
        classes = json.load(fh)["classes"]
    version_uri = None
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=EmotionPyfunc(),
            artifacts={"model": os.path.join(export_dir, "model.keras"),
                       "labels": os.path.join(export_dir, "labels.json")},
            code_paths=[os.path.dirname(emotion_ray.__file__)],
            registered_model_name=cfg.registered_model_name,
            pip_requirements=_pip_requirements(),
            signature=_signature(classes),
            input_example=pd.DataFrame({"image": [_example_image()]}),
        )
        if cfg.registered_model_name and info.registered_model_version:
            version_uri = f"models:/{cfg.registered_model_name}/{info.registered_model_version}"
    c.set_terminated(run_id, status="FINISHED")
    return version_uri


def download_model(model_uri: str, tracking_uri: str, dst: str) -> tuple[str, str]:
    """`models:/name/version` -> local (model.keras, labels.json) paths."""
    import mlflow

    from mlflow.exceptions import MlflowException

    from emotion_ray.errors import ConfigError

    mlflow.set_tracking_uri(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst)
    except MlflowException as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model {model_uri} not found in the MLflow registry at {tracking_uri}: {first_line}") from None
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
        """The registered model: `score`'s decode and Predictor behind MLflow's pyfunc interface.

        Input: a DataFrame with an `image` column (the file's bytes; base64 in JSON, as
        `mlflow models serve` receives them) and/or a `path` column (local, `s3://` or archive
        member paths, read where the model runs). Output: one row per input with score's
        columns (path, label, confidence, prob_<class>, width, height, error); an unreadable or
        undecodable input is an error row, never a failed batch. Probabilities equal `score`'s
        and `predict`'s bit for bit (the same padded batches).
        """

        def load_context(self, context):
            from emotion_ray.runtime import setup_process

            setup_process()  # before TensorFlow loads in the serving process
            from emotion_ray.config import CPU_SCORE_BATCH
            from emotion_ray.inference import Predictor, bundle_from_files

            bundle = bundle_from_files(context.artifacts["model"], context.artifacts["labels"])
            self.predictor = Predictor(bundle, CPU_SCORE_BATCH)

        def predict(self, context, model_input, params=None):
            import pyarrow as pa

            from emotion_ray import storage
            from emotion_ray.config import DecodeLimits, StorageConfig
            from emotion_ray.sources import decode_table

            n = len(model_input)
            paths = list(model_input["path"]) if "path" in model_input else [None] * n
            images = list(model_input["image"]) if "image" in model_input else [None] * n
            data = [bytes(b) if isinstance(b, (bytes, bytearray)) else None for b in images]
            paths = [storage.as_listed(p) if isinstance(p, str) else f"<input row {i}>" for i, p in enumerate(paths)]
            batch = pa.table({"path": pa.array(paths, pa.string()), "data": pa.array(data, pa.binary())})
            decoded = decode_table(batch, self.predictor.bundle.image_size, DecodeLimits(), StorageConfig())
            frame = self.predictor(decoded).drop_columns(["model_id", "scored_at"]).to_pandas()
            for column in ("label", "error"):  # null, not NaN: JSON answers say `null`
                frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
            return frame

except ImportError:  # pragma: no cover - mlflow is a hard dependency; keep imports cheap elsewhere
    EmotionPyfunc = None  # type: ignore[assignment,misc]
