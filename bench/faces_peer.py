"""The peer of bench/faces.py --score: `fer`'s FER().detect_emotions on each picture, as users run it.

Runs in the benchmark's own virtual environment (BENCH_DIR/peer-venv, made by bench/quality.py,
or peer-venv-faces made by bench/faces.py; never a project dependency), so it imports nothing
from emotion_ray. Reads a JSON list of image paths on stdin, prints one JSON object on stdout.

`FER()` with its defaults: OpenCV's frontal-face Haar cascade on the full-size picture
(scaleFactor 1.1, minNeighbors 5, minSize 50 px; no downscaling), then its quantized TFLite
emotion model per face (`fer.fer.FER`: fer 25.10 dropped the package-level export). Per
picture: `cv2.imread(path)` + `detect_emotions(img)`, one process, after one warm-up call; the libraries' own thread counts (OpenCV and TFLite may use every core:
`cpu_per_wall` says how much they did).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    import cv2
    import fer
    import tensorflow as tf
    from fer.fer import FER  # fer 25.10 no longer exports it from the package

    paths = json.load(sys.stdin)
    start = time.perf_counter()
    detector = FER()
    detector.detect_emotions(cv2.imread(paths[0]))  # warm-up: the TFLite interpreter's first call
    ready_s = time.perf_counter() - start
    wall, cpu, found = [], [], []
    for path in paths:
        t, c = time.perf_counter(), time.process_time()
        faces = detector.detect_emotions(cv2.imread(path))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        found.append(len(faces))
    print(json.dumps({
        "fer_version": fer.__version__, "tensorflow_version": tf.__version__, "opencv_version": cv2.__version__,
        "cores_visible": len(os.sched_getaffinity(0)), "opencv_threads": cv2.getNumThreads(),
        "ready_s": round(ready_s, 2), "pictures": len(paths), "wall_s": round(sum(wall), 2), "cpu_s": round(sum(cpu), 2),
        "pictures_per_s": round(len(paths) / sum(wall), 2), "pictures_per_cpu_s": round(len(paths) / sum(cpu), 2),
        "cpu_ms_per_picture": round(1e3 * sum(cpu) / len(paths), 1), "cpu_per_wall": round(sum(cpu) / sum(wall), 2),
        "faces_found": sum(found), "pictures_with_a_face": sum(n > 0 for n in found),
        "per_picture": dict(zip((os.path.basename(p) for p in paths), found)),
        "per_picture_cpu_ms": dict(zip((os.path.basename(p) for p in paths), (round(1e3 * c, 1) for c in cpu))),
    }))


if __name__ == "__main__":
    main()
