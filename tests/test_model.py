"""Architectures: the seed's layers exactly, scaling inside, save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest

from emotion_ray.config import ConfigError, ModelConfig, TrainConfig, build_config
from emotion_ray.inference import TestTimeAugmentation, forward_pass
from emotion_ray.model import (
    GREY_WEIGHTS,
    KERAS_ZIP_MAGIC,
    build_model,
    class_weights,
    compile_for_training,
    compile_model,
    fit_batchnorm_momentum,
    keras,
    load_model,
    save_model,
)

FACE_AUG = {"enabled": True, "rotation": 0.03, "translation": 0.1, "zoom": 0.1, "brightness": 0.2, "contrast": 0.2}


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


@pytest.mark.parametrize("arch", ["seed_cnn", "wide_cnn", "mobilenet_v2", "face_cnn"])
def test_every_architecture_saves_and_reloads_to_identical_predictions(arch, tmp_path):
    # mobilenet_v3_small and efficientnet_b0: in their own tests below (each backbone is slow to build).
    cfg = ModelConfig(architecture=arch, dropout=0.2, augmentation=FACE_AUG)
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
    # With test-time views too: (N, classes) for any N (N >= 1: TensorFlow's convolutions refuse an empty batch).
    for views in (TestTimeAugmentation(flip=True), TestTimeAugmentation(flip=True, shift=0.1)):
        averaged = forward_pass(model, views)
        for n in (1, 5):
            x = rng.integers(0, 256, (n, 24, 24, 3), dtype=np.uint8)
            probs = averaged(x).numpy()
            assert probs.shape == (n, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5), (views, n)
        assert averaged.experimental_get_tracing_count() == 1


def _backbone_weights_file(arch: str, path, size: int = 32, seed: int = 0):
    """A backbone built as model.py builds it (weights=None), with random BatchNorm statistics and,
    for EfficientNet, an ImageNet-like Normalization, saved with save_weights to `path`."""
    from emotion_ray.model import BACKBONES

    constructor, options, _ = BACKBONES[arch]
    source = constructor(input_shape=(size, size, 3), include_top=False, weights=None, **options)
    rng = np.random.default_rng(seed)
    for layer in source.layers:
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.Normalization)):
            layer.set_weights([rng.uniform(0.1, 1.0, w.shape).astype(w.dtype) for w in layer.get_weights()])
    source.save_weights(str(path))
    return source


def _backbone(model):
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


@pytest.mark.parametrize("arch, name", [("mobilenet_v2", "backbone.weights.h5"), ("mobilenet_v3_small", "b.h5")])
def test_backbone_weights_come_from_a_given_file(arch, name, tmp_path):
    """Both HDF5 layouts save_weights writes (Keras v3 `.weights.h5`, legacy `.h5`) load, whatever the name."""
    size = 32
    source = _backbone_weights_file(arch, tmp_path / name, size)
    (tmp_path / name).rename(tmp_path / "renamed.bin")  # the layout is read from the contents
    cfg = ModelConfig(architecture=arch, backbone_weights=str(tmp_path / "renamed.bin"), dropout=0.2)
    model = build_model(cfg, 3, size)
    assert model.input.dtype == "uint8" and model.output_shape == (None, 3)
    loaded = _backbone(model).get_weights()
    assert len(loaded) == len(source.get_weights())
    for a, b in zip(source.get_weights(), loaded):
        np.testing.assert_array_equal(a, b)
    if arch == "mobilenet_v2":
        return
    # Pretrained: the backbone runs in inference mode (its BatchNorm statistics stay), also in fit.
    x = np.random.default_rng(1).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    compile_model(model, 1e-3).fit(x, np.eye(3)[np.arange(8) % 3], epochs=1, verbose=0)
    moving = [w for w in _backbone(model).weights if "moving" in w.name]
    assert moving and all(np.array_equal(w.numpy(), s.numpy()) for w, s in
                          zip(moving, [w for w in source.weights if "moving" in w.name]))


def test_a_backbone_model_sees_a_colour_image_as_its_grey_version():
    # (A MobileNetV3 model file, hard-swish arithmetic included, loads in safe mode: tests/test_train.py.)
    model = build_model(ModelConfig(architecture="mobilenet_v3_small", grey=True, dropout=0.2,
                                    augmentation=FACE_AUG), 3, 32)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds[:2] == ["InputLayer", "Rescaling"] and kinds[-4:] == ["Functional", "GlobalAveragePooling2D",
                                                                         "Dropout", "Dense"]
    assert {"RandomFlip", "RandomBrightness"} <= set(kinds) and kinds.index("Dense") > kinds.index("RandomBrightness")
    colour = np.random.default_rng(4).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    luma = np.rint(colour.astype("float64") @ np.array(GREY_WEIGHTS)).astype(np.uint8)
    grey = np.repeat(luma[..., None], 3, axis=-1)
    np.testing.assert_allclose(model.predict(colour, verbose=0), model.predict(grey, verbose=0), atol=2e-3)


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


# ----------------------------------------------------------------------------- face_cnn
@pytest.mark.parametrize("size", [48, 64])
def test_face_cnn_takes_uint8_rgb_and_is_small(size):
    model = build_model(ModelConfig(architecture="face_cnn", dropout=0.3, augmentation=FACE_AUG), 3, size)
    assert model.input_shape == (None, size, size, 3) and model.input.dtype == "uint8"
    assert model.output_shape == (None, 3)
    # Global pooling: the same parameters at any size, a tenth of the seed CNN's 3.7 M.
    assert model.count_params() == 390_054
    kinds = {type(layer).__name__ for layer in model.layers}
    assert {"BatchNormalization", "GlobalAveragePooling2D", "RandomTranslation", "RandomBrightness"} <= kinds
    assert "Flatten" not in kinds
    x = np.random.default_rng(3).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    probs = model.predict(x, verbose=0)
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_face_cnn_stages_take_the_convolutions_asked_for():
    """The face recipe's (1, 1, 2, 2): a second 3x3 convolution where the maps are 12 and 6 px."""
    model = build_model(ModelConfig(architecture="face_cnn", convs_per_stage=(1, 1, 2, 2)), 3, 48)
    convs = [(layer.output_shape[1], layer.filters) for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert convs == [(48, 32), (24, 64), (12, 128), (12, 128), (6, 256), (6, 256)]
    assert model.count_params() == 1_128_870
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        ModelConfig(convs_per_stage=(1, 0, 1, 1))


def test_face_cnn_sees_a_colour_image_as_its_grey_version():
    model = build_model(ModelConfig(architecture="face_cnn"), 3, 48)
    grey_layer = model.get_layer("grey")
    assert not grey_layer.trainable and id(grey_layer.weights[0]) not in {id(w) for w in model.trainable_weights}
    colour = np.random.default_rng(4).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    luma = np.rint(colour.astype("float64") @ np.array(GREY_WEIGHTS)).astype(np.uint8)
    grey = np.repeat(luma[..., None], 3, axis=-1)  # what a grey FER2013 JPEG decodes to as RGB
    # Equal up to the rounding of luma to uint8 (half a grey level).
    np.testing.assert_allclose(model.predict(colour, verbose=0), model.predict(grey, verbose=0), atol=2e-3)
    # And the channels are mixed only by luma: swapping red and blue of a grey image changes nothing.
    np.testing.assert_array_equal(model.predict(grey, verbose=0), model.predict(grey[..., ::-1], verbose=0))
    # Fine-tuning after frozen epochs unfreezes the reused layers, never the fixed luma.
    from emotion_ray.model import set_reused_trainable

    set_reused_trainable(model, False)
    set_reused_trainable(model, True)
    assert not grey_layer.trainable and all(layer.trainable for layer in model.layers if layer is not grey_layer)


def test_face_cnn_trains_with_every_face_augmentation():
    # RandomContrast has no gradient: the luma kernel (a TensorFlow-trainable variable even with
    # trainable=False) must come after the augmentation, or fit fails at its first step.
    model = build_model(ModelConfig(architecture="face_cnn", dropout=0.3, augmentation=FACE_AUG), 3, 16)
    compile_model(model, 1e-3, weight_decay=0.05, label_smoothing=0.1)
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 8)]
    grey_before = model.get_layer("grey").get_weights()[0].copy()
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0, class_weight={0: 1.5, 1: 0.5, 2: 1.0})
    assert np.isfinite(history.history["loss"][0])
    np.testing.assert_array_equal(model.get_layer("grey").get_weights()[0], grey_before)


# ----------------------------------------------------------------------------- training options
def test_balanced_class_weights_are_scikit_learns():
    counts = {"angry": 3995, "happy": 7215, "sad": 4830, "unused": 7}
    weights = class_weights(counts, ["angry", "happy", "sad"])
    n = 3995 + 7215 + 4830
    assert weights == pytest.approx({0: n / (3 * 3995), 1: n / (3 * 7215), 2: n / (3 * 4830)})
    # Every class weighs the same in total, and the mean weight per example is 1.
    totals = [weights[i] * counts[c] for i, c in enumerate(["angry", "happy", "sad"])]
    assert totals == pytest.approx([n / 3] * 3)
    assert class_weights({"a": 5, "b": 5}, ["a", "b"]) == {0: 1.0, 1: 1.0}
    with pytest.raises(ValueError, match="sad"):
        class_weights({"angry": 3, "happy": 4}, ["angry", "happy", "sad"])


def _schedule(model):
    """The optimizer's learning-rate schedule (`optimizer.learning_rate` reads its current value)."""
    from emotion_ray.model import keras

    return keras.optimizers.schedules.deserialize(model.optimizer.get_config()["learning_rate"])


def _small_model():
    return build_model(ModelConfig(architecture="face_cnn", filter_multiplier=0.25), 3, 16)


def test_batchnorm_statistics_follow_a_small_epoch():
    """With 4 steps an epoch, the moving mean ends one epoch where an average of window 4 puts it
    (momentum 0.75: 68 % of the way to the batches' mean), not 4 % of the way (Keras' 0.99); large
    data keeps 0.99; BatchNorm inside a nested backbone is set too."""
    model = _small_model()
    fit_batchnorm_momentum(model, 4)
    norms = [layer for layer in model.submodules if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 4 and all(n.momentum == pytest.approx(0.75) for n in norms)
    # Learning rate 0: the convolutions stay as built, so the first norm's input is known exactly.
    model = compile_model(model, 0.0)
    rng = np.random.default_rng(0)
    images = rng.integers(100, 256, (32, 16, 16, 3), dtype=np.uint8)
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 32)]
    first = norms[0]
    seen = keras.Model(model.inputs, first.input).predict(images, verbose=0)  # (32, 16, 16, C)
    model.fit(images, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
    expected = np.zeros(seen.shape[-1])
    for k in range(4):  # the exponential average over the epoch's 4 batch means, from 0
        expected = 0.75 * expected + 0.25 * seen[8 * k : 8 * (k + 1)].mean(axis=(0, 1, 2))
    assert np.abs(expected).max() > 0.01  # the test can tell 68 % from 4 %
    np.testing.assert_allclose(first.moving_mean.numpy(), expected, rtol=1e-3, atol=1e-5)

    fit_batchnorm_momentum(model, 1000)
    assert all(n.momentum == pytest.approx(0.99) for n in norms)
    outer = keras.Sequential([keras.Input((16, 16, 3), dtype="uint8"), _small_model()])
    fit_batchnorm_momentum(outer, 2)
    assert {n.momentum for n in outer.submodules if isinstance(n, keras.layers.BatchNormalization)} == {0.5}


def test_compile_defaults_are_the_seeds_adam_without_smoothing():
    model = compile_model(_small_model(), 1e-3)
    assert type(model.optimizer).__name__ == "Adam"
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    assert model.loss.get_config()["label_smoothing"] == 0.0


def test_compile_options_smoothing_adamw_and_warmup_cosine():
    model = compile_model(_small_model(), 2e-3, lr_schedule="cosine", total_steps=100, warmup_steps=10,
                          weight_decay=0.05, label_smoothing=0.1)
    assert type(model.optimizer).__name__ == "AdamW" and model.optimizer.weight_decay == pytest.approx(0.05)
    assert model.loss.get_config()["label_smoothing"] == pytest.approx(0.1)
    schedule = _schedule(model)
    lr = [float(schedule(step)) for step in (0, 5, 10, 55, 100)]
    assert lr == pytest.approx([0.0, 1e-3, 2e-3, 1e-3, 0.0], abs=1e-7)
    # No warmup: cosine from the peak.
    plain = _schedule(compile_model(_small_model(), 1e-3, lr_schedule="cosine", total_steps=10))
    assert float(plain(0)) == pytest.approx(1e-3) and float(plain(10)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="total_steps"):
        compile_model(_small_model(), 1e-3, lr_schedule="cosine", total_steps=None)


def test_compile_for_training_takes_a_train_configs_options(tmp_path):
    cfg = TrainConfig(data="d", epochs=4, learning_rate=2e-3, lr_schedule="cosine", warmup_epochs=1,
                      weight_decay=0.05, label_smoothing=0.1, class_weight="balanced")
    model = compile_for_training(_small_model(), cfg, steps_per_epoch=25)
    schedule = _schedule(model)
    assert float(schedule(25)) == pytest.approx(2e-3) and float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
    # The schedule (and with it the step count) survives a save/load, as a resumed run needs.
    path = tmp_path / "m.keras"
    save_model(model, str(path))
    reloaded = load_model(str(path), compile=True)
    assert float(_schedule(reloaded)(25)) == pytest.approx(2e-3)
    assert reloaded.loss.get_config()["label_smoothing"] == pytest.approx(0.1)


def test_train_config_defaults_keep_todays_training_and_options_are_validated():
    cfg = TrainConfig(data="d")
    assert (cfg.lr_schedule, cfg.warmup_epochs, cfg.weight_decay, cfg.label_smoothing, cfg.class_weight) == (
        "constant", 0.0, 0.0, 0.0, "none")
    aug = cfg.model.augmentation
    assert (aug.enabled, aug.translation, aug.brightness) == (False, 0.0, 0.0)
    for bad in ({"class_weight": "auto"}, {"lr_schedule": "step"}, {"label_smoothing": 1.0},
                {"warmup_epochs": 1}, {"lr_schedule": "cosine", "warmup_epochs": 10},
                {"model": {"augmentation": {"brightness": 1.5}}}):
        with pytest.raises(ConfigError):
            build_config(TrainConfig, {"data": "d", **bad})
