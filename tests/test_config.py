"""Bad config gives a clear message and a non-zero exit, before any cluster work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_min_confidence_is_a_probability():
    where = {"model": "m", "inputs": ["i"], "output": "o"}
    assert build_config(ScoreConfig, where).min_confidence is None  # off by default
    assert build_config(ScoreConfig, where, {"min_confidence": 0.7}).min_confidence == 0.7
    for bad in (1.5, -0.1):
        with pytest.raises(ConfigError, match="min_confidence"):
            build_config(ScoreConfig, where, {"min_confidence": bad})


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


# ----------------------------------------------------------------------------- backbones (issue #16, item 2)
def test_backbone_architectures_and_their_weights_are_validated():
    from emotion_ray.config import BACKBONE_ARCHITECTURES, ModelConfig

    with pytest.raises(ConfigError, match="model.architecture: .*'mobilenet_v3_small' or 'efficientnet_b0'"):
        build_config(TrainConfig, {"data": "d", "model": {"architecture": "resnet50"}})
    for arch in BACKBONE_ARCHITECTURES:
        # Keras' backbones refuse images under 32x32: known before any cluster work.
        with pytest.raises(ConfigError, match=f"{arch} needs image_size >= 32, got 24"):
            build_config(TrainConfig, {"data": "d", "image_size": 24, "model": {"architecture": arch}})
        assert build_config(TrainConfig, {"data": "d", "image_size": 32, "model": {"architecture": arch}})
    with pytest.raises(ConfigError, match="face_cnn needs image_size >= 16"):
        build_config(TrainConfig, {"data": "d", "image_size": 8, "model": {"architecture": "face_cnn"}})
    # init_from ignores the architecture: the earlier model's size is checked against the data instead.
    assert build_config(TrainConfig, {"data": "d", "image_size": 24,
                                      "model": {"architecture": "efficientnet_b0", "init_from": "runs/a"}})
    assert [ModelConfig(backbone_weights=v).backbone_weights for v in ("none", "None", "", None)] == [None] * 4
    assert ModelConfig(backbone_weights=" ImageNet ").backbone_weights == "imagenet"
    pretrained = ModelConfig(architecture="mobilenet_v3_small", backbone_weights="imagenet")
    assert pretrained.pretrained_backbone
    assert not pretrained.model_copy(update={"architecture": "face_cnn"}).pretrained_backbone  # no backbone
    assert not pretrained.model_copy(update={"init_from": "runs/a"}).pretrained_backbone
    assert not pretrained.model_copy(update={"backbone_weights": None}).pretrained_backbone


def test_cli_train_refuses_a_missing_backbone_file_before_any_cluster_work(tmp_path):
    res = run_cli("train", "--data", str(tmp_path / "d"), "--output", str(tmp_path / "runs"),
                  "--architecture", "mobilenet_v3_small", "--set", f"model.backbone_weights={tmp_path}/w.h5")
    assert res.returncode == 2 and f"model.backbone_weights: no file at {tmp_path}/w.h5" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_check_model_fits_the_prepared_datasets_size():
    from emotion_ray.train import check_model_fits

    cfg = build_config(TrainConfig, {"data": "d", "model": {"architecture": "mobilenet_v3_small"}})
    with pytest.raises(ConfigError, match="mobilenet_v3_small needs image_size >= 32, got 24 .*--image-size"):
        check_model_fits(cfg, {"image_size": 24})
    check_model_fits(cfg, {"image_size": 48})


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


def test_shipped_train_configs_validate():
    from emotion_ray.inference import TestTimeAugmentation

    root = Path(__file__).resolve().parents[1] / "train_configs"
    # The data placeholder is the one key to give.
    shipped = {p.name: load_config(TrainConfig, str(p), {"data": "prepared"}) for p in sorted(root.glob("*.yaml"))}
    recipe = shipped["face_recipe.yaml"]
    assert recipe.model.architecture == "face_cnn" and TestTimeAugmentation.of(recipe.model).views == 10
