"""S3 end to end against a moto server: prepare from s3://, train with checkpoints and run dir on
s3://, score s3:// -> s3://."""

from __future__ import annotations

import json

import pytest

from emotion_ray.config import PrepareConfig, ScoreConfig, StorageConfig, TrainConfig
from emotion_ray.prepare import prepare
from emotion_ray.demo import make_demo_dataset
from emotion_ray.score import read_scores, score
from emotion_ray.train import run_training

pytestmark = pytest.mark.slow


def test_prepare_train_score_all_on_s3(ray_session, s3_endpoint, s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    local = tmp_path / "images"
    make_demo_dataset(local, per_class=20, seed=12, canvas=64)
    fs.put(str(local) + "/", f"{s3_bucket}/raw/", recursive=True)
    store = {"s3_endpoint_url": s3_endpoint}
    base = f"s3://{s3_bucket}"

    manifest = prepare(PrepareConfig(inputs=[f"{base}/raw"], output=f"{base}/dataset", image_size=32, storage=store))
    assert manifest["rows"] == 60

    result = run_training(TrainConfig(data=f"{base}/dataset", output=f"{base}/runs", run_name="s3run", workers=2,
                                      epochs=2, batch_size=16, storage=store, mlflow={"enabled": False}))
    assert result["run_dir"] == f"{base}/runs/s3run" and result["epochs_run"] == 2
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/runs/s3run")}
    assert {"model.keras", "labels.json", "metrics.json", "history.csv", "loss.png"} <= names
    assert any(n.startswith("checkpoint_") for n in names), names

    summary = score(ScoreConfig(model=f"{base}/runs/s3run", inputs=[f"{base}/raw"], output=f"{base}/scores",
                                storage=store), show_progress=False)
    assert summary["rows"] == 60
    rows = read_scores(f"{base}/scores", StorageConfig(**store)).to_pylist()
    assert len({r["path"] for r in rows}) == 60 and all(r["error"] is None for r in rows)
    assert json.loads(fs.cat_file(f"{s3_bucket}/scores/_SUCCESS.json"))["rows"] == 60
