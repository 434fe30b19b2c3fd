"""`predict --annotate FOLDER`: each picture with its faces boxed and labelled, so a person can see what was scored.

`Annotations` is the one entry point: entered, it claims FOLDER as every stage claims its output
(outputs.py); `write` then draws the pictures of a predict run into it.

Names: a picture lands at its path relative to the common folder of the run's pictures,
mirrored as folders under FOLDER, its image extension (jpg, jpeg, png, bmp, gif, webp, any case)
replaced by `.annotated.jpg` for a JPEG or `.annotated.png` for any other format:
`predict a/x.jpg b/x.jpg c/x.png --annotate seen` writes `seen/a/x.annotated.jpg`,
`seen/b/x.annotated.jpg` and `seen/c/x.annotated.png`. Pictures of the run that would still
share a name, compared without the extension and case-insensitively (`a/x.jpg` and `a/x.png`;
`x.jpg` and `X.jpg` in S3, which a case-insensitive disk cannot hold apart), each insert the
first 8 hex digits of the SHA-256 of their full location (`seen/a/x.1f0c2d3e.annotated.png`).
Names are text as the `path` column writes them (a byte that is not UTF-8 as `%XX`); S3 objects
mirror as `s3/<bucket>/<key>` and archive members as `<archive name>/<member>` where the run mixes
them with other pictures. The same inputs always give the same names.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from emotion_ray import outputs, storage
from emotion_ray.config import DecodeLimits, StorageConfig
from emotion_ray.errors import ConfigError
from emotion_ray.images import IMAGE_EXTENSIONS, open_image, read_error, to_rgb_array

MARKER = "_emotion_ray_annotations"
OWNER = "predict --annotate"
SUFFIX = ".annotated"
COLOURS = {"angry": (220, 40, 40), "happy": (40, 170, 60), "sad": (50, 90, 220)}
OTHER_COLOUR = (230, 160, 20)
JPEG_QUALITY = 92  # the picture is for a person's eyes: Pillow's default 75 blurs the labels' text
# Pillow's JPEG draft mode shrinks a big picture when its shorter side is at least twice this;
# boxes are in the full picture's pixels, so the picture is opened whole.
_WHOLE = sys.maxsize // 4


class Annotations:
    """FOLDER (local or `s3://`) of `predict --annotate`:

        with Annotations(folder, inputs, storage_cfg, limits, overwrite) as annotations:
            results = inference.predict(cfg)
            for outcome in annotations.write(results): ...

    Entering takes FOLDER's OutputLock (held until exit) and claims it as every stage claims its
    output: ConfigError (nothing read or written) for a FOLDER that overlaps an input (outputs.
    check_apart), is a file, holds anything without our marker `_emotion_ray_annotations`, or
    holds an earlier run's pictures unless `overwrite` (which deletes only the names the marker
    lists, and the folders left empty by that); StageError when another run holds the lock.
    """

    def __init__(self, folder: str, inputs: Sequence[str], storage_cfg: StorageConfig | None = None,
                 limits: DecodeLimits | None = None, overwrite: bool = False):
        self.folder, self.inputs, self.overwrite = folder, list(inputs), overwrite
        self.storage_cfg = storage_cfg or StorageConfig()
        self.limits = limits or DecodeLimits()
        self._lock = outputs.OutputLock(folder, f"predict --annotate {folder}", self.storage_cfg)

    def __enter__(self) -> Annotations:
        # Checked before the lock: taking it creates FOLDER, which must not land in an input.
        outputs.check_apart(self.folder, self.inputs)
        if not storage.is_s3(self.folder) and os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise ConfigError(f"annotate folder {self.folder} is a file: choose an empty or new folder")
        self._lock.acquire()
        try:
            earlier = outputs.claim_folder(self.folder, MARKER, OWNER, self.storage_cfg, inputs=self.inputs)
            if any(n != MARKER and not n.startswith(outputs.LOG_PREFIX) for n in earlier):
                if not self.overwrite:
                    raise ConfigError(f"annotate folder {self.folder} already holds annotated pictures; pass "
                                      "--overwrite to replace them (only the pictures emotion-ray wrote there go)")
                _prune_empty(self.folder, outputs.remove_owned(self.folder, MARKER, self.storage_cfg))
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._lock.release()

    def write(self, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Draw each picture of `records` (inference.as_records rows: path as listed, label,
        confidence, error, and with faces `face` {box: [x, y, w, h] in the displayed picture's
        pixels}) into FOLDER: a face gets its box and "label probability", a whole-picture
        prediction or a row's error goes in the top-left corner.

        Returns per picture, in the order of first appearance: {"path", "annotated": the written
        file's URI or None, "error": None or why it was not drawn, as predict words a row's error
        ("not_an_image: ...", "unreadable: FileNotFoundError: ...")}. A picture that cannot be read
        or drawn is such an outcome, never an exception: the pictures after it are still drawn.
        Raises StageError only when another run took FOLDER's lock over.
        """
        by_path: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            by_path.setdefault(record["path"], []).append(record)
        names = _names(list(by_path))
        taken: dict[str, str] = {}  # casefolded name -> the location drawn there
        outcomes = []
        for path, rows in by_path.items():
            base, location = names[path]
            try:
                body, extension = self._draw(path, rows)
            except _NotDrawn as exc:
                outcomes.append({"path": path, "annotated": None, "error": str(exc)})
                continue
            name = f"{base}{SUFFIX}{extension}"
            if taken.setdefault(name.casefold(), location) != location:
                # Unreachable short of a name crafted to equal another's hashed one; refused, not overwritten.
                outcomes.append({"path": path, "annotated": None, "error": f"name_clash: {name} is another picture's"})
                continue
            self._lock.check()
            # Recorded before it is written: a crash mid-write still leaves it ours to delete.
            outputs.record_written(self.folder, MARKER, [name], self.storage_cfg)
            uri = storage.join(self.folder, *name.split("/"))
            storage.write_bytes_atomic(uri, body, self.storage_cfg)
            outcomes.append({"path": path, "annotated": uri, "error": None})
        return outcomes

    def _draw(self, path: str, rows: list[dict[str, Any]]) -> tuple[bytes, str]:
        """The picture at `path` with `rows` drawn, encoded: (bytes, ".jpg" or ".png"); _NotDrawn
        when it cannot be read or decoded (the reason as decoding words it)."""
        try:
            data = storage.read_listed(path, self.storage_cfg, self.limits.max_file_bytes)
        except Exception as exc:  # noqa: BLE001 - a missing or unreadable file is an outcome, not a crash
            raise _NotDrawn(read_error(exc)) from None
        # The same decode as predict's (EXIF rotation applied, transparency on white): the
        # boxes' pixels are this picture's.
        opened = open_image(data, _WHOLE, max_pixels=self.limits.max_pixels,
                            max_file_bytes=self.limits.max_file_bytes)
        if opened.error:
            raise _NotDrawn(opened.error)
        try:
            return _encode(_drawn(opened.image, rows), opened.image)
        except Exception as exc:  # noqa: BLE001 - one odd picture must not stop the others
            raise _NotDrawn(f"corrupt: {type(exc).__name__}: {exc}") from None


class _NotDrawn(Exception):
    """A picture that cannot be drawn; its message is the outcome's error."""


def _drawn(image: Image.Image, rows: list[dict[str, Any]]) -> Image.Image:
    img = Image.fromarray(to_rgb_array(image))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(12, img.width // 40))
    line = max(2, img.width // 300)
    for record in rows:
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
    return img


def _encode(img: Image.Image, original: Image.Image) -> tuple[bytes, str]:
    """JPEG for a JPEG (MPO: a camera's JPEG with previews), PNG for every other format. No EXIF
    is copied: the pixels are already turned upright, and an Orientation tag would turn them
    again. An RGB picture's colour profile is kept (a phone's wide-gamut colours stay right)."""
    icc = original.info.get("icc_profile") if original.mode == "RGB" else None
    buf = io.BytesIO()
    if original.format in ("JPEG", "MPO"):
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, icc_profile=icc)
        return buf.getvalue(), ".jpg"
    img.save(buf, format="PNG", icc_profile=icc)
    return buf.getvalue(), ".png"


def _location(path: str) -> list[str]:
    """A picture's `path` (as listed) as name components, its kind first: ["file", <absolute
    path's parts>], ["s3", bucket, <key's parts>], or its archive's components then the member's.

    Empty and "." parts are dropped and ".." becomes "%2E%2E" (an S3 key or an archive member
    may hold them), so no name leaves FOLDER; "%" itself is always escaped in a listed path, so
    "%2E%2E" names no other part."""
    member = storage.split_member_uri(path)
    if member:
        archive, name = member
        parts = _location(archive) + name.split("/")
    elif storage.is_s3(path):
        parts = ["s3", *path.split("://", 1)[1].split("/")]
    else:
        parts = ["file", *os.path.abspath(path).split(os.sep)]
    return ["%2E%2E" if p == ".." else p for p in parts if p not in ("", ".")]


def _names(paths: list[str]) -> dict[str, tuple[str, str]]:
    """Each path's name under FOLDER without `.annotated<ext>` (module docstring), and its
    location (two spellings of one file share both)."""
    located = {p: _location(p) for p in paths}
    common = len(os.path.commonprefix([parts[:-1] for parts in located.values()]))
    bases: dict[str, str] = {}
    for path, parts in located.items():
        *folders, name = parts[common:]
        stem, ext = os.path.splitext(name)
        rel = [*folders, stem if ext.lower() in IMAGE_EXTENSIONS else name]
        if rel[0].startswith("_emotion_ray"):  # the marker's, the lock's and the logs' prefix: never a picture's
            rel[0] = "%5F" + rel[0][1:]
        bases[path] = "/".join(rel)
    sharing: dict[str, set[str]] = defaultdict(set)
    for path, base in bases.items():
        sharing[base.casefold()].add("/".join(located[path]))
    names = {}
    for path, base in bases.items():
        location = "/".join(located[path])
        if len(sharing[base.casefold()]) > 1:
            base = f"{base}.{hashlib.sha256(location.encode()).hexdigest()[:8]}"
        names[path] = (base, location)
    return names


def _prune_empty(folder: str, removed: list[str]) -> None:
    """Delete the folders under a local FOLDER that held only removed pictures (S3 has no folders)."""
    if storage.is_s3(folder):
        return
    parents = {os.path.dirname(name) for name in removed}
    for parent in sorted({p for name in parents for p in _ancestors(name)}, key=len, reverse=True):
        try:
            os.rmdir(os.path.join(folder, *parent.split("/")))
        except OSError:  # not empty: a user's file there keeps its folder
            pass


def _ancestors(rel: str) -> list[str]:
    out = []
    while rel:
        out.append(rel)
        rel = os.path.dirname(rel)
    return out
