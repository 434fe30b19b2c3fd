"""Architecture registry. Every model takes uint8 RGB (N, size, size, 3) and scales inside itself.

Uses tf.keras with TF_USE_LEGACY_KERAS=1 (tf-keras): Keras 3 breaks model.fit under
MultiWorkerMirroredStrategy. Import this module only where TensorFlow may load.
"""

from __future__ import annotations

import os
import tempfile

from emotion_ray import runtime  # noqa: F401 - must precede the TensorFlow import
from emotion_ray.config import ModelConfig, StorageConfig

import tensorflow as tf  # noqa: E402

keras = tf.keras
METRIC_NAMES = ("categorical_accuracy", "precision", "recall")


def _augmentation(cfg: ModelConfig) -> list:
    aug = cfg.augmentation
    if not aug.enabled:
        return []
    layers = []
    if aug.flip:
        layers.append(keras.layers.RandomFlip("horizontal"))  # faces are left-right symmetric
    if aug.rotation:
        layers.append(keras.layers.RandomRotation(aug.rotation))
    if aug.zoom:
        layers.append(keras.layers.RandomZoom(aug.zoom))
    if aug.contrast:
        layers.append(keras.layers.RandomContrast(aug.contrast))
    return layers


def _head(cfg: ModelConfig, num_classes: int) -> list:
    head = [keras.layers.Dense(cfg.dense_units, activation="relu")]
    if cfg.dropout:
        head.append(keras.layers.Dropout(cfg.dropout))
    head.append(keras.layers.Dense(num_classes, activation="softmax"))
    return head


def _filters(base: int, cfg: ModelConfig) -> int:
    return max(1, round(base * cfg.filter_multiplier))


def seed_cnn(cfg: ModelConfig, num_classes: int, image_size: int) -> keras.Model:
    """The seed notebook's CNN, exactly, plus Rescaling(1/255) in front (and optional extras)."""
    layers = [keras.Input((image_size, image_size, 3), dtype="uint8", name="image"), keras.layers.Rescaling(1 / 255)]
    layers += _augmentation(cfg)
    for base in (16, 32, 16):
        layers += [keras.layers.Conv2D(_filters(base, cfg), (3, 3), activation="relu"), keras.layers.MaxPooling2D()]
    layers += [keras.layers.Flatten()] + _head(cfg, num_classes)
    return keras.Sequential(layers, name="seed_cnn")


def wide_cnn(cfg: ModelConfig, num_classes: int, image_size: int) -> keras.Model:
    """Wider convolutions and global pooling: fewer parameters than Flatten at large sizes."""
    layers = [keras.Input((image_size, image_size, 3), dtype="uint8", name="image"), keras.layers.Rescaling(1 / 255)]
    layers += _augmentation(cfg)
    for base in (32, 64, 128):
        layers += [
            keras.layers.Conv2D(_filters(base, cfg), (3, 3), padding="same", activation="relu"),
            keras.layers.Conv2D(_filters(base, cfg), (3, 3), padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
        ]
    layers += [keras.layers.GlobalAveragePooling2D()] + _head(cfg, num_classes)
    return keras.Sequential(layers, name="wide_cnn")


def mobilenet_v2(
    cfg: ModelConfig, num_classes: int, image_size: int, storage_cfg: StorageConfig | None = None
) -> keras.Model:
    """Transfer learning: a MobileNetV2 backbone whose weights come from a user-given file.

    Weights are never downloaded at run time (clusters are often offline); without
    `backbone_weights` the backbone starts from random weights.
    """
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # MobileNetV2 expects [-1, 1]
    for layer in _augmentation(cfg):
        x = layer(x)
    backbone = keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3), include_top=False, weights=None, alpha=0.35
    )
    if cfg.backbone_weights:
        from emotion_ray import storage

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(cfg.backbone_weights))
            storage.download_file(cfg.backbone_weights, local, storage_cfg)
            backbone.load_weights(local)
    x = keras.layers.GlobalAveragePooling2D()(backbone(x))
    for layer in _head(cfg, num_classes):
        x = layer(x)
    return keras.Model(inputs, x, name="mobilenet_v2")


ARCHITECTURES = {"seed_cnn": seed_cnn, "wide_cnn": wide_cnn, "mobilenet_v2": mobilenet_v2}


def build_model(cfg: ModelConfig, num_classes: int, image_size: int, storage_cfg: StorageConfig | None = None):
    builder = ARCHITECTURES[cfg.architecture]
    if builder is mobilenet_v2:
        return builder(cfg, num_classes, image_size, storage_cfg)
    return builder(cfg, num_classes, image_size)


def compile_model(model: keras.Model, learning_rate: float) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="categorical_accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
    )
    return model


def share_gpus() -> None:
    """Let TensorFlow take GPU memory as it needs it, not all of it at start.

    By default the first process on a GPU claims nearly all its memory, so a second predictor
    given the same GPU (`gpus_per_predictor` < 1) fails to start. Call before anything runs on
    the GPU; without GPUs it does nothing.
    """
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # this process already runs on the GPU (a second predict() call): too late
            pass


def load_model(path: str, compile: bool = False) -> keras.Model:
    """Load a `.keras` file. safe_mode=True: no arbitrary code from the file runs."""
    return keras.models.load_model(path, safe_mode=True, compile=compile)


def inference_function(model: keras.Model):
    """`model`'s forward pass (inference mode) as one compiled graph: uint8 images -> probabilities.

    Scoring and evaluation call this rather than `predict_on_batch`, which re-enters Keras'
    predict machinery (a data adapter per call, run in Python between the graph's ops); the
    outputs are identical, and on 2 CPU cores it is 1.15-1.2x faster alone and +15% end to end
    in `score` (bench/RESULTS.md). The batch dimension is left open, so one trace serves every
    batch size.
    """
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.uint8)
    return tf.function(lambda images: model(images, training=False), input_signature=[spec])
