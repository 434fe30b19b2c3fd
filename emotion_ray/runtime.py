"""Starting or joining Ray with the environment every worker needs."""

from __future__ import annotations

import json
import os

# Keras 3 breaks model.fit under MultiWorkerMirroredStrategy; tf-keras works, but only if this
# is set before TensorFlow is first imported in a process, so it must reach every Ray worker
# through the runtime environment rather than being set inside the training function.
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
os.environ.update({k: os.environ.get(k, v) for k, v in WORKER_ENV.items()})


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` / $RAY_ADDRESS (as `ray job submit` sets), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    # Inside `ray job submit` the job's runtime env is merged with ours, and Ray refuses a
    # variable set in both: add only what the job did not set itself.
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    job_env_vars = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    env_vars = {k: v for k, v in WORKER_ENV.items() if k not in job_env_vars}
    ray.init(
        address=address or os.environ.get("RAY_ADDRESS") or None,
        runtime_env={"env_vars": env_vars} if env_vars else None,
        log_to_driver=True,
        logging_level="WARNING",
    )
