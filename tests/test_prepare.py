"""prepare: every file accounted for, leak-free deterministic splits, user data untouched."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from emotion_ray import storage
from emotion_ray.config import ConfigError, PrepareConfig
from emotion_ray.dataset import SPLITS, load_split, read_manifest
from emotion_ray.prepare import prepare
from emotion_ray.prepare_tasks import split_of
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
        if not files:  # an empty split
            continue
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
                          str(tmp_path / "ds"), "--image-size", "16"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
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
    # A picture's faces share its group, and its pHash is the whole picture's.
    assert len({(r["group"], r["phash"]) for r in two}) == 1 and two[0]["phash"] is not None


def test_split_by_folder_keeps_the_given_splits_and_counts_cross_split_copies(ray_session, tmp_path):
    root = tmp_path / "published"
    for split, seed in (("train", 1), ("val", 2), ("test", 3)):
        make_demo_dataset(root / split, per_class=4, seed=seed, canvas=32)
    shutil.copy(root / "train" / "sad" / "sad_00000.jpg", root / "test" / "sad" / "leaked.jpg")
    happy = next((root / "train" / "happy").iterdir())
    (root / "val" / "happy" / "resized.jpg").write_bytes(copies_of(happy.read_bytes())["half"][0])  # a near-copy
    (root / "README.txt").write_text("not in a split folder")
    manifest = prepare(PrepareConfig(inputs=[str(root)], output=str(tmp_path / "ds"), image_size=16, split_by="folder"))
    assert manifest["split_rows"] == {"train": 12, "val": 13, "test": 13}
    assert manifest["groups"]["groups_across_splits"] == 2  # counted (and warned about), the given splits kept
    assert {r["path"].split("/published/")[1].split("/")[0] for r in rows_of(tmp_path / "ds")
            if r["split"] == "val"} == {"val"}
    assert manifest["duplicates"]["groups_across_splits"] == 1
    assert manifest["ignored"]["by_reason"] == {"not_an_image_extension": 1}


def test_kaggle_layout_without_val_carves_validation_from_train_by_group(ray_session, tmp_path):
    """Kaggle's FER2013 has train/ and test/ only: val comes out of train/ (val_from_train of it), by
    group (a picture and its near-copies on one side), deterministically; test/ stays test."""
    root = tmp_path / "kaggle"
    make_demo_dataset(root / "train", per_class=8, seed=4, canvas=48)
    make_demo_dataset(root / "test", per_class=3, seed=5, canvas=48)
    originals = sorted((root / "train").rglob("*.*"))
    for picture in originals[::4]:  # near-copies of every fourth training picture, beside it
        for kind, (copy, ext) in copies_of(picture.read_bytes()).items():
            (picture.parent / f"{picture.stem}.{kind}{ext}").write_bytes(copy)
    train_files = len(list((root / "train").rglob("*.*")))
    cfg = dict(inputs=[str(root)], image_size=16, split_by="folder", val_from_train=0.3)
    manifest = prepare(PrepareConfig(output=str(tmp_path / "ds"), **cfg))
    rows = manifest["split_rows"]
    assert rows["test"] == 9 and rows["train"] + rows["val"] == train_files and rows["val"] >= 3, rows
    assert manifest["val_from_train"] == [str(root)] and "split into train and val (0.3 of its groups)" in manifest[
        "split_method"]
    assert manifest["split_fractions"] == {"train": 0.7, "val": 0.3, "test": 0.0}
    found = [{**row, "split": split} for split in SPLITS for row in pads.dataset(
        [str(tmp_path / "ds" / rel) for rel in manifest["shards"][split]], format="parquet").to_table(
        columns=["path", "group"]).to_pylist()]
    where = {split: {r["path"].split("/kaggle/")[1].split("/")[0] for r in found if r["split"] == split}
             for split in SPLITS}
    assert where == {"train": {"train"}, "val": {"train"}, "test": {"test"}}
    groups_in = {split: {r["group"] for r in found if r["split"] == split} for split in SPLITS}
    assert not groups_in["train"] & groups_in["val"]  # leak-free: no group on both sides
    for picture in originals[::4]:  # each original with its three copies, in one split
        copies = [r["split"] for r in found if f"/kaggle/train/{picture.parent.name}/{picture.stem}" in r["path"]]
        assert len(copies) == 4 and len(set(copies)) == 1, copies
    assert sum(s == "val" for r in found if ".half." in r["path"] for s in [r["split"]]) >= 1, "no copies in val"
    # Deterministic: the same input gives the same splits (without grouping too: each file's sha256).
    again = prepare(PrepareConfig(output=str(tmp_path / "again"), **cfg))
    assert again["split_rows"] == rows and sorted(rows_of(tmp_path / "again"), key=str) == sorted(
        rows_of(tmp_path / "ds"), key=str)
    plain = prepare(PrepareConfig(output=str(tmp_path / "plain"), near_duplicate_distance=0, **cfg))
    assert plain["split_rows"]["val"] >= 3 and plain["split_rows"]["test"] == 9
    # A layout that has val/ keeps it: nothing is carved.
    make_demo_dataset(root / "val", per_class=2, seed=6, canvas=48)
    given = prepare(PrepareConfig(output=str(tmp_path / "given"), **cfg))
    assert given["split_rows"]["val"] == 6 and given["val_from_train"] == []


@pytest.mark.fast
def test_val_from_train_is_a_fraction_used_only_by_folder_splits():
    where = dict(inputs=["in"], output="out")
    assert PrepareConfig(**where).split_fractions == {"train": 0.7, "val": 0.2, "test": 0.1}
    assert PrepareConfig(**where, split_by="folder").split_fractions == {"train": 0.9, "val": 0.1, "test": 0.0}
    for bad in (0, 1, 1.5):
        with pytest.raises(ConfigError, match="val_from_train"):
            build_config(PrepareConfig, {**where, "split_by": "folder", "val_from_train": bad})


# ----------------------------------------------------------------------------- groups (issue 17, items 1-2)
from emotion_ray import groups  # noqa: E402
from emotion_ray.config import build_config  # noqa: E402
from emotion_ray.images import decode_image  # noqa: E402

FRACTIONS = {"train": 0.7, "val": 0.2, "test": 0.1}


def copies_of(data: bytes) -> dict[str, tuple[bytes, str]]:
    """A picture's near-duplicates as scraped folders hold them: resized to half (JPEG q90),
    re-encoded at JPEG quality 30, cropped by 1 % of each side (PNG)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    made = {}
    for name, picture, fmt, options in (
        ("half", img.resize((w // 2, h // 2), Image.Resampling.LANCZOS), "JPEG", {"quality": 90}),
        ("q30", img, "JPEG", {"quality": 30}),
        ("crop", img.crop((w // 100, h // 100, w - w // 100, h - h // 100)), "PNG", {}),
    ):
        buf = io.BytesIO()
        picture.save(buf, format=fmt, **options)
        made[name] = (buf.getvalue(), ".png" if fmt == "PNG" else ".jpg")
    return made


def plan_of(pictures: dict[str, bytes], size: int = 32, keys: dict[str, tuple[str, ...]] | None = None,
            distance: int = 6) -> groups.GroupPlan:
    names = list(pictures)
    return groups.plan_groups(
        names, [hashlib.sha256(pictures[n]).hexdigest() for n in names],
        [groups.perceptual_hash(decode_image(pictures[n], size).pixels) for n in names], keys or {}, distance,
        lambda digest: split_of(digest, FRACTIONS))


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("originals")
    make_demo_dataset(root, per_class=4, seed=11, canvas=200)
    return {p.name: p.read_bytes() for p in sorted(root.rglob("*.*"))}


@pytest.mark.fast
def test_resized_reencoded_and_cropped_copies_group_with_their_original(originals):
    pictures = dict(originals)
    for name, data in originals.items():
        pictures.update({f"{name}.{kind}": copy for kind, (copy, _) in copies_of(data).items()})
    plan = plan_of(pictures)
    for name in originals:
        family = [name] + [f"{name}.{kind}" for kind in ("half", "q30", "crop")]
        assert len({plan.group[p] for p in family}) == 1, f"{name}: a copy left its original's group"
        assert len({plan.split[p] for p in family}) == 1
    # Unrelated faces stay apart; every copy is a near-duplicate of its original at least.
    assert plan.stats["groups"] == len(originals) == plan.stats["groups_of_several_pictures"]
    assert plan.stats["near_duplicate_pairs"] >= 3 * len(originals)
    # The plain sha256 split would have put copies of most pictures in another split than the original.
    assert plan.stats["groups_straddling_hash_split"] >= len(originals) // 2
    assert plan.stats["groups_across_splits"] == 0
    # 0 turns near-duplicates off: then every file is its own group, as before.
    assert plan_of(pictures, distance=0).stats["groups"] == len(pictures)


@pytest.mark.fast
def test_group_plan_is_deterministic_stable_and_joins_every_relation():
    rng = np.random.default_rng(0)
    n = 400
    paths = [f"/in/c/p{i}.jpg" for i in range(n)]
    digests = [hashlib.sha256(p.encode()).hexdigest() for p in paths]
    phashes = [int(v) for v in rng.integers(0, 2**63, n, dtype=np.int64)]  # unrelated: ~32 bits apart
    phashes[1] = phashes[0] ^ 0b101  # a near-duplicate of p0 (2 bits)
    digests[3] = digests[2]  # an exact copy of p2
    keys = {paths[i]: ("ann",) for i in (10, 20, 30)}
    keys[paths[30]] = ("ann", "session9")  # pattern says ann, CSV says session9: one group
    keys[paths[40]] = ("session9",)
    keys[paths[0]] = ("bob",)  # bob's picture has a near-duplicate without a key: it joins bob
    plan = groups.plan_groups(paths, digests, phashes, keys, 6, lambda d: split_of(d, FRACTIONS))

    assert len({plan.split[paths[i]] for i in (10, 20, 30, 40)}) == 1 and plan.group[paths[40]] == "ann"
    assert plan.group[paths[1]] == plan.group[paths[0]] == "bob"
    assert plan.group[paths[3]] == plan.group[paths[2]] == digests[2]
    # A person's split depends on the key alone: stable whoever joins, in any dataset.
    assert plan.split[paths[10]] == split_of(hashlib.sha256(b"ann").hexdigest(), FRACTIONS)
    # A picture in no group keeps exactly the plain hash split.
    assert all(plan.split[paths[i]] == split_of(digests[i], FRACTIONS) for i in range(50, n))
    assert plan.stats["near_duplicate_pairs"] == 1 and plan.stats["group_keys"] == 3
    assert plan.stats["groups"] == n - 1 - 1 - 3  # p1 joins p0, p3 joins p2, p20/30/40 join p10

    order = rng.permutation(n)  # the same pictures in another order: the same plan
    again = groups.plan_groups([paths[i] for i in order], [digests[i] for i in order], [phashes[i] for i in order],
                               keys, 6, lambda d: split_of(d, FRACTIONS))
    assert again.group == plan.group and again.split == plan.split and again.stats == plan.stats
    # More data: only the groups new pictures join may move.
    more = groups.plan_groups(paths + ["/in/c/new.jpg"], digests + ["0" * 64], phashes + [phashes[60] ^ 1], keys, 6,
                              lambda d: split_of(d, FRACTIONS))
    assert {p for p in paths if more.split[p] != plan.split[p]} <= {paths[60]}


@pytest.mark.fast
def test_groups_fill_the_splits_at_their_fractions():
    # The smallest of a group's sha256s leans towards 0 (train): its own sha256 is what counts.
    n = 3000
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4 * n)]
    paths = [f"/in/c/{i}.jpg" for i in range(4 * n)]
    values = np.random.default_rng(2).integers(0, 2**63, n)  # unrelated groups of 4 near-duplicates each
    plan = groups.plan_groups(paths, digests, [int(values[i // 4]) for i in range(4 * n)], {}, 6,
                              lambda d: split_of(d, FRACTIONS))
    counts = Counter(plan.split.values())
    assert plan.stats["groups"] == n and plan.stats["groups_across_splits"] == 0
    assert all(abs(counts[s] / (4 * n) - FRACTIONS[s]) < 0.03 for s in SPLITS), counts


@pytest.mark.fast
def test_near_duplicate_pairs_match_every_pair_compared():
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**64, 3000, dtype=np.uint64)  # three blocks of PAIR_BLOCK
    hashes[2900:3000] = hashes[:100] ^ np.uint64(0b111111)  # 6 bits away: near-duplicates at the limit
    hashes[2800:2900] = hashes[100:200] ^ np.uint64(0b1111111)  # 7 bits away: not
    a, b = groups.near_duplicate_pairs(hashes, 6)
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    expected = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(distance <= 6, 1)))}
    assert set(zip(a.tolist(), b.tolist())) == expected and len(a) == len(expected)
    assert {(i, 2900 + i) for i in range(100)} <= expected and not {(100 + i, 2800 + i) for i in range(100)} & expected


@pytest.mark.fast
def test_group_keys_from_a_pattern_and_a_csv(tmp_path):
    names = {uri: (uri, uri[len("/d/"):], uri[len("/d/"):].split("/", 1)[1])
             for uri in ("/d/happy/ann_01.jpg", "/d/sad/ann_02.png", "/d/sad/s1/bob_7.jpg", "/d/sad/IMG_1.jpg")}
    csv_rows = groups.read_group_file(b"path,group,note\n./sad/s1/bob_7.jpg,robert,x\n/d/sad/IMG_1.jpg,ann,\n"
                                      b"happy/gone.jpg,zed,\nsad/ann_02.png,,\n", "g.csv")
    keys = groups.user_keys(names, r"([a-z]+)_\d+\.", csv_rows)
    assert keys.by_path == {"/d/happy/ann_01.jpg": ("ann",), "/d/sad/ann_02.png": ("ann",),
                            "/d/sad/s1/bob_7.jpg": ("bob", "robert"), "/d/sad/IMG_1.jpg": ("ann",)}
    assert keys.file_rows_unmatched == 1  # happy/gone.jpg
    with pytest.raises(ValueError, match="header row with `path` and `group`"):
        groups.read_group_file(b"file,person\na.jpg,ann\n", "g.csv")
    with pytest.raises(ValueError, match="line 3: a.jpg is given two groups"):
        groups.read_group_file(b"path,group\na.jpg,ann\na.jpg,bob\n", "g.csv")


@pytest.mark.fast
def test_bad_group_config_is_named_before_any_cluster_work(tmp_path):
    where = {"inputs": [str(tmp_path)], "output": str(tmp_path / "o")}
    with pytest.raises(ConfigError, match=r"group_pattern: .*not a valid regular expression"):
        build_config(PrepareConfig, {**where, "group_pattern": "([a-z]+"})
    with pytest.raises(ConfigError, match=r"group_pattern: .*needs a capture group"):
        build_config(PrepareConfig, {**where, "group_pattern": r"[a-z]+_\d+"})
    with pytest.raises(ConfigError, match="near_duplicate_distance"):
        build_config(PrepareConfig, {**where, "near_duplicate_distance": -1})
    with pytest.raises(ConfigError, match=r"group_file .*missing\.csv not found"):
        prepare(PrepareConfig(**where, group_file=str(tmp_path / "missing.csv")))
    (tmp_path / "bad.csv").write_text("name,person\n")
    with pytest.raises(ConfigError, match="needs a header row"):
        prepare(PrepareConfig(**where, group_file=str(tmp_path / "bad.csv")))


def test_near_duplicates_and_a_persons_pictures_never_straddle_splits(ray_session, originals, tmp_path):
    root = tmp_path / "in"
    for name, data in originals.items():
        folder = root / name.split("_")[0]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"x{name}").write_bytes(data)
        for kind, (copy, ext) in copies_of(data).items():
            (folder / f"x{name}.{kind}{ext}").write_bytes(copy)
    people = tmp_path / "people"
    make_demo_dataset(people, per_class=4, seed=12, canvas=64)
    for i, picture in enumerate(sorted(people.rglob("*.*"))):  # ann, bob, cat: each in every class
        shutil.copy(picture, root / picture.parent.name / f"person-{('ann', 'bob', 'cat')[i % 3]}-{i}{picture.suffix}")
    happy, sad = sorted(n for n in originals if n.startswith("happy"))[0], sorted(n for n in originals if n.startswith("sad"))[1]
    (tmp_path / "groups.csv").write_text(f"path,group\nhappy/x{happy},session1\n{root / 'sad' / f'x{sad}'},session1\n")

    manifest = prepare(PrepareConfig(inputs=[str(root)], output=str(tmp_path / "ds"), image_size=32,
                                     group_pattern=r"^person-([a-z]+)-", group_file=str(tmp_path / "groups.csv")))
    rows = rows_of(tmp_path / "ds")
    assert len(rows) == 4 * len(originals) + 12
    split = {Path(r["path"]).name: r["split"] for r in rows}
    assert set(split.values()) == set(SPLITS)
    for name in originals:
        assert len({s for file, s in split.items() if file.startswith(f"x{name}")}) == 1, f"copies of {name} straddle"
    for person in ("ann", "bob", "cat"):
        assert len({s for file, s in split.items() if file.startswith(f"person-{person}-")}) == 1
    assert split[f"x{happy}"] == split[f"x{sad}"]  # the CSV's session1
    shards = pads.dataset([str(tmp_path / "ds" / rel) for s in SPLITS for rel in manifest["shards"][s]],
                          format="parquet").to_table(columns=["path", "group", "phash"]).to_pylist()
    assert {r["group"] for r in shards if "person-ann-" in r["path"]} == {"ann"}
    assert all(r["phash"] is not None for r in shards)
    g = manifest["groups"]
    # 12 originals with their copies, less the two the CSV joins, and three people.
    assert (g["groups"], g["group_keys"], g["pictures_with_group_key"]) == (14, 4, 14)
    assert g["near_duplicate_pairs"] >= 3 * len(originals) and g["groups_across_splits"] == 0
    assert g["groups_straddling_hash_split"] >= 6  # what the plain hash split would have leaked
