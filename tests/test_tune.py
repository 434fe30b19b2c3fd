"""Tuning: validation up front, the smoke search end to end, resume after the driver is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from emotion_ray.config import ConfigError, TrainConfig, load_config
from emotion_ray.tune import load_tune_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tune_configs" / "smoke.yaml"


@pytest.mark.fast
def test_shipped_configs_validate():
    paths = sorted((ROOT / "tune_configs").glob("*.yaml"))
    assert {"smoke.yaml", "overnight.yaml", "face_recipe_overnight.yaml"} <= {p.name for p in paths}
    for path in paths:
        load_tune_config(str(path))


@pytest.mark.fast
def test_backbone_weights_are_read_once_per_architecture_before_any_trial(tmp_path):
    from emotion_ray.backbones import HDF5_MAGIC
    from emotion_ray.tune import backbone_weights, model_variants

    (tmp_path / "v3.h5").write_bytes(HDF5_MAGIC + b"v3")
    raw = yaml.safe_load(SMOKE.read_text())
    raw["base"]["model.backbone_weights"] = str(tmp_path / "v3.h5")
    raw["space"]["model.architecture"] = {"choice": ["face_cnn", "mobilenet_v3_small"]}
    raw["space"]["model.init_from"] = {"choice": [None, "runs/parent"]}
    cfg = load_tune_config_dict(raw)
    assert len(model_variants(cfg)) == 4
    # Only the variant that builds a backbone from the file needs it (init_from reuses a model).
    assert backbone_weights(cfg) == {("mobilenet_v3_small", str(tmp_path / "v3.h5")): HDF5_MAGIC + b"v3"}
    raw["base"]["model.backbone_weights"] = str(tmp_path / "missing.h5")
    with pytest.raises(ConfigError, match="no file at"):
        backbone_weights(load_tune_config_dict(raw))


@pytest.mark.fast
def test_sampled_values_never_leak_into_a_base_section():
    raw = yaml.safe_load(SMOKE.read_text())
    raw["base"]["model"] = {"dropout": 0.1, "architecture": "face_cnn"}
    raw["space"] = {"model.dropout": {"choice": [0.3, 0.4]}}
    cfg = load_tune_config_dict(raw)  # validation builds a train config per example value
    assert cfg.base["model"] == {"dropout": 0.1, "architecture": "face_cnn"}
    assert cfg.train_config({}).model.dropout == 0.1 and cfg.train_config({"model.dropout": 0.3}).model.dropout == 0.3


def load_tune_config_dict(raw: dict):
    from emotion_ray.config import TuneConfig, build_config

    return build_config(TuneConfig, raw)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"space": {"learning_rat": {"loguniform": [0.001, 0.01]}}}, "learning_rat: unknown key"),
        ({"space": {"learning_rate": {"loguniform": [0.0, 0.01]}}}, "loguniform needs low > 0"),
        ({"space": {"learning_rate": {"uniform": [0.1, 0.01]}}}, "low < high"),
        ({"space": {"model.dropout": {"choice": [0.2, 1.5]}}}, "model.dropout"),
        ({"space": {"lr": {"normal": [0, 1]}}}, "normal: unknown key"),
        ({"num_samplez": 3}, "num_samplez: unknown key"),
        ({"search": {"algorithm": "optuna"}, "space": {"batch_size": {"grid": [8, 16]}}}, "Optuna samples"),
        ({"base": {"workers": 4}}, "not under base"),
    ],
)
def test_bad_config_fails_fast_with_a_clear_message(override, message):
    raw = yaml.safe_load(SMOKE.read_text())
    raw.update(override)
    with pytest.raises(ConfigError, match=message):
        from emotion_ray.config import build_config
        from emotion_ray.tune import TuneConfig

        build_config(TuneConfig, raw)


def test_impossible_resources_fail_before_any_trial(ray_session, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "emotion_ray.cli", "tune", "--config", str(SMOKE), "--set", "trial.use_gpu=true",
         "--set", f"output={tmp_path}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address},
    )
    assert res.returncode == 2 and "GPU" in res.stderr
    assert not (tmp_path / "smoke").exists()


@pytest.mark.slow
def test_smoke_search_resumes_after_driver_kill_and_exports_a_best_config(ray_session, prepared_demo, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "emotion_ray.cli", "tune", "--config", str(SMOKE),
           "--set", f"data={prepared_demo}", "--set", f"output={tmp_path}",
           "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
           # One finished trial and one pending when the driver is killed; one epoch a trial: its
           # first checkpoint is its last, so the kill never waits on an epoch nothing asserts on.
           "--set", "num_samples=2", "--set", "base.epochs=1"]
    experiment = tmp_path / "smoke"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    # Kill the driver once the first trial has checkpointed, while later trials are pending.
    while not list(experiment.glob("train_runs/*/checkpoint_*")):
        assert time.time() < deadline and proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(5)  # let Tune save its experiment state once
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (experiment / "trials.csv").exists()
    # Tune checks a continued experiment's trainable by name: experiments saved before the trial
    # moved to trials.py named it `_trial` (tune.TRAINABLE_NAME), and their trial folders say so.
    assert list(experiment.glob("_trial_*")), sorted(p.name for p in experiment.iterdir())

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    output = res.stdout + res.stderr
    (tmp_path / "second.log").write_text(output)
    traceback_at = output.rfind("Traceback")  # Tune's tables would push the cause out of view
    assert res.returncode == 0, output[traceback_at : traceback_at + 8000] if traceback_at >= 0 else output[-8000:]
    assert "continuing tuning experiment" in res.stdout

    trials = pd.read_csv(experiment / "trials.csv")
    assert len(trials) == 2 and list(trials["rank"]) == [1, 2]
    assert trials["best_metric"].is_monotonic_increasing  # ranked by val_loss, min first
    assert len(pd.read_parquet(experiment / "trials.parquet")) == 2
    assert (experiment / "best" / "model.keras").exists() and (experiment / "best" / "metrics.json").exists()

    # The best config is a train config that `emotion-ray train --config` accepts unchanged.
    best = load_config(TrainConfig, str(experiment / "best_train_config.yaml"))
    assert best.cpus_per_worker is None  # sized by `train` for its own cluster
    assert best.learning_rate == pytest.approx(trials.loc[0, "config.learning_rate"])
    assert best.data == str(prepared_demo) and best.model.dense_units == trials.loc[0, "config.model.dense_units"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("emotion_ray_tune")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_name == "tune_smoke"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(children) == 2
    # Every run names the driver's command and the dataset it trained on; each trial is described.
    assert {r.data.tags["mlflow.source.name"] for r in parent + children} == {"cli.py tune"}
    assert {r.inputs.dataset_inputs[0].dataset.digest for r in parent + children} == \
        {parent[0].data.tags["emotion_ray.dataset_manifest_sha256"][:12]}
    assert all("training run `trial_" in r.data.tags["mlflow.note.content"] for r in children)
    assert client.get_latest_versions("emotion_cnn_tuned")


@pytest.mark.fast
def test_search_space_maps_onto_tune_domains():
    from ray import tune

    from emotion_ray.config import Distribution
    from emotion_ray.tune import tune_domain

    lr = tune_domain(Distribution(loguniform=[1e-4, 1e-2]))
    assert isinstance(lr, tune.search.sample.Float) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert isinstance(lr.sampler, tune.search.sample.LogUniform)
    units = tune_domain(Distribution(randint=[8, 64]))
    assert isinstance(units, tune.search.sample.Integer) and (units.lower, units.upper) == (8, 64)
    assert tune_domain(Distribution(choice=["seed_cnn", "wide_cnn"])).categories == ["seed_cnn", "wide_cnn"]
    assert tune_domain(Distribution(grid=[16, 32])) == {"grid_search": [16, 32]}
