"""Deterministic synthetic faces for the demo and the tests.

The expression is carried only by the mouth curve, the eyebrow angle and the eye shape:
- happy: mouth curves up, brows level and high, eyes round
- sad:   mouth curves down, brows slope down towards the temples, eyes narrowed
- angry: mouth flat and tight, brows slope down towards the nose, eyes narrowed
Everything else varies at random (face shape and size, skin tone, position, rotation,
background, noise, JPEG quality, some PNG and grayscale files), so a model has to learn
expressions, not colours or layouts.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEMO_CLASSES = ("angry", "happy", "sad")


def draw_face(label: str, rng: np.random.Generator, canvas: int = 256) -> Image.Image:
    """Draw one face with the given expression; all nuisance factors come from `rng`."""
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(img)
    # Background clutter so position and colour of the scene carry no label information.
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.integers(0, canvas, 2)
        x1, y1 = x0 + rng.integers(10, 80), y0 + rng.integers(10, 80)
        draw.rectangle((int(x0), int(y0), int(x1), int(y1)), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))

    scale = canvas / 256
    cx = canvas / 2 + rng.uniform(-25, 25) * scale
    cy = canvas / 2 + rng.uniform(-25, 25) * scale
    rx = rng.uniform(70, 100) * scale
    ry = rx * rng.uniform(1.0, 1.3)
    skin = tuple(int(v) for v in (np.array([rng.uniform(90, 255)] * 3) * np.array([1.0, 0.8, 0.65])).clip(0, 255))
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=skin, outline=(30, 20, 10), width=max(1, int(2 * scale)))

    ink = (int(rng.integers(0, 60)),) * 3
    line = max(2, int(rng.uniform(6, 9) * scale))
    eye_dx, eye_y = rx * 0.4, cy - ry * 0.25
    eye_w = rx * rng.uniform(0.18, 0.24)
    eye_h = eye_w * (1.0 if label == "happy" else 0.35)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        draw.ellipse((ex - eye_w, eye_y - eye_h, ex + eye_w, eye_y + eye_h), fill=(255, 255, 255), outline=ink, width=line // 2 + 1)
        draw.ellipse((ex - eye_h * 0.6, eye_y - eye_h * 0.6, ex + eye_h * 0.6, eye_y + eye_h * 0.6), fill=ink)
        # Brows: level (happy), inner end low (angry), outer end low (sad).
        by = eye_y - eye_w * 1.8
        slope = {"happy": 0.0, "angry": 0.9, "sad": -0.9}[label] * eye_w
        inner, outer = ex - side * eye_w * 1.2, ex + side * eye_w * 1.2
        draw.line((inner, by + slope, outer, by - slope), fill=ink, width=line)

    mouth_w = rx * rng.uniform(0.55, 0.7)
    my = cy + ry * 0.45
    curve = {"happy": 1.0, "sad": -1.0, "angry": 0.0}[label] * mouth_w * rng.uniform(0.6, 0.8)
    points = []
    for i in range(21):
        t = -1 + i / 10
        points.append((cx + t * mouth_w, my + curve * (1 - t * t) - curve * 0.5))
    draw.line(points, fill=ink, width=line, joint="curve")

    img = img.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR, fillcolor=background)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    noise = rng.normal(0, rng.uniform(0, 12), (canvas, canvas, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def encode_demo_image(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str]:
    """Encode as most photo folders look: mostly JPEG at varied quality, some PNG and grayscale."""
    if rng.random() < 0.15:
        img = img.convert("L")
    buf = io.BytesIO()
    if rng.random() < 0.2:
        img.save(buf, format="PNG")
        return buf.getvalue(), ".png"
    img.save(buf, format="JPEG", quality=int(rng.integers(60, 96)))
    return buf.getvalue(), ".jpg"


def make_demo_dataset(
    out_dir: str | Path,
    per_class: int = 100,
    seed: int = 0,
    canvas: int = 256,
    classes: tuple[str, ...] = DEMO_CLASSES,
) -> dict[str, int]:
    """Write `per_class` faces per class under `out_dir/<label>/`; returns counts per class.

    Deterministic in (`per_class`, `seed`, `canvas`): image i of a class is the same file
    whatever `per_class` is, so a bigger demo set contains the smaller one.
    """
    out = Path(out_dir)
    counts: dict[str, int] = {}
    for class_index, label in enumerate(classes):
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, class_index, i])
            data, ext = encode_demo_image(draw_face(label, rng, canvas), rng)
            (folder / f"{label}_{i:05d}{ext}").write_bytes(data)
        counts[label] = per_class
    return counts

