"""report.html: one self-contained page per training run, for a person to look at.

Pure rendering on the driver (evaluate.export_run calls `write_report`): the figures the run
directory already holds (loss.png, accuracy.png, confusion_matrix.png, reliability.png, drawn
by evaluate._plots) are embedded as they are, beside the headline numbers, the dataset's counts
and the test split's most confident mistakes with their Grad-CAM maps (explain.py, computed in
the evaluation). Every picture is a base64 PNG inside the page, so the one file opens
wherever it is: the run directory, MLflow's artifact view, an S3 console. No TensorFlow or Ray.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any

import numpy as np

REPORT_FILE = "report.html"
# evaluate._plots' figures, in the order the page shows them.
FIGURES = (("loss.png", "Loss per epoch"), ("accuracy.png", "Accuracy per epoch"),
           ("confusion_matrix.png", "Confusion matrix (test)"), ("reliability.png", "Calibration (test)"))
# Small pictures (48 px faces) are drawn at least this wide, pixels kept sharp (CSS), so a face reads.
THUMB_PX = 144
CAM_ALPHA = 0.45  # the heatmap's weight over the picture: the face stays visible under it

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.1em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1em; } td, th { padding: 0.25em 0.7em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
.headline { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 1em 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 1em; min-width: 8em; }
.card .v { font-size: 1.6em; font-weight: 600; } .card .k { color: #666; font-size: 0.85em; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; } figcaption { color: #666; font-size: 0.9em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax({{ thumb + 30 }}px, 1fr)); gap: 1em; }
.mistake { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em; font-size: 0.85em; }
.pix { image-rendering: pixelated; width: {{ thumb }}px; height: {{ thumb }}px; }
.camgrid { grid-template-columns: repeat(auto-fill, minmax({{ 2 * thumb + 40 }}px, 1fr)); }
.cams { display: flex; gap: 0.5em; }
.bar { display: flex; align-items: center; gap: 0.4em; margin: 1px 0; }
.bar span.name { width: 4.5em; } .bar span.track { flex: 1; background: #eee; height: 0.8em; position: relative; }
.bar span.fill { position: absolute; left: 0; top: 0; bottom: 0; background: #9ab; }
.bar span.fill.pred { background: #d55; } .bar span.fill.true { background: #4a4; }
.bar span.num { width: 3em; text-align: right; }
.path { color: #888; word-break: break-all; font-size: 0.85em; }
.note { color: #666; font-size: 0.9em; max-width: 60em; }
</style></head><body>
<h1>{{ title }}</h1>
<p class="sub">{{ subtitle }}</p>

<h2>Headline</h2>
<div class="headline">
{% for key, value in headline %}<div class="card"><div class="v">{{ value }}</div><div class="k">{{ key }}</div></div>
{% endfor %}</div>
{% for note in notes %}<p class="sub note">{{ note }}</p>
{% endfor %}<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>test rows</th></tr>
{% for c, m in per_class %}<tr><td>{{ c }}</td><td>{{ "%.3f"|format(m.precision) }}</td>
<td>{{ "%.3f"|format(m.recall) }}</td><td>{{ "%.3f"|format(m.f1) }}</td><td>{{ m.support }}</td></tr>
{% endfor %}</table>

<h2>Dataset</h2>
<table><tr><th>split</th>{% for c in classes %}<th>{{ c }}</th>{% endfor %}<th>total</th></tr>
{% for split, row, total in counts %}<tr><td>{{ split }}</td>{% for n in row %}<td>{{ n }}</td>{% endfor %}
<td>{{ total }}</td></tr>
{% endfor %}</table>

<h2>Curves, confusion and calibration</h2>
<div class="figs">
{% for name, caption, data in figures %}<figure><img src="data:image/png;base64,{{ data }}" alt="{{ name }}">
<figcaption>{{ caption }} ({{ name }})</figcaption></figure>
{% endfor %}</div>

<h2>Most confident mistakes (test)</h2>
<p class="note">The test pictures the model got wrong with the highest confidence (calibrated, as
<code>score</code> would write it), most confident first: {{ mistakes|length }} of {{ wrong }} mistakes
in {{ test_rows }} test rows. Bars: every class's probability; red the predicted class, green the true one.</p>
{% if mistakes %}<div class="grid">
{% for m in mistakes %}<div class="mistake" data-row="{{ m.row }}" data-path="{{ m.path or '' }}" data-true="{{ m.true }}"
 data-predicted="{{ m.predicted }}" data-confidence="{{ m.confidence }}">
<img class="pix" src="data:image/png;base64,{{ m.image }}" alt="test row {{ m.row }}">
<div><b>true {{ m.true }}</b>, predicted <b>{{ m.predicted }}</b> ({{ "%.0f"|format(100 * m.confidence) }} %)</div>
{% for name, p, kind in m.bars %}<div class="bar"><span class="name">{{ name }}</span><span class="track">
<span class="fill {{ kind }}" style="width: {{ "%.1f"|format(100 * p) }}%"></span></span>
<span class="num">{{ "%.2f"|format(p) }}</span></div>
{% endfor %}<div class="path">row {{ m.row }}{% if m.path %}: {{ m.path }}{% endif %}</div>
</div>
{% endfor %}</div>{% else %}<p>No mistakes on the test split.</p>{% endif %}

{% if cams %}<h2>Where the model looked (Grad-CAM)</h2>
<p class="note">Grad-CAM (Selvaraju et al. 2017): the regions whose features raise a class's score, red
strongest, over the picture, for the {{ cams|length }} most confident mistakes above: on the left the
evidence for the class the model chose, on the right for the true class. A map is as coarse as the
model's last feature map, a few cells a side, smoothed to the picture's size.</p>
<div class="grid camgrid">
{% for m in cams %}<div class="mistake" data-cam-row="{{ m.row }}"><div class="cams">
<figure><img class="pix" src="data:image/png;base64,{{ m.cam_predicted }}" alt="Grad-CAM {{ m.predicted }}">
<figcaption>as {{ m.predicted }} (chosen)</figcaption></figure>
<figure><img class="pix" src="data:image/png;base64,{{ m.cam_true }}" alt="Grad-CAM {{ m.true }}">
<figcaption>as {{ m.true }} (true)</figcaption></figure></div>
<div class="path">row {{ m.row }}</div></div>
{% endfor %}</div>{% endif %}
</body></html>
"""


def png_base64(pixels: np.ndarray) -> str:
    """(H, W, 3) uint8 RGB (or (H, W) grey) -> a PNG, base64 text for a `data:` URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def cam_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = CAM_ALPHA) -> np.ndarray:
    """A Grad-CAM map drawn over its picture: (S, S, 3) uint8 and (S, S) in [0, 1] -> (S, S, 3)
    uint8, the map through matplotlib's `jet` colour map (blue weak, red strong) blended at
    `alpha`. ValueError when the shapes differ."""
    from matplotlib import colormaps

    image, cam = np.asarray(image), np.asarray(cam, dtype=np.float32)
    if image.shape[:2] != cam.shape:
        raise ValueError(f"picture {image.shape} and map {cam.shape} differ in size")
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * image + alpha * heat, 0, 255).astype(np.uint8)


def render_report(run_name: str, metrics: dict[str, Any], manifest: dict[str, Any], mistakes: list[dict[str, Any]],
                  figures: dict[str, bytes], details: str = "") -> str:
    """The report page's HTML.

    metrics: metrics.json's contents (classification_metrics, calibration_report, best_epoch,
    epochs_run); manifest: the dataset's manifest.json (`classes`, `counts` per split and class);
    mistakes: evaluate_checkpoint's `mistakes` (explain.WorstMistakes examples, the first ones
    with `cam_predicted` / `cam_true` maps); figures: PNG bytes by file name (FIGURES; a missing
    one is left out); details: one line under the title (model, image size, workers, ...).
    """
    import jinja2

    classes = manifest["classes"]
    fmt = lambda x, spec=".3f": "n/a" if x is None else format(x, spec)  # noqa: E731
    headline = [("test accuracy", fmt(metrics["categorical_accuracy"])), ("macro-F1", fmt(metrics["macro_f1"])),
                ("ECE before → after", f"{fmt(metrics.get('ece_before'))} → {fmt(metrics.get('ece_after'))}"),
                ("temperature", fmt(metrics.get("temperature"), ".2f")),
                ("best epoch", f"{metrics.get('best_epoch')} of {metrics.get('epochs_run')}"),
                ("test rows", str(metrics["test_rows"]))]
    # What the numbers above do not say on their own: a model at chance, why T is what it is, and
    # a temperature that made held-out ECE worse (the train summary prints the same).
    notes = []
    if metrics.get("learned") is False:
        notes.append(f"Not learned: the best val_loss {fmt(metrics.get('best_val_loss'))} stayed near chance level "
                     f"{fmt(metrics.get('chance_val_loss'))}; train longer or on more pictures.")
    if metrics.get("temperature_reason"):
        notes.append(f"Calibration: {metrics['temperature_reason']}.")
    notes += [f"Warning: {w}." for w in (metrics.get("calibration") or {}).get("warnings", [])]
    counts = [(split, [row.get(c, 0) for c in classes], sum(row.values()))
              for split, row in manifest.get("counts", {}).items()]
    shown, cams = [], []
    for m in mistakes:
        true, predicted = classes[m["true"]], classes[m["predicted"]]
        bars = [(c, p, "pred" if j == m["predicted"] else "true" if j == m["true"] else "")
                for j, (c, p) in enumerate(zip(classes, m["probabilities"]))]
        shown.append({"row": m["row"], "path": m.get("path"), "true": true, "predicted": predicted,
                      "confidence": m["confidence"], "bars": bars, "image": png_base64(_thumbnail(m["image"]))})
        if m.get("cam_predicted") is not None:
            cams.append({"row": m["row"], "true": true, "predicted": predicted,
                         "cam_predicted": png_base64(_thumbnail(cam_overlay(m["image"], m["cam_predicted"]))),
                         "cam_true": png_base64(_thumbnail(cam_overlay(m["image"], m["cam_true"])))})
    cm = np.asarray(metrics["confusion_matrix"]["rows_true_cols_predicted"])
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(
        title=f"Training run {run_name}", subtitle=details, headline=headline, notes=notes,
        per_class=[(c, metrics["per_class"][c]) for c in classes], classes=classes, counts=counts,
        figures=[(name, caption, base64.b64encode(figures[name]).decode("ascii"))
                 for name, caption in FIGURES if name in figures],
        mistakes=shown, cams=cams, wrong=int(cm.sum() - np.trace(cm)), test_rows=metrics["test_rows"],
        thumb=THUMB_PX)


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    """The picture as the page shows it: as it is (CSS scales small ones up, pixels kept sharp);
    pictures larger than the thumbnail are shrunk here, so the page stays small."""
    if pixels.shape[0] <= THUMB_PX:
        return pixels
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR))


def write_report(export_dir: str, run_name: str, metrics: dict[str, Any], manifest: dict[str, Any],
                 mistakes: list[dict[str, Any]], details: str = "") -> str:
    """Render the report from the figures already in `export_dir` (FIGURES) and write it there as
    REPORT_FILE; returns its path. See `render_report` for the arguments."""
    figures = {}
    for name, _ in FIGURES:
        path = os.path.join(export_dir, name)
        if os.path.exists(path):
            with open(path, "rb") as fh:
                figures[name] = fh.read()
    path = os.path.join(export_dir, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(render_report(run_name, metrics, manifest, mistakes, figures, details))
    return path
