"""Images/s of 1-worker Ray training vs plain tf.keras fit on the same preloaded tensors.

Both train the seed CNN on the same prepared train split with the same global batch and
validate on the same val split each epoch; the first epoch (graph tracing, Ray Data's
first pass) is excluded from both, and each side's figure is its median epoch, so a stray
slow epoch (this box is shared with Ray's own processes) does not decide the ratio. Plain
Keras is measured before and after the Ray runs and averaged, to cancel drift in the
machine's speed. Ray is measured twice: with the in-memory shard cache (the default for a
worker's share under 2 GiB) and streaming from Ray Data every epoch (what larger datasets
do). Target: Ray (cached) >= 0.9 x plain. BENCH_IMAGE_SIZE (default 128) and BENCH_GPU=1
(use_gpu, 1 worker) are settable for GPU runs.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from bench.common import WORK, demo_files, record
from emotion_ray.config import ModelConfig, PrepareConfig, TrainConfig
from emotion_ray.data import prepare
from emotion_ray.images import pixels_from_arrow
from emotion_ray.runtime import init_ray


def load(dataset, manifest, split):
    t = pq.ParquetDataset([str(dataset / r) for r in manifest["shards"][split]]).read(columns=["image", "label_index"])
    x = pixels_from_arrow(t["image"], manifest["image_size"])
    return x, np.eye(len(manifest["classes"]), dtype=np.float32)[t["label_index"].to_numpy()]


def main() -> None:
    size = int(os.environ.get("BENCH_IMAGE_SIZE", 128))
    epochs, batch = 10, 32
    use_gpu = os.environ.get("BENCH_GPU") == "1"
    src = demo_files("train", per_class=200, canvas=256)
    dataset = WORK / f"train_ds_{size}"
    init_ray()
    if not (dataset / "manifest.json").exists():
        shutil.rmtree(dataset, ignore_errors=True)
        prepare(PrepareConfig(inputs=[str(src)], output=str(dataset), image_size=size))
    manifest = json.loads((dataset / "manifest.json").read_text())

    from emotion_ray.model import build_model, compile_model

    xt, yt = load(dataset, manifest, "train")
    xv, yv = load(dataset, manifest, "val")

    import tensorflow as tf

    def plain_keras() -> float:
        times = []

        class Timer(tf.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                times.append(time.perf_counter() - self.t)

        model = compile_model(build_model(ModelConfig(), 3, size), 1e-3)
        model.fit(xt, yt, validation_data=(xv, yv), batch_size=batch, epochs=epochs, verbose=0, callbacks=[Timer()])
        return len(xt) / np.median(times[1:])

    from emotion_ray.train import run_training

    def ray_training(cache: bool) -> tuple[float, dict]:
        runs = WORK / "train_runs"
        shutil.rmtree(runs, ignore_errors=True)
        result = run_training(TrainConfig(data=str(dataset), output=str(runs), run_name="bench", workers=1,
                                          use_gpu=use_gpu, epochs=epochs, batch_size=batch,
                                          early_stopping_patience=99, cache_in_memory=cache,
                                          mlflow={"enabled": False}))
        history = pd.read_csv(runs / "bench" / "history.csv")
        return len(xt) / history["epoch_seconds"].iloc[1:].median(), result

    plain_before = plain_keras()
    ray_ips, result = ray_training(cache=True)
    streaming_ips, _ = ray_training(cache=False)
    plain_after = plain_keras()
    plain = (plain_before + plain_after) / 2
    record("train", {"image_size": size, "train_rows": len(xt), "batch_size": batch, "epochs_timed": epochs - 1,
                     "gpu": use_gpu, "plain_keras_images_per_s": round(plain, 1),
                     "plain_keras_before_after": [round(plain_before, 1), round(plain_after, 1)],
                     "ray_1_worker_images_per_s": round(ray_ips, 1), "ratio": round(ray_ips / plain, 2),
                     "ray_1_worker_streaming_images_per_s": round(streaming_ips, 1),
                     "ratio_streaming": round(streaming_ips / plain, 2),
                     "target_ratio": 0.9, "ray_test_accuracy": round(result["categorical_accuracy"], 3)})


if __name__ == "__main__":
    main()
