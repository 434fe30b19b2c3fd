"""Process set-up and every Ray-version-sensitive switch, each with its own small test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from emotion_ray import runtime
from emotion_ray.runtime import WORKER_ENV, job_env_vars, starts_its_own_ray


def test_workers_of_a_ray_started_here_inherit_the_worker_env(ray_session):
    @ray_session.remote
    def worker_env() -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in WORKER_ENV}

    assert ray_session.get(worker_env.remote()) == WORKER_ENV
    # Inherited, not shipped as a runtime env: workers then start without Ray's runtime-env agent.
    assert not ray_session.get_runtime_context().runtime_env.get("env_vars")


def test_workers_of_a_ray_started_here_find_its_state_api_beside_other_rays(ray_session):
    """Ray Train's PlacementGroupCleaner asks the state API, from a worker, whether a run's controller
    lives; with another Ray on the machine (here: a second one started beside the session's) it
    found several and died, leaving the run's CPUs reserved (issue 30). Workers get this Ray's own
    address; the driver's environment is left as it was."""
    other = subprocess.Popen([sys.executable, "-c", "import ray, sys; ray.init(address='local', num_cpus=1, "
                              "include_dashboard=False); print('up', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "up"

        @ray_session.remote(num_cpus=0)
        def controller_seen_alive(actor_id: str) -> tuple[str | None, str]:
            from ray.util.state import get_actor

            return os.environ.get("RAY_API_SERVER_ADDRESS"), get_actor(actor_id, timeout=30).state

        @ray_session.remote(num_cpus=0)
        class Controller:
            def ready(self) -> bool:
                return True

        controller = Controller.remote()
        ray_session.get(controller.ready.remote())
        address, state = ray_session.get(controller_seen_alive.remote(controller._actor_id.hex()))
        webui = ray_session._private.worker.global_worker.node.address_info["webui_url"]
        assert address == f"http://{webui}" and state == "ALIVE"
        assert "RAY_API_SERVER_ADDRESS" not in os.environ
    finally:
        other.stdin.close()
        other.wait(timeout=60)


@pytest.mark.fast
def test_only_a_ray_started_here_skips_the_runtime_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert starts_its_own_ray("local")
    assert not starts_its_own_ray("127.0.0.1:6379")  # joining: the workers are not our children
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # as inside `ray job submit`
    assert not starts_its_own_ray(None)


@pytest.mark.fast
def test_job_env_vars_reads_the_submitted_jobs_runtime_env(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_env_vars() == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {"TF_USE_LEGACY_KERAS": "1"}}}))
    assert job_env_vars() == {"TF_USE_LEGACY_KERAS": "1"}


@pytest.mark.fast
def test_importing_the_package_writes_no_environment():
    code = ("import os; before = dict(os.environ); import emotion_ray.cli, emotion_ray.score, emotion_ray.train, "
            "emotion_ray.tune, emotion_ray.inference, emotion_ray.prepare; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in os.environ.items() if k not in WORKER_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.fast
def test_setup_process_keeps_what_the_user_exported(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.delenv("TF_USE_LEGACY_KERAS", raising=False)
    runtime.setup_process()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" and os.environ["TF_USE_LEGACY_KERAS"] == "1"


def test_parquet_reader_v1_is_on_inside_and_restored_after(ray_session):
    context = ray_session.data.DataContext.get_current()
    before = context.use_datasource_v2
    with runtime.parquet_reader_v1():
        assert context.use_datasource_v2 is False
    assert context.use_datasource_v2 == before


def test_unfused_decode_keeps_its_own_operator(ray_session):
    """With the memory declared, a task map before an actor pool is not fused into the actors."""
    ds = ray_session.data.range(8).map_batches(lambda b: b, **runtime.unfused_task_options(64 * 1024**2))

    class Identity:
        def __call__(self, batch):
            return batch

    ds = ds.map_batches(Identity, compute=ray_session.data.ActorPoolStrategy(size=1))
    stats = ds.materialize().stats()
    assert "MapBatches(<lambda>)->MapBatches(Identity)" not in stats and "MapBatches(Identity)" in stats


def test_bounded_actor_wait_and_inflight_cap_set_the_dataset_context(ray_session):
    ds = ray_session.data.range(4)
    runtime.bound_actor_wait(ds, 3.5)
    runtime.cap_inflight_bytes(ds, 123 * 1024**2)
    assert ds.context.wait_for_min_actors_s == 3.5
    assert ds.context.execution_options.resource_limits.object_store_memory == 123 * 1024**2


def test_shared_resources_reach_the_datasets_derived_from_one(ray_session):
    ds = ray_session.data.range(4)
    assert ds.context.op_resource_reservation_enabled  # Ray Data's default, which prepare turns off
    runtime.share_resources_between_operators(ds)
    derived = ds.map_batches(lambda b: b).materialize().map_batches(lambda b: b)
    assert not derived.context.op_resource_reservation_enabled
    assert ray_session.data.range(4).context.op_resource_reservation_enabled  # others keep the default


@pytest.mark.fast
def test_a_demand_fits_only_a_node_that_has_all_of_it():
    nodes = [{"CPU": 8, "memory": 16e9}, {"CPU": 2, "GPU": 1, "memory": 64e9}]
    assert runtime.fits_a_node({"CPU": 2, "memory": 60e9}, nodes)
    assert runtime.fits_a_node({"CPU": 8, "GPU": 0}, nodes)  # a zero demand asks for nothing
    assert not runtime.fits_a_node({"CPU": 4, "memory": 60e9}, nodes)  # the CPUs and the memory are on two nodes
    assert not runtime.fits_a_node({"GPU": 2}, nodes)
