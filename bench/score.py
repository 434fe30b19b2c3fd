"""Scoring throughput and memory.

One run, same files, same model (the seed CNN at 256x256):
  end-to-end `score` images/s  vs  (a) pure model.predict on preloaded tensors (the compute
  limit; target >= 0.85x), (a') the forward pass `score` itself runs, on the same tensors,
  and (b) the seed's way: read, resize, predict one image at a time (target >= 10x). End to
  end is timed on 1,002 files (cold and warm) and on 10x as many (bulk, which the ratios
  use); the bulk run's start-up and steady rate after it come from score's own summary.
On a node where Ray sees a GPU, `score` runs with use_gpu (its GPU defaults) and (a) on the GPU.
On a CPU-only machine it also reports the ceiling that sharing cores puts on any pipeline:
cores / (decode + forward-pass CPU seconds per image), each measured here.
Peak memory scoring 1,000 vs 10,000 images (PSS of the driver + Ray worker processes, sampled): ratio <= 1.2.
Draft mode: pixel difference and prediction agreement with and without JPEG DCT scaling.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from bench.common import WORK, demo_files, record
from emotion_ray.config import ModelConfig, ScoreConfig
from emotion_ray.runtime import init_ray

SIZE = 256
CLASSES = ["angry", "happy", "sad"]


def model_dir() -> Path:
    from emotion_ray.model import build_model, save_model

    run = WORK / "score_model"
    if not (run / "model.keras").exists():
        run.mkdir(parents=True, exist_ok=True)
        save_model(build_model(ModelConfig(), 3, SIZE), str(run / "model.keras"))
        (run / "labels.json").write_text(json.dumps({"classes": CLASSES, "image_size": SIZE}))
    return run


def images_of(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix in (".jpg", ".png"))


def replicated(src: Path, copies: int) -> Path:
    """`copies` x the files of `src` under new names (scoring cost does not depend on content)."""
    out = WORK / f"score_x{copies}"
    if not (out / ".done").exists():
        shutil.rmtree(out, ignore_errors=True)
        for k in range(copies):
            for path in images_of(src):
                dst = out / f"c{k}" / Path(path).relative_to(src)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, dst)
        (out / ".done").write_text("ok")
    return out


def peak_rss_of_score(inputs: Path, output: Path, use_gpu: bool) -> int:
    """Peak summed PSS of a fresh `emotion-ray score` process and everything it starts.

    PSS, not RSS: Ray's processes map the same shared object-store pages, which RSS counts
    once per process."""
    shutil.rmtree(output, ignore_errors=True)
    proc = subprocess.Popen([sys.executable, "-m", "emotion_ray.cli", "score", "--model", str(model_dir()),
                             "--input", str(inputs), "--output", str(output), *(["--use-gpu"] if use_gpu else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RAY_ADDRESS": ""})
    peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    assert proc.returncode == 0
    return peak


def main() -> None:
    from emotion_ray.images import decode_image
    from emotion_ray.inference import forward_pass
    from emotion_ray.model import load_model
    from emotion_ray.score import score

    src = demo_files("score", per_class=334, canvas=512)
    files = images_of(src)
    model = load_model(str(model_dir() / "model.keras"))
    init_ray()
    import ray

    # On a GPU node `score` runs its GPU path (and (a) runs on the GPU by itself).
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0

    # Reading and decoding, one core: CPU seconds per image.
    cpu_start = time.process_time()
    pixels = np.stack([decode_image(Path(f).read_bytes(), SIZE).pixels for f in files])
    decode_cpu_s = (time.process_time() - cpu_start) / len(files)

    # (a) compute limit, as #4 defines it: model.predict on preloaded uint8 tensors, batches of 64.
    # (a') the forward pass `score` itself runs (inference.forward_pass, batches of 64): faster
    # than model.predict, so the pipeline is also measured against it. One pass over 1,002
    # images is ~3 s, and a single sample swung by 20 % between runs here: each is the median
    # of 3 passes, interleaved so that both see the same moments of the machine.
    forward = forward_pass(model)
    model.predict(pixels[:64], verbose=0)
    forward(pixels[:64])

    def timed(fn) -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        return len(files) / (time.perf_counter() - start), (time.process_time() - cpu_start) / len(files)

    predict_runs, forward_runs = [], []
    for _ in range(3):
        predict_runs.append(timed(lambda: model.predict(pixels, batch_size=64, verbose=0)))
        forward_runs.append(timed(lambda: [forward(pixels[i : i + 64]).numpy() for i in range(0, len(pixels), 64)]))
    compute_ips = float(np.median([ips for ips, _ in predict_runs]))
    forward_ips = float(np.median([ips for ips, _ in forward_runs]))
    predict_cpu_s = float(np.median([cpu for _, cpu in forward_runs]))
    # Where decoding and prediction share the same cores (a CPU-only machine), no pipeline can
    # beat cores / (decode + forward-pass CPU seconds per image).
    cores = len(os.sched_getaffinity(0))
    ceiling_ips = min(forward_ips, cores / (decode_cpu_s + predict_cpu_s))

    # (b) the seed's way: one image at a time, read + resize + predict.
    subset = files[:200]
    start = time.perf_counter()
    for f in subset:
        img = np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE)))
        model.predict(img[None], verbose=0)
    seed_ips = len(subset) / (time.perf_counter() - start)

    # End to end: Ray Data decode tasks + predictor actor, Parquet out. Cold: Ray's workers and
    # the predictor start inside the timing; warm: a second run on the started cluster. Every
    # run starts its own predictor (TensorFlow import + model load, ~4 s of CPU here), which a
    # 1,000-image job cannot amortise: the bulk run (10x the files) spreads it over more images
    # and the headline ratios use it; score's summary gives the steady rate after start-up.
    bulk = replicated(src, 10)
    e2e, summaries = {}, {}
    for attempt, folder in (("cold", src), ("warm", src), ("bulk", bulk)):
        out = WORK / f"score_out_{attempt}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        summaries[attempt] = score(ScoreConfig(model=str(model_dir()), inputs=[str(folder)], output=str(out),
                                               use_gpu=use_gpu),
                                   show_progress=False)
        e2e[attempt] = summaries[attempt]["rows"] / (time.perf_counter() - start)
    e2e_ips = e2e["bulk"]

    # Draft mode: effect on pixels and predictions (the sources are 512px, the target 256px).
    import emotion_ray.images as images_mod

    jpegs = [f for f in files if f.endswith(".jpg")][:300]
    diffs, agree = [], 0
    for f in jpegs:
        data = Path(f).read_bytes()
        with_draft = decode_image(data, SIZE).pixels
        img = Image.open(f)
        img = images_mod._to_rgb(img).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        without = np.asarray(img, dtype=np.uint8)
        diffs.append(np.abs(with_draft.astype(int) - without.astype(int)).mean())
        p = model.predict(np.stack([with_draft, without]), verbose=0)
        agree += int(p[0].argmax() == p[1].argmax())

    ray.shutdown()  # the memory runs start their own Ray, as a user's command would
    small = replicated(src, 1)
    big = bulk
    rss_small = peak_rss_of_score(small, WORK / "score_mem_small", use_gpu)
    rss_big = peak_rss_of_score(big, WORK / "score_mem_big", use_gpu)

    record("score", {
        "files": len(files), "image_size": SIZE, "source_size": 512, "score_on_gpu": use_gpu,
        "compute_limit_images_per_s": round(compute_ips, 1),
        "seed_one_at_a_time_images_per_s": round(seed_ips, 1),
        "score_end_to_end_cold_images_per_s": round(e2e["cold"], 1),
        "score_end_to_end_warm_images_per_s": round(e2e["warm"], 1),
        "score_end_to_end_bulk_images_per_s": round(e2e["bulk"], 1), "bulk_files": len(images_of(bulk)),
        "ratio_vs_compute_limit": round(e2e_ips / compute_ips, 2), "target_vs_compute_limit": 0.85,
        # The bulk run after its first scored batch (start-up excluded), from score's own summary.
        "bulk_first_batch_s": summaries["bulk"]["first_batch_seconds"],
        "bulk_steady_images_per_s": summaries["bulk"]["steady_images_per_second"],
        "steady_ratio_vs_compute_limit": round(summaries["bulk"]["steady_images_per_second"] / compute_ips, 2),
        "compute_limit_runs": [round(ips, 1) for ips, _ in predict_runs],
        "forward_pass_limit_images_per_s": round(forward_ips, 1),
        "forward_pass_runs": [round(ips, 1) for ips, _ in forward_runs],
        "ratio_vs_forward_pass_limit": round(e2e_ips / forward_ips, 2),
        "decode_cpu_ms_per_image": round(decode_cpu_s * 1e3, 2), "predict_cpu_ms_per_image": round(predict_cpu_s * 1e3, 2),
        "shared_core_ceiling_images_per_s": round(ceiling_ips, 1),
        "ceiling_ratio_vs_compute_limit": round(ceiling_ips / compute_ips, 2),
        "ceiling_ratio_vs_forward_pass_limit": round(ceiling_ips / forward_ips, 2),
        "bulk_share_of_ceiling": round(e2e_ips / ceiling_ips, 2),
        "ratio_vs_seed_way": round(e2e_ips / seed_ips, 1), "target_vs_seed_way": 10,
        "warm_1k_ratio_vs_seed_way": round(e2e["warm"] / seed_ips, 1),
        "peak_pss_mb_1x": round(rss_small / 2**20), "peak_pss_mb_10x": round(rss_big / 2**20),
        "files_1x": len(images_of(small)), "files_10x": len(images_of(big)),
        "memory_ratio_10x_vs_1x": round(rss_big / rss_small, 2), "target_memory_ratio": 1.2,
        "draft_mean_abs_pixel_diff": round(float(np.mean(diffs)), 2),
        "draft_prediction_agreement": round(agree / len(jpegs), 3), "draft_images_compared": len(jpegs),
    })


if __name__ == "__main__":
    main()
