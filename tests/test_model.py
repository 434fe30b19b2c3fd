"""Architectures: the seed's layers exactly, scaling inside, save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest

from emotion_ray.config import ModelConfig
from emotion_ray.config import ConfigError
from emotion_ray.inference import forward_pass
from emotion_ray.model import KERAS_ZIP_MAGIC, build_model, compile_model, keras, load_model, save_model


def test_seed_cnn_is_the_seed_architecture_with_rescaling_in_front():
    model = build_model(ModelConfig(), 3, 256)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Rescaling", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D",
                     "Flatten", "Dense", "Dense"]
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [16, 32, 16] and all(c.kernel_size == (3, 3) for c in convs)
    dense = [layer for layer in model.layers if type(layer).__name__ == "Dense"]
    assert [d.units for d in dense] == [256, 3] and dense[-1].activation.__name__ == "softmax"
    assert model.input_shape == (None, 256, 256, 3)
    # 448 + 4,640 + 4,624 conv + 14,400*256+256 dense + 256*3+3 output, as the seed at 256x256x3
    assert model.count_params() == 3_697_139


def test_scaling_lives_in_the_model():
    model = build_model(ModelConfig(), 3, 24)
    rescale = model.layers[0]
    assert np.isclose(rescale.scale, 1 / 255)
    raw = np.random.default_rng(0).integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    # Callers pass raw uint8 pixels; uint8 and the same values as float give the same output.
    np.testing.assert_allclose(model.predict(raw, verbose=0), model.predict(raw.astype("float32"), verbose=0), rtol=1e-6)


@pytest.mark.parametrize("arch", ["seed_cnn", "wide_cnn", "mobilenet_v2"])
def test_every_architecture_saves_and_reloads_to_identical_predictions(arch, tmp_path):
    cfg = ModelConfig(architecture=arch, dropout=0.2, augmentation={"enabled": True})
    size = 32
    model = compile_model(build_model(cfg, 3, size), 1e-3)
    x = np.random.default_rng(1).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    before = model.predict(x, verbose=0)
    path = tmp_path / "model.keras"
    save_model(model, str(path))
    after = load_model(str(path)).predict(x, verbose=0)
    np.testing.assert_array_equal(before, after)
    assert np.allclose(before.sum(axis=1), 1.0, atol=1e-5)


def test_forward_pass_is_predict_in_inference_mode_for_any_batch_size():
    # Augmentation and dropout are active in training mode, so a forward pass that left them on
    # would not match predict.
    model = build_model(ModelConfig(dropout=0.5, augmentation={"enabled": True}), 3, 24)
    forward = forward_pass(model)
    rng = np.random.default_rng(2)
    for n in (1, 5, 64):
        x = rng.integers(0, 256, (n, 24, 24, 3), dtype=np.uint8)
        np.testing.assert_allclose(forward(x).numpy(), model.predict(x, verbose=0), rtol=1e-6, atol=1e-7)
    assert forward.experimental_get_tracing_count() == 1  # one trace for every batch size


def test_backbone_weights_come_from_a_given_file(tmp_path):
    from emotion_ray.model import keras

    size = 32
    source = keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False, weights=None, alpha=0.35)
    weights = tmp_path / "backbone.weights.h5"
    source.save_weights(weights)
    model = build_model(ModelConfig(architecture="mobilenet_v2", backbone_weights=str(weights)), 3, size)
    backbone = next(layer for layer in model.layers if layer.name.startswith("mobilenetv2"))
    for a, b in zip(source.get_weights(), backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


def _trained_seed_cnn(size: int = 32):
    model = compile_model(build_model(ModelConfig(), 3, size), 1e-3)
    x = np.random.default_rng(3).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    model.fit(x, np.eye(3)[np.arange(8) % 3], epochs=1, verbose=0)  # the optimizer now has state
    return model, x


def test_models_saved_in_any_thread_are_keras_zip_files(tmp_path):
    """tf-keras keeps its format switch per thread (Ray Train trains in one): a `.keras` name
    alone gave HDF5 there, after the first save."""
    import threading

    model, _ = _trained_seed_cnn()
    paths = [tmp_path / f"m{i}.keras" for i in range(3)]
    thread = threading.Thread(target=lambda: [save_model(model, str(p)) for p in paths])
    thread.start()
    thread.join()
    assert [p.read_bytes()[:4] for p in paths] == [KERAS_ZIP_MAGIC] * 3


def test_inference_only_file_drops_the_optimizer_and_predicts_the_same(tmp_path):
    model, x = _trained_seed_cnn()
    save_model(model, str(tmp_path / "full.keras"))
    save_model(model, str(tmp_path / "infer.keras"), include_optimizer=False)
    full, infer = (tmp_path / "full.keras").stat().st_size, (tmp_path / "infer.keras").stat().st_size
    assert infer < 0.4 * full  # Adam keeps two slots per weight
    np.testing.assert_array_equal(load_model(str(tmp_path / "infer.keras")).predict(x, verbose=0),
                                  model.predict(x, verbose=0))


def test_lambda_code_is_refused_in_a_keras_zip_and_in_hdf5_named_keras(tmp_path):
    ran = tmp_path / "code_ran"
    marker = str(ran)
    layer = keras.layers.Lambda(lambda t: (open(marker, "w").close(), t)[1])
    model = keras.Sequential([keras.Input((4,)), layer])
    save_model(model, str(tmp_path / "lambda.keras"))
    model.save(str(tmp_path / "lambda.h5"))
    (tmp_path / "lambda.h5").rename(tmp_path / "hdf5_renamed.keras")
    ran.unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="Lambda"):
        load_model(str(tmp_path / "lambda.keras"))
    with pytest.raises(ConfigError, match="HDF5"):
        load_model(str(tmp_path / "hdf5_renamed.keras"))
    assert not ran.exists()


def test_reuse_for_classes_keeps_shared_classes_by_name_and_freezing_spares_the_classifier():
    from emotion_ray.model import reuse_for_classes, set_reused_trainable

    parent = build_model(ModelConfig(), 3, 24)
    kernel, bias = parent.layers[-1].get_weights()
    child = reuse_for_classes(parent, ["angry", "happy", "sad"], ["Sad", "happy", "neutral"])
    new_kernel, new_bias = child.layers[-1].get_weights()
    np.testing.assert_array_equal(new_kernel[:, 0], kernel[:, 2])  # Sad <- sad, case-insensitive
    np.testing.assert_array_equal(new_kernel[:, 1], kernel[:, 1])
    assert new_kernel.shape == (kernel.shape[0], 3) and child.output_shape == (None, 3)
    x = np.random.default_rng(4).integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    np.testing.assert_allclose(child.predict(x, verbose=0)[:, :2].sum() > 0, True)
    assert child.layers[-2].output is not None and child.layers[1] is parent.layers[0]  # shared, not copied
    set_reused_trainable(child, False)
    assert [w.name for w in child.trainable_weights] == [w.name for w in child.layers[-1].weights]


def test_reuse_refuses_a_model_without_a_softmax_classifier():
    from emotion_ray.model import reuse_for_classes

    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ConfigError, match="not a softmax Dense"):
        reuse_for_classes(plain, ["a", "b", "c"], ["a", "b"])
