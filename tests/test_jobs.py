"""`ray job submit` against a real local Ray head started by the test, end to end on S3 (moto) and on
the GPU path (the head declares two GPUs); cluster.yaml against Ray's schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from emotion_ray.config import StorageConfig
from emotion_ray.score import read_scores
from tests.conftest import BIN, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_valid_for_the_ray_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # Ray's own JSON schema, after Ray fills its AWS defaults
    import ray

    assert raw["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
               if "ray start" in c)
    ingress = raw["provider"]["security_group"]["IpPermissions"]
    assert [p["FromPort"] for p in ingress] == [22] and "0.0.0.0/0" not in json.dumps(ingress)
    text = (ROOT / "cluster.yaml").read_text()
    assert "aws_secret_access_key" not in text.lower() and "IamInstanceProfile" in text
    assert {"gpu_workers", "cpu_workers"} <= set(raw["available_node_types"])


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` with its own ports and temp dir, declaring 2 GPUs: TensorFlow finds none
    and runs on the CPU, but Ray places GPU work exactly as on a GPU node (3 CPUs: two predictors
    at one CPU each and room to decode, as a GPU node has). Stopped by the
    processes it started."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead_", dir="/tmp")
    ports = {"--port": free_port(), "--dashboard-port": free_port(), "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--min-worker-port": 20000, "--max-worker-port": 20999}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--num-cpus", "3", "--num-gpus", "2", "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir, "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        wait_for_port(ports["--dashboard-port"], timeout=120)
        yield address, env
    finally:
        mine = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        for proc in mine:
            proc.terminate()
        psutil.wait_procs(mine, timeout=5)  # some of Ray's processes ignore SIGTERM: killed next
        for proc in mine:
            if proc.is_running():
                proc.kill()


def submit(address: str, env: dict, *args: str, timeout: float = 900) -> str:
    """`ray job submit` a jobs/ entry point, wait for it, return its logs; fail with them if it failed."""
    job_id = f"test_{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"TF_USE_LEGACY_KERAS": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}
    ray = str(BIN / "ray")
    res = subprocess.run(
        [ray, "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    status = subprocess.run([ray, "job", "status", "--address", address, job_id], env=env, capture_output=True,
                            text=True, timeout=120)
    assert f"job '{job_id}' succeeded" in (status.stdout + status.stderr).lower(), (res.stdout + res.stderr)[-5000:]
    return res.stdout


def gpus_held(address: str, env: dict, kind: str) -> dict[str, list[float]]:
    """GPUs asked for by each of the head's actors or plain tasks (`kind`: "actors" or "tasks") that
    asked for any, by class or function name, finished ones included: what Ray placed by GPU."""
    res = subprocess.run([str(BIN / "ray"), "list", kind, "--address", address, "--detail", "--format", "json",
                          "--limit", "10000"], env=env, capture_output=True, text=True, timeout=120, check=True)
    held: dict[str, list[float]] = {}
    for entry in json.loads(res.stdout):
        if kind == "tasks" and entry.get("type") != "NORMAL_TASK":  # actor creation counts under actors
            continue
        # Work in a placement group (Ray Train's workers) asks for its group's GPU_group_* resource.
        gpus = max((v for k, v in (entry.get("required_resources") or {}).items()
                    if k == "GPU" or k.startswith("GPU_group_")), default=0)
        if gpus:
            held.setdefault(entry.get("class_name") or entry["func_or_class_name"], []).append(gpus)
    return held


@pytest.mark.slow
def test_prepare_train_score_on_gpus_via_ray_job_submit_all_on_s3(ray_head, s3_endpoint, s3_bucket, tmp_path):
    """The users' path in one test: jobs/ submitted to a GPU head, data, runs and scores on S3
    (a moto server), checkpoints on S3, MLflow on sqlite. Train places one GPU per worker and the
    test evaluation asks for one; `score` starts one predictor per GPU."""
    import s3fs

    from emotion_ray.demo import make_demo_dataset

    address, env = ray_head
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    local = tmp_path / "images"
    make_demo_dataset(local, per_class=20, seed=11, canvas=64)
    fs.put(str(local) + "/", f"{s3_bucket}/raw/", recursive=True)
    base, endpoint = f"s3://{s3_bucket}", ["--s3-endpoint-url", s3_endpoint]

    logs = submit(address, env, "jobs/prepare.py", "--input", f"{base}/raw", "--output", f"{base}/dataset",
                  "--image-size", "32", *endpoint)
    assert "prepared dataset" in logs
    assert json.loads(fs.cat_file(f"{s3_bucket}/dataset/manifest.json"))["rows"] == 60

    submit(address, env, "jobs/train.py", "--data", f"{base}/dataset", "--output", f"{base}/runs", "--run-name", "job",
           "--workers", "2", "--use-gpu", "--epochs", "1", "--batch-size", "16",
           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *endpoint)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/runs/job")}
    assert {"model.keras", "labels.json", "metrics.json", "history.csv", "loss.png"} <= names
    assert any(n.startswith("checkpoint_") for n in names), names
    assert json.loads(fs.cat_file(f"{s3_bucket}/runs/job/metrics.json"))["epochs_run"] == 1
    # Two Train workers on a GPU each; the test evaluation in a task on one GPU.
    assert gpus_held(address, env, "actors") == {"RayTrainWorker": [1.0, 1.0]}
    assert gpus_held(address, env, "tasks") == {"evaluate_checkpoint": [1.0]}

    submit(address, env, "jobs/score.py", "--model", f"{base}/runs/job", "--input", f"{base}/raw",
           "--output", f"{base}/scores", "--use-gpu", *endpoint)
    rows = read_scores(f"{base}/scores", StorageConfig(s3_endpoint_url=s3_endpoint)).to_pylist()
    assert len({r["path"] for r in rows}) == len(rows) == 60 and all(r["error"] is None for r in rows)
    summary = json.loads(fs.cat_file(f"{s3_bucket}/scores/_SUCCESS.json"))
    assert summary["rows"] == 60 and summary["errors"] == {}
    predictors = {k: v for k, v in gpus_held(address, env, "actors").items() if "Predictor" in k}
    assert list(predictors.values()) == [[1.0, 1.0]], predictors  # one predictor per GPU
