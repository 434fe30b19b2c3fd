"""Bad config gives a clear message and a non-zero exit, before any cluster work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from emotion_ray.config import ConfigError, PrepareConfig, ScoreConfig, TrainConfig, build_config, load_config

CLI = [sys.executable, "-m", "emotion_ray.cli"]

pytestmark = pytest.mark.fast


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"epochz: unknown key"):
        build_config(TrainConfig, {"data": "d", "epochz": 3})


def test_splits_must_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 1"):
        build_config(PrepareConfig, {"inputs": ["a"], "output": "b", "splits": {"train": 0.9, "val": 0.2, "test": 0.1}})


def test_global_batch_must_divide_over_workers():
    with pytest.raises(ConfigError, match="divide evenly"):
        build_config(TrainConfig, {"data": "d", "workers": 3, "batch_size": 32})


def test_score_defaults_follow_the_device():
    where = {"model": "m", "inputs": ["i"], "output": "o"}
    cpu = build_config(ScoreConfig, where)
    assert (cpu.batch_size, cpu.num_predictors) == (64, 1)
    gpu = build_config(ScoreConfig, where, {"use_gpu": True})
    assert (gpu.batch_size, gpu.num_predictors) == (256, None)  # None: a pool that grows with the GPUs
    chosen = build_config(ScoreConfig, where, {"use_gpu": True, "batch_size": 32, "num_predictors": 3})
    assert (chosen.batch_size, chosen.num_predictors) == (32, 3)


def test_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: d\nepochs: 4\nmodel:\n  dropout: 0.2\n")
    cfg = load_config(TrainConfig, str(path), {"model.dense_units": 64, "epochs": 7})
    assert (cfg.epochs, cfg.model.dropout, cfg.model.dense_units) == (7, 0.2, 64)


def test_cli_bad_config_exits_2_with_message(tmp_path):
    res = run_cli("prepare", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--set", "splits={train: 0.9, val: 0.2, test: 0.1}")
    assert res.returncode == 2
    assert "splits" in res.stderr and "sum to 1" in res.stderr
    res = run_cli("prepare", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"))
    assert res.returncode == 2 and "is not a folder" in res.stderr
    res = run_cli("train", "--data", "d", "--set", "model.architecture=resnet9000")
    assert res.returncode == 2 and "model.architecture" in res.stderr


def test_every_subcommand_has_help():
    for cmd in ("demo-data", "prepare", "train", "tune", "score", "predict"):
        res = run_cli(cmd, "--help")
        assert res.returncode == 0 and "usage" in res.stdout


def test_an_empty_override_is_an_error_not_the_default():
    res = run_cli("score", "--model", "m", "--input", "i", "--output", "o", "--set", "batch_size=")
    assert res.returncode == 2 and "batch_size=" in res.stderr and "no value" in res.stderr


def test_decode_limits_have_one_definition():
    from emotion_ray import images
    from emotion_ray.config import DecodeLimits, PredictConfig

    for cfg in (PrepareConfig(inputs=["i"], output="o"), ScoreConfig(model="m", inputs=["i"], output="o"),
                PredictConfig(model="m", inputs=["i"])):
        assert cfg.decode_limits() == DecodeLimits()
    assert images.DEFAULT_MAX_PIXELS == DecodeLimits().max_pixels


def test_tune_schema_lives_with_the_others_and_plumbing_is_not_a_user_key():
    from emotion_ray.config import TuneConfig

    assert "mlflow_parent_run_id" not in TrainConfig.model_fields
    with pytest.raises(ConfigError, match="mlflow_parent_run_id: unknown key"):
        build_config(TrainConfig, {"data": "d", "mlflow_parent_run_id": "x"})
    assert "space" in TuneConfig.model_fields


def test_tracking_uri_flag_beats_mlflow_tracking_uri_which_beats_the_default(monkeypatch, tmp_path):
    from emotion_ray.cli import SCORE_FLAGS, TRAIN_FLAGS, _config_from_args, build_parser

    def tracking_uris(*flags: str) -> tuple[str, str]:
        score = build_parser().parse_args(["score", "--model", "m", "--input", "i", "--output", "o", *flags])
        train = build_parser().parse_args(["train", "--data", "d", *flags])
        return (_config_from_args(ScoreConfig, score, SCORE_FLAGS).mlflow_tracking_uri,
                _config_from_args(TrainConfig, train, TRAIN_FLAGS).mlflow.tracking_uri)

    for name in ("MLFLOW_TRACKING_URI", "EMOTION_RAY_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uris() == (f"sqlite:///{tmp_path.resolve()}/mlflow.db",) * 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert tracking_uris() == ("http://from-env:5000",) * 2
    assert tracking_uris("--tracking-uri", "http://from-flag:5000") == ("http://from-flag:5000",) * 2
