"""report.html: it parses, holds every section, its pictures are real PNGs, and its mistakes are
the most confident wrong answers, in order. `check_report` is shared with tests/test_train.py,
which checks the page of a real training run."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from emotion_ray.calibration import calibration_report
from emotion_ray.evaluate import _plots
from emotion_ray.explain import WorstMistakes
from emotion_ray.metrics import classification_metrics, confusion_matrix
from emotion_ray.report import FIGURES, REPORT_FILE, cam_overlay, render_report, write_report

pytestmark = pytest.mark.fast

CLASSES = ["angry", "happy", "sad"]
SECTIONS = ("Headline", "Dataset", "Curves, confusion and calibration", "Most confident mistakes (test)",
            "Where the model looked (Grad-CAM)")


class _Page(HTMLParser):
    """The parts of a report page the tests look at: section titles, images, mistake cards."""

    def __init__(self):
        super().__init__()
        self.h2, self.images, self.mistakes, self.cam_rows = [], [], [], []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "h2":
            self._in_h2 = True
            self.h2.append("")
        elif tag == "img":
            self.images.append((a.get("alt"), a["src"]))
        elif tag == "div" and "data-confidence" in a:
            self.mistakes.append(a)
        elif tag == "div" and "data-cam-row" in a:
            self.cam_rows.append(int(a["data-cam-row"]))

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.h2[-1] += data


def check_report(text: str, classes: list[str], cams: int) -> _Page:
    """Assert what every report holds; returns the parsed page. `cams`: the Grad-CAM cards expected."""
    from PIL import Image

    page = _Page()
    page.feed(text)
    page.close()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert list(page.h2) == list(SECTIONS[: 4 + bool(cams)]), page.h2
    for alt, src in page.images:
        assert src.startswith("data:image/png;base64,"), alt  # self-contained: nothing to fetch
        picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert picture.format == "PNG", alt
        if alt in dict(FIGURES):  # the run's figures: big enough to read
            assert picture.width >= 300 and picture.height >= 250, (alt, picture.size)
        else:  # a picture or its Grad-CAM overlay: not a speck
            assert min(picture.size) >= 32, (alt, picture.size)
    assert [alt for alt, _ in page.images][:4] == [name for name, _ in FIGURES]
    confidences = [float(m["data-confidence"]) for m in page.mistakes]
    assert confidences == sorted(confidences, reverse=True)
    for m in page.mistakes:
        assert m["data-true"] in classes and m["data-predicted"] in classes
        assert m["data-true"] != m["data-predicted"]  # a mistake
        assert 1 / len(classes) <= float(m["data-confidence"]) <= 1
    assert page.cam_rows == [int(m["data-row"]) for m in page.mistakes][:cams]
    # A card per mistake and, per Grad-CAM card, the predicted class's map and the true one's.
    assert len(page.images) == 4 + len(page.mistakes) + 2 * cams
    return page


def _blob(size: int, cy: float, cx: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A run's metrics, manifest and mistakes (60 random test rows, 8 mistakes kept, 2 with
    maps) and its figures drawn by evaluate._plots into a folder, once for the module."""
    folder = tmp_path_factory.mktemp("run")
    return (folder, *_synthetic_run(folder))


def _synthetic_run(tmp_path, rows=60, cams=2):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, rows)
    probs = rng.dirichlet(np.ones(3) * 0.7, rows).astype(np.float32)
    metrics = classification_metrics(confusion_matrix(labels, probs.argmax(1), 3), CLASSES)
    metrics.update(calibration_report(probs, labels, probs, labels), best_epoch=3, epochs_run=5)
    history = [{"epoch": e, "loss": 1 / e, "val_loss": 1.1 / e, "categorical_accuracy": 0.5 + e / 20,
                "val_categorical_accuracy": 0.45 + e / 20} for e in range(1, 6)]
    _plots(str(tmp_path), history, metrics)
    worst = WorstMistakes(8)
    images = rng.integers(0, 256, (rows, 48, 48, 3), np.uint8)
    for start in range(0, rows, 16):
        worst.add(images[start:start + 16], probs[start:start + 16], labels[start:start + 16],
                  [f"test/{CLASSES[y]}/img_{start + i}.jpg" for i, y in enumerate(labels[start:start + 16])])
    examples = worst.examples()
    for e in examples[:cams]:
        e["cam_predicted"], e["cam_true"] = _blob(48, 0.3, 0.3), _blob(48, 0.7, 0.6)
    manifest = {"classes": CLASSES, "counts": {s: {c: n for c in CLASSES} for s, n in
                                               (("train", 70), ("val", 15), ("test", 20))}}
    return metrics, manifest, examples, probs, labels


def test_report_renders_every_section_with_real_pngs_and_ordered_mistakes(synthetic):
    tmp_path, metrics, manifest, examples, probs, labels = synthetic
    path = write_report(str(tmp_path), "demo <run>", metrics, manifest, examples, "seed_cnn at 48x48 px")
    assert path == str(tmp_path / REPORT_FILE)
    text = (tmp_path / REPORT_FILE).read_text(encoding="utf-8")
    page = check_report(text, CLASSES, cams=2)
    assert "demo &lt;run&gt;" in text  # escaped, not markup
    # The 8 shown are the 8 most confident wrong answers of all 60 rows.
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    expected = wrong[np.argsort(-probs[wrong].max(1), kind="stable")][:8]
    assert [int(m["data-row"]) for m in page.mistakes] == expected.tolist()
    assert [m["data-path"] for m in page.mistakes][0] == f"test/{CLASSES[labels[expected[0]]]}/img_{expected[0]}.jpg"
    # Headline numbers as metrics.json holds them.
    assert f"{metrics['categorical_accuracy']:.3f}" in text and f"{metrics['macro_f1']:.3f}" in text
    assert f"{metrics['temperature']:.2f}" in text and "3 of 5" in text
    # Why T is what it is (metrics.json's temperature_reason), and a model at chance said as such.
    assert f"Calibration: {metrics['temperature_reason']}." in text and "Not learned" not in text
    from emotion_ray.report import render_report

    at_chance = render_report("r", {**metrics, "learned": False, "best_val_loss": 1.09, "chance_val_loss": 1.099,
                                    "calibration": {**metrics["calibration"], "warnings": ["T = 0.54 raised the test "
                                                                                           "ECE"]}}, manifest, [], {})
    assert "Not learned: the best val_loss 1.090 stayed near chance level 1.099" in at_chance
    assert "Warning: T = 0.54 raised the test ECE." in at_chance


def test_a_run_without_mistakes_or_maps_still_renders(synthetic):
    tmp_path, metrics, manifest, _, _, _ = synthetic
    text = (Path(write_report(str(tmp_path), "r", metrics, manifest, []))).read_text(encoding="utf-8")
    page = check_report(text, CLASSES, cams=0)
    assert page.mistakes == [] and "No mistakes on the test split." in text
    # Without the run's figures (not drawn), the page still renders, with the numbers alone.
    assert "Headline" in render_report("r", metrics, manifest, [], {})


def test_cam_overlay_keeps_the_picture_size_and_marks_the_hot_region():
    image = np.full((48, 48, 3), 128, np.uint8)
    cam = np.zeros((48, 48), np.float32)
    cam[:, :24] = 1.0
    out = cam_overlay(image, cam)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    # jet: red where the map is 1, blue where it is 0.
    assert out[:, :24, 0].mean() > out[:, :24, 2].mean() + 50
    assert out[:, 24:, 2].mean() > out[:, 24:, 0].mean() + 50
    with pytest.raises(ValueError, match="differ in size"):
        cam_overlay(image, cam[:10])
