"""Ray Train's TensorFlow backend without `import tensorflow` where nothing trains.

`ray.train.tensorflow` imports TensorFlow in its package `__init__`, so Ray's TensorflowConfig
makes every process that unpickles it import TensorFlow: the driver, and Ray Train's controller
actor, which only sets TF_CONFIG on the workers. That import costs the controller seconds of
CPU and hundreds of MB per run, on the critical path before the workers start (bench/RESULTS.md,
run start-up). `MultiWorkerTFConfig` does what Ray's `_TensorflowBackend.on_start` does (Ray
2.60) from this TensorFlow-free module. It is part of runtime.py's Ray-version review: its test
is tests/test_tf_backend.py.
"""

from __future__ import annotations

import json
import os

import ray
from ray.train.backend import Backend, BackendConfig


def _worker_address() -> str:
    """This worker's host:port for TF_CONFIG (a free port on its node)."""
    from ray._common.network_utils import build_address
    from ray.train._internal.utils import get_address_and_port

    return build_address(*get_address_and_port())


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    """On worker `index`: the cluster MultiWorkerMirroredStrategy reads from TF_CONFIG."""
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": worker_addresses},
                                          "task": {"type": "worker", "index": index}})
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


class _TFConfigBackend(Backend):
    def on_start(self, worker_group, backend_config) -> None:
        addresses = worker_group.execute(_worker_address)
        ray.get([worker_group.execute_single_async(i, _set_tf_config, worker_addresses=addresses, index=i)
                 for i in range(len(worker_group))])


class MultiWorkerTFConfig(BackendConfig):
    """DataParallelTrainer's backend_config for MultiWorkerMirroredStrategy workers (what
    TensorflowTrainer passes, minus the TensorFlow import)."""

    @property
    def backend_cls(self):
        return _TFConfigBackend
