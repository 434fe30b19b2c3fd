"""`predict --annotate`: each picture with its faces boxed and labelled, so a person can see what was scored."""

from __future__ import annotations

import io
import os
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from emotion_ray import storage
from emotion_ray.config import StorageConfig

COLOURS = {"angry": (220, 40, 40), "happy": (40, 170, 60), "sad": (50, 90, 220)}
OTHER_COLOUR = (230, 160, 20)


def annotate(path: str, records: list[dict[str, Any]], out_path: str, storage_cfg: StorageConfig | None = None) -> str:
    """Draw `records` (inference.as_records rows of one picture) on the displayed picture at
    `path` (as the `path` column names it), as a PNG at `out_path`. A face gets its box and
    "label probability"; a whole-image prediction or an error is written in the top-left
    corner. Returns `out_path`."""
    img = Image.open(io.BytesIO(storage.read_listed(path, storage_cfg)))
    img = ImageOps.exif_transpose(img).convert("RGB")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(12, img.width // 40))
    line = max(2, img.width // 300)
    for record in records:
        text = f"{record['label']} {record['confidence']:.2f}" if record["label"] else f"ERROR {record['error']}"
        colour = COLOURS.get(record["label"], OTHER_COLOUR)
        face = record.get("face")
        if face:
            x, y, w, h = face["box"]
            draw.rectangle([x, y, x + w, y + h], outline=colour, width=line)
            anchor = (x, max(0, y - font.size - 2 * line))
        else:
            anchor = (line, line)
        box = draw.textbbox(anchor, text, font=font)
        draw.rectangle(box, fill=colour)
        draw.text(anchor, text, fill=(255, 255, 255), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    img.save(out_path, format="PNG")
    return out_path
