"""Face detection (emotion_ray/faces.py): recall, false positives, speed per core, load cost.

Per detector ("haar", "mtcnn"), one process, one thread (cv2.setNumThreads(1), TensorFlow
intra-/inter-op threads 1), the same inputs for both:
- face_photos (shared/data/face_photos): counts against the README's per-picture counts. With
  no boxes to compare, a picture with n faces and d detections scores min(d, n) true and
  max(0, d - n) false detections.
- FER2013 test faces (48x48 grey) pasted, resized to `face` px, at a random place into grey
  `scene` x `scene` backgrounds: random crops of the two photos scikit-learn ships (a temple,
  a flower; no people) or 1/f noise. A detection is true if its IoU with the pasted square is
  >= 0.3 (detectors frame a face differently from FER's crops: the median IoU of a found face
  is ~0.7-0.8); every other detection is false. Empty scenes (no face) count false detections.
- The downscale bound: the same with max_side=640 (the default) and with no bound, on the
  face photos and on the first `--n-full` scenes of each 1280 px cell.
- Speed: images per wall second and per CPU second; single-threaded, the latter is images/s
  per core without the time lost to other users of a shared machine.
- Crop margin: mean IoU of `crop_box(detection, margin)` with the pasted square (FER's own
  framing), for the margin default.
- Load cost: a fresh process importing faces.py, getting the detector and running one
  detection: seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import record

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTOS = SHARED / "face_photos"
FER_TEST = SHARED / "fer2013" / "test"
DETECTORS = ("haar", "mtcnn")
MATCH_IOU = 0.3
GRID = [(48, 320), (48, 640), (48, 1280), (64, 320), (64, 640), (64, 1280),
        (128, 320), (128, 640), (128, 1280), (256, 320), (256, 640), (256, 1280)]
MARGINS = (0.0, 0.05, 0.1, 0.2, 0.3)
UNBOUNDED = 1_000_000


def photo_counts() -> dict[str, int]:
    """Faces per picture from shared/data/README.md ("every other file 1")."""
    text = (SHARED / "README.md").read_text()
    counts = {name: int(n) for name, n in re.findall(r"([\w.-]+\.(?:jpg|png)) (\d+)", text)}
    return {p.name: counts.get(p.name, 1) for p in sorted(PHOTOS.iterdir()) if p.suffix in (".jpg", ".png")}


def rgb_of(path: Path) -> np.ndarray:
    """A photo as the product decodes it before detection: EXIF-rotated RGB at full size."""
    from emotion_ray.images import open_image, to_rgb_array

    return to_rgb_array(open_image(path.read_bytes(), min_side=UNBOUNDED).image)


def pink_noise(rng: np.random.Generator, side: int) -> np.ndarray:
    """1/f noise (a cloud-like texture), made at 320 px at most and scaled up to `side`."""
    full, side = side, min(side, 320)
    spectrum = rng.normal(size=(side, side)) + 1j * rng.normal(size=(side, side))
    fy, fx = np.meshgrid(np.fft.fftfreq(side), np.fft.fftfreq(side), indexing="ij")
    field = np.real(np.fft.ifft2(spectrum / np.maximum(np.hypot(fx, fy), 1.0 / side)))
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    img = Image.fromarray((field * 200 + 25).astype(np.uint8))
    return np.asarray(img.resize((full, full), Image.BILINEAR) if full != side else img).copy()


def background(rng: np.random.Generator, side: int, photos: list[np.ndarray]) -> np.ndarray:
    if rng.random() < 0.5:
        return pink_noise(rng, side)
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    crop = int(rng.integers(160, min(h, w) + 1))
    y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    img = Image.fromarray(photo[y : y + crop, x : x + crop]).convert("L").resize((side, side), Image.BILINEAR)
    arr = np.asarray(img)
    return arr[:, ::-1].copy() if rng.random() < 0.5 else arr.copy()


def scenes(n: int, seed: int = 7) -> tuple[list[dict], list[dict]]:
    """n scenes per GRID cell (each a different FER test face) and n empty scenes per scene size."""
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
    faces = sorted(FER_TEST.rglob("*.jpg"))
    order = rng.permutation(len(faces))
    with_face, empty, k = [], [], 0
    for face_px, side in GRID:
        for i in range(n):
            grey = background(rng, side, photos)
            face = Image.open(faces[order[k % len(faces)]]).convert("L").resize((face_px, face_px), Image.BILINEAR)
            k += 1
            x, y = int(rng.integers(0, side - face_px + 1)), int(rng.integers(0, side - face_px + 1))
            grey[y : y + face_px, x : x + face_px] = np.asarray(face)
            with_face.append({"face": face_px, "scene": side, "k": i, "box": (x, y, face_px, face_px),
                              "rgb": np.repeat(grey[:, :, None], 3, axis=2)})
    for side in sorted({s for _, s in GRID}):
        for i in range(n):
            empty.append({"scene": side, "k": i, "rgb": np.repeat(background(rng, side, photos)[:, :, None], 3, axis=2)})
    return with_face, empty


def single_thread() -> None:
    import cv2

    cv2.setNumThreads(1)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def timed_detect(det, images: list[np.ndarray]) -> tuple[list[list], np.ndarray, np.ndarray]:
    """Detections, and wall and CPU seconds per image, for `images`, one at a time."""
    found, wall, cpu = [], [], []
    for img in images:
        start, cpu_start = time.perf_counter(), time.process_time()
        found.append(det.detect(img))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return found, np.array(wall), np.array(cpu)


def speed(wall: np.ndarray, cpu: np.ndarray) -> dict:
    """Images per wall second and per CPU second (= per core when single-threaded; it does not
    count time this process waited for a core the other users of the machine held)."""
    return {"images_per_s": round(len(wall) / wall.sum(), 2), "images_per_cpu_s": round(len(cpu) / cpu.sum(), 2),
            "cpu_per_wall": round(cpu.sum() / wall.sum(), 2)}


def load_cost(name: str) -> dict:
    # Peak RSS from VmHWM: ru_maxrss survives fork + exec, so a child would report this process's.
    peak = "[int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]"
    code = (
        "import time, numpy as np; t = time.perf_counter()\n"
        "from emotion_ray.faces import get_detector\n"
        f"d = get_detector({name!r}); d.detect(np.zeros((480, 640, 3), np.uint8))\n"
        f"print(time.perf_counter() - t, {peak})\n")
    base = f"import numpy; print(0, {peak})"
    out = {}
    for key, src in (("python", base), (name, code)):
        proc = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, check=True,
                              env={**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
        seconds, rss = proc.stdout.split()[-2:]
        out[key] = (float(seconds), float(rss))
    return {"ready_s": round(out[name][0], 2), "peak_rss_mib": round(out[name][1]),
            "over_bare_python_mib": round(out[name][1] - out["python"][1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=25, help="scenes per (face, scene) cell")
    parser.add_argument("--n-full", type=int, default=8, help="of which detected without the 640 px bound (1280 px only)")
    args = parser.parse_args()
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    single_thread()
    from emotion_ray.faces import Face, crop_box, get_detector

    counts = photo_counts()
    photos = {name: rgb_of(PHOTOS / name) for name in counts}
    with_face, empty = scenes(args.n)
    result: dict = {"n_per_cell": args.n, "n_full": args.n_full, "match_iou": MATCH_IOU, "photos": {}, "scenes": {}, "speed": {},
                    "margin_iou": {}, "load": {}}
    for name in DETECTORS:
        result["load"][name] = load_cost(name)
        for max_side in (640, UNBOUNDED):
            det = get_detector(name, max_side=max_side)
            det.detect(photos["obama_small.jpg"])  # warm-up (TensorFlow traces on first calls)
            tag = f"{name}@{'full' if max_side == UNBOUNDED else max_side}"

            found, wall, cpu = timed_detect(det, list(photos.values()))
            per = {p: len(f) for p, f in zip(photos, found)}
            tp = sum(min(per[p], counts[p]) for p in counts)
            fp = sum(max(0, per[p] - counts[p]) for p in counts)
            result["photos"][tag] = {"faces": sum(counts.values()), "true": tp, "false": fp,
                                     "recall": round(tp / sum(counts.values()), 3), "per_picture": per,
                                     **speed(wall, cpu)}

            # Without the bound, only the first `n_full` scenes of each 1280 px cell (4-8x the cost).
            cells = [s for s in with_face if max_side == 640 or (s["scene"] == 1280 and s["k"] < args.n_full)]
            found, wall, cpu = timed_detect(det, [s["rgb"] for s in cells])
            table, margin_ious = {}, {m: [] for m in MARGINS}
            for s, faces in zip(cells, found):
                truth = Face(*s["box"], 1.0)
                ious = [f.iou(truth) for f in faces]
                hit = max(ious, default=0.0) >= MATCH_IOU
                cell = table.setdefault(f"{s['face']}px in {s['scene']}", {"n": 0, "found": 0, "false": 0})
                cell["n"] += 1
                cell["found"] += hit
                cell["false"] += sum(iou < MATCH_IOU for iou in ious)
                if hit and s["face"] == 128:
                    best = faces[int(np.argmax(ious))]
                    for m in MARGINS:
                        left, top, side = crop_box(best, m)
                        margin_ious[m].append(Face(left, top, side, side, 1.0).iou(truth))
            empties = [e for e in empty if max_side == 640 or (e["scene"] == 1280 and e["k"] < args.n_full)]
            efound, ewall, ecpu = timed_detect(det, [e["rgb"] for e in empties])
            for e, faces in zip(empties, efound):
                cell = table.setdefault(f"empty {e['scene']}", {"n": 0, "found": 0, "false": 0})
                cell["n"] += 1
                cell["false"] += len(faces)
            for key, cell in table.items():
                if key.startswith("empty"):
                    del cell["found"]
                else:
                    cell["recall"] = round(cell["found"] / cell["n"], 3)
                cell["false_per_image"] = round(cell["false"] / cell["n"], 3)
            result["scenes"][tag] = table
            if max_side == 640:
                result["margin_iou"][name] = {str(m): round(float(np.mean(v)), 3) for m, v in margin_ious.items()}
            # Speed per scene size, over the scenes with and without a face.
            for side in sorted({e["scene"] for e in empties}):
                pick = np.array([s["scene"] == side for s in cells])
                epick = np.array([e["scene"] == side for e in empties])
                result["speed"][f"{tag} {side}px"] = speed(np.concatenate([wall[pick], ewall[epick]]),
                                                           np.concatenate([cpu[pick], ecpu[epick]]))
            print(json.dumps({tag: {"photos": result["photos"][tag], "scenes": table}}, indent=1), flush=True)
    record("faces", result)


if __name__ == "__main__":
    main()
