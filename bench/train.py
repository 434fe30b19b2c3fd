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
from emotion_ray.prepare import prepare
from emotion_ray.images import pixels_from_arrow
from emotion_ray.runtime import init_ray


def load(dataset, manifest, split):
    t = pq.ParquetDataset([str(dataset / r) for r in manifest["shards"][split]]).read(columns=["image", "label_index"])
    x = pixels_from_arrow(t["image"], manifest["image_size"])
    return x, np.eye(len(manifest["classes"]), dtype=np.float32)[t["label_index"].to_numpy()]


def streamed_read(dataset, manifest) -> dict:
    """Reading a larger split as a streamed epoch does, against pyarrow alone on the same files.

    The train split's shards are hard-linked 40 times under new names (160 shards of ~5 MB),
    with a manifest of their own. Ray Data is read the way a worker reads its shard (batches of
    32, local shuffle, prefetch) through `load_split`, once as it is and once with one read
    task per shard (Ray's default); CPU is the whole machine's, Ray's processes included."""
    import psutil

    import emotion_ray.dataset as data_mod

    copies = 40
    big = WORK / f"{dataset.name}_x{copies}"
    if not (big / "manifest.json").exists():
        shutil.rmtree(big, ignore_errors=True)
        shards = []
        for k in range(copies):
            for rel in manifest["shards"]["train"]:
                dst = big / f"data/split=train/c{k}-{os.path.basename(rel)}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(dataset / rel, dst)
                shards.append(str(dst.relative_to(big)))
        big_manifest = {**manifest, "shards": {"train": shards, "val": [], "test": []},
                        "split_rows": {"train": manifest["split_rows"]["train"] * copies, "val": 0, "test": 0}}
        (big / "manifest.json").write_text(json.dumps(big_manifest))
    files = [str(big / rel) for rel in json.loads((big / "manifest.json").read_text())["shards"]["train"]]
    size = manifest["image_size"]

    def measure(read) -> tuple[float, float]:
        cpu0, start = psutil.cpu_times(), time.perf_counter()
        rows = read()
        wall, cpu1 = time.perf_counter() - start, psutil.cpu_times()
        busy = sum(getattr(cpu1, f) - getattr(cpu0, f) for f in ("user", "system", "nice"))
        return rows / wall, busy / rows * 1e3

    def iterate(ds) -> int:
        return sum(len(pixels_from_arrow(b["image"], size)) for b in ds.iter_batches(
            batch_size=32, batch_format="pyarrow", local_shuffle_buffer_size=256, prefetch_batches=2))

    def per_shard_tasks() -> int:
        # load_split itself, with its grouping off: tasks of 1 byte means one task per shard.
        grouped, data_mod.READ_TASK_BYTES = data_mod.READ_TASK_BYTES, 1
        try:
            return iterate(data_mod.load_split(str(big), "train"))
        finally:
            data_mod.READ_TASK_BYTES = grouped

    runs = {"pyarrow": [], "load_split": [], "one_task_per_shard": []}
    for _ in range(2):  # alternated; the first pass also warms the page cache
        runs["pyarrow"].append(measure(lambda: sum(
            len(pixels_from_arrow(pq.read_table(f, columns=["image", "label_index"])["image"], size)) for f in files)))
        runs["load_split"].append(measure(lambda: iterate(data_mod.load_split(str(big), "train"))))
        runs["one_task_per_shard"].append(measure(per_shard_tasks))
    best = {k: max(v) for k, v in runs.items()}  # by rows/s
    return {"streamed_read_rows": manifest["split_rows"]["train"] * copies,
            "streamed_read_shards": len(files),
            **{f"read_{k}_rows_per_s": round(v[0]) for k, v in best.items()},
            **{f"read_{k}_cpu_ms_per_row": round(v[1], 3) for k, v in best.items()}}


def main() -> None:
    size = int(os.environ.get("BENCH_IMAGE_SIZE", 128))
    epochs, batch = 10, 32
    use_gpu = os.environ.get("BENCH_GPU") == "1"
    src = demo_files("train", per_class=200, canvas=256)
    dataset = WORK / f"train_ds_{size}"
    init_ray()
    if not (dataset / "manifest.json").exists():
        shutil.rmtree(dataset, ignore_errors=True)
        # One file per decoding block (the smallest shard_bytes), as datasets were sharded when
        # these figures were first taken: streamed_read measures many small shards.
        prepare(PrepareConfig(inputs=[str(src)], output=str(dataset), image_size=size, shard_bytes=1024**2))
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
    reading = streamed_read(dataset, manifest)
    record("train", {"image_size": size, "train_rows": len(xt), "batch_size": batch, "epochs_timed": epochs - 1,
                     "gpu": use_gpu, "plain_keras_images_per_s": round(plain, 1),
                     "plain_keras_before_after": [round(plain_before, 1), round(plain_after, 1)],
                     "ray_1_worker_images_per_s": round(ray_ips, 1), "ratio": round(ray_ips / plain, 2),
                     "ray_1_worker_streaming_images_per_s": round(streaming_ips, 1),
                     "ratio_streaming": round(streaming_ips / plain, 2),
                     "target_ratio": 0.9, "ray_test_accuracy": round(result["categorical_accuracy"], 3),
                     **reading})


if __name__ == "__main__":
    main()
