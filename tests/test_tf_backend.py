"""Ray Train's TensorFlow backend without the TensorFlow import: each worker gets its group's
TF_CONFIG, and Ray Train's controller never loads TensorFlow."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from emotion_ray.tf_backend import MultiWorkerTFConfig
from tests.conftest import ray_processes

pytestmark = pytest.mark.slow


def test_workers_get_their_groups_tf_config_and_the_controller_never_loads_tensorflow(ray_session, tmp_path):
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    seen = tmp_path / "seen"
    seen.mkdir()

    def loop():
        import os

        import ray.train

        rank = ray.train.get_context().get_world_rank()
        (seen / f"{rank}.json").write_text(json.dumps({k: os.environ.get(k) for k in ("TF_CONFIG", "TF_USE_LEGACY_KERAS")}))
        time.sleep(2)  # the controller stays up while the test looks at it

    trainer = TensorflowTrainer(loop, tensorflow_config=MultiWorkerTFConfig(),
                                scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                                run_config=ray.train.RunConfig(name="tf_config", storage_path=str(tmp_path)))
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(trainer.fit)
        while not ray_processes("TrainController"):
            assert not future.done(), future.result()
            time.sleep(0.1)
        [controller] = ray_processes("TrainController")
        time.sleep(1)  # its set-up (the backend's on_start among it) done
        libraries = {m.path for m in controller.memory_maps()}
        result = future.result(timeout=300)
    assert not [path for path in libraries if "tensorflow" in path.lower()]
    assert result.error is None
    configs = [json.loads((seen / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert all(c["TF_USE_LEGACY_KERAS"] == "1" for c in configs)
    tf_configs = [json.loads(c["TF_CONFIG"]) for c in configs]
    assert [c["task"] for c in tf_configs] == [{"type": "worker", "index": 0}, {"type": "worker", "index": 1}]
    workers = tf_configs[0]["cluster"]["worker"]
    assert tf_configs[1]["cluster"]["worker"] == workers and len(set(workers)) == 2 and all(":" in w for w in workers)
