"""Process set-up, and every switch that depends on the Ray version, in one file.

`setup_process()` is the one place that writes the environment; the CLI, `jobs/`, the tests,
the benchmarks and the MLflow model call it before anything imports TensorFlow. Nothing in
the package writes the environment at import time.

The rest are small named functions around behaviour that moved between Ray releases (private
address resolution, the job's runtime env, the Parquet reader, operator fusion, actor waits).
Each has a test in tests/test_runtime.py, so a Ray upgrade is a review of this one file.
Checked against Ray 2.60.
"""

from __future__ import annotations

import contextlib
import math
import json
import os
from typing import Any, Iterator

# Keras 3 breaks model.fit under MultiWorkerMirroredStrategy; tf-keras works, but only if this
# is set before TensorFlow is first imported in a process, so it must reach every Ray worker
# before any code runs there: through the runtime environment, or by inheritance when
# init_ray starts Ray itself (setting it inside the training function is too late).
# TF_ENABLE_ONEDNN_OPTS: TensorFlow 2.21 leaves its oneDNN CPU kernels off unless asked on
# machines without its favoured instruction sets (the AVX2 development box); asked, training and
# inference ran about twice as fast there (bench/RESULTS.md, oneDNN). Every process of a run
# gets the same value, so predict, score and the MLflow model keep computing the same bits.
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "1"}


def setup_process() -> None:
    """Give this process (and the Ray it may start) the environment TensorFlow needs.

    Idempotent; a value the user exported wins. Must run before TensorFlow is imported: after
    that, `tf.keras` is already fixed, and `model.py` refuses to run on Keras 3.
    """
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)


def starts_its_own_ray(address: str | None) -> bool:
    """Whether `ray.init(address)` will start a new Ray here rather than join a running one.

    Ray's own address resolution answers it (RAY_ADDRESS, then a `ray start` head on this
    machine); it is private API, so any doubt answers False (the safe, slower path).
    """
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address) is None
    except Exception:  # noqa: BLE001 - an API change must cost speed, never correctness
        return False


def job_env_vars() -> dict[str, str]:
    """Environment variables the enclosing `ray job submit` already sets for its workers.

    Ray passes the job's config to the driver as JSON in RAY_JOB_CONFIG_JSON_ENV_VAR; it refuses
    a runtime env that sets a variable the job also sets, so callers add only the others.
    """
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return dict((job_config.get("runtime_env") or {}).get("env_vars") or {})


def init_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Join the cluster at `address` / $RAY_ADDRESS (as `ray job submit` sets), else start a local
    one declaring `num_cpus` CPUs (None: the machine's cores; ignored when joining)."""
    import ray

    if ray.is_initialized():
        return
    setup_process()
    address = address or os.environ.get("RAY_ADDRESS") or None
    own = starts_its_own_ray(address)
    if own:
        # Its processes inherit this environment, WORKER_ENV included. A runtime env would
        # make every worker start through Ray's runtime-env agent and leave Ray's pre-started
        # workers unused (actor start-up: bench/RESULTS.md, score).
        env_vars = {}
    else:
        already = job_env_vars()
        env_vars = {k: v for k, v in WORKER_ENV.items() if k not in already}
    dashboard_port = free_port() if own else None
    with _environment(state_api_address(dashboard_port) if own else {}):
        ray.init(
            address=address,
            runtime_env={"env_vars": env_vars} if env_vars else None,
            # Workers' lines come to the driver's stderr: the CLI's log file unless --verbose (console.py).
            log_to_driver=True,
            logging_level="WARNING",
            dashboard_port=dashboard_port,
            num_cpus=num_cpus if own else None,
        )
    quiet_ray_data()


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_api_address(dashboard_port: int) -> dict[str, str]:
    """The environment that tells Ray's processes where this Ray's state API (its dashboard) is.

    Ray Train's PlacementGroupCleaner (a detached actor) asks the state API whether a run's
    controller is alive, and removes the run's worker placement group once it is dead: a Tune
    trial that ASHA stops, or that ends, is killed with its controller before the controller
    removes its group. The state API finds its cluster from RAY_API_SERVER_ADDRESS / RAY_ADDRESS
    or, for a Ray started by `ray.init` (ours on one machine), by looking for GCS processes; with
    any other Ray on the machine it finds several, the cleaner's thread dies ("Found multiple
    active Ray instances") and the group's CPUs stay reserved for good: the next trial's workers or
    reads never get them (issue 30). Ray's processes inherit the environment ray.init starts
    them with, so this is set around it."""
    return {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set `values` in os.environ while inside, then restore it: the processes started inside
    keep them, this process does not."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def quiet_ray_data() -> None:
    """Switch Ray Data's own progress bars off: the stages draw one bar each (console.py).

    Ray 2.60: `enable_progress_bars` on the driver's DataContext (copied into every dataset
    built after it) turns off the per-operator tqdm bars and, when stdout is not a terminal,
    their periodic "Total Progress" log lines. It logs one warning saying so, into the log."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def train_worker_runtime_env() -> dict[str, Any]:
    """Ray Train's `worker_runtime_env`: the worker environment on a joined cluster too."""
    return {"env_vars": dict(WORKER_ENV)}


@contextlib.contextmanager
def parquet_reader_v1() -> Iterator[None]:
    """Build `read_parquet` datasets with Ray Data's V1 Parquet reader while inside.

    The V2 reader lists the files again in a task every time the dataset runs; callers that
    already know every file (a manifest) lose seconds per training epoch to it
    (bench/RESULTS.md, train). The caller's setting is restored on exit.
    """
    import ray

    context = ray.data.DataContext.get_current()
    before, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        yield
    finally:
        context.use_datasource_v2 = before


def unfused_task_options(memory_bytes: int) -> dict[str, Any]:
    """`map_batches` options that declare a task's memory and keep it a separate operator.

    Ray Data fuses consecutive map operators whose remote args are identical; a task-based
    decode step fused into an actor pool would then decode serially inside the few actors
    that hold the model, instead of on every free CPU. Declaring memory makes the args differ.
    """
    return {"memory": int(memory_bytes)}


def cap_inflight_bytes(dataset, max_bytes: int) -> None:
    """Bound the object-store bytes a streaming `dataset` holds at once (decoded batches waiting)."""
    options = dataset.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=max_bytes)


def share_resources_between_operators(dataset) -> None:
    """Let a dataset's operators share the cluster's CPUs as their work arrives.

    By default Ray Data reserves part of the cluster for each operator of a pipeline; on a small
    cluster prepare's decode stage then ran one task at a time while the CPU reserved for the
    Parquet write waited for blocks (bench/RESULTS.md, prepare). The datasets derived from
    `dataset` share its context, and so this setting."""
    dataset.context.op_resource_reservation_enabled = False


def bound_actor_wait(dataset, seconds: float) -> None:
    """Make a dataset's actor pool give up (GetTimeoutError) if its initial actors have not
    started within `seconds`: by default Ray waits forever for resources no node has."""
    dataset.context.wait_for_min_actors_s = seconds


def node_capacities() -> list[dict[str, float]] | None:
    """Each alive node's total resources (`CPU`, `GPU`, `memory` in bytes); None when no alive
    node has a CPU: an autoscaling cluster's head, whose worker node sizes are not known yet."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return nodes if any(n.get("CPU", 0) > 0 for n in nodes) else None


def fits_a_node(demand: dict[str, float], nodes: list[dict[str, float]]) -> bool:
    """Whether one node has every resource of `demand` (a task or actor runs on one node).

    Ray does not fail such a request: it waits for a node that will never come (the
    "No available node types can fulfill" warning), so callers check before they start.
    """
    return any(all(node.get(name, 0) >= amount for name, amount in demand.items() if amount) for node in nodes)


def cpu_reservations() -> dict[str, Any]:
    """What holds the cluster's CPUs right now: `total` and `free` CPUs, and `groups`, every live
    placement group reserving CPUs, largest first: {id (hex), name, cpus, state, mine (the calling
    process runs in it)}. Placement groups are where Tune trials, Ray Train worker groups (and one
    being removed after its run) hold CPUs that no other task may use, whether busy or not."""
    import ray

    mine = ray.get_runtime_context().get_placement_group_id()
    groups = []
    for pg_id, info in ray.util.placement_group_table().items():
        cpus = sum(bundle.get("CPU", 0) for bundle in (info.get("bundles") or {}).values())
        if info.get("state") != "REMOVED" and cpus:
            groups.append({"id": pg_id, "name": info.get("name") or "", "cpus": round(cpus, 4),
                           "state": info.get("state"), "mine": pg_id == mine})
    groups.sort(key=lambda g: -g["cpus"])
    return {"total": ray.cluster_resources().get("CPU", 0.0), "free": ray.available_resources().get("CPU", 0.0),
            "groups": groups}


def describe_cpu_reservations(reservations: dict[str, Any]) -> str:
    """cpu_reservations() in one sentence, e.g. `2 CPUs, 0.01 free; placement groups hold 1.99:
    3f2a.. 0.99 (this worker's group), 9c1e.. 0.99, 77b0.. 0.01`."""
    groups = reservations["groups"]
    held = sum(g["cpus"] for g in groups)
    parts = [f"{g['id'][:8]} {g['cpus']:g}" + (" (this worker's group)" if g["mine"] else "")
             + (f" [{g['state']}]" if g["state"] != "CREATED" else "") for g in groups]
    return (f"{reservations['total']:g} CPUs, {reservations['free']:g} free; placement groups hold {held:g}"
            + (": " + ", ".join(parts) if parts else ""))


def bound_worker_placement(seconds: float) -> dict[str, Any]:
    """Ray Train `FailureConfig` options that give up on a worker group that cannot be placed for
    about `seconds`. Ray Train 2.60 retries a group start that timed out (60 s each,
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) without limit: right while an autoscaler adds nodes,
    a hang when a placement group that will never go holds the CPUs (issue 30). Its
    `controller_failure_limit` (a DeveloperAPI) counts those timeouts."""
    start_timeout = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60))
    return {"controller_failure_limit": max(1, math.ceil(seconds / start_timeout))}
