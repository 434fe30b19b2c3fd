"""prepare: every file accounted for, leak-free deterministic splits, user data untouched."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from emotion_ray import storage
from emotion_ray.config import ConfigError, PrepareConfig
from emotion_ray.dataset import SPLITS, load_split, read_manifest
from emotion_ray.prepare import prepare, split_of
from emotion_ray.demo import make_demo_dataset


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def rows_of(out: Path) -> list[dict]:
    manifest = read_manifest(str(out))
    rows = []
    for split in SPLITS:
        files = [str(out / rel) for rel in manifest["shards"][split]]
        for row in pads.dataset(files, format="parquet").to_table(columns=["path", "label", "content_hash"]).to_pylist():
            rows.append({**row, "split": split})
    return rows


@pytest.fixture()
def messy_tree(tmp_path) -> Path:
    """Demo faces plus every kind of file a real folder holds."""
    root = tmp_path / "in"
    make_demo_dataset(root, per_class=12, seed=3, canvas=64)
    (root / "happy" / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(root / "happy" / "happy_00001.jpg", root / "happy" / "nested" / "deeper" / "copy.JPEG")
    shutil.copy(root / "sad" / "sad_00002.jpg", root / "sad" / "nested_dup.jpg")
    (root / "sad" / "empty.jpg").write_bytes(b"")
    good = (root / "angry" / "angry_00000.jpg").read_bytes()
    (root / "angry" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "angry" / "text.png").write_bytes(b"this is not a png")
    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, format="PNG")
    (root / "happy" / "bomb.png").write_bytes(buf.getvalue())
    for mode in ("RGBA", "P", "LA", "I;16", "CMYK"):
        img = Image.new("RGB", (64, 64), (200, 100, 50)).convert(mode) if mode != "I;16" else Image.new("I;16", (64, 64), 40000)
        buf = io.BytesIO()
        img.save(buf, format="TIFF" if mode == "CMYK" else "PNG")
        ext = ".bmp" if mode == "P" else ".png"
        if mode == "CMYK":
            img.convert("RGB").save(root / "sad" / "cmyk_as_jpeg.jpg", format="JPEG")
            Image.new("CMYK", (64, 64), (10, 20, 30, 40)).save(root / "sad" / "real_cmyk.jpg", format="JPEG")
        else:
            (root / "sad" / f"mode_{mode.replace(';', '')}{ext}").write_bytes(buf.getvalue())
    (root / "happy" / "README.txt").write_text("not an image")
    (root / "happy" / ".DS_Store").write_bytes(b"\0\0")
    (root / ".hidden_dir").mkdir()
    (root / ".hidden_dir" / "x.jpg").write_bytes(good)
    (root / "loose_file.jpg").write_bytes(good)
    return root


def test_messy_tree_every_file_accounted_and_input_untouched(ray_session, messy_tree, tmp_path):
    # A name that is not UTF-8 (the latin-1 byte 0xF1): a row, its path escaped losslessly.
    odd_name = os.path.join(os.fsencode(messy_tree / "sad"), b"espa\xf1a.jpg")
    Image.new("RGB", (40, 40), (90, 20, 160)).save(odd_name, format="JPEG")
    before = tree_digest(messy_tree)
    out = tmp_path / "out"
    manifest = prepare(PrepareConfig(inputs=[str(messy_tree)], output=str(out), image_size=24, max_pixels=4_000_000))

    assert tree_digest(messy_tree) == before, "prepare must never modify the input tree"
    files_found = len(before)
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    rows = rows_of(out)
    assert len(rows) == manifest["rows"]
    assert manifest["files_found"] == files_found
    assert len(rows) + len(rejects) + manifest["ignored"]["count"] == files_found
    assert manifest["rejects"]["count"] == len(rejects) == 4
    reasons = {Path(r["path"]).name: r["reason"] for r in rejects}
    assert reasons == {"empty.jpg": "empty", "truncated.jpg": "truncated", "text.png": "not_an_image",
                       "bomb.png": "too_large"}
    assert manifest["ignored"]["by_reason"] == {"hidden": 2, "not_in_class_folder": 1, "not_an_image_extension": 1}
    skipped = pq.read_table(out / manifest["ignored"]["listed_in"]).to_pylist()  # at the root: skipped.parquet
    assert sorted((Path(r["path"]).relative_to(messy_tree).as_posix(), r["reason"]) for r in skipped) == [
        (".hidden_dir/x.jpg", "hidden"), ("happy/.DS_Store", "hidden"), ("happy/README.txt", "not_an_image_extension"),
        ("loose_file.jpg", "not_in_class_folder")]
    # Every odd mode (and name) made it in as a row.
    names = {Path(r["path"]).name for r in rows}
    assert {"mode_RGBA.png", "mode_P.bmp", "mode_LA.png", "mode_I16.png", "real_cmyk.jpg", "copy.JPEG",
            "espa%F1a.jpg"} <= names
    [odd] = [r for r in rows if r["path"].endswith("espa%F1a.jpg")]
    assert os.fsencode(storage.unescape(odd["path"])) == odd_name and odd["label"] == "sad"
    # Counts in the manifest equal the rows per split and class.
    for split in SPLITS:
        for label, n in manifest["counts"][split].items():
            assert n == sum(1 for r in rows if r["split"] == split and r["label"] == label)


def test_splits_disjoint_by_content_and_duplicates_share_a_split(ray_session, messy_tree, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(PrepareConfig(inputs=[str(messy_tree)], output=str(out), image_size=24, max_pixels=4_000_000))
    rows = rows_of(out)
    split_by_hash: dict[str, set] = {}
    for r in rows:
        split_by_hash.setdefault(r["content_hash"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_by_hash.values()), "a content hash appears in two splits"
    assert manifest["duplicates"]["duplicate_rows"] == 2  # copy.JPEG and nested_dup.jpg
    assert manifest["duplicates"]["groups_with_conflicting_labels"] == 0


def test_split_is_deterministic_and_stable_when_data_grows(ray_session, tmp_path):
    small, big = tmp_path / "small", tmp_path / "big"
    make_demo_dataset(small, per_class=10, seed=5, canvas=48)
    make_demo_dataset(big, per_class=25, seed=5, canvas=48)  # a superset of `small`
    cfg = dict(image_size=16)
    prepare(PrepareConfig(inputs=[str(small)], output=str(tmp_path / "a"), **cfg))
    prepare(PrepareConfig(inputs=[str(small)], output=str(tmp_path / "b"), **cfg))
    prepare(PrepareConfig(inputs=[str(big)], output=str(tmp_path / "c"), **cfg))
    key = lambda rows: {(Path(r["path"]).relative_to(Path(r["path"]).parents[1]).as_posix()): r["split"] for r in rows}  # noqa: E731
    a, b, c = (key(rows_of(tmp_path / n)) for n in "abc")
    assert a == b
    assert all(c[name] == split for name, split in a.items())
    assert len(c) == 75 and {"train", "val", "test"} == set(c.values())


@pytest.mark.fast
def test_split_of_follows_the_fractions():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20000)]
    fractions = {"train": 0.7, "val": 0.2, "test": 0.1}
    counts = {s: 0 for s in SPLITS}
    for h in hashes:
        counts[split_of(h, fractions)] += 1
    assert abs(counts["train"] / 20000 - 0.7) < 0.02 and abs(counts["test"] / 20000 - 0.1) < 0.01


def test_classes_default_to_the_folders_found_and_listed_ones_match_case_insensitively(ray_session, tmp_path):
    root = tmp_path / "in"
    make_demo_dataset(root, per_class=4, seed=0, canvas=32)
    shutil.copytree(root / "angry", root / "neutral")
    manifest = prepare(PrepareConfig(inputs=[str(root)], output=str(tmp_path / "o1"), image_size=16))
    assert manifest["classes"] == ["angry", "happy", "neutral", "sad"]  # sorted, as Keras infers them
    manifest = prepare(PrepareConfig(inputs=[str(root)], output=str(tmp_path / "o2"), image_size=16,
                                     classes=["Happy", "sad"]))
    assert manifest["classes"] == ["Happy", "sad"] and manifest["counts"]["train"]["Happy"] > 0
    assert manifest["ignored"]["by_reason"] == {"class_not_selected": 8}


def test_the_seed_notebooks_folder_layout_prepares_with_no_flags(ray_session, tmp_path):
    root = tmp_path / "data"
    make_demo_dataset(root, per_class=4, seed=0, canvas=32)
    for name in ("angry", "happy", "sad"):
        (root / name).rename(root / name.capitalize())  # Angry/, Happy/, Sad/ as the seed shipped them
    res = subprocess.run([sys.executable, "-m", "emotion_ray.cli", "prepare", "--input", str(root), "--output",
                          str(tmp_path / "ds"), "--image-size", "16"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert read_manifest(str(tmp_path / "ds"))["classes"] == ["Angry", "Happy", "Sad"]


@pytest.mark.fast
def test_missing_class_is_a_clear_error(tmp_path):
    root = tmp_path / "in"
    make_demo_dataset(root, per_class=3, seed=0, canvas=32, classes=("angry", "happy"))
    with pytest.raises(ConfigError, match=r"no images found for class\(es\) \['sad'\]"):
        prepare(PrepareConfig(inputs=[str(root)], output=str(tmp_path / "o"), image_size=16,
                              classes=["angry", "happy", "sad"]))


@pytest.mark.fast
def test_every_ignored_file_is_listed_with_its_reason(tmp_path):
    """What skipped.parquet holds: each file found that is not an input, with why; the counts agree."""
    from emotion_ray.prepare import list_labelled_files

    root = tmp_path / "in"
    for rel in ("happy/a.jpg", "sad/b.png", "angry/c.jpg", "happy/.d.jpg", "happy/notes.txt", "loose.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"listing reads no bytes")
    listing = list_labelled_files(PrepareConfig(inputs=[str(root)], output=str(tmp_path / "o"),
                                                classes=["happy", "sad"]))
    assert sorted((Path(p).relative_to(root).as_posix(), r) for p, r in listing.ignored.rows) == [
        ("angry/c.jpg", "class_not_selected"), ("happy/.d.jpg", "hidden"), ("happy/notes.txt", "not_an_image_extension"),
        ("loose.jpg", "not_in_class_folder")]
    assert listing.ignored.counts() == {"class_not_selected": 1, "hidden": 1, "not_an_image_extension": 1,
                                        "not_in_class_folder": 1}
    assert listing.found == len(listing.files) + len(listing.ignored) == 6


def test_output_safety_rules(ray_session, tmp_path):
    root = tmp_path / "in"
    make_demo_dataset(root, per_class=4, seed=0, canvas=32)
    foreign = tmp_path / "users_folder"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    with pytest.raises(ConfigError, match="not an emotion_ray prepare output"):
        prepare(PrepareConfig(inputs=[str(root)], output=str(foreign), image_size=16))
    assert (foreign / "thesis.docx").read_text() == "precious"

    out = tmp_path / "out"
    prepare(PrepareConfig(inputs=[str(root)], output=str(out), image_size=16))
    with pytest.raises(ConfigError, match="--overwrite"):
        prepare(PrepareConfig(inputs=[str(root)], output=str(out), image_size=16))
    again = prepare(PrepareConfig(inputs=[str(root)], output=str(out), image_size=16, overwrite=True))
    assert again["rows"] == 12 and len(rows_of(out)) == 12


def test_s3_round_trip(ray_session, s3_endpoint, s3_bucket, tmp_path):
    import s3fs

    local = tmp_path / "in"
    make_demo_dataset(local, per_class=5, seed=2, canvas=32)
    (local / "sad" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.put(str(local) + "/", f"{s3_bucket}/raw/", recursive=True)

    out = f"s3://{s3_bucket}/prepared"
    manifest = prepare(PrepareConfig(inputs=[f"s3://{s3_bucket}/raw"], output=out, image_size=16,
                                     storage={"s3_endpoint_url": s3_endpoint}))
    assert manifest["rows"] == 15 and manifest["rejects"]["count"] == 1
    assert json.loads(fs.cat_file(f"{s3_bucket}/prepared/manifest.json"))["rows"] == 15
    assert fs.exists(f"{s3_bucket}/prepared/rejects.parquet")
    assert all(p.startswith("s3://") for p in manifest["sources"])
    from emotion_ray.config import StorageConfig
    ds = load_split(out, "train", StorageConfig(s3_endpoint_url=s3_endpoint))
    assert ds.count() == manifest["split_rows"]["train"]


def test_overwrite_deletes_only_what_prepare_wrote_and_output_inside_input_is_refused(ray_session, tmp_path):
    small, ds = tmp_path / "small", tmp_path / "ds"
    make_demo_dataset(small, per_class=3, seed=4, canvas=32)
    prepare(PrepareConfig(inputs=[str(small)], output=str(ds), image_size=16))
    shutil.copytree(small, ds / "raw")  # the probe: the user's own files inside the dataset folder
    (ds / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="inside"):
        prepare(PrepareConfig(inputs=[str(ds / "raw")], output=str(ds), image_size=16, overwrite=True))
    again = prepare(PrepareConfig(inputs=[str(small)], output=str(ds), image_size=16, overwrite=True))
    assert again["rows"] == 9 and (ds / "notes.txt").read_text() == "mine"
    assert tree_digest(ds / "raw") == tree_digest(small)
    assert len(rows_of(ds)) == 9  # no shard of the first run left behind


PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "face_photos"


@pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"face photos not found at {PHOTOS}")
def test_prepare_with_faces_keeps_crops_with_their_source_and_counts_pictures(ray_session, tmp_path):
    root = tmp_path / "in"
    layout = {"happy": ["two_people.jpg", "obama.jpg"], "sad": ["obama_small.jpg", "kit_with_rose.jpg"],
              "angry": ["biden.jpg", "obama_partial_face.jpg"]}
    for label, names in layout.items():
        (root / label).mkdir(parents=True)
        for name in names:
            shutil.copy(PHOTOS / name, root / label / name)
    out = tmp_path / "ds"
    manifest = prepare(PrepareConfig(inputs=[str(root)], output=str(out), image_size=32,
                                     faces={"mode": "all", "detector": "haar"}, splits={"train": 1, "val": 0, "test": 0}))
    # Haar: two faces in two_people, three boxes in kit_with_rose, none in the cut face (bench/RESULTS.md, faces).
    assert manifest["faces"]["pictures_by_faces"] == {"0": 1, "1": 3, "2+": 2}
    assert manifest["rejects"]["by_reason"] == {"no_face": 1} and manifest["rows"] == 8
    shard = pads.dataset([str(out / rel) for rel in manifest["shards"]["train"]], format="parquet").to_table()
    two = [r for r in shard.drop_columns(["image"]).to_pylist() if r["path"].endswith("two_people.jpg")]
    assert sorted(r["face_index"] for r in two) == [0, 1] and all(r["box_w"] > 50 and r["label"] == "happy" for r in two)
    assert len({r["content_hash"] for r in two}) == 1 and manifest["duplicates"]["duplicate_rows"] == 0


def test_split_by_folder_keeps_the_given_splits_and_counts_cross_split_copies(ray_session, tmp_path):
    root = tmp_path / "published"
    for split, seed in (("train", 1), ("val", 2), ("test", 3)):
        make_demo_dataset(root / split, per_class=4, seed=seed, canvas=32)
    shutil.copy(root / "train" / "sad" / "sad_00000.jpg", root / "test" / "sad" / "leaked.jpg")
    (root / "README.txt").write_text("not in a split folder")
    manifest = prepare(PrepareConfig(inputs=[str(root)], output=str(tmp_path / "ds"), image_size=16, split_by="folder"))
    assert manifest["split_rows"] == {"train": 12, "val": 12, "test": 13}
    assert {r["path"].split("/published/")[1].split("/")[0] for r in rows_of(tmp_path / "ds")
            if r["split"] == "val"} == {"val"}
    assert manifest["duplicates"]["groups_across_splits"] == 1
    assert manifest["ignored"]["by_reason"] == {"not_an_image_extension": 1}
