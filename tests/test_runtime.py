"""Every Ray worker gets the TensorFlow settings, whether Ray was started here or joined."""

from __future__ import annotations

import os

from emotion_ray.runtime import WORKER_ENV, _starts_its_own_ray


def test_workers_of_a_ray_started_here_inherit_the_worker_env(ray_session):
    @ray_session.remote
    def worker_env() -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in WORKER_ENV}

    assert ray_session.get(worker_env.remote()) == WORKER_ENV
    # Inherited, not shipped as a runtime env: workers then start without Ray's runtime-env agent.
    assert not ray_session.get_runtime_context().runtime_env.get("env_vars")


def test_only_a_ray_started_here_skips_the_runtime_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _starts_its_own_ray("local")
    assert not _starts_its_own_ray("127.0.0.1:6379")  # joining: the workers are not our children
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # as inside `ray job submit`
    assert not _starts_its_own_ray(None)
