"""Scoring on a GPU machine that has neither TensorFlow nor Ray: what the hardware allows.

The GPU machines lent to this project carry PyTorch/JAX but no TensorFlow, and nothing can be
installed there beyond 64 MiB of wheels (Ray's alone is 79 MB, TensorFlow's ~600 MB). So the
real `score` cannot run there; this script measures the two halves of its pipeline with the
very same code and model file, and the same architecture without Ray:

  (a) compute limit: our saved seed-CNN `model.keras`, loaded by Keras 3 on the JAX backend
      (GPU), `model.predict` on preloaded uint8 tensors;
  (b) the seed's way: read, resize and predict one image at a time;
  decode: `emotion_ray.images.decode_image` (the one preprocessing path) per core and on all
      cores but one;
  pipeline: decode on a process pool (cores - 1) into shared memory, feeding fixed batches to
      the GPU predictor: `score`'s structure with multiprocessing in place of Ray Data.

Run: python -m bench.gpu_proxy MODEL.keras OUT.json   (MODEL saved by `model.build_model`).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from collections import deque
from multiprocessing import get_context
from pathlib import Path

import numpy as np

SIZE = 256
CANVAS = 512
PER_CLASS = int(os.environ.get("BENCH_PER_CLASS", 334))
REPEAT = int(os.environ.get("BENCH_REPEAT", 8))  # long enough for GPU timings to mean something
CLASSES = ("angry", "happy", "sad")
BATCH = 256


def _write_one(job: tuple[str, int, int]) -> str:
    from emotion_ray.demo import draw_face, encode_demo_image

    folder, class_index, i = job
    label = CLASSES[class_index]
    rng = np.random.default_rng([123, class_index, i])
    data, ext = encode_demo_image(draw_face(label, rng, CANVAS), rng)
    path = Path(folder) / label / f"{label}_{i:05d}{ext}"
    path.write_bytes(data)
    return str(path)


def _decode(path: str) -> np.ndarray:
    from emotion_ray.images import decode_image

    return decode_image(Path(path).read_bytes(), SIZE).pixels


def _slots_path(slots: int) -> str:
    need = slots * BATCH * SIZE * SIZE * 3
    return "/dev/shm/gpu_proxy_slots" if shutil.disk_usage("/dev/shm").free > 2 * need else "/tmp/gpu_proxy_slots"


def _decode_into(job: tuple[str, int, int, list[str]]) -> tuple[int, int]:
    path, slots, slot, paths = job
    view = np.memmap(path, np.uint8, mode="r+", shape=(slots, BATCH, SIZE, SIZE, 3))
    for k, p in enumerate(paths):
        view[slot, k] = _decode(p)
    view.flush()
    del view
    return slot, len(paths)


def _stream(pool, procs: int, batches: list[list[str]], predict) -> int:
    """Decode `batches` on the pool into shared slots, in order, at most `slots` in flight;
    `predict` (if any) gets each full slot as it arrives. Returns images done."""
    slots = procs + 4  # every process busy, plus a few batches ready for the GPU
    path = _slots_path(slots)
    view = np.memmap(path, np.uint8, mode="w+", shape=(slots, BATCH, SIZE, SIZE, 3))
    pending: deque = deque()
    todo = iter(enumerate(batches))

    def submit() -> None:
        for i, paths in todo:
            pending.append(pool.apply_async(_decode_into, ((path, slots, i % slots, paths),)))
            return

    for _ in range(slots):
        submit()
    done = 0
    while pending:
        slot, n = pending.popleft().get()
        if predict is not None:
            predict(view[slot])  # fixed shape: a short last batch carries stale rows, as padding
        done += n
        submit()
    del view
    os.remove(path)
    return done


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def main(model_path: str, out_json: str) -> None:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    procs = max(1, (os.cpu_count() or 2) - 1)
    result: dict = {"bench": "score_gpu_proxy", "machine": f"{platform.machine()} {os.cpu_count()} cores",
                    "image_size": SIZE, "source_size": CANVAS, "decode_processes": procs}
    ctx = get_context("spawn")  # JAX and fork do not mix

    folder = Path("/tmp/gpu_proxy_files")
    for label in CLASSES:
        (folder / label).mkdir(parents=True, exist_ok=True)
    with ctx.Pool(procs) as pool:
        files = sorted(pool.map(_write_one, [(str(folder), c, i) for c in range(len(CLASSES))
                                             for i in range(PER_CLASS)], chunksize=8))
        result["files"] = len(files)

        sample = files[:200]
        start = time.perf_counter()
        for f in sample:
            _decode(f)
        result["decode_1_core_images_per_s"] = _rate(len(sample), time.perf_counter() - start)

        work = files * REPEAT
        batches = [work[i : i + BATCH] for i in range(0, len(work), BATCH)]
        start = time.perf_counter()
        _stream(pool, procs, batches, predict=None)
        result["decode_all_cores_images_per_s"] = _rate(len(work), time.perf_counter() - start)

        import keras

        result["keras"] = keras.__version__
        result["backend"] = keras.backend.backend()
        try:
            import jax

            result["jax_devices"] = [str(d) for d in jax.devices()]
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            result["jax_devices"] = repr(exc)
        model = keras.saving.load_model(model_path, compile=False)
        pixels = np.stack([_decode(f) for f in files])
        preloaded = np.concatenate([pixels] * REPEAT)

        for batch in (64, BATCH):
            model.predict(preloaded[: batch * 2], batch_size=batch, verbose=0)  # compile
            start = time.perf_counter()
            model.predict(preloaded, batch_size=batch, verbose=0)
            result[f"compute_limit_batch{batch}_images_per_s"] = _rate(len(preloaded), time.perf_counter() - start)

        # The seed's way: read + resize + predict, one image at a time.
        from PIL import Image

        model.predict(pixels[:1], verbose=0)
        start = time.perf_counter()
        for f in sample:
            img = np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE)))
            model.predict(img[None], verbose=0)
        result["seed_one_at_a_time_images_per_s"] = _rate(len(sample), time.perf_counter() - start)

        # score's structure without Ray: decode tasks write batches into shared memory (Ray's
        # object store does the same), the GPU predicts fixed-size batches as they arrive.
        start = time.perf_counter()
        done = _stream(pool, procs, batches, predict=model.predict_on_batch)
        result["pipeline_images_per_s"] = _rate(done, time.perf_counter() - start)

    limit = max(result[f"compute_limit_batch{b}_images_per_s"] for b in (64, BATCH))
    result["compute_limit_images_per_s"] = limit
    result["pipeline_vs_compute_limit"] = round(result["pipeline_images_per_s"] / limit, 3)
    result["pipeline_vs_seed_way"] = round(result["pipeline_images_per_s"] / result["seed_one_at_a_time_images_per_s"], 1)
    result["decode_cores_to_feed_gpu"] = round(limit / result["decode_1_core_images_per_s"], 1)
    print(json.dumps(result, indent=2))
    Path(out_json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
