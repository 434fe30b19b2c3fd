"""The worst mistakes kept while batches stream past, and Grad-CAM on models whose evidence lies
where we put it."""

from __future__ import annotations

import numpy as np
import pytest

from emotion_ray.explain import WorstMistakes


@pytest.mark.fast
@pytest.mark.parametrize("batch", [1, 7, 50])
def test_worst_mistakes_streamed_are_the_most_confident_wrong_rows_of_the_whole_split(batch):
    rng = np.random.default_rng(batch)
    rows = 50
    probs = rng.dirichlet(np.ones(3), rows).astype(np.float32)
    probs[10] = probs[20] = [0.01, 0.01, 0.98]  # a tie at the top: the earlier row comes first
    labels = rng.integers(0, 3, rows)
    labels[10] = labels[20] = 0
    images = rng.integers(0, 256, (rows, 4, 4, 3), np.uint8)
    worst = WorstMistakes(6)
    for start in range(0, rows, batch):
        worst.add(images[start:start + batch], probs[start:start + batch], labels[start:start + batch],
                  [f"p{i}" for i in range(start, min(rows, start + batch))])
    got = worst.examples()
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    expected = wrong[np.argsort(-probs[wrong].max(1), kind="stable")][:6]
    assert [e["row"] for e in got] == expected.tolist() and worst.rows == rows
    for e in got:
        i = e["row"]
        assert e["true"] == labels[i] != e["predicted"] == probs[i].argmax()
        assert e["confidence"] == pytest.approx(probs[i].max()) and e["probabilities"] == pytest.approx(probs[i])
        assert e["path"] == f"p{i}" and np.array_equal(e["image"], images[i])
    assert got.index(next(e for e in got if e["row"] == 10)) < got.index(next(e for e in got if e["row"] == 20))


@pytest.mark.fast
def test_worst_mistakes_of_a_perfect_split_or_k_zero_are_none():
    probs = np.eye(3, dtype=np.float32)
    worst = WorstMistakes(4)
    worst.add(np.zeros((3, 2, 2, 3), np.uint8), probs, [0, 1, 2])
    assert worst.examples() == []
    none = WorstMistakes(0)
    none.add(np.zeros((3, 2, 2, 3), np.uint8), probs, [1, 2, 0])
    assert none.examples() == []
    with pytest.raises(ValueError, match="differ"):
        worst.add(np.zeros((2, 2, 2, 3), np.uint8), probs, [0, 1, 2])


SIZE = 32


def _colour_model(nested: bool):
    """uint8 RGB -> 2 classes: class 0's logit is the mean redness of the picture, class 1's its
    greenness. A 1x1 convolution makes a red map and a green map (the last 4-D layer); pooled,
    then an identity Dense. The evidence for a class lies exactly where its colour is. `nested`:
    the convolution sits inside an inner Model, as a tf.keras.applications backbone does."""
    from emotion_ray.model import keras

    conv = keras.layers.Conv2D(2, 1, activation="relu", name="colours")
    if nested:
        inner_in = keras.Input((SIZE, SIZE, 3))
        conv = keras.Model(inner_in, conv(inner_in), name="backbone")
    inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = conv(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    head = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, head(x))
    colours = model.get_layer("backbone").get_layer("colours") if nested else model.get_layer("colours")
    colours.set_weights([np.array([[[[1, 0], [0, 1], [0, 0]]]], np.float32), np.zeros(2, np.float32)])
    head.set_weights([np.eye(2, dtype=np.float32) * 4, np.zeros(2, np.float32)])
    return model


@pytest.mark.parametrize("nested", [False, True])
def test_grad_cam_finds_the_evidence_where_it_is(nested):
    from emotion_ray.explain import feature_layer, grad_cam

    model = _colour_model(nested)
    assert feature_layer(model).name == ("backbone" if nested else "colours")
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[4:14, 2:12, 0] = 255  # red, top left
    image[18:30, 20:30, 1] = 255  # green, bottom right: not the mirror of the red square, so a flip shows
    maps = grad_cam(model, np.stack([image, image]), [0, 1])
    assert maps.shape == (2, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() == pytest.approx(1.0)
    red, green = maps
    # Nearly all of each map's mass on its own square (bilinear resizing blurs only its edge).
    red_box, green_box = np.zeros((SIZE, SIZE), bool), np.zeros((SIZE, SIZE), bool)
    red_box[3:15, 1:13] = True
    green_box[17:31, 19:31] = True
    assert red[red_box].sum() / red.sum() > 0.9 and red[green_box].sum() == 0
    assert green[green_box].sum() / green.sum() > 0.9 and green[red_box].sum() == 0
    # The left half holds the red evidence, the right half the green.
    assert red[:, : SIZE // 2].sum() > 0.95 * red.sum() and green[:, SIZE // 2 :].sum() > 0.95 * green.sum()


def test_grad_cam_of_a_picture_without_evidence_is_zero_and_errors_are_named():
    from emotion_ray.explain import feature_layer, grad_cam
    from emotion_ray.model import keras

    model = _colour_model(False)
    blank = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    assert not grad_cam(model, blank, [0]).any()  # no red anywhere: nothing to show, not noise
    assert grad_cam(model, blank[:0], []).shape == (0, SIZE, SIZE)
    with pytest.raises(ValueError, match="do not match"):
        grad_cam(model, blank, [0, 1])
    with pytest.raises(ValueError, match="no layer with a 4-D"):
        feature_layer(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    pooled = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Conv2D(2, 1),
                               keras.layers.GlobalAveragePooling2D(), keras.layers.Softmax()])
    with pytest.raises(ValueError, match="not a Dense classifier"):
        grad_cam(pooled, blank, [0])
