"""Face detection (emotion_ray/faces.py): recall, false positives, speed per core, load cost.

Per detector (DETECTORS), one process, one thread (cv2.setNumThreads(1), TensorFlow
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

`--score` measures instead `score` with faces, all in one run on the same pictures (the face
photos, plus `--score-scenes` scenes per GRID cell and empty scenes per scene size, written once
to BENCH_DIR/faces_score_pictures_<n>: photos as they are, scenes as JPEG):
- end to end: `emotion_ray.score.score` of a 48 px model (the seed CNN, untrained: speed does not
  depend on the weights) with faces none and all + each of `--score-detectors` (Ray over every core; Ray is
  started before the runs, each run starts its own predictor): the summary's images_per_second
  and steady_images_per_second, and the bench's own steady rate (pictures after the first
  batch reached the driver / time from it to the last batch, from 3 batches on; the summary's
  counts the first batch's face rows as pictures);
- in process, one thread: `sources.decode_table` on the same files (none / each detector): CPU
  ms per picture, i.e. what a decode task spends; the decode that detection starts from without
  detecting (640 px); and the forward pass per face at 48 px. Ratios: detection x decode, and
  fer's CPU per picture over ours (decode task + forward pass per face);
- the peer: `fer`'s `FER().detect_emotions(cv2.imread(path))` per picture (its default Haar
  cascade), in the bench's peer venv (bench/faces_peer.py prints JSON): pictures/s after a
  warm-up call, CPU ms per picture, faces found.
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
import pyarrow as pa
from PIL import Image

from bench.common import WORK, record

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTOS = SHARED / "face_photos"
FER_TEST = SHARED / "fer2013" / "test"
DETECTORS = ("blazeface", "blazeface_one_pass", "haar", "mtcnn")  # one_pass: without the tile pass
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
                              "rgb": np.repeat(grey[:, :, None], 3, axis=2),
                              "label": faces[order[(k - 1) % len(faces)]].parent.name})
    for side in sorted({s for _, s in GRID}):
        for i in range(n):
            empty.append({"scene": side, "k": i, "rgb": np.repeat(background(rng, side, photos)[:, :, None], 3, axis=2)})
    return with_face, empty


def smooth_background(side: int, seed: int = 1) -> np.ndarray:
    """A side x side grey of smooth blotches: 12 x 12 random values upsampled bilinearly."""
    rng = np.random.default_rng(seed)
    blobs = Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8))
    return np.asarray(blobs.resize((side, side), Image.BILINEAR)).copy()


def smooth_scenes(n: int = 40) -> list[np.ndarray]:
    """Empty scenes of smooth shapes, where a face-like blob is easy to see: 640 px
    `smooth_background`s (tests/test_faces.py's background too), and the two
    sample photos Gaussian-blurred (kernel 15, 31, 61 px), as out-of-focus backgrounds are."""
    import cv2
    from sklearn.datasets import load_sample_image

    blobs = [np.repeat(smooth_background(640, seed)[:, :, None], 3, axis=2) for seed in range(n)]
    blurred = [cv2.GaussianBlur(load_sample_image(name), (k, k), 0) for name in ("china.jpg", "flower.jpg")
               for k in (15, 31, 61)]
    return blobs + blurred


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


SCORE_SIZE = 48
SCORE_CLASSES = ["angry", "happy", "sad"]
PEER_VENVS = (WORK / "peer-venv", WORK / "peer-venv-faces")  # bench/quality.py's, else our own
# What `from fer import FER` needs (fer's own requirements pull torch, facenet-pytorch and moviepy
# for its MTCNN and video paths, which FER() with its default Haar detector does not use).
PEER_PACKAGES = ["tensorflow", "opencv-python-headless<5", "pandas", "pillow", "requests", "setuptools<81"]


def score_pictures(n: int) -> Path:
    """The face photos (bytes as they are) and `n` scenes per GRID cell plus `n` empty scenes per
    scene size (JPEG, quality 90), written once."""
    folder = WORK / f"faces_score_pictures_{n}"
    done = folder.with_name(folder.name + ".done")  # beside, not inside: score would count it as skipped
    if done.exists():
        return folder
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in photo_counts():
        shutil.copyfile(PHOTOS / name, folder / f"photo_{name}")
    with_face, empty = scenes(n)
    for s in with_face:
        Image.fromarray(s["rgb"]).save(folder / f"scene_{s['face']}px_in_{s['scene']}_{s['k']}.jpg", quality=90)
    for e in empty:
        Image.fromarray(e["rgb"]).save(folder / f"empty_{e['scene']}_{e['k']}.jpg", quality=90)
    done.write_text("ok")
    return folder


def score_model_dir() -> Path:
    """As bench/score.py's model_dir(), at 48 px: the seed CNN, untrained, and its labels.json."""
    from emotion_ray.config import ModelConfig
    from emotion_ray.model import build_model, save_model

    run = WORK / "faces_score_model"
    if not (run / "model.keras").exists():
        run.mkdir(parents=True, exist_ok=True)
        save_model(build_model(ModelConfig(), len(SCORE_CLASSES), SCORE_SIZE), str(run / "model.keras"))
        (run / "labels.json").write_text(json.dumps({"classes": SCORE_CLASSES, "image_size": SCORE_SIZE}))
    return run


def peer_python() -> Path:
    """A venv where `from fer import FER` works: bench/quality.py's if there, else one made here."""
    for venv in PEER_VENVS:
        python = venv / "bin" / "python"
        if (venv / ".done").exists() and python.exists():
            return python
    venv = PEER_VENVS[-1]
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--no-deps", "fer"], check=True)
    subprocess.run(pip + PEER_PACKAGES, check=True)
    (venv / ".done").write_text("ok")
    return python


def run_fer(files: list[str]) -> dict:
    python = peer_python()
    # A clean environment: none of the project's TensorFlow settings (TF_USE_LEGACY_KERAS) or paths.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run([str(python), str(Path(__file__).with_name("faces_peer.py"))], input=json.dumps(files),
                          capture_output=True, text=True, env=env, cwd="/", check=False)
    if proc.returncode:
        raise RuntimeError(f"fer failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"venv": str(python.parents[1]), **json.loads(proc.stdout.strip().splitlines()[-1])}


def decode_cost(files: list[str], faces, passes: int) -> tuple[dict, pa.Table]:
    """`sources.decode_table` over `files` in this process (one thread), as a decode task runs it:
    CPU ms per picture (median of `passes`, after a warm-up on two files), rows and faces."""
    from emotion_ray.config import DecodeLimits, StorageConfig
    from emotion_ray.sources import decode_table

    def run(paths):
        return decode_table(pa.table({"path": paths}), SCORE_SIZE, DecodeLimits(), StorageConfig(), faces=faces,
                            one_thread=True)

    run(files[:2])
    cpu, wall = [], []
    for _ in range(passes):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = run(files)
        cpu.append(time.process_time() - cpu_start)
        wall.append(time.perf_counter() - start)
    faces_found = out.num_rows - (0 if faces is None else sum(1 for e in out["error"].to_pylist() if e))
    return {"cpu_ms_per_picture": round(1e3 * float(np.median(cpu)) / len(files), 1),
            "cpu_ms_runs": [round(1e3 * c / len(files), 1) for c in cpu],
            "cpu_per_wall": round(sum(cpu) / sum(wall), 2), "rows": out.num_rows,
            "faces_found": faces_found if faces is not None else None}, out


def start_ray(tries: int = 3) -> int:
    """`runtime.init_ray`, tried again when Ray's node misses its start-up wait; returns the tries used."""
    import ray

    from emotion_ray.runtime import init_ray

    for attempt in range(1, tries + 1):
        try:
            init_ray()
            return attempt
        except Exception as exc:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc) or attempt == tries:
                raise
            print(f"ray.init try {attempt}: {exc}", flush=True)
            ray.shutdown()
    raise AssertionError("unreachable")


def decode_640_cost(files: list[str]) -> dict:
    """CPU ms per picture of the decode that face detection starts from, without detecting:
    `open_image` at decode_faces' bound (640 px on the shorter side here, JPEG draft mode) +
    `to_rgb_array`, one thread. Splits decode_table's cost with faces into decoding and detecting."""
    from emotion_ray.faces import DEFAULT_MAX_SIDE
    from emotion_ray.images import open_image, to_rgb_array

    blobs = [Path(f).read_bytes() for f in files]
    cpu_start = time.process_time()
    for data in blobs:
        to_rgb_array(open_image(data, max(DEFAULT_MAX_SIDE, 4 * SCORE_SIZE)).image)
    return {"cpu_ms_per_picture": round(1e3 * (time.process_time() - cpu_start) / len(files), 1)}


def score_bench(args) -> None:
    """`score` with faces none / each detector vs decode-only cost vs fer, on the same pictures."""
    import shutil

    from emotion_ray.config import FaceConfig, ScoreConfig
    from emotion_ray.inference import forward_pass
    from emotion_ray.model import load_model
    from emotion_ray.score import score

    # Ray first, so a start-up failure costs no measurement: on this shared machine (load average
    # 10-35 on 2 cores) Ray's raylet has missed ray.init's fixed 30 s registration wait.
    ray_start_tries = start_ray()
    folder = score_pictures(args.score_scenes)
    files = sorted(str(p) for p in folder.iterdir())
    model = score_model_dir()
    modes = {"none": FaceConfig(mode="none"),
             **{name: FaceConfig(mode="all", detector=name) for name in args.score_detectors.split(",")}}
    result: dict = {"pictures": len(files), "photos": len(photo_counts()), "scenes_per_cell": args.score_scenes,
                    "image_size": SCORE_SIZE, "cores": len(os.sched_getaffinity(0)), "decode_one_thread": {},
                    "score": {}, "load_average_start": os.getloadavg(),
                    "ray_start_tries": ray_start_tries}

    # 1. In process, one thread: what a decode task spends per picture.
    decoded = {}
    for name, faces in modes.items():
        result["decode_one_thread"][name], decoded[name] = decode_cost(
            files, faces if faces.enabled else None, args.passes_none if name == "none" else 1)
        print(name, json.dumps(result["decode_one_thread"][name]), flush=True)
    result["decode_one_thread"]["decode_640_no_detection"] = decode_640_cost(files)
    base = result["decode_one_thread"]["none"]["cpu_ms_per_picture"]
    for name in list(modes)[1:]:
        result["decode_one_thread"][name]["x_decode_none"] = round(
            result["decode_one_thread"][name]["cpu_ms_per_picture"] / base, 1)
    # The forward pass per face at 48 px (one thread too), on the first detector's crops.
    crops = np.frombuffer(b"".join(v for v in decoded[list(modes)[1]]["image"].to_pylist() if v), np.uint8)
    crops = crops.reshape(-1, SCORE_SIZE, SCORE_SIZE, 3)
    forward = forward_pass(load_model(str(model / "model.keras")))
    forward(crops[:64])
    cpu_start = time.process_time()
    for _ in range(5):
        for i in range(0, len(crops), 64):
            forward(crops[i : i + 64]).numpy()
    result["forward_cpu_ms_per_face"] = round(1e3 * (time.process_time() - cpu_start) / (5 * len(crops)), 2)

    # 2. The peer, one process.
    result["fer"] = run_fer(files)
    print("fer", json.dumps({k: v for k, v in result["fer"].items() if not k.startswith("per_picture")}),
          flush=True)

    # 1b. Real photos only (the face photos, `photo_` files): a decode task's CPU per photo, over
    # `--passes-none` passes, beside fer's CPU on the same photos in the same run (from its
    # per-picture figures above); fer's CPU / ours per core with the forward pass per face.
    photo_files = [f for f in files if Path(f).name.startswith("photo_")]
    fer_photo_ms = float(np.mean([result["fer"]["per_picture_cpu_ms"][Path(f).name] for f in photo_files]))
    result["photos_only"] = {"photos": len(photo_files), "fer_cpu_ms_per_photo": round(fer_photo_ms, 1)}
    for name, faces in modes.items():
        cost, table = decode_cost(photo_files, faces if faces.enabled else None, args.passes_none)
        ours = cost["cpu_ms_per_picture"] + result["forward_cpu_ms_per_face"] * table.num_rows / len(photo_files)
        result["photos_only"][name] = {**cost, "fer_cpu_vs_ours": round(fer_photo_ms / ours, 1)}
        print("photos", name, json.dumps(result["photos_only"][name]), flush=True)

    # 3. End to end: score, Ray over every core (already started: each run pays its own
    # predictor's start and, on first use, the detector's load in each decode worker).
    # The summary's steady rate counts the first batch's rows as pictures (with faces a batch has
    # more rows than pictures), so the bench also times each batch's arrival at the driver's writer
    # itself: steady = pictures after the first batch / time from the first batch to the last.
    import emotion_ray.score as score_module

    arrivals: list[tuple[float, set]] = []
    writer_add = score_module._PartWriter.add

    def timed_add(self, table):
        arrivals.append((time.perf_counter(), set(table["path"].to_pylist())))
        return writer_add(self, table)

    score_module._PartWriter.add = timed_add
    for name, faces in modes.items():
        out = WORK / f"faces_score_out_{name}"
        shutil.rmtree(out, ignore_errors=True)
        arrivals.clear()
        start = time.perf_counter()
        summary = score(ScoreConfig(model=str(model), inputs=[str(folder)], output=str(out), faces=faces),
                        show_progress=False)
        wall = time.perf_counter() - start
        no_face = summary["errors"].get("no_face", 0)
        first_t, first_paths = arrivals[0]
        later = set().union(*(p for _, p in arrivals[1:])) - first_paths
        result["score"][name] = {
            "images_per_second": summary["images_per_second"],
            "steady_images_per_second": summary["steady_images_per_second"],
            # Meaningless from fewer than 3 batches (two that arrive together give any rate).
            "bench_steady_images_per_second": round(len(later) / (arrivals[-1][0] - first_t), 2)
            if later and len(arrivals) >= 3 else None,
            "first_batch_seconds": summary["first_batch_seconds"], "seconds": summary["seconds"],
            "first_batch_pictures": len(first_paths), "batches": len(arrivals),
            "call_seconds": round(wall, 2), "rows": summary["rows"], "pictures": summary["pictures"],
            "faces_found": summary["rows"] - no_face if faces.enabled else None, "errors": summary["errors"],
        }
        print(name, json.dumps(result["score"][name]), flush=True)
    import ray

    ray.shutdown()
    result["load_average_end"] = os.getloadavg()

    fer = result["fer"]
    result["ratios"] = {
        **{f"score_{m}_vs_fer": round(result["score"][m]["images_per_second"] / fer["pictures_per_s"], 2)
           for m in modes},
        **{f"score_{m}_steady_vs_fer": round(result["score"][m]["bench_steady_images_per_second"] / fer["pictures_per_s"], 2)
           for m in modes if result["score"][m]["bench_steady_images_per_second"]},
        # Per core: fer's CPU per picture over ours (a decode task's, plus the forward pass per face).
        **{f"cpu_{m}_vs_fer": round(fer["cpu_ms_per_picture"] / (
            result["decode_one_thread"][m]["cpu_ms_per_picture"]
            + result["forward_cpu_ms_per_face"] * result["decode_one_thread"][m]["rows"] / len(files)), 1)
           for m in modes},
        "target_vs_fer": 10, "target_detection_x_decode": 2,
    }
    record("faces_score", result)


def crop_accuracy(args) -> None:
    """A FER2013-trained face model's accuracy on each detector's crops of the pasted-FER scenes,
    where the true label is the pasted face's: end to end (a scene whose face is not found counts
    as wrong) and on the found faces only, beside the pasted square itself (the framing FER2013
    gives). Per detector at its own FER margin (faces.FER_MARGIN) and, for the margin's choice,
    at the other margins. The model: a run directory (`--crop-accuracy RUN`)."""
    from emotion_ray.config import StorageConfig
    from emotion_ray.faces import FER_MARGIN, Face, crop_face, get_detector
    from emotion_ray.inference import forward_pass, resolve_model
    from emotion_ray.model import load_model_bytes

    bundle = resolve_model(args.crop_accuracy, StorageConfig(), "")
    forward = forward_pass(load_model_bytes(bundle.model_bytes), bundle.test_time)
    size, classes = bundle.image_size, bundle.classes
    with_face, _ = scenes(args.n)

    def accuracy(crops: list[np.ndarray | None]) -> dict:
        found = [i for i, c in enumerate(crops) if c is not None]
        right = np.zeros(len(crops), bool)
        if found:
            probs = np.concatenate([np.asarray(forward(np.stack([crops[i] for i in found[j : j + 256]])))
                                    for j in range(0, len(found), 256)])
            right[found] = [classes[int(p.argmax())] == with_face[i]["label"] for i, p in zip(found, probs)]
        return {"found": len(found), "end_to_end": round(float(right.mean()), 4),
                "on_found": round(float(right[found].mean()), 4) if found else None}

    truth_crops = [crop_face(s["rgb"], Face(*s["box"], 1.0), size, 0.0) for s in with_face]
    result: dict = {"model": bundle.model_id, "scenes": len(with_face), "n_per_cell": args.n,
                    "pasted_square": accuracy(truth_crops), "detectors": {}}
    for name in ("blazeface", "haar", "mtcnn"):
        det = get_detector(name)
        matches = []
        for s in with_face:
            truth = Face(*s["box"], 1.0)
            faces = [f for f in det.detect(s["rgb"]) if f.iou(truth) >= MATCH_IOU]
            matches.append(max(faces, key=lambda f: f.iou(truth)) if faces else None)
        margins = sorted({FER_MARGIN[name], 0.0, 0.1, 0.2})
        result["detectors"][name] = {
            str(m): accuracy([crop_face(s["rgb"], f, size, m) if f else None for s, f in zip(with_face, matches)])
            for m in margins}
        result["detectors"][name]["fer_margin"] = FER_MARGIN[name]
        print(name, json.dumps(result["detectors"][name]), flush=True)
    record("faces_crop_accuracy", result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=25, help="scenes per (face, scene) cell")
    parser.add_argument("--n-full", type=int, default=8, help="of which detected without the 640 px bound (1280 px only)")
    parser.add_argument("--score", action="store_true", help="score throughput with faces vs without vs fer instead")
    parser.add_argument("--score-scenes", type=int, default=6, help="--score: scenes per (face, scene) cell")
    parser.add_argument("--passes-none", type=int, default=3, help="--score: decode passes without faces (median)")
    parser.add_argument("--score-detectors", default="blazeface,mtcnn", help="--score: detectors, comma-separated")
    parser.add_argument("--crop-accuracy", metavar="RUN", help="a FER2013-trained run: its accuracy on each "
                        "detector's crops of the scenes instead")
    args = parser.parse_args()
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    single_thread()
    if args.score:
        score_bench(args)
        return
    if args.crop_accuracy:
        crop_accuracy(args)
        return
    from emotion_ray.faces import BlazeFaceDetector, Face, crop_box, get_detector

    counts = photo_counts()
    photos = {name: rgb_of(PHOTOS / name) for name in counts}
    with_face, empty = scenes(args.n)
    result: dict = {"n_per_cell": args.n, "n_full": args.n_full, "match_iou": MATCH_IOU, "photos": {}, "scenes": {}, "speed": {},
                    "margin_iou": {}, "load": {}}
    for name in DETECTORS:
        if name != "blazeface_one_pass":  # the same process cost as blazeface
            result["load"][name] = load_cost(name)
        for max_side in (640, UNBOUNDED):
            det = (BlazeFaceDetector(max_side, tiles="never") if name == "blazeface_one_pass"
                   else get_detector(name, max_side=max_side))
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
            if max_side == 640:
                smooth = smooth_scenes()
                table["empty smooth"] = {"n": len(smooth), "found": 0, "false": sum(len(det.detect(im)) for im in smooth)}
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
