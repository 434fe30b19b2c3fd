"""The weights a pretrained backbone starts from, read once by the driver and shipped to every worker.

`model.backbone_weights` names them (config.ModelConfig): `imagenet` is Keras' own ImageNet file
for the architecture (no classifier), downloaded with `tf.keras.utils.get_file` into Keras'
cache (~/.keras/models, or $KERAS_HOME) where the driver has internet, so once per driver
machine and never once per worker; any other value is a local or s3:// HDF5 file written by
the backbone's `save_weights`. `resolve_weights` turns either into bytes before any cluster
work, refusing a missing or non-HDF5 file with a ConfigError; train.py passes the bytes to the
workers in the training loop's config (Ray carries large arguments through its object store),
so workers need neither internet nor the driver's files. model.load_backbone_weights loads them.

TensorFlow is imported here only to download.
"""

from __future__ import annotations

from emotion_ray import storage
from emotion_ray.config import ModelConfig, StorageConfig
from emotion_ray.errors import ConfigError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# Keras' ImageNet files without the classifier (include_top=False), exactly as tf-keras 2.21's
# applications fetch them for the backbones model.py builds: (URL, md5; None where Keras has none).
# MobileNetV2 at alpha 0.35 and MobileNetV3Small at alpha 1.0 were trained on 224x224 images.
IMAGENET_FILES: dict[str, tuple[str, str | None]] = {
    "mobilenet_v2": ("https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
                     "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5", None),
    "mobilenet_v3_small": ("https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/"
                           "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
                           "d3e8ec802a04aa4fc771ee12a9a9b836"),
    "efficientnet_b0": ("https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
                        "50bc09e76180e00e4465e1a485ddc09d"),
}


def fetch_imagenet(architecture: str, cache_dir: str | None = None) -> str:
    """The local path of Keras' ImageNet weights for `architecture`: from Keras' cache (`cache_dir`,
    default ~/.keras) when it is there with the right md5, else downloaded into it first.
    ConfigError when it cannot be downloaded (no internet: give the file's path instead)."""
    from emotion_ray.model import keras

    url, file_hash = IMAGENET_FILES[architecture]
    try:
        return keras.utils.get_file(url.rsplit("/", 1)[1], url, file_hash=file_hash, cache_subdir="models",
                                    cache_dir=cache_dir)
    except Exception as exc:  # get_file raises bare Exception for network errors
        raise ConfigError(f"model.backbone_weights imagenet: could not download {url} ({exc}); on a machine "
                          "without internet download it elsewhere and set model.backbone_weights to its local "
                          "or s3:// path") from None


def resolve_weights(model: ModelConfig, storage_cfg: StorageConfig | None = None,
                    cache_dir: str | None = None) -> bytes | None:
    """The bytes of the file `model.backbone_weights` names, or None when the run has no pretrained
    backbone (no weights, an architecture without a backbone, or init_from). ConfigError when the
    file is missing, cannot be downloaded, or is not HDF5."""
    if not model.pretrained_backbone:
        return None
    source = model.backbone_weights
    if source == "imagenet":
        source = fetch_imagenet(model.architecture, cache_dir)
    try:
        data = storage.read_bytes(source, storage_cfg)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"model.backbone_weights: no file at {source}") from None
    if not data.startswith(HDF5_MAGIC):
        raise ConfigError(f"model.backbone_weights {source} is not an HDF5 weights file (write one with the "
                          f"{model.architecture} backbone's save_weights to a .h5 path)")
    return data
