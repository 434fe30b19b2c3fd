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
