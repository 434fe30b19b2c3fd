"""Architecture registry. Every model takes uint8 RGB (N, size, size, 3) and scales inside itself.

Uses tf.keras with TF_USE_LEGACY_KERAS=1 (tf-keras): Keras 3 breaks model.fit under
MultiWorkerMirroredStrategy. Import this module only where TensorFlow may load; the process
must have run `runtime.setup_process()` first (the CLI, jobs/ and Ray workers started by the
package do), and importing it on Keras 3 fails at once with what to do.

Model files are Keras zip files (`.keras`), written and read only through `save_model` and
`load_model` here: see their docstrings for why neither trusts tf-keras' defaults.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from emotion_ray.config import ModelConfig, StorageConfig, TrainConfig
from emotion_ray.errors import ConfigError

import tensorflow as tf  # noqa: E402

keras = tf.keras
if not keras.__name__.startswith("tf_keras"):
    raise ImportError(
        "emotion_ray needs tf-keras: TensorFlow was imported before TF_USE_LEGACY_KERAS=1 was set. "
        "Call emotion_ray.runtime.setup_process() before importing TensorFlow."
    )
KERAS_ZIP_MAGIC = b"PK\x03\x04"
METRIC_NAMES = ("categorical_accuracy", "precision", "recall")


def _augmentation(cfg: ModelConfig, value_range: tuple[float, float] = (0.0, 1.0)) -> list:
    """Random layers (identity at inference); `value_range`: the pixel range they see, for brightness."""
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
    if aug.translation:
        layers.append(keras.layers.RandomTranslation(aug.translation, aug.translation))
    if aug.contrast:
        layers.append(keras.layers.RandomContrast(aug.contrast))
    if aug.brightness:
        layers.append(keras.layers.RandomBrightness(aug.brightness, value_range=value_range))
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


# ITU-R BT.601 luma, the weights of tf.image.rgb_to_grayscale and PIL's convert("L").
GREY_WEIGHTS = (0.299, 0.587, 0.114)
# Layers fixed by design: they stay frozen when the reused layers are unfrozen for fine-tuning.
FIXED_LAYERS = ("grey",)


def _grey(channels: int) -> keras.layers.Layer:
    """(N, S, S, 3) RGB -> (N, S, S, channels), each channel the BT.601 luma; fixed (never trained).
    A Dense over the channel axis: a saved model holds it as plain weights, not Python code."""
    return keras.layers.Dense(
        channels, use_bias=False, trainable=False, name="grey",
        kernel_initializer=keras.initializers.Constant([[w] * channels for w in GREY_WEIGHTS]),
    )


def _pooled_classifier(x, cfg: ModelConfig, num_classes: int):
    """(N, H, W, C) features -> GlobalAveragePooling2D -> Dropout(cfg.dropout) -> Dense softmax (N, classes)."""
    x = keras.layers.GlobalAveragePooling2D()(x)
    if cfg.dropout:
        x = keras.layers.Dropout(cfg.dropout)(x)
    return keras.layers.Dense(num_classes, activation="softmax")(x)


def face_cnn(cfg: ModelConfig, num_classes: int, image_size: int) -> keras.Model:
    """A small VGG-style CNN for face crops (FER2013's 48x48; 64 also works), grey inside.

    uint8 RGB (N, S, S, 3)
      -> Rescaling(1/255)                         (N, S, S, 3) in [0, 1]
      -> augmentation (training only)             (N, S, S, 3)
      -> grey: fixed BT.601 luma, not trained     (N, S, S, 1)
      -> 4 stages of cfg.convs_per_stage x Conv3x3-BatchNorm-ReLU with 32, 64, 128, 256 filters
         (x filter_multiplier), 2x2 max-pooling after the first three    (N, S/8, S/8, 256)
      -> GlobalAveragePooling2D                   (N, 256)
      -> Dropout(cfg.dropout) -> Dense(num_classes, softmax)   (no hidden Dense: dense_units unused)

    With one convolution per stage: 390,054 parameters for 3 classes at any S (the seed CNN: 3.7 M
    at 256), ~32 M multiply-adds per 48x48 image; with (1, 1, 2, 2), the face recipe's, 1.13 M and
    ~74 M. The design is VGG's stacked 3x3 convolutions (Simonyan & Zisserman 2015) with
    batch normalisation (Ioffe & Szegedy 2015) and global average pooling in place of Flatten-Dense
    (Lin et al. 2014, "Network in Network"), as in mini-Xception for FER2013 (Arriaga et al. 2017).
    Colour photos become grey inside the model, so they look like FER2013's grey faces
    (RECIPE_NOTES.md); the conversion follows the augmentation, which then never needs gradients
    through the (TensorFlow-trainable) luma kernel. Recipe and numbers: RECIPE_NOTES.md.
    """
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    for layer in _augmentation(cfg):
        x = layer(x)
    x = _grey(channels=1)(x)
    bases = (32, 64, 128, 256)
    for i, (base, convs) in enumerate(zip(bases, cfg.convs_per_stage)):
        for _ in range(convs):
            x = keras.layers.Conv2D(_filters(base, cfg), (3, 3), padding="same", use_bias=False)(x)
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.ReLU()(x)
        if i < len(bases) - 1:
            x = keras.layers.MaxPooling2D()(x)
    return keras.Model(inputs, _pooled_classifier(x, cfg, num_classes), name="face_cnn")


# ImageNet's per-channel standard deviations, as Keras' EfficientNet uses them (see load_backbone_weights).
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
# tf.keras.applications backbones: (constructor, its options, rescaling (scale, offset) applied in front
# of it, None where the backbone scales [0, 255] inputs itself). Keras' MobileNetV3 (include_preprocessing)
# rescales to [-1, 1] and its EfficientNet to ImageNet's mean and variance; MobileNetV2 takes [-1, 1].
BACKBONES = {
    "mobilenet_v2": (keras.applications.MobileNetV2, {"alpha": 0.35}, (1 / 127.5, -1.0)),
    "mobilenet_v3_small": (keras.applications.MobileNetV3Small, {"include_preprocessing": True}, None),
    "efficientnet_b0": (keras.applications.EfficientNetB0, {}, None),
}


def backbone_model(cfg: ModelConfig, num_classes: int, image_size: int, storage_cfg: StorageConfig | None = None,
                   weights: bytes | None = None) -> keras.Model:
    """A tf.keras.applications backbone (ImageNet-style feature extractor) with a classifier for `num_classes`.

    uint8 RGB (N, S, S, 3), S >= 32 (Keras' minimum; S/32 rounded up is the backbone's output side)
      -> float32 in [0, 255]                      (N, S, S, 3)
      -> augmentation (training only)             (N, S, S, 3)
      -> cfg.grey: fixed BT.601 luma on all three channels, not trained   (N, S, S, 3)
      -> the backbone, its own preprocessing inside it (MobileNetV2: a Rescaling to [-1, 1] in front)
                                                  (N, ceil(S/32), ceil(S/32), C)
      -> GlobalAveragePooling2D -> Dropout(cfg.dropout) -> Dense(num_classes, softmax)   (N, num_classes)

    Backbones (include_top=False): `mobilenet_v2`, MobileNetV2 at width 0.35 (Sandler et al. 2018,
    C = 1280); `mobilenet_v3_small`, MobileNetV3-Small at width 1.0 (Howard et al. 2019, "Searching for
    MobileNetV3", C = 576, 0.94 M parameters); `efficientnet_b0` (Tan & Le 2019, "EfficientNet:
    Rethinking Model Scaling for CNNs", C = 1280, 4.0 M parameters). `weights`: the bytes of the file
    cfg.backbone_weights names (backbones.resolve_weights; the driver ships them to the workers), read
    here when not given. With weights the backbone runs in inference mode (BatchNorm keeps the moving
    statistics it came with, also while fine-tuning: small face batches would otherwise replace them),
    and training treats it as the reused part (model.freeze_epochs, fine_tune_learning_rate).
    """
    constructor, options, rescaling = BACKBONES[cfg.architecture]
    backbone = constructor(input_shape=(image_size, image_size, 3), include_top=False, weights=None, **options)
    if cfg.backbone_weights:
        if weights is None:
            from emotion_ray.backbones import resolve_weights

            weights = resolve_weights(cfg, storage_cfg)
        load_backbone_weights(backbone, weights, imagenet=cfg.backbone_weights == "imagenet")
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1.0, name="to_float")(inputs)  # a cast: Rescaling casts to float32
    for layer in _augmentation(cfg, value_range=(0.0, 255.0)):
        x = layer(x)
    if cfg.grey:
        x = _grey(channels=3)(x)
    if rescaling:
        x = keras.layers.Rescaling(*rescaling)(x)
    x = backbone(x, training=False) if cfg.backbone_weights else backbone(x)
    return keras.Model(inputs, _pooled_classifier(x, cfg, num_classes), name=cfg.architecture)


def load_backbone_weights(backbone: keras.Model, data: bytes, imagenet: bool = False) -> None:
    """Load an HDF5 weights file's bytes (the backbone's `save_weights`, legacy `.h5` or Keras v3
    `.weights.h5` layout) into `backbone`, built with weights=None. `imagenet`: the file is Keras' own
    ImageNet file (backbones.IMAGENET_FILES). Keras builds EfficientNet for those weights with one more
    step after its Normalization layer, x / sqrt(stddev) per channel (tensorflow/tensorflow#49930:
    the file's variance is the original implementation's stddev); that step is folded into the
    layer's variance here, so the model needs no layer Keras only adds for weights="imagenet"."""
    import io

    import h5py

    with h5py.File(io.BytesIO(data), "r") as fh:
        legacy = "layer_names" in fh.attrs or "model_weights" in fh
    with tempfile.TemporaryDirectory() as tmp:
        # tf-keras chooses its reader by the name: `.weights.h5` is the v3 layout, other `.h5` the legacy one.
        path = os.path.join(tmp, "backbone.h5" if legacy else "backbone.weights.h5")
        with open(path, "wb") as fh:
            fh.write(data)
        backbone.load_weights(path)
    if imagenet:
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.Normalization):
                mean, variance, count = layer.get_weights()
                layer.set_weights([mean, variance * np.array(IMAGENET_STDDEV_RGB, dtype=variance.dtype), count])


ARCHITECTURES = {"seed_cnn": seed_cnn, "wide_cnn": wide_cnn, "face_cnn": face_cnn,
                 **{name: backbone_model for name in BACKBONES}}


def build_model(cfg: ModelConfig, num_classes: int, image_size: int, storage_cfg: StorageConfig | None = None,
                backbone_weights: bytes | None = None) -> keras.Model:
    """The architecture `cfg` names for `num_classes` classes and `image_size` px uint8 RGB input.
    `backbone_weights`: for backbones, the bytes of cfg.backbone_weights' file (else read from it)."""
    if cfg.architecture in BACKBONES:
        return backbone_model(cfg, num_classes, image_size, storage_cfg, backbone_weights)
    return ARCHITECTURES[cfg.architecture](cfg, num_classes, image_size)


def reuse_for_classes(parent: keras.Model, parent_classes: list[str], classes: list[str]) -> keras.Model:
    """A model made of `parent`'s layers up to its classifier, and a new classifier for `classes`.

    The classifier is `parent`'s last layer (a softmax Dense). A class of `classes` that
    `parent_classes` also names (case-insensitive) keeps its kernel column and bias; the others
    start from Keras' initialisers. The reused layers are shared with `parent`, not copied.
    Raises ConfigError when the last layer is not a softmax Dense (there is no head to replace).
    (Transfer learning by fine-tuning: Yosinski et al., "How transferable are features in deep
    neural networks?", NeurIPS 2014.)
    """
    head = parent.layers[-1]
    if not isinstance(head, keras.layers.Dense) or head.activation is not keras.activations.softmax:
        raise ConfigError(f"init_from: the model's last layer is {type(head).__name__}, not a softmax Dense "
                          "classifier; it cannot be reused for new classes")
    features = parent.layers[-2].output
    new_head = keras.layers.Dense(len(classes), activation="softmax", name="classifier")
    model = keras.Model(parent.inputs, new_head(features), name=f"{parent.name}_transfer")
    kernel, bias = head.get_weights()
    new_kernel, new_bias = new_head.get_weights()
    known = {c.lower(): i for i, c in enumerate(parent_classes)}
    for j, name in enumerate(classes):
        if name.lower() in known:
            new_kernel[:, j], new_bias[j] = kernel[:, known[name.lower()]], bias[known[name.lower()]]
    new_head.set_weights([new_kernel, new_bias])
    return model


def set_reused_trainable(model: keras.Model, trainable: bool) -> None:
    """Freeze (or unfreeze) every layer but the classifier (the last); fixed layers (FIXED_LAYERS: the grey
    conversion) stay frozen. For a backbone model the reused part is the backbone (the layers in front of it
    and the pooling hold no weights). Recompile afterwards."""
    for layer in model.layers[:-1]:
        layer.trainable = trainable and layer.name not in FIXED_LAYERS


def fit_batchnorm_momentum(model: keras.Model, steps_per_epoch: int) -> None:
    """Set the momentum of every BatchNormalization layer of `model` (nested backbones included)
    to min(0.99, 1 - 1 / steps_per_epoch), in place, before training.

    The moving mean and variance that inference uses are an exponential average with a window of
    about 1 / (1 - momentum) steps. At Keras' 0.99 that is 100 steps: a few hundred photos make
    a handful of steps an epoch, and after a few epochs the statistics are still mostly their
    initial values (0 and 1), so the model answers nearly the same class for every input at
    inference while training accuracy rises. With the window at most one epoch, every epoch's
    validation sees statistics of the current weights; large data keeps Keras' 0.99. A heuristic,
    not a published method. `steps_per_epoch`: this worker's optimizer steps per epoch (>= 1).
    """
    momentum = min(0.99, 1.0 - 1.0 / max(1, steps_per_epoch))
    for layer in model.submodules:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def class_weights(counts: dict[str, int], classes: list[str]) -> dict[int, float]:
    """Keras `class_weight` for `fit`, "balanced" as scikit-learn defines it: n / (k * count).

    `counts`: training examples per class name; the keys of the result are indices into `classes`.
    Every class then weighs the same in the training loss in total (FER2013's train has 1.8
    happy per angry face).
    """
    missing = [c for c in classes if counts.get(c, 0) <= 0]
    if missing:
        raise ValueError(f"no training examples for {missing}: balanced class weights need every class")
    n = sum(counts[c] for c in classes)
    return {i: n / (len(classes) * counts[c]) for i, c in enumerate(classes)}


def learning_rate_schedule(
    learning_rate: float, schedule: str = "constant", total_steps: int | None = None, warmup_steps: int = 0
):
    """`learning_rate` itself, or for "cosine" a linear warmup from 0 over `warmup_steps` to it and a
    cosine decay to 0 at `total_steps` (optimizer steps of the whole run: epochs x steps per epoch)."""
    if schedule == "constant":
        return learning_rate
    if schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {schedule!r}")
    if not total_steps or total_steps <= warmup_steps:
        raise ValueError(f"cosine needs total_steps above warmup_steps ({warmup_steps}), got {total_steps}")
    if not warmup_steps:
        return keras.optimizers.schedules.CosineDecay(learning_rate, total_steps)
    return keras.optimizers.schedules.CosineDecay(
        0.0, total_steps - warmup_steps, warmup_target=learning_rate, warmup_steps=warmup_steps
    )


def compile_model(
    model: keras.Model,
    learning_rate: float,
    *,
    lr_schedule: str = "constant",
    total_steps: int | None = None,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    label_smoothing: float = 0.0,
) -> keras.Model:
    """Adam (AdamW when `weight_decay` > 0) on categorical cross-entropy, with the project's metrics.

    The defaults are the seed's: constant rate, Adam, no smoothing. See `learning_rate_schedule`
    for `total_steps`/`warmup_steps`; `compile_for_training` derives them from a TrainConfig.
    """
    lr = learning_rate_schedule(learning_rate, lr_schedule, total_steps, warmup_steps)
    if weight_decay:
        optimizer = keras.optimizers.AdamW(lr, weight_decay=weight_decay)
    else:
        optimizer = keras.optimizers.Adam(lr)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="categorical_accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
    )
    return model


def compile_for_training(model: keras.Model, cfg: TrainConfig, steps_per_epoch: int) -> keras.Model:
    """`compile_model` with a TrainConfig's options; `steps_per_epoch`: optimizer steps per epoch
    (each worker's: ceil(train rows / batch_size) when the global batch is split over workers)."""
    return compile_model(
        model,
        cfg.learning_rate,
        lr_schedule=cfg.lr_schedule,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        weight_decay=cfg.weight_decay,
        label_smoothing=cfg.label_smoothing,
    )


def save_model(model: keras.Model, path: str, include_optimizer: bool = True) -> None:
    """Write `model` as a Keras zip file at `path` (name it `.keras`).

    The format is asked for explicitly: tf-keras keeps its "new format" switch per thread, and
    Ray Train runs the training loop in a thread where a `.keras` name alone fell back to HDF5
    (which `load_model(safe_mode=True)` cannot guard). `include_optimizer=False` writes an
    inference-only file (the optimizer's slots are twice the weights for Adam); checkpoints
    keep it, for resuming.
    """
    if not include_optimizer and model.optimizer is not None:
        trained = model
        model = keras.models.clone_model(trained)  # the same layers, never compiled: no optimizer
        model.set_weights(trained.get_weights())
    model.save(path, save_format="keras_v3")


def load_model_bytes(data: bytes, compile: bool = False) -> keras.Model:
    """`load_model` for a model file's bytes (as a ModelBundle carries them)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        with open(path, "wb") as fh:
            fh.write(data)
        return load_model(path, compile=compile)


def load_model(path: str, compile: bool = False) -> keras.Model:
    """Load a Keras zip file with safe_mode=True: a `Lambda` layer's Python code is refused.

    tf-keras reads a file named `.keras` that is not a zip (e.g. HDF5) through its legacy
    loader, which ignores safe_mode and would run such code: anything but a Keras zip is
    refused here. Raises ConfigError naming the file and what it is.
    """
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != KERAS_ZIP_MAGIC:
        kind = "an HDF5 file" if magic == b"\x89HDF" else f"not a zip file (starts with {magic!r})"
        raise ConfigError(f"model file {path} is {kind}, not a Keras zip (.keras) file; refusing to load it "
                          "(only Keras zip files can be loaded without running code they hold)")
    try:
        return keras.models.load_model(path, safe_mode=True, compile=compile)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "Lambda" in str(exc):
            raise ConfigError(f"model file {path} holds Python code (a Lambda layer); refusing to load it") from None
        raise
