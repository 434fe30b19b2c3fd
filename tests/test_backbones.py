"""The weights a pretrained backbone starts from: checked and read once by the driver, ImageNet's
through Keras' download cache (served here by a local HTTP server: nothing here reaches the internet)."""

from __future__ import annotations

import hashlib
import http.server
import threading

import numpy as np
import pytest

from emotion_ray.backbones import HDF5_MAGIC, IMAGENET_FILES, resolve_weights
from emotion_ray.config import BACKBONE_ARCHITECTURES, ConfigError, ModelConfig


@pytest.mark.fast
def test_backbone_weights_file_is_checked_by_the_driver(tmp_path):
    def model(weights):
        return ModelConfig(architecture="efficientnet_b0", backbone_weights=str(weights))

    with pytest.raises(ConfigError, match=f"no file at {tmp_path}/missing.h5"):
        resolve_weights(model(tmp_path / "missing.h5"))
    with pytest.raises(ConfigError, match="no file at"):
        resolve_weights(model(tmp_path))  # a folder
    (tmp_path / "model.keras").write_bytes(b"PK\x03\x04 a zip, not weights")
    with pytest.raises(ConfigError, match="not an HDF5 weights file .*efficientnet_b0 backbone's save_weights"):
        resolve_weights(model(tmp_path / "model.keras"))
    (tmp_path / "w.h5").write_bytes(HDF5_MAGIC + b"rest")
    assert resolve_weights(model(tmp_path / "w.h5")) == HDF5_MAGIC + b"rest"
    # Nothing to read without a pretrained backbone, even when the key is set.
    assert resolve_weights(ModelConfig(architecture="face_cnn", backbone_weights=str(tmp_path / "missing"))) is None


# ----------------------------------------------------------------------------- with TensorFlow
def test_imagenet_weights_are_downloaded_once_and_efficientnets_normalisation_folded(tmp_path, monkeypatch):
    """`imagenet` goes through Keras' get_file (here from a local HTTP server standing in for Google's:
    nothing here reaches the internet) into a cache, read again without a download; EfficientNet's
    ImageNet correction (x / sqrt(stddev) after Normalization) lands in the variance."""
    from emotion_ray.model import build_model, keras, load_model, save_model
    from tests.test_model import _backbone, _backbone_weights_file

    size = 32
    source = _backbone_weights_file("efficientnet_b0", tmp_path / "efficientnetb0_notop.h5", size)
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/efficientnetb0_notop.h5"
        md5 = hashlib.md5((tmp_path / "efficientnetb0_notop.h5").read_bytes()).hexdigest()
        monkeypatch.setitem(IMAGENET_FILES, "efficientnet_b0", (url, md5))
        cfg = ModelConfig(architecture="efficientnet_b0", backbone_weights="imagenet")
        data = resolve_weights(cfg, cache_dir=str(tmp_path / "keras"))
        again = resolve_weights(cfg, cache_dir=str(tmp_path / "keras"))
        assert data == again == (tmp_path / "efficientnetb0_notop.h5").read_bytes() and len(requests) == 1
        monkeypatch.setitem(IMAGENET_FILES, "efficientnet_b0", (url + ".missing", md5))
        with pytest.raises(ConfigError, match="could not download .*local or s3:// path"):
            resolve_weights(cfg, cache_dir=str(tmp_path / "other"))
    finally:
        server.shutdown()
        server.server_close()

    model = build_model(cfg, 3, size, backbone_weights=data)
    norm = next(layer for layer in _backbone(model).layers if isinstance(layer, keras.layers.Normalization))
    source_norm = next(layer for layer in source.layers if isinstance(layer, keras.layers.Normalization))
    (mean, variance, _), (src_mean, src_variance, _) = norm.get_weights(), source_norm.get_weights()
    np.testing.assert_array_equal(mean, src_mean)
    np.testing.assert_allclose(variance, src_variance * np.array([0.229, 0.224, 0.225]), rtol=1e-6)
    others = [w for w in _backbone(model).weights if "normalization" not in w.name]
    assert all(np.array_equal(w.numpy(), s.numpy()) for w, s in
               zip(others, [w for w in source.weights if "normalization" not in w.name]))
    # The folded variance is what the saved model holds and uses.
    x = np.random.default_rng(2).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    save_model(model, str(tmp_path / "m.keras"))
    np.testing.assert_array_equal(load_model(str(tmp_path / "m.keras")).predict(x, verbose=0),
                                  model.predict(x, verbose=0))


def test_imagenet_files_are_the_ones_keras_applications_fetch():
    from tf_keras.src.applications import efficientnet, mobilenet_v2, mobilenet_v3

    from emotion_ray.model import BACKBONES

    assert set(IMAGENET_FILES) == set(BACKBONES) == set(BACKBONE_ARCHITECTURES)
    assert IMAGENET_FILES["mobilenet_v2"][0] == (
        mobilenet_v2.BASE_WEIGHT_PATH + "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_"
        f"{float(BACKBONES['mobilenet_v2'][1]['alpha'])}_224_no_top.h5")
    assert IMAGENET_FILES["mobilenet_v3_small"] == (
        mobilenet_v3.BASE_WEIGHT_PATH + "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        mobilenet_v3.WEIGHTS_HASHES["small_224_1.0_float"][1])
    assert IMAGENET_FILES["efficientnet_b0"] == (efficientnet.BASE_WEIGHTS_PATH + "efficientnetb0_notop.h5",
                                                 efficientnet.WEIGHTS_HASHES["b0"][1])
    assert efficientnet.IMAGENET_STDDEV_RGB == [0.229, 0.224, 0.225]


