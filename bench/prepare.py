"""prepare images/s vs a plain single-process Pillow decode+resize loop over the same files.

Target: prepare >= 0.8 x cores x the plain loop. All runs read the same 2,000 demo-style
files (512x512 sources, 256x256 output) in one process; Ray starts before timing. prepare runs
twice: cold (Ray's workers start and import on first use) and warm; the ratio uses warm.
"""

from __future__ import annotations

import os
import shutil
import time

from PIL import Image

from bench.common import WORK, demo_files, record
from emotion_ray.config import PrepareConfig
from emotion_ray.prepare import prepare
from emotion_ray.runtime import init_ray


def plain_loop(files: list[str], size: int) -> float:
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as img:
            img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR).tobytes()
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    size = 256
    src = demo_files("prepare", per_class=667, canvas=512)
    files = sorted(str(p) for p in src.rglob("*") if p.suffix in (".jpg", ".png"))
    init_ray()
    plain = plain_loop(files, size)
    runs = []
    for attempt in ("cold", "warm"):  # cold: Ray's worker processes start and import on first use
        out = WORK / f"prepared_{attempt}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        prepare(PrepareConfig(inputs=[str(src)], output=str(out), image_size=size))
        runs.append(len(files) / (time.perf_counter() - start))
    cold, warm = runs
    cores = os.cpu_count()
    record("prepare", {"files": len(files), "image_size": size, "source_size": 512,
                       "plain_loop_images_per_s": round(plain, 1), "prepare_cold_images_per_s": round(cold, 1),
                       "prepare_warm_images_per_s": round(warm, 1), "ratio_warm": round(warm / plain, 2),
                       "ratio_cold": round(cold / plain, 2), "target_ratio": round(0.8 * cores, 2)})


if __name__ == "__main__":
    main()
