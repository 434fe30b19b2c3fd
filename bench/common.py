"""Shared helpers for the benchmarks: demo-style files and recording results."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
from pathlib import Path

from emotion_ray.demo import make_demo_dataset
from emotion_ray.runtime import setup_process

setup_process()  # every benchmark imports this module before TensorFlow loads

ROOT = Path(__file__).resolve().parent
WORK = Path(os.environ.get("BENCH_DIR", "/tmp/emotion_ray_bench"))


def demo_files(name: str, per_class: int, canvas: int) -> Path:
    """Cached demo-style images (JPEG/PNG/grey mix) under BENCH_DIR."""
    folder = WORK / f"{name}_{per_class}_{canvas}"
    if not (folder / ".done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        make_demo_dataset(folder, per_class=per_class, seed=123, canvas=canvas)
        (folder / ".done").write_text("ok")
    return folder


def record(section: str, payload: dict) -> None:
    """Print and append one result to bench/results.jsonl (RESULTS.md quotes them)."""
    payload = {"bench": section, "when": dt.datetime.now().isoformat(timespec="seconds"),
               "machine": f"{platform.machine()} {os.cpu_count()} cores", **payload}
    print(json.dumps(payload, indent=2))
    with open(ROOT / "results.jsonl", "a") as fh:
        fh.write(json.dumps(payload) + "\n")
