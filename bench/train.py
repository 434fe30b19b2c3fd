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

`--recipe` (issue #16, item 5) measures the face recipe instead, in a few minutes: face_cnn
with train_configs/face_recipe.yaml as it is (48 px, batch 64, AdamW, cosine schedule with
warmup, label smoothing, balanced class weights, face augmentation) trained by `run_training`
(1 worker, cached) vs plain `fit` of the same model, compiled the same way, on the same
tensors with the same class weights; and, for what the recipe costs, plain `fit` of the seed
CNN (its own defaults: Adam, no augmentation) on those tensors. The same method: epoch 1
excluded, median epoch, plain runs before and after the Ray run, averaged. Each figure comes
twice: images per second of wall time, and per second of CPU time of the process that trains
(plain: this one; Ray: the Train worker's, its `epoch_cpu_seconds`), which a machine shared
with other jobs changes far less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from bench.common import ROOT, WORK, demo_files, record
from emotion_ray.config import ModelConfig, PrepareConfig, TrainConfig, load_config
from emotion_ray.prepare import prepare
from emotion_ray.images import pixels_from_arrow
from emotion_ray.runtime import init_ray


RECIPE = ROOT.parent / "train_configs" / "face_recipe.yaml"


def prepared(name: str, src, size: int, **settings):
    """`src` prepared at `size` px under BENCH_DIR (once, with PrepareConfig `settings`), and its manifest."""
    dataset = WORK / name
    if not (dataset / "manifest.json").exists():
        shutil.rmtree(dataset, ignore_errors=True)
        prepare(PrepareConfig(inputs=[str(src)], output=str(dataset), image_size=size, **settings))
    return dataset, json.loads((dataset / "manifest.json").read_text())


def plain_epochs(model, train, val, batch: int, epochs: int, class_weight=None) -> pd.DataFrame:
    """Plain `model.fit` on in-memory tensors; per epoch its wall seconds and this process's CPU seconds
    (columns named as in a run's history.csv)."""
    import tensorflow as tf

    times = []

    class Timer(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            times.append((time.perf_counter() - self.t[0], time.process_time() - self.t[1]))

    model.fit(*train, validation_data=val, batch_size=batch, epochs=epochs, verbose=0, callbacks=[Timer()],
              class_weight=class_weight)
    return pd.DataFrame(times, columns=["epoch_seconds", "epoch_cpu_seconds"])


def images_per_s(history: pd.DataFrame, rows: int, column: str = "epoch_seconds") -> float:
    """Training images per second (of wall time, or of CPU time with epoch_cpu_seconds): the median of
    epochs 2..N (epoch 1 holds graph tracing and Ray Data's first pass)."""
    return rows / history[column].iloc[1:].median()


def plain_images_per_s(model, train, val, batch: int, epochs: int, class_weight=None) -> float:
    """Training images/s of plain `model.fit` on in-memory tensors: the median of epochs 2..N."""
    return images_per_s(plain_epochs(model, train, val, batch, epochs, class_weight), len(train[0]))


def ray_history(cfg: TrainConfig) -> tuple[pd.DataFrame, dict]:
    """`run_training(cfg)` as run "bench" under BENCH_DIR/train_runs: its history.csv and summary."""
    from emotion_ray.train import run_training

    runs = WORK / "train_runs"
    shutil.rmtree(runs, ignore_errors=True)
    result = run_training(cfg.model_copy(update={"output": str(runs), "run_name": "bench"}))
    return pd.read_csv(runs / "bench" / "history.csv"), result


def ray_images_per_s(cfg: TrainConfig, train_rows: int) -> tuple[float, dict]:
    """Training images/s of `run_training(cfg)`: the median of epochs 2..N of its history, and its summary."""
    history, result = ray_history(cfg)
    return images_per_s(history, train_rows), result


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
    init_ray()
    # One file per decoding block (the smallest shard_bytes), as datasets were sharded when these
    # figures were first taken: streamed_read measures many small shards.
    dataset, manifest = prepared(f"train_ds_{size}", demo_files("train", per_class=200, canvas=256), size,
                                 shard_bytes=1024**2)

    from emotion_ray.model import build_model, compile_model

    xt, yt = load(dataset, manifest, "train")
    xv, yv = load(dataset, manifest, "val")

    def plain_keras() -> float:
        return plain_images_per_s(compile_model(build_model(ModelConfig(), 3, size), 1e-3), (xt, yt), (xv, yv),
                                  batch, epochs)

    def ray_training(cache: bool) -> tuple[float, dict]:
        return ray_images_per_s(TrainConfig(data=str(dataset), workers=1, use_gpu=use_gpu, epochs=epochs,
                                            batch_size=batch, early_stopping_patience=99, cache_in_memory=cache,
                                            mlflow={"enabled": False}), len(xt))

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


def recipe(epochs: int, per_class: int) -> None:
    """The face recipe through Ray Train vs plain fit, and the seed CNN's plain fit (module docstring)."""
    from emotion_ray.model import build_model, class_weights, compile_for_training, compile_model

    cfg = load_config(TrainConfig, str(RECIPE), {"data": "unset", "workers": 1, "epochs": epochs,
                                                 "early_stopping_patience": 99, "cache_in_memory": True,
                                                 "mlflow.enabled": False})
    size, batch = cfg.image_size, cfg.batch_size
    init_ray()
    dataset, manifest = prepared(f"recipe_ds_{size}_{per_class}", demo_files("recipe", per_class, canvas=96), size)
    cfg = cfg.model_copy(update={"data": str(dataset)})
    train, val = load(dataset, manifest, "train"), load(dataset, manifest, "val")
    rows, classes = len(train[0]), manifest["classes"]
    weights = class_weights(manifest["counts"]["train"], classes)

    def plain_recipe() -> pd.DataFrame:
        model = compile_for_training(build_model(cfg.model, len(classes), size), cfg, -(-rows // batch))
        return plain_epochs(model, train, val, batch, epochs, class_weight=weights)

    def plain_seed() -> pd.DataFrame:
        return plain_epochs(compile_model(build_model(ModelConfig(), len(classes), size), 1e-3), train, val,
                            batch, epochs)

    loads = [os.getloadavg()[0]]
    before = plain_recipe(), plain_seed()
    loads.append(os.getloadavg()[0])
    ray, result = ray_history(cfg)
    loads.append(os.getloadavg()[0])
    after = plain_recipe(), plain_seed()
    loads.append(os.getloadavg()[0])

    def rates(column: str) -> dict:
        """images/s by wall or CPU time: each plain side averaged over its two runs, and the ratios."""
        plain = [images_per_s(h, rows, column) for h in (before[0], after[0])]
        seed = [images_per_s(h, rows, column) for h in (before[1], after[1])]
        ray_ips = images_per_s(ray, rows, column)
        return {"plain_recipe": round(np.mean(plain), 1), "plain_recipe_before_after": [round(v, 1) for v in plain],
                "ray_recipe_1_worker": round(ray_ips, 1), "ratio": round(ray_ips / np.mean(plain), 2),
                "plain_seed_cnn": round(np.mean(seed), 1), "plain_seed_before_after": [round(v, 1) for v in seed],
                "recipe_cost_vs_seed_cnn": round(np.mean(seed) / np.mean(plain), 2)}

    params = {name: build_model(m, len(classes), size).count_params()
              for name, m in (("recipe", cfg.model), ("seed_cnn", ModelConfig()))}
    record("train_recipe", {
        "config": str(RECIPE.relative_to(ROOT.parent)), "architecture": cfg.model.architecture, "image_size": size,
        "train_rows": rows, "val_rows": len(val[0]), "batch_size": batch, "epochs_timed": epochs - 1,
        "target_ratio": 0.9, "images_per_wall_s": rates("epoch_seconds"),
        "images_per_cpu_s": rates("epoch_cpu_seconds"),
        "params": params, "ray_recipe_test_accuracy": round(result["categorical_accuracy"], 3),
        "load_average_1min_at_start_plain_ray_plain_end": [round(v, 1) for v in loads],
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", action="store_true", help="the face recipe vs plain fit, and the seed CNN")
    parser.add_argument("--epochs", type=int, default=8, help="--recipe: epochs (the recipe's own: 8)")
    parser.add_argument("--per-class", type=int, default=300, help="--recipe: demo faces per class")
    args = parser.parse_args()
    if args.recipe:
        recipe(args.epochs, args.per_class)
    else:
        main()
