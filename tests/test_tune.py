"""Tuning: validation up front, the smoke search end to end, resume after the driver is killed."""

from __future__ import annotations

import json
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


# Runs CLI commands one after the other on a private Ray that declares argv[1] CPUs, as a user's
# small machine would be, and prints their exit statuses (`RCS [...]`); argv[2] is a JSON list of
# argument lists. Commands that outlive argv[3] seconds count as hung: the script stops the Ray it
# started (no orphaned Ray processes on a shared machine) and exits 3. The test session's own Ray
# runs beside it: two Ray instances on one machine, as in issue 30.
ON_DECLARED_CPUS = """
import json, os, sys, threading
from emotion_ray import runtime
runtime.setup_process()
import ray
runtime.init_ray("local", num_cpus=float(sys.argv[1]))
def hung():
    print(f"HUNG: still running after {sys.argv[3]} s", file=sys.stderr, flush=True)
    try:
        ray.shutdown()
    finally:
        os._exit(3)
timer = threading.Timer(float(sys.argv[3]), hung)
timer.daemon = True
timer.start()
from emotion_ray.cli import main
print("RCS", json.dumps([main(argv) for argv in json.loads(sys.argv[2])]), flush=True)
"""


def run_on_declared_cpus(cpus: float, commands: list[list[str]], seconds: float = 600) -> tuple[list[int], str]:
    """(exit status of each command, everything they printed)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-c", ON_DECLARED_CPUS, str(cpus), json.dumps(commands), str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 120, cwd=ROOT, env=env)
    output = res.stdout + res.stderr
    statuses = [line for line in res.stdout.splitlines() if line.startswith("RCS ")]
    assert res.returncode == 0 and statuses, output[-6000:]
    return json.loads(statuses[-1][4:]), output


@pytest.mark.slow
@pytest.mark.parametrize("cpus", [1, 2])
def test_search_and_folds_finish_every_trial_back_to_back_on_1_and_2_cpus_declared(tiny_prepared, tmp_path, cpus):
    """Issue 30: trials one after another on a machine of 1 or 2 CPUs, with another Ray on it (the
    test session's); every trial finishes. Before the fix: ASHA stops a trial at its last epoch,
    Tune kills it and its Train controller, and Ray Train's cleaner, which removes the dead
    controller's worker placement group, crashed on "multiple active Ray instances": the group's
    CPUs stayed reserved and the next trial's workers or reads never started. On 2 CPUs the workers
    also declare a whole CPU each, so a trial's reservation (0.01 + 1) leaves its reads 0.99: they
    asked for 1. On 1 CPU the default sizing (0.01 + 0.99) leaves nothing, and building a dataset
    inside a trial ran Parquet sampling tasks of a whole CPU.
    On 2 CPUs, a deliberately starved input (reads asking a whole CPU, input_stall_timeout_s 30)
    ends its trial with an InputStallError naming the reservations, the search goes on and its
    summary counts the failure; a plain `train` so starved exits 2 with that one line."""
    declared = ["--set", "trial.cpus_per_worker=1"] if cpus == 2 else []
    tune = ["tune", "--config", str(SMOKE), "--set", f"data={tiny_prepared}", "--set", f"output={tmp_path}",
            "--set", "num_samples=2", "--set", "max_concurrent_trials=1", "--set", "base.epochs=1",
            "--set", "base.batch_size=8", "--set", "mlflow.enabled=false", *declared]
    folds = ["evaluate", "--data", str(tiny_prepared), "--output", str(tmp_path / "cv"), "--folds", "2",
             "--workers", "1", "--epochs", "1", "--batch-size", "8", "--max-concurrent-trials", "1",
             "--set", "inner_parts=3", "--set", "model.dense_units=16", "--no-mlflow",
             *(["--set", "cpus_per_worker=1"] if cpus == 2 else [])]
    starved = ["--set", "data_read_cpus=1", "--set", "input_stall_timeout_s=10", "--set", "max_failures=0"]
    commands = [tune, folds]
    if cpus == 2:
        commands += [
            # Two trials back to back: the first reads with a whole CPU each and stalls, the second finishes.
            [*tune[:-2], "--set", "name=starved", "--set", "num_samples=1", "--set", "space.data_read_cpus={grid: [1, 0]}",
             # 30 s: the trial that reads with no CPU must not trip it on a busy machine
             "--set", "base.input_stall_timeout_s=30",
             "--set", "base.max_failures=0", *declared],
            ["train", "--data", str(tiny_prepared), "--output", str(tmp_path / "runs"), "--run-name", "starved",
             "--workers", "1", "--epochs", "1", "--batch-size", "8", "--no-mlflow", "--set", "cpus_per_worker=1.5",
             *starved],
        ]
    started = time.perf_counter()
    statuses, output = run_on_declared_cpus(cpus, commands)
    print(f"{len(commands)} commands on {cpus} CPU(s): {time.perf_counter() - started:.0f} s")
    assert statuses[:2] == [0, 0], output[-6000:]
    trials = pd.read_csv(tmp_path / "smoke" / "trials.csv")
    assert len(trials) == 2 and set(trials["status"]) == {"TERMINATED"}
    cv = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert [f["fold"] for f in cv["per_fold"]] == [0, 1]
    if cpus == 2:
        assert statuses[2:] == [0, 2], output[-6000:]
        trials = pd.read_csv(tmp_path / "starved" / "trials.csv")
        failed = trials[trials["status"] == "ERROR"]
        assert len(trials) == 2 and list(failed["config.data_read_cpus"]) == [1], trials.to_dict("records")
        assert failed["error"].iloc[0].startswith("InputStallError: input stalled: no batch from the train split")
        assert "placement groups hold" in failed["error"].iloc[0]
        assert "failed       1 of 2 trials (trials.csv's error column): 1 x InputStallError: input stalled" in output
        line = next(li for li in output.splitlines() if li.startswith("emotion-ray train: error: "))
        assert "input stalled: no batch from the train split (Ray Data) in 10 s; its read tasks ask 1 CPU each" in line
        assert "placement groups hold 1.5: " in line and "1.5 (this worker's group)" in line, line


@pytest.mark.fast
def test_failed_trials_are_counted_by_their_one_line_reason():
    from emotion_ray.summary import tune_text
    from emotion_ray.tune import error_reason, failures

    # A trial's error arrives as Ray's text of the remote traceback; the worker's message is its reason.
    remote = RuntimeError("ray::ImplicitFunc.train() (pid=1)\n  File \"trials.py\", line 43\n"
                          "emotion_ray.errors.InputStallError: input stalled: no batch from the train split (Ray "
                          "Data) in 10 s; its read tasks ask 1 CPU each. Cluster: 2 CPUs, 0.99 free\n")
    stall = ("InputStallError: input stalled: no batch from the train split (Ray Data) in 10 s; its read tasks ask "
             "1 CPU each. Cluster: 2 CPUs, 0.99 free")
    assert error_reason(remote) == stall
    assert error_reason(ValueError("Traceback\n  File x\nValueError: boom\n")) == "ValueError: boom"
    table = pd.DataFrame({"status": ["TERMINATED", "ERROR", "ERROR"], "error": [None, stall, stall]})
    failed = failures(table)
    assert failed == {"failed_trials": 2, "failure_reasons": {stall: 2}}
    text = tune_text({"experiment": "e", "trials": 3, **failed, "best_trial": "t0", "best_config": {"lr": 0.1},
                      "best_val_loss": 0.5, "best_train_config": "c.yaml", "best_model": "m", "best_test_accuracy": 0.9})
    assert f"failed       2 of 3 trials (trials.csv's error column): 2 x {stall}" in text
    assert "failed" not in tune_text({"experiment": "e", "trials": 3, "failed_trials": 0, "failure_reasons": {},
                                      "best_trial": "t0", "best_config": {}, "best_val_loss": 0.5,
                                      "best_train_config": "c", "best_model": "m", "best_test_accuracy": 0.9})
