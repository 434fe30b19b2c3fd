"""`predict --annotate`: distinct names, the output-folder rules, bad pictures as error lines, JPEG stays JPEG.

`Annotations` needs no model: the records are written here as inference.as_records gives them.
One test runs the CLI with the untrained model of test_score.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from emotion_ray import storage
from emotion_ray.annotate import MARKER, Annotations
from emotion_ray.errors import ConfigError
from tests.test_score import model_dir  # noqa: F401  (the untrained-model fixture)

ORIENTATION = 0x0112


def picture(path: Path, colour: tuple[int, int, int], size=(64, 48), fmt: str | None = None, **save) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt, **save)
    return str(path)


def row(path: str, label: str | None = "happy", face: list[int] | None = None, error: str | None = None) -> dict:
    record = {"path": storage.as_listed(path), "label": label, "confidence": None if error else 0.75,
              "probabilities": {}, "error": error}
    if face:
        record["face"] = {"index": 0, "box": face, "score": 0.99}
    return record


def claim(folder: Path, *inputs: str) -> None:
    with Annotations(str(folder), list(inputs)):
        pass


def written(folder: Path) -> list[str]:
    return json.loads((folder / MARKER).read_text())["written"]


@pytest.mark.fast
def test_pictures_of_one_name_never_overwrite_each_other_and_jpeg_stays_jpeg(tmp_path):
    root = tmp_path / "in"
    colours = {"a/x.jpg": (200, 30, 30), "b/x.jpg": (30, 200, 30), "c/x.png": (30, 30, 200),
               "a/x.gif": (200, 200, 30), "a/X.JPEG": (30, 200, 200), "d/y.webp": (120, 60, 200)}
    paths = {name: picture(root / name, colour) for name, colour in colours.items()}
    records = [row(p) for p in paths.values()]

    with Annotations(str(tmp_path / "seen"), list(paths.values())) as annotations:
        outcomes = annotations.write(records)
    assert [o["error"] for o in outcomes] == [None] * len(paths)
    names = {Path(o["path"]).relative_to(root).as_posix(): Path(o["annotated"]).relative_to(tmp_path / "seen").as_posix()
             for o in outcomes}
    # Folders mirror the inputs' from their common folder; a name alone in its folder stays readable.
    assert names["b/x.jpg"] == "b/x.annotated.jpg" and names["c/x.png"] == "c/x.annotated.png"
    assert names["d/y.webp"] == "d/y.annotated.png"
    # x.jpg, x.gif and X.JPEG in a/ would share a name (on a case-insensitive disk too): each adds its hash.
    for name in ("a/x.jpg", "a/x.gif", "a/X.JPEG"):
        stem, digest, rest = names[name].split(".", 2)
        assert stem in ("a/x", "a/X") and len(digest) == 8 and rest in ("annotated.jpg", "annotated.png")
    assert len({n.casefold() for n in names.values()}) == len(paths)
    assert sorted(written(tmp_path / "seen")) == sorted(names.values())
    for name, out in names.items():
        drawn = Image.open(tmp_path / "seen" / out)
        assert drawn.format == ("JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG"), name
        corner = drawn.convert("RGB").getpixel((drawn.width - 2, drawn.height - 2))  # its own picture, not another's
        assert all(abs(c - e) < 12 for c, e in zip(corner, colours[name])), (name, corner)

    # The same inputs give the same names.
    with Annotations(str(tmp_path / "again"), list(paths.values())) as annotations:
        again = annotations.write(records)
    assert [Path(o["annotated"]).relative_to(tmp_path / "again").as_posix() for o in again] == list(names.values())


@pytest.mark.fast
def test_an_unreadable_picture_is_an_error_and_the_pictures_after_it_are_still_drawn(tmp_path):
    first = picture(tmp_path / "in" / "first.jpg", (90, 90, 90))
    bad = tmp_path / "in" / "bad.jpg"
    bad.write_bytes(b"not a picture")
    cut = tmp_path / "in" / "cut.png"
    cut.write_bytes(Path(picture(tmp_path / "whole.png", (10, 10, 10), size=(300, 300))).read_bytes()[:100])
    later = picture(tmp_path / "in" / "later.png", (90, 90, 90))
    missing = str(tmp_path / "in" / "gone.jpg")
    inputs = [first, str(bad), str(cut), missing, later]
    records = [row(first), row(str(bad), None, error="not_an_image: Pillow cannot identify the format"),
               row(str(cut), None, error="truncated: ..."), row(missing, None, error="unreadable: ..."), row(later)]

    with Annotations(str(tmp_path / "seen"), inputs) as annotations:
        outcomes = annotations.write(records)
    errors = {Path(o["path"]).name: o["error"] for o in outcomes}
    assert errors["bad.jpg"] == "not_an_image: Pillow cannot identify the format"
    assert errors["cut.png"].startswith("truncated: ") and errors["gone.jpg"].startswith("unreadable: FileNotFoundError")
    assert errors["first.jpg"] is None and errors["later.png"] is None
    assert sorted(p.name for p in (tmp_path / "seen").iterdir()) == [MARKER, "first.annotated.jpg",
                                                                      "later.annotated.png"]


@pytest.mark.fast
def test_an_exif_rotated_jpeg_is_drawn_upright_as_a_jpeg_without_a_turn_left_in_it(tmp_path):
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored 64x48, displayed turned a quarter: 48x64
    photo = picture(tmp_path / "phone.jpg", (128, 128, 128), exif=exif.tobytes())
    box = [8, 20, 30, 30]  # in the displayed picture's pixels, as predict gives faces

    with Annotations(str(tmp_path / "seen"), [photo]) as annotations:
        [outcome] = annotations.write([row(photo, "angry", face=box)])
    drawn = Image.open(outcome["annotated"])
    assert drawn.format == "JPEG" and drawn.size == (48, 64)
    assert drawn.getexif().get(ORIENTATION) in (None, 1)  # a viewer must not turn it again
    r, g, b = drawn.convert("RGB").getpixel((box[0] + box[2] // 2, box[1] + box[3]))  # the box's bottom edge
    assert r > g + 60 and r > b + 60  # angry's red (blurred by JPEG), where the face is on the upright picture


@pytest.mark.fast
def test_the_folder_follows_every_outputs_rules(tmp_path):
    photo = picture(tmp_path / "in" / "a" / "x.jpg", (90, 90, 90))
    other = picture(tmp_path / "in" / "b" / "x.png", (90, 90, 90))

    foreign = tmp_path / "foreign"
    (foreign / "notes.txt").parent.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty and is not an emotion_ray predict --annotate output"):
        claim(foreign, photo)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(ConfigError, match="is inside output"):  # an input inside the folder
        claim(tmp_path / "in", photo)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        claim(a_file, photo)

    seen = tmp_path / "seen"
    with Annotations(str(seen), [photo, other]) as annotations:
        annotations.write([row(photo), row(other)])
    (seen / "notes.txt").write_text("the user's, beside ours")
    with pytest.raises(ConfigError, match="already holds annotated pictures; pass --overwrite"):
        claim(seen, photo)
    assert (seen / "a" / "x.annotated.jpg").exists()

    # --overwrite deletes only what the marker lists (and the folders that leaves empty), then draws anew.
    with Annotations(str(seen), [photo], overwrite=True) as annotations:
        [outcome] = annotations.write([row(photo)])
    assert outcome["annotated"] == str(seen / "x.annotated.jpg")
    assert sorted(p.relative_to(seen).as_posix() for p in seen.rglob("*")) == [MARKER, "notes.txt", "x.annotated.jpg"]
    assert written(seen) == ["x.annotated.jpg"]


@pytest.mark.fast
def test_archive_members_and_odd_member_names_stay_inside_the_folder(tmp_path):
    jpeg = tmp_path / "face.jpg"
    picture(jpeg, (90, 90, 90))
    archive = tmp_path / "in" / "photos.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../up.jpg", jpeg.read_bytes())
        z.writestr("x.jpg", jpeg.read_bytes())
    beside = picture(tmp_path / "in" / "x.jpg", (90, 90, 90))
    paths = [storage.member_uri(str(archive), m) for m in ("../up.jpg", "x.jpg")] + [beside]

    with Annotations(str(tmp_path / "seen"), paths) as annotations:
        outcomes = annotations.write([row(p) for p in paths])
    assert [Path(o["annotated"]).relative_to(tmp_path / "seen").as_posix() for o in outcomes] == [
        "photos.zip/%2E%2E/up.annotated.jpg", "photos.zip/x.annotated.jpg", "x.annotated.jpg"]


@pytest.mark.fast
def test_the_cli_refuses_a_foreign_folder_before_loading_a_model(tmp_path):
    photo = picture(tmp_path / "x.jpg", (90, 90, 90))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    res = subprocess.run([sys.executable, "-m", "emotion_ray.cli", "predict", photo, "--model", str(tmp_path / "none"),
                          "--annotate", str(tmp_path / "foreign")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "is not an emotion_ray predict --annotate output" in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "-m", "emotion_ray.cli", "predict", photo, "--model", "m", "--overwrite"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "overwrite: only with annotate" in res.stderr, res.stderr


def test_predict_annotates_every_readable_picture_under_its_own_name(model_dir, tmp_path):  # noqa: F811
    root = tmp_path / "in"
    inputs = [picture(root / "a" / "x.jpg", (200, 30, 30)), str(root / "b" / "bad.jpg"),
              picture(root / "b" / "x.jpg", (30, 200, 30)), picture(root / "c" / "x.png", (30, 30, 200))]
    Path(inputs[1]).write_bytes(b"not a picture")
    res = subprocess.run([sys.executable, "-m", "emotion_ray.cli", "predict", *inputs, "--model", str(model_dir),
                          "--annotate", str(tmp_path / "seen")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]  # a bad file: exit 1, as predict without --annotate
    assert f"{inputs[1]}: ERROR not_an_image" in res.stdout
    assert f"not annotated: {inputs[1]}: ERROR not_an_image: Pillow cannot identify the format" in res.stderr
    assert "Traceback" not in res.stderr
    seen = tmp_path / "seen"
    expected = {"a/x.annotated.jpg": "JPEG", "b/x.annotated.jpg": "JPEG", "c/x.annotated.png": "PNG"}
    assert [line for line in res.stderr.splitlines() if line.startswith("annotated: ")] == [
        f"annotated: {seen / name}" for name in expected]
    assert {name: Image.open(seen / name).format for name in expected} == expected
    assert sorted(written(seen)) == sorted(expected)
