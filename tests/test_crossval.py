"""Cross-validation (crossval.py, `emotion-ray evaluate`): config checks before any cluster work,
and K folds end to end on 2 workers."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from emotion_ray.config import ConfigError, CrossValidationConfig


@pytest.mark.fast
@pytest.mark.parametrize("override, message", [
    ({"folds": 1}, "folds: Input should be greater than or equal to 2"),
    ({"resume": True, "run_name": "x"}, "a cross-validation starts over"),
    ({"pool": "test"}, "pool: Input should be"),
    ({"inner_parts": 1}, "inner_parts"),
    ({"batch_size": 7, "workers": 2}, "must divide evenly"),
])
def test_bad_cross_validation_config_fails_fast(override, message):
    from emotion_ray.config import build_config

    with pytest.raises(ConfigError, match=message):
        build_config(CrossValidationConfig, {"data": "d", "output": "o", **override})


@pytest.mark.fast
def test_more_folds_than_a_class_has_groups_exits_2_before_any_cluster_work(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = tmp_path / "ds"
    (ds / "data" / "split=train").mkdir(parents=True)
    pq.write_table(pa.table({"image": [b"x"] * 5, "label_index": pa.array([0, 0, 1, 1, 1], pa.int32()),
                             "group": ["a", "b", "c", "d", "e"]}), ds / "data" / "split=train" / "p.parquet")
    (ds / "manifest.json").write_text(json.dumps({"classes": ["angry", "happy"], "image_size": 8,
                                                  "shards": {"train": ["data/split=train/p.parquet"], "val": [],
                                                             "test": []}}))
    res = subprocess.run([sys.executable, "-m", "emotion_ray.cli", "evaluate", "--data", str(ds), "--output",
                          str(tmp_path / "cv"), "--folds", "3", "--no-mlflow"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr
    assert "class 'angry' has 2 group(s) in the pool, fewer than folds=3" in res.stderr
    assert not (tmp_path / "cv").exists()

@pytest.mark.slow
def test_k_fold_on_2_workers_gives_k_fold_results_and_mean_std(ray_session, tiny_prepared, tmp_path):
    from mlflow.tracking import MlflowClient

    from emotion_ray.config import CrossValidationConfig
    from emotion_ray.crossval import run_cross_validation

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # Two folds trained at once, one Train worker each: K-fold on 2 workers.
    cfg = CrossValidationConfig(data=str(tiny_prepared), output=str(tmp_path / "cv"), folds=2, inner_parts=3,
                                workers=1, max_concurrent_trials=2, epochs=1, batch_size=8, model={"dense_units": 16},
                                mlflow={"tracking_uri": uri, "experiment": "cv_test"})
    started = time.perf_counter()
    result = run_cross_validation(cfg)
    print(f"cross-validation took {time.perf_counter() - started:.1f} s")

    on_disk = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert on_disk["per_fold"] == result["per_fold"] and len(result["per_fold"]) == 2
    heldout = [f["rows"]["test"] for f in result["per_fold"]]
    assert sum(heldout) == result["pool_rows"] == 36  # every labelled row held out once
    for k, fold in enumerate(result["per_fold"]):
        manifest = json.loads((tmp_path / "cv" / "folds" / f"fold_{k}" / "dataset" / "manifest.json").read_text())
        assert fold["rows"] == manifest["split_rows"] and sum(fold["rows"].values()) == 36
        assert sum(map(sum, fold["confusion_matrix"]["rows_true_cols_predicted"])) == fold["rows"]["test"]
        assert (tmp_path / "cv" / "folds" / f"fold_{k}" / "metrics.json").exists()
    acc = [f["accuracy"] for f in result["per_fold"]]
    assert result["mean_std"]["accuracy"]["mean"] == pytest.approx(np.mean(acc))
    assert result["mean_std"]["accuracy"]["std"] == pytest.approx(np.std(acc, ddof=1))
    assert result["mean_std"]["macro_f1"]["values"] == [f["macro_f1"] for f in result["per_fold"]]
    assert result["pooled"]["test_rows"] == 36
    assert result["pooled"]["confusion_matrix"]["rows_true_cols_predicted"] == np.sum(
        [f["confusion_matrix"]["rows_true_cols_predicted"] for f in result["per_fold"]], axis=0).tolist()

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("cv_test").experiment_id])
    parent = [r for r in runs if r.info.run_name == "cv_cv"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and sorted(r.info.run_name for r in children) == ["cv_cv_fold_0", "cv_cv_fold_1"]
    assert parent[0].data.metrics["cv_accuracy_mean"] == pytest.approx(result["mean_std"]["accuracy"]["mean"])
    assert sorted(r.data.metrics["heldout_accuracy"] for r in children) == pytest.approx(sorted(acc))
    assert {r.info.status for r in parent + children} == {"FINISHED"}


@pytest.mark.fast
def test_summary_prints_mean_std_and_the_pooled_confusion():
    from emotion_ray.folds import summarize
    from emotion_ray.metrics import classification_metrics
    from emotion_ray.summary import cv_text

    classes = ["angry", "happy"]
    folds = [classification_metrics(np.array([[4, 1], [0, 5]]), classes),
             classification_metrics(np.array([[3, 2], [1, 4]]), classes)]
    spread = summarize(folds, classes)
    pooled = spread.pop("pooled")
    text = cv_text({"folds": 2, "dataset": "ds", "pool_rows": 20, "pool": "all", "pool_groups": 18, "seconds": 9.0,
                    "per_fold": [{"rows": {"test": 10}}, {"rows": {"test": 10}}], "mean_std": spread,
                    "pooled": pooled, "classes": classes, "output": "cv", "mlflow": None}, None)
    assert "accuracy     0.800 ± 0.141   folds 0.900, 0.700" in text
    assert "held out 10, 10" in text and "on 20 held-out rows" in text
    rows = [line.split() for line in text.splitlines()]
    assert ["angry", "7", "3"] in rows and ["happy", "1", "9"] in rows  # the pooled confusion, rows true
