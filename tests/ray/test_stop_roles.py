"""Stopping a run's roles waits for their death: ``ray.kill`` only asks, so without the wait a restarted run
(or a check right after) meets the old actors still alive and holding their resources."""

from __future__ import annotations

import time

import pytest

from pipeline.driver.roles import Roles, stop_roles, wait_until_dead
from tests.helpers import state_address

pytestmark = pytest.mark.ray


def pinger(ray):
    """A trivial actor class, made inside a function so that Ray ships it by value (workers cannot import
    a test module)."""

    class Pinger:
        def ping(self) -> int:
            return 1

    return ray.remote(num_cpus=0)(Pinger)


def test_stop_roles_returns_with_every_actor_dead(ray_cluster):
    ray = ray_cluster
    from ray.util.state import list_actors

    roles = Roles()
    roles.verifiers.actors = [pinger(ray).remote() for _ in range(3)]
    assert ray.get([a.ping.remote() for a in roles.verifiers.actors]) == [1, 1, 1]
    ids = {a._actor_id.hex() for a in roles.verifiers.actors}
    stop_roles(roles)
    states = {a.actor_id: a.state for a in list_actors(address=state_address(), limit=10_000)}
    assert {i: states.get(i) for i in ids} == {i: "DEAD" for i in ids}


def test_wait_until_dead_reports_the_actors_still_alive(ray_cluster):
    ray = ray_cluster
    alive, doomed = (pinger(ray).remote() for _ in range(2))
    ray.get([alive.ping.remote(), doomed.ping.remote()])
    ray.kill(doomed, no_restart=True)
    t0 = time.monotonic()
    left = wait_until_dead([alive, doomed], timeout_s=3)
    assert left == [alive]
    assert time.monotonic() - t0 >= 3  # it waited for the one that never dies
    assert ray.get(alive.ping.remote()) == 1
    ray.kill(alive, no_restart=True)
    assert wait_until_dead([alive], timeout_s=60) == []
