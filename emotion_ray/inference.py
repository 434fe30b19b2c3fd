"""The one inference path: `score`, `predict`, training's test evaluation and the MLflow model.

- `resolve_model`: a run directory, a `.keras` file with `labels.json` beside it (local or
  `s3://`), or `models:/name/version|alias` -> a `ModelBundle` (the file's bytes and labels).
- `inference_settings`: a bundle and the caller's overrides -> `InferenceSettings`, everything
  besides the weights that decides the rows (image size, faces, test-time views, temperature,
  min confidence, decode limits). The one place they are resolved: score, predict, evaluation and
  the MLflow model all decode (`InferenceSettings.decode`) and predict (`Predictor`) with it.
- `Predictor`: loads a bundle once (safe Keras zip only), checks its outputs once, and turns
  decoded Arrow batches (see sources.decode_table) into prediction rows.
- Its forward pass runs in fixed-size padded batches, so a file's probabilities do not depend on
  how many files share its batch: a file at the same row of its batch gets bit-identical numbers
  from every caller; at another row a matrix product may round float32's last bit differently
  (a tail row of the kernel's blocking: 3e-8 measured), so labels agree except at an exact tie.
- The run's fitted temperature (labels.json `temperature`, calibration.py; 1 when absent) is
  applied here and nowhere else, so every caller gets the same calibrated probabilities; so is
  test-time augmentation (labels.json `test_time_flip` and `test_time_shift`, `TestTimeAugmentation`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from emotion_ray import storage
from emotion_ray.calibration import UNCERTAIN, apply_temperature
from emotion_ray.config import DecodeLimits, FaceConfig, StorageConfig
from emotion_ray.errors import ConfigError, StageError
from emotion_ray.images import pixels_from_arrow

MODEL_FILE, LABELS_FILE = "model.keras", "labels.json"
FACE_COLUMNS = ("face_index", "box_x", "box_y", "box_w", "box_h", "face_score", "faces_in_picture")


@dataclass(frozen=True)
class TestTimeAugmentation:
    """Which views of each image a prediction averages (test-time augmentation; the ten-crop
    averaging of Krizhevsky et al. 2012, here as whole-image views of a face crop).

    `flip`: the image and its left-right mirror. `shift` (a fraction of the side, 0..0.25): also
    the image moved by that much up, down, left and right (at least 1 px; the edge pixels
    repeated), each mirrored too when `flip`. Views: 1, 2 (flip), 5 (shift) or 10 (both), and the
    inference compute is that many times one pass. labels.json records both keys; a model
    without them predicts from the image alone.
    """

    __test__ = False  # a dataclass, not a pytest class

    flip: bool = False
    shift: float = 0.0

    @classmethod
    def of(cls, settings) -> "TestTimeAugmentation":
        """From labels.json's dict or a ModelConfig (`test_time_flip`, `test_time_shift`)."""
        get = settings.get if isinstance(settings, dict) else lambda key, default: getattr(settings, key, default)
        flip, shift = get("test_time_flip", False), get("test_time_shift", 0.0)
        if flip is not None and not isinstance(flip, bool):
            raise ConfigError(f"test_time_flip {flip!r} is not true or false")
        if shift is not None and (isinstance(shift, bool) or not isinstance(shift, (int, float))
                                  or not 0 <= shift <= 0.25):
            raise ConfigError(f"test_time_shift {shift!r} is not a fraction of the side between 0 and 0.25")
        return cls(bool(flip), float(shift or 0.0))

    def as_labels(self) -> dict[str, Any]:
        """The labels.json keys that make every later prediction average the same views."""
        return {"test_time_flip": self.flip, "test_time_shift": self.shift}

    def offsets(self, image_size: int) -> list[tuple[int, int]]:
        """(rows, columns) each view moves the image by, in px at `image_size`; (0, 0) first."""
        if not self.shift:
            return [(0, 0)]
        d = max(1, round(self.shift * image_size))
        return [(0, 0), (0, d), (0, -d), (d, 0), (-d, 0)]

    @property
    def views(self) -> int:
        """Forward passes per image: each offset, and its mirror with `flip`."""
        return len(self.offsets(1)) * (2 if self.flip else 1)


@dataclass(frozen=True)
class ModelBundle:
    """A model as shipped to predictor actors (through the object store: `ray.put` it)."""

    model_bytes: bytes
    classes: list[str]
    image_size: int
    model_id: str  # the model's URI and content hash, written into every prediction row
    faces: dict | None = None  # the face preprocessing the model was trained with (labels.json), if any
    temperature: float = 1.0  # fitted on the validation split (labels.json); 1: the raw softmax
    test_time: TestTimeAugmentation = TestTimeAugmentation()  # the views a prediction averages (labels.json)


@dataclass(frozen=True)
class InferenceSettings:
    """How a model's predictions are made, besides its weights: built only by `inference_settings`.

    `faces` is always a FaceConfig (mode "none": whole pictures). `decode` turns a table of
    `path` (and optionally `data`, a file's bytes) into the rows `Predictor` takes; `record` is
    what an output remembers of them (score.py).
    """

    image_size: int
    faces: FaceConfig
    test_time: TestTimeAugmentation
    temperature: float
    min_confidence: float | None = None
    limits: DecodeLimits = dataclasses.field(default_factory=DecodeLimits)

    def decode(self, batch: pa.Table, storage_cfg: StorageConfig, one_thread: bool = False) -> pa.Table:
        """sources.decode_table with these settings: a row per picture, or with faces on a row per face."""
        from emotion_ray.sources import decode_table

        return decode_table(batch, self.image_size, self.limits, storage_cfg, self.faces, one_thread)

    def record(self) -> dict[str, Any]:
        """The settings that change an output's rows, JSON-ready: {"faces": {"mode": "none"} or
        {mode, detector, tiles (blazeface only), margin (the crop margin used, the detector's own
        resolved), min_size, no_face}, "test_time": {"flip", "shift"}, "temperature",
        "min_confidence"}. Decode limits are left out: they decide which files are refused (an
        error row), not how a scored row is computed; the image size is the model's own."""
        faces: dict[str, Any] = {"mode": self.faces.mode}
        if self.faces.enabled:  # the other face settings do nothing without faces
            faces.update(detector=self.faces.detector, margin=self.faces.crop_margin, min_size=self.faces.min_size,
                         no_face=self.faces.no_face)
            if self.faces.detector == "blazeface":  # only BlazeFace looks again in tiles
                faces["tiles"] = self.faces.tiles
        return {"faces": faces, "test_time": {"flip": self.test_time.flip, "shift": self.test_time.shift},
                "temperature": self.temperature, "min_confidence": self.min_confidence}


def inference_settings(bundle: ModelBundle, faces: FaceConfig | None = None, min_confidence: float | None = None,
                       limits: DecodeLimits | None = None) -> InferenceSettings:
    """A model's InferenceSettings: its labels.json (image size, faces, test-time views,
    temperature) with the caller's overrides. `faces`: what the caller asked for (the whole
    FaceConfig), else what the model was trained on, else whole pictures. ConfigError when
    `min_confidence` is asked of a model with a class named `uncertain` (the label of rows below it)."""
    if min_confidence is not None and UNCERTAIN in bundle.classes:
        raise ConfigError(f"model {bundle.model_id} has a class named {UNCERTAIN!r}, the label of rows below "
                          "min_confidence: score without min_confidence")
    if faces is None:
        faces = FaceConfig.model_validate(bundle.faces) if bundle.faces else FaceConfig()
    return InferenceSettings(bundle.image_size, faces, bundle.test_time, bundle.temperature, min_confidence,
                             limits or DecodeLimits())


def resolve_model(model: str, storage_cfg: StorageConfig, tracking_uri: str) -> ModelBundle:
    """Run directory, `.keras` file (with labels.json beside it), or `models:/name/version|alias`.

    Raises ConfigError when the model cannot be found (a missing registry version included).
    """
    if model.startswith(("models:/", "runs:/")):
        from emotion_ray.tracking import download_model

        with tempfile.TemporaryDirectory() as tmp:
            bundle = bundle_from_files(*download_model(model, tracking_uri, tmp))
            return dataclasses.replace(bundle, model_id=f"{model}#{bundle.model_id}")  # the URI and content hash
    model_uri = model if model.endswith(".keras") else storage.join(model, MODEL_FILE)
    labels_uri = storage.join(posixpath.dirname(model_uri) if storage.is_s3(model_uri)
                              else os.path.dirname(os.path.abspath(model_uri)), LABELS_FILE)
    for uri in (model_uri, labels_uri):
        if not storage.exists(uri, storage_cfg):
            raise ConfigError(f"model {model}: {uri} not found (expected a run directory or a .keras file "
                              "with labels.json beside it)")
    data = storage.read_bytes(model_uri, storage_cfg)
    return _bundle(data, storage.read_json(labels_uri, storage_cfg), f"{model_uri}#{_content_id(data)}")


def bundle_from_files(model_path: str, labels_path: str) -> ModelBundle:
    """A bundle from a local model file and its labels.json (as the MLflow model holds them)."""
    with open(model_path, "rb") as fh:
        data = fh.read()
    with open(labels_path) as fh:
        return _bundle(data, json.load(fh), _content_id(data))


def _content_id(data: bytes) -> str:
    return f"sha256={hashlib.sha256(data).hexdigest()[:12]}"


def _bundle(data: bytes, labels: dict, model_id: str) -> ModelBundle:
    """A bundle from a model file's bytes and its labels.json's contents (ConfigError on a
    temperature that is not a positive number, a test_time_flip that is not a bool or a
    test_time_shift outside 0..0.25)."""
    temperature = labels.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ConfigError(f"model {model_id}: labels.json temperature {temperature!r} is not a positive number")
    try:
        test_time = TestTimeAugmentation.of(labels)
    except ConfigError as e:
        raise ConfigError(f"model {model_id}: labels.json {e}") from None
    return ModelBundle(data, labels["classes"], labels["image_size"], model_id, labels.get("faces"),
                       float(temperature), test_time)


def share_gpus() -> None:
    """Let TensorFlow take GPU memory as it needs it, not all of it at start.

    By default the first process on a GPU claims nearly all its memory, so a second predictor
    given the same GPU (`gpus_per_predictor` < 1) fails to start. Call before anything runs on
    the GPU; without GPUs it does nothing.
    """
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # this process already runs on the GPU (a second Predictor): too late
            pass


def forward_pass(model, test_time: TestTimeAugmentation = TestTimeAugmentation()):
    """`model`'s forward pass (inference mode) as one compiled graph: uint8 images (N, H, W, 3),
    N >= 1 (TensorFlow's convolutions refuse an empty batch; Predictor pads) -> probabilities
    (N, classes). ConfigError for a shift on a model without a fixed input size.

    With test-time augmentation (`TestTimeAugmentation`), the mean of the probabilities of the
    image's views: with `flip` the answer is the same for an image and its mirror.
    Used rather than `predict_on_batch`, which re-enters Keras' predict machinery each call;
    the outputs are identical and it is faster (bench/RESULTS.md, score). The batch dimension
    is left open, so one trace serves every batch size.
    """
    import tensorflow as tf

    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.uint8)
    if test_time.views == 1:
        return tf.function(lambda images: model(images, training=False), input_signature=[spec])
    height, width = model.input_shape[1:3]
    if test_time.shift and (height is None or width is None):
        raise ConfigError(f"test_time_shift needs a model with a fixed input size; this one takes {model.input_shape}")

    def moved(images, dy, dx):
        # Gathering clipped indices repeats the edge rows and columns into the space a shift opens.
        images = tf.gather(images, tf.clip_by_value(tf.range(height) - dy, 0, height - 1), axis=1)
        return tf.gather(images, tf.clip_by_value(tf.range(width) - dx, 0, width - 1), axis=2)

    def averaged(images):
        views = [images if (dy, dx) == (0, 0) else moved(images, dy, dx) for dy, dx in test_time.offsets(height)]
        if test_time.flip:
            views += [tf.reverse(v, axis=[2]) for v in views]
        # One model call per view, not one batch of all of them: memory stays that of the caller's
        # batch (10 views of a 256 batch of 224 px pictures would not fit a small GPU).
        total = model(views[0], training=False)
        for view in views[1:]:
            total += model(view, training=False)
        return total / len(views)

    return tf.function(averaged, input_signature=[spec])


def _check_outputs(probe: np.ndarray, classes: list[str], model_id: str) -> None:
    """A model whose outputs are not one probability per class is refused at load."""
    if probe.ndim != 2 or probe.shape[1] != len(classes):
        raise StageError(f"model {model_id} outputs shape {probe.shape[1:]} but labels.json names "
                         f"{len(classes)} classes {classes}: the labels do not belong to this model")
    sums = probe.sum(axis=1)
    if (probe < 0).any() or not np.allclose(sums, 1.0, atol=1e-3):
        raise StageError(f"model {model_id} does not output probabilities (row sums {sums.min():.3g}-"
                         f"{sums.max():.3g}, not 1): its last layer must be a softmax")


class Predictor:
    """Loads a model once, then turns decoded batches into prediction rows.

    Used as a Ray Data actor-pool UDF (`bundle` may be an ObjectRef: the model travels through
    the object store, not inside the UDF) and in-process by predict, evaluation and MLflow.
    `settings` (inference_settings; unset: the bundle's own) decide the views averaged and the
    temperature (calibration.py) of the probabilities; with their `min_confidence` (0..1), rows
    whose top probability is below it are labelled `uncertain` (their confidence and
    probabilities are still written).
    """

    def __init__(self, bundle: ModelBundle | Any, batch_size: int, settings: InferenceSettings | None = None):
        from emotion_ray.model import load_model_bytes

        if not isinstance(bundle, ModelBundle):  # an ObjectRef
            import ray

            bundle = ray.get(bundle)
        self.settings = settings = settings or inference_settings(bundle)
        share_gpus()
        self.model = load_model_bytes(bundle.model_bytes)
        self.forward = forward_pass(self.model, settings.test_time)
        self.bundle = bundle
        self.batch_size = batch_size
        self.min_confidence = settings.min_confidence
        probe = np.random.default_rng(0).integers(0, 256, (2, settings.image_size, settings.image_size, 3), np.uint8)
        _check_outputs(self.forward(probe).numpy(), bundle.classes, bundle.model_id)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, size, size, 3) uint8 -> (N, classes) float32 calibrated probabilities (the bundle's
        temperature applied), in fixed-size padded chunks."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            padded = np.zeros((self.batch_size, *chunk.shape[1:]), dtype=np.uint8)
            padded[: len(chunk)] = chunk
            out.append(apply_temperature(self.forward(padded).numpy(), self.settings.temperature)[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, len(self.bundle.classes)), dtype=np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Decoded rows (InferenceSettings.decode) -> prediction rows (README, score); face columns pass through."""
        classes, size = self.bundle.classes, self.settings.image_size
        column = batch["image"]
        good = column.is_valid().to_numpy(zero_copy_only=False)
        probs = np.full((len(column), len(classes)), np.nan, dtype=np.float32)
        if good.any():
            probs[good] = self.probabilities(pixels_from_arrow(column, size))
        best = np.nan_to_num(probs, nan=-1.0).argmax(axis=1)
        top = np.where(good, np.nan_to_num(probs.max(axis=1, initial=-1.0)), np.nan)
        unsure = good & (top < self.min_confidence) if self.min_confidence is not None else np.zeros_like(good)
        columns = {"path": batch["path"]}
        for name in FACE_COLUMNS:  # with faces on: which face of the picture, and where
            if name in batch.column_names:
                columns[name] = batch[name]
        columns.update({
            "label": pa.array([(UNCERTAIN if u else classes[b]) if g else None
                               for b, g, u in zip(best, good, unsure)], pa.string()),
            "confidence": pa.array(top, pa.float32(), mask=~good),
        })
        for j, c in enumerate(classes):
            columns[f"prob_{c}"] = pa.array(probs[:, j], pa.float32(), mask=~good)
        columns["model_id"] = pa.array([self.bundle.model_id] * len(column), pa.string())
        columns["width"], columns["height"], columns["error"] = batch["width"], batch["height"], batch["error"]
        now = dt.datetime.now(dt.timezone.utc)
        columns["scored_at"] = pa.array([now] * len(column), pa.timestamp("us", tz="UTC"))
        return pa.table(columns)


def as_records(rows: pa.Table, classes: list[str]) -> list[dict[str, Any]]:
    """Prediction rows -> plain dicts: path, label, confidence, probabilities by class, error,
    and with faces on `face` (index, box x/y/w/h in the displayed picture's pixels, score)."""
    records = []
    for r in rows.to_pylist():
        record = {"path": r["path"], "label": r["label"], "confidence": r["confidence"],
                  "probabilities": {c: r[f"prob_{c}"] for c in classes}, "error": r["error"]}
        if r.get("face_index") is not None:
            record["face"] = {"index": r["face_index"], "box": [r["box_x"], r["box_y"], r["box_w"], r["box_h"]],
                              "score": r["face_score"]}
        records.append(record)
    return records


def predict(cfg) -> list[dict[str, Any]]:
    """Predict a few files (a `PredictConfig`) in this process: the settings, decode and Predictor of `score`."""
    bundle = resolve_model(cfg.model, cfg.storage, cfg.mlflow_tracking_uri)
    settings = inference_settings(bundle, cfg.faces, cfg.min_confidence, cfg.decode_limits())
    paths = [storage.as_listed(p) for p in cfg.inputs]  # `path` as score writes it (a name that is not UTF-8 escaped)
    decoded = settings.decode(pa.table({"path": paths}), cfg.storage)
    return as_records(Predictor(bundle, cfg.batch_size, settings)(decoded), bundle.classes)
