"""Start-up: what a short training run costs beyond its epochs (Tune trials, folds, tests).

Runs `run_training` on 18 demo images at 32 px for one epoch on 2 workers, `--runs` times in one
Ray session (the first pays Ray Data's and the workers' cold start, as a Tune experiment's first
trial does), and records per run the wall seconds of the whole run, of its one epoch
(history.csv's epoch_seconds), and the busy CPU seconds of the whole machine while it ran
(/proc/stat: every process of the run counts, the driver's, Ray's and the workers'). The
epoch is the work; the rest is the fixed cost every run pays, whatever its data.

    python -m bench.startup [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

import pandas as pd

from bench.common import WORK, demo_files, record


def busy_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (Linux /proc/stat, all cores)."""
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fh.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / 100


def main() -> None:
    from emotion_ray.config import TrainConfig
    from emotion_ray.runtime import init_ray
    from emotion_ray.train import run_training

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    images = demo_files("startup", per_class=6, canvas=48)
    out = WORK / "startup_runs"
    shutil.rmtree(out, ignore_errors=True)
    init_ray("local")
    runs = []
    for i in range(args.runs):
        cfg = TrainConfig(data=str(images), output=str(out), run_name=f"r{i}", workers=2, epochs=1, batch_size=8,
                          image_size=32, mlflow={"enabled": False})
        cpu, started = busy_cpu_seconds(), time.perf_counter()
        result = run_training(cfg)
        wall, cpu = time.perf_counter() - started, busy_cpu_seconds() - cpu
        epoch = float(pd.read_csv(f"{result['run_dir']}/history.csv")["epoch_seconds"].iloc[0])
        runs.append({"wall_s": round(wall, 1), "busy_cpu_s": round(cpu, 1), "epoch_s": round(epoch, 2)})
        print(runs[-1], flush=True)
    warm = runs[1:] or runs
    record("startup", {"images": 18, "image_size": 32, "workers": 2, "epochs": 1, "runs": runs,
                       "warm_median_wall_s": statistics.median(r["wall_s"] for r in warm),
                       "warm_median_busy_cpu_s": statistics.median(r["busy_cpu_s"] for r in warm),
                       "epoch_share_of_wall": round(statistics.median(r["epoch_s"] / r["wall_s"] for r in warm), 3)})


if __name__ == "__main__":
    main()
