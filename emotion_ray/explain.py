"""What the evaluation shows a person: the test split's worst mistakes and where the model looked.

Runs where evaluate.py evaluates (`evaluate_best`: the training driver, or a GPU task), which holds the model and streams the test
pixels: `WorstMistakes` keeps the few most confident wrong answers as the batches pass (never
the whole split's pixels), and `grad_cam` maps, for a handful of them, the picture regions
behind a class score. report.py draws both; neither is needed for scoring.

`WorstMistakes` is pure NumPy; `grad_cam` and `feature_layer` import TensorFlow (tf-keras, the
model's Keras) when called.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class WorstMistakes:
    """The `k` wrong answers of highest confidence among the rows offered, with their pixels.

    `add` takes one batch at a time: images (N, S, S, 3) uint8, probabilities (N, classes)
    (calibrated: what score would write), true label indices (N,), and optionally the rows'
    paths; rows are numbered in the order offered. `examples()` returns them most confident
    first (ties: the earlier row first), each a dict: `row` (index in the split), `path`
    (or None), `true` and `predicted` (class indices), `confidence` (the predicted class's
    probability), `probabilities` (list of floats, one per class) and `image` (S, S, 3)
    uint8, a copy. Memory: `k` images, whatever the split's size.
    """

    def __init__(self, k: int):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = k
        self.rows = 0
        self._kept: list[dict[str, Any]] = []

    def add(self, images: np.ndarray, probs: np.ndarray, labels: np.ndarray, paths=None) -> None:
        probs, labels = np.asarray(probs), np.asarray(labels, dtype=np.int64)
        if len(images) != len(probs) or len(probs) != len(labels):
            raise ValueError(f"images {len(images)}, probabilities {len(probs)} and labels {len(labels)} differ")
        predicted = probs.argmax(axis=1)
        confidence = probs.max(axis=1, initial=0.0)
        wrong = np.flatnonzero(predicted != labels)
        # Only this batch's k most confident mistakes can enter the kept k.
        wrong = wrong[np.argsort(-confidence[wrong], kind="stable")[: self.k]]
        for i in wrong:
            self._kept.append({
                "row": self.rows + int(i), "path": None if paths is None else paths[i],
                "true": int(labels[i]), "predicted": int(predicted[i]), "confidence": float(confidence[i]),
                "probabilities": [float(p) for p in probs[i]], "image": np.array(images[i], dtype=np.uint8),
            })
        self._kept.sort(key=lambda e: (-e["confidence"], e["row"]))
        del self._kept[self.k :]
        self.rows += len(labels)

    def examples(self) -> list[dict[str, Any]]:
        return list(self._kept)


def feature_layer(model):
    """The layer whose output Grad-CAM weighs: the last one with a 4-D (N, H, W, C) output that is
    not a pooling layer (pooling only coarsens the map of the convolution before it).

    A nested backbone (model.backbone_model) is one layer of the outer model: its output is its
    last convolutional block's feature map, the last 4-D tensor inside it, taken as it is. Raises
    ValueError when the model has no such layer.
    """
    import tensorflow as tf

    pooling = (tf.keras.layers.MaxPooling2D, tf.keras.layers.AveragePooling2D)
    for layer in reversed(model.layers):
        shape = layer.output_shape
        if isinstance(shape, tuple) and len(shape) == 4 and not isinstance(layer, pooling):
            return layer
    raise ValueError(f"model {model.name} has no layer with a 4-D (N, H, W, C) output: no map for Grad-CAM")


def grad_cam(model, images: np.ndarray, class_indices) -> np.ndarray:
    """Grad-CAM maps (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks
    via Gradient-based Localization", ICCV): for each image, where in the picture the evidence
    for one class lies.

    model: a project model (uint8 RGB in, a softmax Dense classifier as its last layer);
    images: (N, S, S, 3) uint8; class_indices: (N,) the class to explain for each image.
    Returns (N, S, S) float32 in [0, 1]: ReLU(sum_k alpha_k A_k) over the feature maps A of
    `feature_layer`, alpha_k the spatial mean of d(class logit)/dA_k, bilinearly resized to the
    image and divided by its maximum (all 0 where no region raises the score). The class score is
    the logit before the softmax, as the paper takes it (the softmax output's gradient also
    pushes the other classes down). Raises ValueError when the last layer is not a Dense or the
    model has no 4-D layer.
    """
    import tensorflow as tf

    keras = tf.keras
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense):
        raise ValueError(f"model {model.name}'s last layer is {type(head).__name__}, not a Dense classifier")
    images = np.asarray(images, dtype=np.uint8)
    class_indices = np.asarray(class_indices, dtype=np.int64)
    if images.ndim != 4 or len(images) != len(class_indices):
        raise ValueError(f"images {images.shape} and class indices {class_indices.shape} do not match")
    if not len(images):
        return np.zeros(images.shape[:3], np.float32)
    # get_output_at(-1): a nested backbone's output in the outer model's graph (its `.output` is its own graph's).
    maps_and_features = keras.Model(model.inputs, [feature_layer(model).get_output_at(-1), head.input])
    with tf.GradientTape() as tape:
        maps, features = maps_and_features(tf.constant(images), training=False)
        logits = tf.matmul(features, head.kernel) + head.bias
        # The images of a batch do not interact (inference mode), so one gradient of the sum gives each its own.
        score = tf.reduce_sum(tf.gather(logits, class_indices, axis=1, batch_dims=1))
    grads = tape.gradient(score, maps)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # alpha: (N, 1, 1, C)
    cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1, keepdims=True))  # (N, h, w, 1)
    cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0].numpy()
    top = cam.max(axis=(1, 2), keepdims=True)
    return np.divide(cam, top, out=np.zeros_like(cam), where=top > 0).clip(0, 1).astype(np.float32)
