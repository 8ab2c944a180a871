"""One contract for every replica backend (``llmserve.replicas.backend.ReplicaBackend``).

The tests below speak only the protocol: ``start``, ``scale``, ``wait_ready``,
``retire``, ``report_failure``, ``endpoints``, ``close``, and the ``Endpoint``s
and ``ReplicaSet``s they return. The one backend-specific thing a test needs,
killing a replica behind the backend's back, comes from the fixture.

To join the suite, a backend provides a ``Harness`` factory in ``HARNESSES``
(then ``backend``'s params pick it up):

- ``make(**engine_overrides)``: a new backend with ``fast_engine_settings``
  (fast health checks and restarts, a 3 s drain timeout) and these overrides;
  the fixture closes every backend it made;
- ``spec(behaviour)``: an ``EngineSpec`` whose replicas behave as asked:
  ``SERVES`` answers ``/health`` and ``/v1/completions`` within a second or
  two (the simulated engine, ``loadtest.sim``, serving ``<model>:<version>``
  and ``<model>``); ``NEVER_READY`` runs but never answers ``/health``;
  ``EXITS_AT_ONCE`` exits with an error as soon as it starts;
- ``kill(endpoint)``: make the replica behind ``endpoint`` die at once, as a
  crash would (locally: SIGKILL its process group; on Kubernetes: delete the
  pod with no grace period);
- every URL an endpoint reports is reachable from the test process, and
  nothing it starts listens beyond the loopback interface (or the cluster).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from llmserve.errors import ReplicaStartError
from llmserve.replicas.backend import Endpoint, EndpointState, ReplicaBackend
from llmserve.replicas.local import LocalBackend
from llmserve.replicas.process import ReplicaProgram
from llmserve.replicas.spec import EngineSpec
from loadtest.simstack import fast_sim
from tests.conftest import ScriptProgram, fast_engine_settings

STARTING, READY, UNHEALTHY = EndpointState.STARTING, EndpointState.READY, EndpointState.UNHEALTHY
DRAINING, STOPPED = EndpointState.DRAINING, EndpointState.STOPPED


class Behaviour(enum.Enum):
    SERVES = "chat"
    NEVER_READY = "stuck"
    EXITS_AT_ONCE = "broken"


@dataclass
class Harness:
    """What one backend brings to the suite (see the module docstring)."""

    make: Callable[..., ReplicaBackend]
    spec: Callable[[Behaviour], EngineSpec]
    kill: Callable[[Endpoint], None]
    made: list[ReplicaBackend] = field(default_factory=list)


def program(spec: EngineSpec) -> ReplicaProgram:
    """What a replica of each behaviour runs, on every backend."""
    behaviour = Behaviour(spec.model_name)
    if behaviour is Behaviour.NEVER_READY:
        return ScriptProgram("import time; time.sleep(600)", spec.model_name, spec.version)
    if behaviour is Behaviour.EXITS_AT_ONCE:
        return ScriptProgram("import sys; print('CUDA out of memory, pretend'); sys.exit(3)",
                             spec.model_name, spec.version)
    return fast_sim(spec)


def specs_in(model_dir: Path) -> Callable[[Behaviour], EngineSpec]:
    """The spec of each behaviour: the same on every backend (``program`` maps it to what runs)."""
    return lambda behaviour: EngineSpec(model_dir=model_dir, model_name=behaviour.value, version="v1")


B = TypeVar("B")


def owner_of(harness: Harness, endpoint: Endpoint, kind: type[B]) -> B:
    """The backend (one the harness made) that runs ``endpoint``."""
    [owner] = [b for b in harness.made if isinstance(b, kind) and endpoint in b.endpoints()]
    return owner


def local_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    def make(**overrides: object) -> ReplicaBackend:
        backend = LocalBackend(fast_engine_settings(**overrides), tmp_path / f"logs-{len(harness.made)}",
                               program=program)
        harness.made.append(backend)
        return backend

    def kill(endpoint: Endpoint) -> None:
        owner = owner_of(harness, endpoint, LocalBackend)
        pid = owner.process(endpoint).pid
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)

    harness = Harness(make, specs_in(tmp_path), kill)
    return harness


def kubernetes_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    """Deployments on the session's real control plane (``tests/kube``), each backend in a namespace of
    its own; the test kubelet runs the same programs as the local backend, as the pods' processes."""
    from llmserve.replicas.kubernetes import KubernetesBackend
    from llmserve.settings import KubernetesSettings
    from tests.kube.fixtures import IMAGE

    cluster = request.getfixturevalue("cluster")
    prefix = f"c{abs(hash(request.node.nodeid)) % 10**8}"

    def make(**overrides: object) -> ReplicaBackend:
        namespace = cluster.namespace(f"{prefix}-{len(harness.made)}")
        settings = KubernetesSettings(namespace=namespace, image=IMAGE, prestop_s=1, shutdown_timeout_s=2,
                                      cpus_per_replica=0.1)
        backend = KubernetesBackend(settings, fast_engine_settings(**overrides), tmp_path, program=program,
                                    api=cluster.api, retire_on_close=True)
        harness.made.append(backend)
        return backend

    def kill(endpoint: Endpoint) -> None:
        owner = owner_of(harness, endpoint, KubernetesBackend)
        cluster.kubelet.crash(owner.settings.namespace, endpoint.details["pod"])

    harness = Harness(make, specs_in(tmp_path), kill)
    return harness


HARNESSES: dict[str, Callable[[pytest.FixtureRequest, Path], Harness]] = {
    "local": local_harness, "kubernetes": kubernetes_harness}


@pytest.fixture(params=[pytest.param("local"), pytest.param("kubernetes", marks=pytest.mark.kubernetes)])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    harness = HARNESSES[request.param](request, tmp_path)
    try:
        yield harness
    finally:
        for backend in harness.made:
            await backend.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        yield client


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def assert_serves(http: httpx.AsyncClient, endpoint: Endpoint) -> None:
    assert endpoint.state is READY and endpoint.routable
    assert (await http.get(f"{endpoint.url}/health")).status_code == 200
    body = {"model": endpoint.model_name, "prompt": "Hello", "max_tokens": 2}
    response = await http.post(f"{endpoint.url}/v1/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == f"{endpoint.model_name}:{endpoint.version}" and answer["choices"]


async def test_start_returns_at_once_with_starting_endpoints_that_wait_ready_makes_serve(
    harness: Harness, http: httpx.AsyncClient
) -> None:
    backend, spec = harness.make(), harness.spec(Behaviour.SERVES)
    began = time.monotonic()
    replica_set = await backend.start(spec, 2)
    assert time.monotonic() - began < 1.0
    endpoints = list(replica_set.endpoints)
    assert len(endpoints) == 2 and len({e.id for e in endpoints}) == 2
    assert [e.state for e in endpoints] == [STARTING, STARTING] and not any(e.routable for e in endpoints)
    assert all((e.model_name, e.version) == (spec.model_name, spec.version) for e in endpoints)
    assert (replica_set.model_name, replica_set.version) == (spec.model_name, spec.version)
    await asyncio.wait_for(backend.wait_ready(endpoints), timeout=20)
    assert len({e.url for e in endpoints}) == 2
    for endpoint in endpoints:
        await assert_serves(http, endpoint)
    assert set(backend.endpoints()) == set(endpoints)


async def test_scale_up_adds_starting_endpoints_that_become_ready(harness: Harness, http: httpx.AsyncClient) -> None:
    backend = harness.make()
    replica_set = await backend.start(harness.spec(Behaviour.SERVES), 1)
    held = replica_set.endpoints  # what a router holds
    [first] = held
    added = await backend.scale(replica_set, 3)
    assert len(added) == 2 and all(e.state is STARTING for e in added)
    assert replica_set.endpoints is held and held == [first, *added]
    assert len({e.id for e in held}) == 3
    await asyncio.wait_for(backend.wait_ready(held), timeout=20)
    for endpoint in held:
        await assert_serves(http, endpoint)
    assert set(backend.endpoints()) == set(held)
    assert await backend.scale(replica_set, 3) == [] and len(held) == 3  # already there: nothing changes


async def test_scale_down_drains_and_removes_endpoints_in_place(harness: Harness) -> None:
    """Which endpoints go is the backend's choice (locally the oldest; on Kubernetes the ReplicaSet's);
    whichever they are, they take no new traffic and the scale-down waits for their requests."""
    backend = harness.make()
    replica_set = await backend.start(harness.spec(Behaviour.SERVES), 1)
    held = replica_set.endpoints
    await backend.scale(replica_set, 3)
    await asyncio.wait_for(backend.wait_ready(held), timeout=20)
    endpoints = list(held)
    for endpoint in endpoints:
        endpoint.outstanding = 1  # a request in flight on each, as the router counts it
    shrinking = asyncio.create_task(backend.scale(replica_set, 1))
    await eventually(lambda: sum(e.state is DRAINING for e in endpoints) == 2, timeout=5)
    [survivor] = [e for e in endpoints if e.state is not DRAINING]
    victims = [e for e in endpoints if e is not survivor]
    await asyncio.sleep(0.3)
    assert survivor.state is READY and not any(e.routable for e in victims) and not shrinking.done()
    for endpoint in endpoints:
        endpoint.outstanding = 0
    assert await asyncio.wait_for(shrinking, timeout=15) == []
    assert replica_set.endpoints is held and held == [survivor]
    assert [e.state for e in victims] == [STOPPED, STOPPED] and survivor.state is READY
    assert backend.endpoints() == [survivor]


async def test_retire_with_drain_waits_for_in_flight_requests_and_retiring_twice_is_harmless(
    harness: Harness,
) -> None:
    backend = harness.make()
    replica_set = await backend.start(harness.spec(Behaviour.SERVES), 2)
    endpoints = list(replica_set.endpoints)
    await asyncio.wait_for(backend.wait_ready(endpoints), timeout=20)
    busy, idle = endpoints
    busy.outstanding = 1
    retiring = asyncio.create_task(backend.retire(replica_set, drain=True))
    await asyncio.sleep(0.3)
    assert busy.state is DRAINING and not busy.routable and not retiring.done()
    assert idle.state in (DRAINING, STOPPED) and not idle.routable
    busy.outstanding = 0
    await asyncio.wait_for(retiring, timeout=10)
    assert [e.state for e in endpoints] == [STOPPED, STOPPED]
    await asyncio.wait_for(backend.retire(replica_set, drain=True), timeout=5)
    assert [e.state for e in endpoints] == [STOPPED, STOPPED]
    assert backend.endpoints() == []


async def test_wait_ready_raises_for_a_replica_that_never_gets_ready(harness: Harness) -> None:
    backend = harness.make(ready_timeout_s=1.0)
    replica_set = await backend.start(harness.spec(Behaviour.NEVER_READY), 1)
    with pytest.raises(ReplicaStartError) as raised:
        await asyncio.wait_for(backend.wait_ready(replica_set.endpoints), timeout=15)
    assert raised.value.replica_id == replica_set.endpoints[0].id
    assert replica_set.endpoints[0].state is not READY


async def test_wait_ready_raises_promptly_for_a_replica_that_exits_at_once(harness: Harness) -> None:
    backend = harness.make()  # a 30 s ready timeout: the exit, not the timeout, must end the wait
    replica_set = await backend.start(harness.spec(Behaviour.EXITS_AT_ONCE), 1)
    with pytest.raises(ReplicaStartError, match="CUDA out of memory, pretend") as raised:
        await asyncio.wait_for(backend.wait_ready(replica_set.endpoints), timeout=10)
    assert raised.value.replica_id == replica_set.endpoints[0].id
    assert not replica_set.endpoints[0].routable


async def test_report_failure_ejects_a_ready_endpoint_until_its_health_check_passes(harness: Harness) -> None:
    backend = harness.make()
    replica_set = await backend.start(harness.spec(Behaviour.SERVES), 1)
    [endpoint] = replica_set.endpoints
    await asyncio.wait_for(backend.wait_ready([endpoint]), timeout=20)
    backend.report_failure(endpoint, "connection refused")
    assert endpoint.state is UNHEALTHY and not endpoint.routable
    await eventually(lambda: endpoint.state is READY)
    assert endpoint.routable and endpoint.restarts == 0


async def test_report_failure_on_a_non_ready_endpoint_changes_nothing(harness: Harness) -> None:
    backend = harness.make()
    replica_set = await backend.start(harness.spec(Behaviour.SERVES), 1)
    [endpoint] = replica_set.endpoints
    backend.report_failure(endpoint, "connection refused")  # still starting
    assert endpoint.state is STARTING and endpoint.last_error is None
    await asyncio.wait_for(backend.wait_ready([endpoint]), timeout=20)
    assert endpoint.state is READY
    await backend.retire(replica_set, drain=False)
    before = (endpoint.state, endpoint.last_error)
    backend.report_failure(endpoint, "connection refused")  # stopped
    assert (endpoint.state, endpoint.last_error) == before and endpoint.state is STOPPED


async def test_a_killed_replica_is_restarted_and_becomes_ready_again(
    harness: Harness, http: httpx.AsyncClient
) -> None:
    backend = harness.make()
    replica_set = await backend.start(harness.spec(Behaviour.SERVES), 1)
    [endpoint] = replica_set.endpoints
    await asyncio.wait_for(backend.wait_ready([endpoint]), timeout=20)
    assert endpoint.restarts == 0
    harness.kill(endpoint)
    await eventually(lambda: endpoint.restarts == 1)
    await asyncio.wait_for(backend.wait_ready([endpoint]), timeout=20)
    assert endpoint.restarts == 1
    await assert_serves(http, endpoint)
    assert backend.endpoints() == [endpoint]


async def test_close_stops_every_endpoint_and_their_urls_refuse_connections(
    harness: Harness, http: httpx.AsyncClient
) -> None:
    backend = harness.make()
    first = await backend.start(harness.spec(Behaviour.SERVES), 2)
    # another version (one version is one Deployment on Kubernetes: a second start would take it over)
    second = await backend.start(dataclasses.replace(harness.spec(Behaviour.SERVES), version="v2"), 1)
    endpoints = [*first.endpoints, *second.endpoints]
    await asyncio.wait_for(backend.wait_ready(endpoints), timeout=20)
    urls = [e.url for e in endpoints]
    await asyncio.wait_for(backend.close(), timeout=15)
    assert [e.state for e in endpoints] == [STOPPED] * 3
    assert not any(e.state is not STOPPED for e in backend.endpoints())
    for url in urls:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{url}/health")
