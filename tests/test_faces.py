"""Face detection and crops (emotion_ray/faces.py): no Ray, real photos and FER2013 faces from shared/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.faces import photo_counts, rgb_of
from emotion_ray.faces import (DETECTORS, Face, FaceDetector, as_rgb, crop_box, crop_face, get_detector,
                               select_faces)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTOS = SHARED / "face_photos"
FER_TEST = SHARED / "fer2013" / "test"
needs_photos = pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"face photos not found at {PHOTOS} (shared data absent)")
needs_fer = pytest.mark.skipif(not FER_TEST.is_dir(), reason=f"FER2013 test faces not found at {FER_TEST} (shared data absent)")

# Per detector, at the default 640 px bound: the most that the detected count may differ from
# the README's count, summed over the photos (and on any one photo), and the least recall.
# Measured (bench/RESULTS.md): haar misses the child in obama_and_biden and the cut face in
# obama_partial_face and adds one box in kit_with_rose; mtcnn finds every face plus two boxes.
PHOTO_TOLERANCE = {"haar": (3, 1, 0.8), "mtcnn": (3, 1, 0.9)}


def smooth_background(side: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blobs = Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8))
    return np.asarray(blobs.resize((side, side), Image.BILINEAR)).copy()


def paste_fer(scene: np.ndarray, name: str, box: tuple[int, int, int]) -> Face:
    """Paste FER2013 test face `name` resized to side box[2] at (box[0], box[1]); its Face."""
    x, y, side = box
    face = Image.open(FER_TEST / name).convert("L").resize((side, side), Image.BILINEAR)
    scene[y : y + side, x : x + side] = np.asarray(face)
    return Face(x, y, side, side, 1.0)


@pytest.fixture(scope="module", params=DETECTORS)
def detector(request) -> FaceDetector:
    return get_detector(request.param)


def test_detectors_are_cached_per_process():
    assert get_detector("haar") is get_detector("haar")
    assert get_detector("haar", max_side=320) is not get_detector("haar")
    with pytest.raises(ValueError, match="unknown face detector"):
        get_detector("dlib")


@needs_photos
def test_face_counts_on_photos_within_tolerance(detector):
    total_off, worst_off, min_recall = PHOTO_TOLERANCE[detector.name]
    counts = photo_counts()
    found = {}
    for name in counts:
        rgb = rgb_of(PHOTOS / name)
        faces = detector.detect(rgb)
        for f in faces:
            assert 0 <= f.x and 0 <= f.y and f.w >= 1 and f.h >= 1, f
            assert f.x + f.w <= rgb.shape[1] and f.y + f.h <= rgb.shape[0], f
            assert 0.0 <= f.score <= 1.0
        assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
        found[name] = len(faces)
    off = {name: found[name] - counts[name] for name in counts}
    recall = sum(min(found[n], counts[n]) for n in counts) / sum(counts.values())
    assert sum(abs(v) for v in off.values()) <= total_off, off
    assert max(abs(v) for v in off.values()) <= worst_off, off
    assert recall >= min_recall, (recall, off)


@needs_photos
def test_boxes_map_back_to_the_full_image(detector):
    """An image over the bound is detected on a downscaled copy; boxes come back in its pixels."""
    rgb = rgb_of(PHOTOS / "obama_small.jpg")  # 320x240: under the bound, detected as is
    big = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * 4, rgb.shape[0] * 4), Image.BILINEAR))
    small_faces, big_faces = detector.detect(rgb), detector.detect(big)
    assert len(small_faces) == len(big_faces) == 1
    s, b = small_faces[0], big_faces[0]
    scaled = Face(s.x * 4, s.y * 4, s.w * 4, s.h * 4, s.score)
    assert b.iou(scaled) > 0.7, (b, scaled)


@needs_photos
def test_grey_photo_is_detected(detector):
    grey = np.asarray(Image.open(PHOTOS / "obama_small.jpg").convert("L"))
    assert len(detector.detect(grey)) == 1
    assert len(detector.detect(np.repeat(grey[:, :, None], 3, axis=2))) == 1


@pytest.mark.parametrize("shape", [(1, 1, 3), (20000, 20, 3), (20, 20000, 3), (0, 5, 3), (5, 0, 3), (23, 23, 3),
                                   (480, 640, 3), (480, 640), (480, 640, 1), (480, 640, 4)])
@pytest.mark.parametrize("fill", [0, 128, 255])
def test_odd_images_never_raise(detector, shape, fill):
    assert detector.detect(np.full(shape, fill, dtype=np.uint8)) == []


def test_random_noise_does_not_raise(detector):
    rng = np.random.default_rng(0)
    faces = detector.detect(rng.integers(0, 256, (700, 900, 3), dtype=np.uint8))
    assert isinstance(faces, list)


def test_non_image_arrays_are_a_value_error(detector):
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        detector.detect(np.zeros((10, 10, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        detector.detect(np.zeros(10, dtype=np.uint8))


@needs_fer
def test_largest_face_crop_holds_the_labelled_face(detector):
    """Two FER2013 faces pasted into a 640 px scene at known boxes: 'largest' picks the 160 px
    one, its crop covers it, and 'all' gives both, left to right."""
    scene = smooth_background(640)
    big = paste_fer(scene, "happy/PrivateTest_10077120.jpg", (300, 200, 160))
    small = paste_fer(scene, "happy/PrivateTest_1140198.jpg", (60, 400, 64))
    faces = detector.detect(scene)
    largest = select_faces(faces, "largest")
    assert len(largest) == 1 and largest[0].iou(big) > 0.6, (largest, big)
    left, top, side = crop_box(largest[0])
    assert Face(left, top, side, side, 1.0).iou(big) > 0.6
    crop = crop_face(scene, largest[0], 48)
    assert crop.shape == (48, 48, 3) and crop.dtype == np.uint8
    # The crop is the pasted face (grey replicated), up to the detector's framing.
    truth = np.asarray(Image.fromarray(scene[big.y : big.y + big.h, big.x : big.x + big.w]).resize((48, 48)))
    corr = np.corrcoef(crop[:, :, 0].ravel().astype(float), truth.ravel().astype(float))[0, 1]
    assert corr > 0.5, corr
    everyone = select_faces(faces, "all")
    assert everyone[0].iou(small) > 0.5, everyone  # leftmost first
    assert any(f.iou(big) > 0.6 for f in everyone[1:]), everyone


def test_select_faces_modes_and_filters():
    a = Face(50, 10, 40, 40, 0.9)
    b = Face(10, 80, 60, 60, 0.7)
    c = Face(10, 5, 60, 60, 0.95)  # same area as b, higher score
    d = Face(200, 0, 12, 12, 0.99)
    faces = [a, b, c, d]
    assert select_faces(faces, "largest") == [c]
    assert select_faces(faces, "all") == [c, b, a, d]
    assert select_faces(faces, "all", min_size=20) == [c, b, a]
    assert select_faces(faces, "largest", min_score=0.96) == [d]
    assert select_faces(faces, "largest", min_score=1.0) == []
    assert select_faces([], "largest") == [] and select_faces([], "all") == []
    with pytest.raises(ValueError, match="unknown face mode"):
        select_faces(faces, "first")


def test_crop_box_is_a_square_centred_on_the_face():
    face = Face(100, 50, 40, 60, 1.0)
    assert crop_box(face, 0.0) == (90, 50, 60)
    assert crop_box(face, 0.25) == (75, 35, 90)  # 60 * (1 + 2 * 0.25)
    with pytest.raises(ValueError):
        crop_box(face, -0.1)


def test_crop_inside_the_image_is_the_exact_pixels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)
    face = Face(30, 20, 40, 40, 1.0)
    np.testing.assert_array_equal(crop_face(rgb, face, 40, margin=0.0), rgb[20:60, 30:70])
    resized = crop_face(rgb, face, 16, margin=0.0)
    expected = np.asarray(Image.fromarray(rgb[20:60, 30:70]).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resized, expected)


def test_crop_at_the_border_is_padded_black():
    rgb = np.full((50, 80, 3), 200, dtype=np.uint8)
    face = Face(0, 0, 10, 10, 1.0)  # margin 0.5: a 20 px square from (-5, -5)
    crop = crop_face(rgb, face, 20, margin=0.5)
    assert crop.shape == (20, 20, 3) and crop.dtype == np.uint8
    assert (crop[:5] == 0).all() and (crop[:, :5] == 0).all()
    assert (crop[5:, 5:] == 200).all()
    # A face box filling a thin image: the square overhangs both sides.
    strip = np.full((10, 300, 3), 90, dtype=np.uint8)
    crop = crop_face(strip, Face(100, 0, 40, 10, 0.5), 40, margin=0.0)
    assert (crop[:15] == 0).all() and (crop[15:25] == 90).all() and (crop[25:] == 0).all()


@pytest.mark.parametrize("size", [1, 7, 48, 224])
def test_crop_shapes_grey_and_tiny_inputs(size):
    for rgb in (np.zeros((1, 1, 3), np.uint8), np.full((30, 40), 77, np.uint8), np.zeros((20000, 20, 3), np.uint8)):
        crop = crop_face(rgb, Face(0, 0, 1, 1, 1.0), size)
        assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    with pytest.raises(ValueError):
        crop_face(np.zeros((4, 4, 3), np.uint8), Face(0, 0, 1, 1, 1.0), 0)


def test_as_rgb_and_iou():
    assert as_rgb(np.zeros((2, 3), np.uint8)).shape == (2, 3, 3)
    assert as_rgb(np.zeros((2, 3, 4), np.uint8)).shape == (2, 3, 3)
    assert Face(0, 0, 10, 10, 1).iou(Face(0, 0, 10, 10, 1)) == 1.0
    assert Face(0, 0, 10, 10, 1).iou(Face(10, 0, 10, 10, 1)) == 0.0
    assert Face(0, 0, 10, 10, 1).iou(Face(5, 0, 10, 10, 1)) == pytest.approx(50 / 150)
