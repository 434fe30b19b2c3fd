"""Quiet by default: what a person sees on a real terminal (a pty, so bars draw), and the log file."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from emotion_ray.demo import make_demo_dataset
from tests.test_score import model_dir  # noqa: F401  (the untrained-model fixture)

CLI = [sys.executable, "-m", "emotion_ray.cli"]
# Lines that are Ray's or TensorFlow's, never the project's.
NOISE = re.compile(r"core_worker|cuInit|cuda|WARNING|INFO|UDF|tensorflow|absl|streaming_executor|\(MapWorker|"
                   r"\(RayTrainWorker|\(raylet\)|pid=", re.IGNORECASE)


def run_in_pty(cmd: list[str], env: dict[str, str], timeout: float = 600,
               size: tuple[int, int] = (30, 120)) -> tuple[int, str]:
    """Run `cmd` with a pseudo-terminal (30x120 unless `size`) as stdout and stderr; (exit status, screen text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal is gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=max(1.0, deadline - time.time())) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def screen_lines(text: str) -> list[str]:
    """The lines a person reads: a bar's redraws (\\r) collapse to their last state; colours go."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return [line.split("\r")[-1].strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]


def assert_quiet(text: str) -> None:
    noise = [line for line in screen_lines(text) if NOISE.search(line) and not line.startswith("log: ")]
    assert not noise, text


def logged_at(text: str) -> Path:
    [line] = [line for line in screen_lines(text) if line.startswith("log: ")]  # named once
    return Path(line.split()[1])


@pytest.fixture()
def env(tmp_path) -> dict[str, str]:
    # TMPDIR: where logs of outputs with no local folder (predict) go; TF's INFO lines: noise for sure.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "TMPDIR": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "0"}


@pytest.fixture()
def faces(tmp_path) -> Path:
    root = tmp_path / "faces"
    make_demo_dataset(root, per_class=4, seed=5, canvas=48)
    return root


SESSION_SCRIPT = """
import logging, os, sys, warnings
from emotion_ray import console
with console.session("score"):
    os.write(2, b"core_worker.cc: a C-level line\\n")
    print("a library's print")
    logging.getLogger("ray.data").warning("UDF too large")
    warnings.warn("a library warning")
    print("project line", file=console.out())
    console.keep_log_in(sys.argv[1])
    os.write(1, b"after the move\\n")
    print("summary", file=console.out())
print("after the session")
"""


@pytest.mark.fast
def test_a_session_sends_every_kind_of_library_output_to_the_log(tmp_path):
    res = subprocess.run([sys.executable, "-c", SESSION_SCRIPT, str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    log = tmp_path / "out" / "_emotion_ray_log_score.log"
    assert res.stdout.splitlines() == ["project line", "summary", "after the session"]
    assert res.stderr.splitlines() == [f"log: {log} (Ray and TensorFlow messages; --verbose shows them here)"]
    text = log.read_text()
    for line in ("core_worker.cc: a C-level line", "a library's print", "UDF too large", "a library warning",
                 "after the move"):
        assert line in text
    assert not list((tmp_path / "emotion_ray_logs").iterdir())  # moved, not copied


BOOM_SCRIPT = """
import os, sys
from emotion_ray import cli
def boom(args):
    os.write(2, b"something Ray said\\n")
    raise RuntimeError("boom")
cli.cmd_predict = boom
sys.exit(cli.main(["predict", "x.jpg", "--model", "m"]))
"""


@pytest.mark.fast
def test_an_unexpected_error_shows_its_traceback_and_names_the_log(tmp_path):
    res = subprocess.run([sys.executable, "-c", BOOM_SCRIPT], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "RuntimeError: boom" in res.stderr
    [log] = (tmp_path / "emotion_ray_logs").iterdir()
    assert f"emotion-ray predict: failed unexpectedly; Ray's and TensorFlow's messages are in {log}" in res.stderr
    assert "something Ray said" in log.read_text() and "RuntimeError: boom" in log.read_text()


def test_predict_shows_the_answer_and_the_log_and_verbose_shows_the_rest(model_dir, faces, env,  # noqa: F811
                                                                         tmp_path):
    image = str(faces / "sad" / "sad_00001.jpg")
    code, text = run_in_pty([*CLI, "predict", image, "--model", str(model_dir)], env)
    assert code == 0, text
    assert_quiet(text)
    lines = screen_lines(text)
    assert re.fullmatch(rf"{re.escape(image)}: (angry|happy|sad) \(0\.\d+\)  angry=.*", lines[0]), text
    log = logged_at(text)
    assert log.parent == tmp_path / "emotion_ray_logs" and re.search("tensorflow|cuda", log.read_text(), re.I)

    code, text = run_in_pty([*CLI, "predict", image, "--model", str(model_dir), "--verbose"], env)
    assert code == 0, text
    assert any(NOISE.search(line) for line in screen_lines(text)) and "log: " not in text


def test_score_draws_a_bar_and_a_summary_and_logs_ray(ray_session, model_dir, faces, env, tmp_path):  # noqa: F811
    out = tmp_path / "scores"
    env = {**env, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [*CLI, "score", "--model", str(model_dir), "--input", str(faces), "--output", str(out)]
    code, text = run_in_pty(cmd, env)
    assert code == 0, text
    assert_quiet(text)
    assert re.search(r"scoring: +\d+%.*\r", text) and re.search(r"12/12 \[.*(img/s|s/img)", text), text  # a bar
    lines = screen_lines(text)
    assert lines[0] == f"log: {out / '_emotion_ray_log_score.log'} (Ray and TensorFlow messages; --verbose shows " \
                       "them here)"
    summary = lines[lines.index(next(line for line in lines if line.startswith("scored 12 images in "))):]
    assert [line.split()[0] for line in summary] == ["scored", "labels", "errors", "predictions", "read"], text
    assert f'pandas.read_parquet("{out}")' in summary[-1]
    log = (out / "_emotion_ray_log_score.log").read_text()
    assert "streaming_executor" in log and "Dataset" in log  # Ray Data's lines

    # --json: the machine form on stdout alone (nothing left to score: no Ray this time).
    res = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["already_scored"] == 12


def test_train_from_an_image_folder_draws_bars_and_keeps_a_frozen_backbone_from_a_file(ray_session, env, tmp_path):
    """`emotion-ray train` on an image folder, as a person runs it: prepare and epoch bars, then the
    summary. The run (one of the suite's costliest things) also carries the on-the-fly checks: the
    folder is prepared into the run, the backbone weights file the driver read reaches the worker (as
    bytes in its loop config), and with freeze_epochs the backbone comes out exactly as it went in."""
    import numpy as np

    from emotion_ray.model import keras, load_model

    images = tmp_path / "images"
    make_demo_dataset(images, per_class=6, seed=5, canvas=48)  # 11 train, 5 val, 2 test
    source = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), include_top=False, weights=None)
    source.save_weights(str(tmp_path / "v3.h5"))
    env = {**env, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    code, text = run_in_pty([*CLI, "train", "--data", str(images), "--output", str(tmp_path / "runs"), "--run-name",
                             "r", "--workers", "1", "--epochs", "1", "--batch-size", "8", "--image-size", "32",
                             "--no-mlflow", "--set", "model.architecture=mobilenet_v3_small", "--set", "model.grey=true",
                             "--set", "model.freeze_epochs=1", "--set", f"model.backbone_weights={tmp_path / 'v3.h5'}"],
                            env)
    assert code == 0, text
    assert_quiet(text)
    run = tmp_path / "runs" / "r"
    assert re.search(r"decoding: +\d+%.*18/18", text) and re.search(r"training: +\d+%.*1/1 \[", text), text
    lines = screen_lines(text)
    assert lines[0].startswith(f"log: {run / '_emotion_ray_log_train.log'} ")
    first = next(i for i, line in enumerate(lines) if line.startswith(f"trained {run}: 1 epoch,"))
    summary = lines[first + 1:]
    assert summary[0].startswith("test "), text
    # A model that never left chance level says so; then why its temperature is what it is (5 val rows: T = 1).
    said = summary[1:-2] if summary[1].startswith("calibration") else summary[2:-2]
    assert summary[1].startswith(("calibration", "warning      not learned: the best val_loss")), text
    assert len(said) == 1 and said[0].startswith("calibration  T = 1: "), text
    assert summary[-2].startswith(f"run          {run}: model.keras"), text
    assert summary[-1].startswith(f"report       {run / 'report.html'}"), text
    log = (run / "_emotion_ray_log_train.log").read_text()
    assert "RayTrainWorker" in log or "ray.train" in log, log[-3000:]

    assert (run / "dataset" / "manifest.json").exists()
    saved = load_model(str(run / "model.keras"))
    trained = next(layer for layer in saved.layers if layer.name.startswith("MobilenetV3"))
    assert len(trained.weights) == len(source.weights) > 100
    for a, b in zip(source.get_weights(), trained.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.fast
def test_a_bar_draws_on_a_terminal_that_reports_no_size(tmp_path):
    # `script`, some CI and container ttys report 0x0: tqdm would draw nothing, not even 100%.
    code = ("from emotion_ray import console\nwith console.session('score'):\n"
            "    for _ in console.progress(iterable=range(3), desc='scoring', unit='img'): pass\n")
    status, text = run_in_pty([sys.executable, "-c", code], {**os.environ, "TMPDIR": str(tmp_path)}, 60, size=(0, 0))
    assert status == 0, text
    [bar] = [line for line in screen_lines(text) if line.startswith("scoring:")]
    assert "100%" in bar and "3/3" in bar and len(bar) <= 80, text


@pytest.mark.fast
def test_a_folder_holding_only_a_log_is_still_free_for_its_stage(tmp_path):
    from emotion_ray import outputs
    from emotion_ray.config import ConfigError, TrainConfig
    from emotion_ray.train import run_training

    for folder in ("scores", "runs/r"):  # as a run that stopped before it wrote anything leaves them
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / f"{outputs.LOG_PREFIX}_x.log").write_text("Ray said things\n")
    outputs.claim_folder(str(tmp_path / "scores"), "_emotion_ray_scores", "score")  # not refused as foreign
    with pytest.raises(ConfigError, match="cannot resume: no run at"):  # the log is no run
        run_training(TrainConfig(data="d", output=str(tmp_path / "runs"), run_name="r", resume=True))
