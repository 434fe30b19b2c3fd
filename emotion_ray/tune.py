"""tune: a Ray Tune search over training configs, described by a YAML file in tune_configs/.

Ray Train V2 pattern: each trial (trials.search_trial, run in a Tune trial's process) is a
function that builds a TensorflowTrainer with train.py's `build_trainer` (the same training
loop as `emotion-ray train`) and fits it; every epoch's report reaches Tune through
TuneReportCallback, so ASHA can stop weak trials early.

Re-running the same command continues the experiment (finished trials are kept). At the end:
trials.parquet / trials.csv ranked by the metric, best_train_config.yaml (accepted unchanged
by `emotion-ray train --config`), and the best trial's model evaluated on the test split,
exported to <output>/<name>/best and registered in MLflow under the experiment's parent run.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from typing import Any

import yaml

from emotion_ray import console, storage
from emotion_ray.config import Distribution, TrainConfig, TuneConfig, build_config, read_yaml
from emotion_ray.errors import ConfigError, StageError

# What each trial's driver function reserves: it only drives its TensorflowTrainer, the
# workers hold the CPUs (Tune refuses an empty resource request, hence a token 1 %).
TRIAL_DRIVER_CPUS = 0.01
TRAINABLE_NAME = "_trial"  # what Tune calls the trials (run_tuning)


def load_tune_config(path: str, overrides: dict[str, Any] | None = None) -> TuneConfig:
    return build_config(TuneConfig, read_yaml(path), overrides)


def tune_domain(dist: Distribution):
    """A config Distribution -> the Ray Tune search domain it describes."""
    from ray import tune

    values = getattr(dist, dist.kind)
    return {
        "loguniform": lambda: tune.loguniform(*values),
        "uniform": lambda: tune.uniform(*values),
        "randint": lambda: tune.randint(*values),
        "choice": lambda: tune.choice(values),
        "grid": lambda: tune.grid_search(values),
    }[dist.kind]()


def model_variants(cfg: TuneConfig) -> list[TrainConfig]:
    """A train config for each combination of architecture, backbone_weights and init_from the search
    can sample (the keys that decide which model a trial builds; the others as in base)."""
    keys = [k for k in ("model.architecture", "model.backbone_weights", "model.init_from") if k in cfg.space]
    return [cfg.train_config(dict(zip(keys, values)))
            for values in itertools.product(*(cfg.space[k].examples() for k in keys))]


def backbone_weights(cfg: TuneConfig) -> dict[tuple[str, str], bytes]:
    """Every pretrained backbone's weights the search can use, read (or downloaded) once by the driver:
    {(architecture, backbone_weights): the file's bytes}. ConfigError for a missing file."""
    from emotion_ray.backbones import resolve_weights

    weights = {}
    for variant in model_variants(cfg):
        key = (variant.model.architecture, variant.model.backbone_weights)
        if variant.model.pretrained_backbone and key not in weights:
            weights[key] = resolve_weights(variant.model, cfg.storage)
    return weights


def _check_resources(cfg: TuneConfig) -> tuple[int, float | None]:
    """Fail fast on trials the cluster can never run; return (concurrent trials, CPUs per worker)."""
    return trial_concurrency(cfg.trial.workers, cfg.trial.use_gpu, cfg.trial.cpus_per_worker,
                             cfg.max_concurrent_trials)


def trial_concurrency(workers: int, use_gpu: bool, cpus_per_worker: float | None,
                      max_concurrent: int | None) -> tuple[int, float | None]:
    """(concurrent trials, CPUs per worker) for trials of `workers` Train workers each on the
    running cluster; ConfigError for a trial the cluster can never run. One CPU stays free for
    Ray Data's read tasks. `max_concurrent` (unset: as many as fit) caps the trials."""
    import ray

    from emotion_ray.train import worker_cpus

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    if use_gpu:
        if gpus < workers:
            raise ConfigError(f"each trial wants {workers} GPU worker(s) but the cluster has {gpus:g} GPU(s)")
        fits = int(gpus // workers)
        return max_concurrent or fits, cpus_per_worker
    if cpus_per_worker:
        per_worker = cpus_per_worker
        if per_worker * workers + TRIAL_DRIVER_CPUS > cpus:
            raise ConfigError(f"each trial wants {per_worker * workers:g} CPUs but the cluster has {cpus:g}")
        # Leave one CPU to Ray Data's read tasks, or trials wait forever for their data.
        fits = max(1, int((cpus - 1) // (per_worker * workers + TRIAL_DRIVER_CPUS)))
        return max_concurrent or fits, per_worker
    trials = max_concurrent or max(1, int((cpus - 1) // (workers + TRIAL_DRIVER_CPUS)))
    return trials, worker_cpus(cpus, workers, False, groups=trials, reserved=TRIAL_DRIVER_CPUS * trials)


def _search(cfg: TuneConfig):
    from ray.tune.schedulers import ASHAScheduler

    search_alg = None
    if cfg.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=cfg.metric, mode=cfg.mode, seed=cfg.search.seed)
    scheduler = None
    if cfg.scheduler.type == "asha":
        max_t = int(cfg.base.get("epochs", TrainConfig.model_fields["epochs"].default))
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(max_t, cfg.scheduler.grace_period),
                                  grace_period=cfg.scheduler.grace_period,
                                  reduction_factor=cfg.scheduler.reduction_factor)
    return search_alg, scheduler


def trials_bar(desc: str = "tuning", unit: str = "trial"):
    """A Tune callback (it runs in this driver) drawing trials finished / trials on the terminal."""
    from ray.tune import Callback

    class TrialsBar(Callback):
        bar = None

        def setup(self, total_num_samples: int | None = None, **info):
            self.bar = console.progress(total=total_num_samples, desc=desc, unit=unit)

        def on_step_end(self, iteration, trials, **info):
            finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)  # restored ones too
            if self.bar is not None and finished != self.bar.n:
                self.bar.update(finished - self.bar.n)

        def on_experiment_end(self, trials, **info):
            self.on_step_end(0, trials)
            if self.bar is not None:
                self.bar.close()

        def __getstate__(self):  # Tune pickles its run config, this included, to restore from
            return {}

    return TrialsBar()


def _results_table(grid, cfg: TuneConfig):
    import pandas as pd

    rows = []
    for result in grid:
        df = result.metrics_dataframe
        row: dict[str, Any] = {"trial_id": (result.metrics or {}).get("trial_id") or _trial_id(result),
                               "status": "ERROR" if result.error else "TERMINATED",
                               "error": error_reason(result.error) if result.error else None}
        row.update({f"config.{k}": v for k, v in (result.config or {}).items() if k != "_setup"})
        if df is not None and cfg.metric in df:
            best = df.loc[df[cfg.metric].idxmin() if cfg.mode == "min" else df[cfg.metric].idxmax()]
            row.update(best_metric=float(best[cfg.metric]), best_epoch=int(best.get("epoch", 0)),
                       epochs_run=int(df["epoch"].max()) if "epoch" in df else len(df))
            for col in ("val_categorical_accuracy", "val_loss", "loss"):
                if col in df:
                    row[f"at_best.{col}"] = float(best[col])
            row["checkpoint_path"] = df["checkpoint_path"].dropna().iloc[-1] if "checkpoint_path" in df else None
        rows.append(row)
    table = pd.DataFrame(rows)
    if "best_metric" in table:
        table = table.sort_values("best_metric", ascending=cfg.mode == "min", na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def _trial_id(result) -> str | None:
    """A trial's id from its folder (`_trial_<id>_...`): a trial that failed before its first report has no metrics."""
    path = getattr(result, "path", None) or ""
    parts = os.path.basename(str(path).rstrip("/")).split("_")
    return "_".join(parts[2:4]) if len(parts) >= 4 else None


def error_reason(error: BaseException) -> str:
    """Why a trial failed, in one line: a Train worker's InputStallError as it was worded, else the
    last line of the error (Tune's errors carry the whole remote traceback before it)."""
    from emotion_ray.train import input_stall

    stall = input_stall(error)
    if stall is not None:
        return f"InputStallError: {stall}"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def failures(table) -> dict[str, Any]:
    """The summary's account of failed trials: how many, and how many failed for each reason
    (its first 300 characters; the whole reason is in trials.csv's `error` column)."""
    failed = table[table["status"] == "ERROR"] if "status" in table else table.iloc[0:0]
    reasons: dict[str, int] = {}
    for reason in failed.get("error", []):
        key = str(reason)[:300]
        reasons[key] = reasons.get(key, 0) + 1
    return {"failed_trials": len(failed), "failure_reasons": reasons}


def run_tuning(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or continue) the search described by `config_path`; returns the summary."""
    import ray.tune
    from ray.train import Checkpoint

    from emotion_ray import tracking
    from emotion_ray.evaluate import export_run
    from emotion_ray.runtime import init_ray
    from emotion_ray.train import check_model_fits, resolve_dataset, run_storage, training_datasets
    from emotion_ray.trials import search_trial

    cfg = load_tune_config(config_path, overrides)
    weights = backbone_weights(cfg)  # before any cluster work: a missing file stops here
    init_ray()
    user_cpus_per_worker = cfg.trial.cpus_per_worker
    concurrency, cpus_per_worker = _check_resources(cfg)
    console.keep_log_in(cfg.experiment_dir)  # a search that can run: its folder is made
    cfg.trial.cpus_per_worker = cpus_per_worker  # one decision for every trial, made here
    probe = cfg.train_config({})
    dataset_uri, manifest = resolve_dataset(probe, cfg.experiment_dir)
    for variant in model_variants(cfg):
        check_model_fits(variant, manifest)

    parent_run_id = None
    if cfg.mlflow.enabled:
        parent_run_id = tracking.start_run(cfg.mlflow, f"tune_{cfg.name}", cfg.model_dump(mode="json"), resume=True)
        tracking.log_dataset(cfg.mlflow, parent_run_id, dataset_uri, manifest, cfg.storage)
    setup = {"tune": cfg.model_dump(mode="json"), "dataset_uri": dataset_uri, "manifest": manifest,
             "parent_run_id": parent_run_id,
             # the trials' runs name this driver's command and commit, not a Tune worker's
             "source_tags": tracking.source_tags() if cfg.mlflow.enabled else None}
    param_space = {key: tune_domain(dist) for key, dist in cfg.space.items()}
    param_space["_setup"] = setup
    # Every trial samples train-config keys that leave the data as it is: one pair of datasets,
    # built here before any trial holds CPUs (train.training_datasets), serves them all.
    with_weights = ray.tune.with_parameters(search_trial, backbone_weights=weights,
                                            datasets=training_datasets(probe, dataset_uri))
    # Tune names trials after the trainable and checks that name when an experiment continues:
    # experiments (and their trial folders) started before the trial moved to trials.py say `_trial`.
    with_weights.__name__ = TRAINABLE_NAME
    trainable = ray.tune.with_resources(with_weights, {"cpu": TRIAL_DRIVER_CPUS})
    storage_probe = TrainConfig(data=cfg.data, output=cfg.output, storage=cfg.storage)
    storage_path, storage_fs = run_storage(storage_probe)
    experiment_path = f"{storage_path}/{cfg.name}" if storage_fs else cfg.experiment_dir

    if ray.tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs):
        print(f"continuing tuning experiment {cfg.experiment_dir}", file=console.out())
        tuner = ray.tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True,
                                       param_space=param_space, storage_filesystem=storage_fs)
    else:
        search_alg, scheduler = _search(cfg)
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=ray.tune.TuneConfig(
                metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples, search_alg=search_alg,
                scheduler=scheduler, max_concurrent_trials=concurrency, time_budget_s=cfg.time_budget_s,
            ),
            run_config=ray.tune.RunConfig(name=cfg.name, storage_path=storage_path,
                                          storage_filesystem=storage_fs, verbose=1, callbacks=[trials_bar()]),
        )
    grid = tuner.fit()

    table = _results_table(grid, cfg)
    out = cfg.experiment_dir
    with tempfile.TemporaryDirectory() as tmp:
        table.to_parquet(os.path.join(tmp, "trials.parquet"), index=False)
        table.to_csv(os.path.join(tmp, "trials.csv"), index=False)
        for name in ("trials.parquet", "trials.csv"):
            storage.upload_file(os.path.join(tmp, name), storage.join(out, name), cfg.storage)
    failed = failures(table)
    ranked = table.dropna(subset=["checkpoint_path"]) if "checkpoint_path" in table else table.iloc[0:0]
    if ranked.empty:
        why = "; ".join(f"{n} x {reason}" for reason, n in failed["failure_reasons"].items())
        raise StageError(f"no trial of {cfg.name} produced a checkpoint" + (f": {why}" if why else "")
                         + "; see the log")
    best = ranked.iloc[0]
    sampled = {k[len("config."):]: _plain(v) for k, v in best.items() if k.startswith("config.")}
    best_cfg = cfg.train_config(sampled, run_name=None)
    best_train = best_cfg.model_dump(mode="json", exclude={"run_name", "resume"})
    best_train["output"] = storage.join(out, "best_config_runs")
    best_train["cpus_per_worker"] = user_cpus_per_worker  # let `train` size workers for its own cluster
    storage.write_bytes_atomic(storage.join(out, "best_train_config.yaml"),
                               yaml.safe_dump(best_train, sort_keys=False).encode(), cfg.storage)

    fs = storage.pyarrow_filesystem(out, cfg.storage)
    checkpoint = Checkpoint(storage.strip_scheme(best["checkpoint_path"]) if storage.is_s3(best["checkpoint_path"])
                            else best["checkpoint_path"], filesystem=fs)
    metrics = export_run(checkpoint, best_cfg, dataset_uri, manifest, storage.join(out, "best"), parent_run_id)
    return {
        "experiment": out,
        "trials": len(table),
        **failed,
        "best_trial": best["trial_id"],
        "best_config": sampled,
        f"best_{cfg.metric}": float(best["best_metric"]),
        "best_train_config": storage.join(out, "best_train_config.yaml"),
        "best_model": storage.join(out, "best", "model.keras"),
        "best_test_accuracy": metrics["categorical_accuracy"],
        "registered_model": metrics.get("registered_model"),
    }


def _plain(value: Any) -> Any:
    """numpy scalars from pandas -> plain Python for YAML."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
