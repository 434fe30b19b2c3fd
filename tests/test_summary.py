"""The demo's closing screen (`python -m emotion_ray.summary DEMO_DIR`): read at a glance."""

from __future__ import annotations

import json

import pytest

from emotion_ray import summary


@pytest.mark.fast
def test_the_demo_summary_writes_counts_as_words_not_python_dicts(tmp_path, capsys):
    (tmp_path / "dataset").mkdir()
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "predictions").mkdir()
    (tmp_path / "dataset" / "manifest.json").write_text(json.dumps(
        {"rows": 60, "split_rows": {"train": 37, "val": 16, "test": 7}}))
    (tmp_path / "runs" / "demo" / "metrics.json").write_text(json.dumps(
        {"best_epoch": 1, "epochs_run": 2, "categorical_accuracy": 0.5, "macro_precision": 0.5, "macro_recall": 0.5,
         "test_rows": 7, "per_class": {"sad": {"precision": 0.5, "recall": 1.0, "support": 2}}}))
    (tmp_path / "predictions" / "_SUCCESS.json").write_text(json.dumps(
        {"rows": 60, "labels": {"angry": 6, "sad": 54}, "errors": {}}))
    assert summary.main(str(tmp_path)) == 0
    screen = capsys.readouterr().out
    assert "(60 images: train 37, val 16, test 7)" in screen
    assert "(60 rows: angry 6, sad 54; errors none)" in screen
    assert "{" not in screen.replace("{loss,accuracy,confusion_matrix,reliability}", ""), screen
    assert "http://127.0.0.1:5000" in screen  # no database: the UI's start page


@pytest.mark.fast
def test_train_summary_says_why_it_stopped_before_its_epochs_and_names_a_runnable_mlflow(tmp_path):
    import os
    import sys

    from emotion_ray.config import TrainConfig

    cfg = TrainConfig(data="d", epochs=12, early_stopping_patience=3,
                      mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    result = {"run_dir": "runs/demo", "epochs_run": 10, "best_epoch": 7, "categorical_accuracy": 0.8,
              "macro_precision": 0.8, "macro_recall": 0.8, "test_rows": 37, "mlflow_run_id": "abc"}
    text = summary.train_text(result, cfg)
    assert text.startswith("trained runs/demo: 10 epochs of 12 (early stopping: val_loss did not improve for 3 "
                           "epochs), the best (epoch 7) saved"), text
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    assert f"open with    {mlflow} ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in text
    assert summary.train_text({**result, "epochs_run": 12}, cfg).startswith("trained runs/demo: 12 epochs, the best")
