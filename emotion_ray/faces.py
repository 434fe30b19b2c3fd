"""Face detection and face crops for photos of people: NumPy + detector libraries, no Ray.

Everything here works on decoded images as `emotion_ray.images` produces them: (H, W, 3)
uint8 RGB arrays, top-left origin, EXIF rotation already applied. It is meant to run inside a
Ray Data decode task: `get_detector` caches one detector per process (weights load once per
worker, not per batch), and nothing imports Ray or, until the MTCNN detector is first asked
for, TensorFlow.

    det = get_detector("haar")                      # or "mtcnn"
    faces = select_faces(det.detect(rgb), "largest")
    crops = [crop_face(rgb, f, 48) for f in faces]  # (48, 48, 3) uint8 each

Detectors (names for `get_detector`):
- ``"haar"``: OpenCV's frontal-face Haar cascade (`haarcascade_frontalface_default.xml`,
  shipped in `cv2.data` of opencv-python(-headless) < 5), the boosted cascade of Viola & Jones,
  "Rapid object detection using a boosted cascade of simple features", CVPR 2001, with Lienhart
  & Maydt's extended feature set (ICIP 2002). Frontal, roughly upright faces only. It has no
  calibrated confidence; `Face.score` is n / (n + 10), n being the number of overlapping raw
  windows OpenCV merged into the box (its `numDetections`). A box needs n > 5 to be reported,
  so scores start at ~0.35; true faces on the photos here score 0.77-0.93, false boxes
  0.35-0.4. It ranks boxes, it is not a probability.
- ``"mtcnn"``: the multi-task cascaded CNN of Zhang, Zhang, Li & Qiao, "Joint face detection
  and alignment using multitask cascaded convolutional networks", IEEE Signal Processing
  Letters 23(10), 2016, as packaged by the `mtcnn` PyPI package (TensorFlow; weights inside
  its wheel). All three stages (P-, R-, O-Net) run; `Face.score` is O-Net's face probability
  in [0, 1] (the package reports boxes above 0.8). It imports TensorFlow, which costs ~4 s
  and ~0.75 GB per process the first time; set TF_USE_LEGACY_KERAS=1 before that, as the
  rest of this project does (the package works with tf-keras 2.21).

The default is MTCNN: on the face photos and on FER2013 faces pasted into scenes it finds more
faces (recall 1.0 vs 0.88 on the photos, 0.85 vs 0.65 on the scenes) with a tenth of Haar's
false boxes, at about Haar's cost per image on textured scenes (bench/RESULTS.md, "Face
detection"). Haar is the light option: no TensorFlow, ~65 MiB and <1 s to load.

Large images are detected on a downscaled copy whose longest side is `max_side` pixels
(default `DEFAULT_MAX_SIDE`, 640), and boxes are mapped back to the pixels of the image given.
A face is found only if it is at least ~24 px (Haar's window; MTCNN's `min_face_size` is 20)
in that copy, i.e. at least 24 * longest_side / 640 px in the original (48 px in a 1280 px
photo, 96 px in a 2560 px one). Measured on 1280 px scenes: detecting at full size costs 4-5x
the CPU; for MTCNN it raised recall of 48 px faces from 0.8 to 1.0 (8 scenes) and changed
little else; for Haar it raised recall but brought 2-4 false boxes per image.

Crops (`crop_face`) default to no margin: the square on the detector box's longer side is
already how FER2013 frames a face (mean IoU with the pasted FER square: Haar 0.80, MTCNN 0.75
at margin 0; 0.59 and 0.51 at 0.2), so a model trained on FER-style crops sees the same framing.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

DETECTORS = ("haar", "mtcnn")
DEFAULT_DETECTOR = "mtcnn"  # chosen from bench/faces.py's numbers (bench/RESULTS.md, "Face detection")
DEFAULT_MAX_SIDE = 640
DEFAULT_MARGIN = 0.0  # FER2013-like framing (module docstring)
DEFAULT_MIN_FACE_SIZE = 0  # pixels of the full image; 0: only the detector's own lower bound
DEFAULT_MIN_SCORE = 0.0  # 0: only the detector's own threshold
MODES = ("largest", "all")
Mode = Literal["largest", "all"]

# Haar settings: OpenCV's tutorial values. minNeighbors 5 rather than 3 halves the false boxes
# on the face photos here at no loss of true faces (bench/RESULTS.md).
_HAAR_FILE = "haarcascade_frontalface_default.xml"
_HAAR_SCALE_FACTOR = 1.1
_HAAR_MIN_NEIGHBORS = 5
_HAAR_MIN_SIZE = 24  # the cascade's own window
_HAAR_SCORE_HALF = 10.0  # score = n / (n + this)
_MTCNN_MIN_FACE = 20  # the package's default


@dataclass(frozen=True)
class Face:
    """One detected face: a box in pixels of the image given to `detect`, top-left origin.

    `x`, `y`: top-left corner; `w`, `h`: width and height (>= 1); the box covers columns
    x .. x+w-1 and rows y .. y+h-1, always inside the image. `score`: the detector's
    confidence in [0, 1], higher is surer; see the module docstring for what it means per
    detector (MTCNN: a probability; Haar: a rank from the vote count).
    """

    x: int
    y: int
    w: int
    h: int
    score: float

    @property
    def area(self) -> int:
        return self.w * self.h

    def iou(self, other: "Face") -> float:
        """Intersection over union of the two boxes, in [0, 1]."""
        ix = max(0, min(self.x + self.w, other.x + other.w) - max(self.x, other.x))
        iy = max(0, min(self.y + self.h, other.y + other.h) - max(self.y, other.y))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


def as_rgb(image: np.ndarray) -> np.ndarray:
    """`image` as an (H, W, 3) uint8 RGB array; grey (H, W) or (H, W, 1) is replicated, an
    alpha channel (H, W, 4) dropped. Raises ValueError for any other shape or a non-uint8 dtype
    (a caller's bug, not a property of a photo)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        return image[:, :, :3]
    return image


class FaceDetector:
    """Finds faces in an RGB image. Get one with `get_detector(name)`; do not build one per image.

    One instance is not meant to be used from several threads at once (Ray tasks and actors
    run one call at a time per process unless told otherwise).
    """

    name: str = ""
    min_side: int = 1  # the smallest detection copy the backend can look at, in pixels

    def __init__(self, max_side: int = DEFAULT_MAX_SIDE) -> None:
        if max_side < self.min_side:
            raise ValueError(f"max_side must be >= {self.min_side}, got {max_side}")
        self.max_side = int(max_side)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in `rgb`, an (H, W, 3) uint8 RGB image (grey (H, W) is accepted too), highest
        score first, boxes in pixels of `rgb`.

        Images whose longest side exceeds `max_side` are detected on a copy downscaled to it
        (area interpolation). Never raises on image content or size: an empty, 1x1, very thin,
        flat or grey image gives [] or faces; an error inside the detector library is logged
        and gives []. Raises ValueError only for a non-image array (see `as_rgb`).
        """
        rgb = as_rgb(rgb)
        height, width = rgb.shape[:2]
        if height == 0 or width == 0:
            return []
        small = rgb
        if max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            import cv2

            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        sh, sw = small.shape[:2]
        if min(sh, sw) < self.min_side:
            return []
        try:
            boxes = self._detect(np.ascontiguousarray(small))
        except Exception:  # noqa: BLE001 - one odd image must not end a batch job
            log.warning("%s face detection failed on a %dx%d image; treating it as no face",
                        self.name, width, height, exc_info=True)
            return []
        fx, fy = width / sw, height / sh
        faces = []
        for x, y, w, h, score in boxes:
            x0 = min(max(int(math.floor(x * fx)), 0), width - 1)
            y0 = min(max(int(math.floor(y * fy)), 0), height - 1)
            x1 = min(max(int(math.ceil((x + w) * fx)), x0 + 1), width)
            y1 = min(max(int(math.ceil((y + h) * fy)), y0 + 1), height)
            faces.append(Face(x0, y0, x1 - x0, y1 - y0, float(min(max(score, 0.0), 1.0))))
        faces.sort(key=lambda f: (-f.score, f.x, f.y))
        return faces

    def _detect(self, rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        """(x, y, w, h, score) boxes in pixels of `rgb` (already bounded by max_side)."""
        raise NotImplementedError


class HaarDetector(FaceDetector):
    """OpenCV's frontal-face Haar cascade (Viola & Jones 2001; see the module docstring)."""

    name = "haar"
    min_side = _HAAR_MIN_SIZE

    def __init__(self, max_side: int = DEFAULT_MAX_SIDE) -> None:
        super().__init__(max_side)
        self._cascade = _haar_cascade()

    def _detect(self, rgb):
        import cv2

        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        rects, votes = self._cascade.detectMultiScale2(
            grey, scaleFactor=_HAAR_SCALE_FACTOR, minNeighbors=_HAAR_MIN_NEIGHBORS,
            minSize=(_HAAR_MIN_SIZE, _HAAR_MIN_SIZE))
        return [(x, y, w, h, n / (n + _HAAR_SCORE_HALF)) for (x, y, w, h), n in zip(rects, votes)]


class MTCNNDetector(FaceDetector):
    """MTCNN (Zhang et al. 2016) from the `mtcnn` package, all three stages, on the CPU."""

    name = "mtcnn"
    min_side = _MTCNN_MIN_FACE  # no face of the minimum size fits in a smaller image

    def __init__(self, max_side: int = DEFAULT_MAX_SIDE) -> None:
        super().__init__(max_side)
        self._model = _mtcnn_model()

    def _detect(self, rgb):
        found = self._model.detect_faces(rgb, min_face_size=_MTCNN_MIN_FACE)
        return [(*f["box"], f["confidence"]) for f in found]


@functools.lru_cache(maxsize=None)
def _haar_cascade():
    import cv2

    path = cv2.data.haarcascades + _HAAR_FILE
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV could not load its Haar cascade from {path}")
    return cascade


@functools.lru_cache(maxsize=None)
def _mtcnn_model():
    from mtcnn import MTCNN  # imports TensorFlow

    return MTCNN(stages="face_and_landmarks_detection", device="CPU:0")


@functools.lru_cache(maxsize=None)
def use_one_thread(name: str) -> None:
    """Make detector `name`'s library use one thread in this process (a one-CPU Ray task):
    OpenCV and TensorFlow otherwise start a thread per core in every decode worker. Call before
    the first detection; once per process."""
    import cv2

    cv2.setNumThreads(1)
    if name == "mtcnn":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already ran in this process: its pools are fixed
            pass


@functools.lru_cache(maxsize=None)
def get_detector(name: str = DEFAULT_DETECTOR, *, max_side: int = DEFAULT_MAX_SIDE) -> FaceDetector:
    """The process's detector called `name` ("haar" or "mtcnn"), built on first use.

    Cached per (name, max_side): weights load once per process. Raises ValueError for an
    unknown name, ImportError when the detector's library is missing, RuntimeError when its
    weights cannot be loaded. Thread counts are the libraries' (all cores by default); a
    one-CPU worker should call `cv2.setNumThreads(1)` and TensorFlow's
    `tf.config.threading.set_*_op_parallelism_threads(1)` before the first detection.
    """
    if name == "haar":
        return HaarDetector(max_side)
    if name == "mtcnn":
        return MTCNNDetector(max_side)
    raise ValueError(f"unknown face detector {name!r}; choose one of {', '.join(DETECTORS)}")


def select_faces(faces: list[Face], mode: Mode = "largest", *, min_size: int = DEFAULT_MIN_FACE_SIZE,
                 min_score: float = DEFAULT_MIN_SCORE) -> list[Face]:
    """The faces a caller should use, after dropping those with min(w, h) < `min_size` pixels
    or `score` < `min_score`.

    mode "largest": a list of at most one face, the one with the largest box area (ties: the
    higher score, then the leftmost, then the topmost). mode "all": every remaining face,
    ordered left to right by `x`, then top to bottom by `y`, then by falling score, so the
    same detections always give the same order. [] when no face is left. Raises ValueError for
    an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown face mode {mode!r}; choose one of {', '.join(MODES)}")
    kept = [f for f in faces if min(f.w, f.h) >= min_size and f.score >= min_score]
    if mode == "largest":
        return [min(kept, key=lambda f: (-f.area, -f.score, f.x, f.y))] if kept else []
    return sorted(kept, key=lambda f: (f.x, f.y, -f.score))


def crop_box(face: Face, margin: float = DEFAULT_MARGIN) -> tuple[int, int, int]:
    """The square `crop_face` cuts, as (left, top, side) in image pixels (may reach outside it).

    Its centre is the box's centre; its side is max(w, h) * (1 + 2 * margin), i.e. `margin`
    is the fraction of the box's longer side added on every side. Raises ValueError for a
    negative margin.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    side = max(1, round(max(face.w, face.h) * (1 + 2 * margin)))
    left = round(face.x + face.w / 2 - side / 2)
    top = round(face.y + face.h / 2 - side / 2)
    return left, top, side


def crop_face(rgb: np.ndarray, face: Face, size: int, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """A (size, size, 3) uint8 crop of `face` from `rgb`, ready for the model.

    The square is `crop_box(face, margin)`: the face stays centred and undistorted. Where the
    square reaches outside the image the crop is padded with black (0) rather than shifted or
    squashed. Resized with Pillow's bilinear filter (antialiased when shrinking), as
    `emotion_ray.images` resizes whole images. `rgb` as for `FaceDetector.detect` (grey is
    replicated). Raises ValueError for size < 1, a negative margin or a non-image array.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    rgb = as_rgb(rgb)
    height, width = rgb.shape[:2]
    left, top, side = crop_box(face, margin)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + side, width), min(top + side, height)
    if x0 == left and y0 == top and x1 == left + side and y1 == top + side:
        square = rgb[y0:y1, x0:x1]
    else:
        square = np.zeros((side, side, 3), dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            square[y0 - top : y1 - top, x0 - left : x1 - left] = rgb[y0:y1, x0:x1]
    if side == size:
        return np.ascontiguousarray(square)
    resized = Image.fromarray(np.ascontiguousarray(square)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)
