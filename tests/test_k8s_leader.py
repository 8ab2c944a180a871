"""Leader election of routers with a Lease, on the real control plane (``tests/kube``)."""

from __future__ import annotations

import asyncio
import time

import pytest
from kubernetes import client

from llmserve.replicas.k8s_leader import LeaseElector
from tests.kube.fixtures import Cluster

pytestmark = pytest.mark.kubernetes


async def until(check: object, what: str, timeout: float = 10.0) -> float:
    began = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - began < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - began


async def test_one_router_leads_a_stopped_leader_is_replaced_and_a_dead_one_after_its_lease(
        cluster: Cluster) -> None:
    namespace = cluster.namespace("leader")
    routers = [LeaseElector(cluster.api, namespace, "llmserve-router-leader", f"router-{i}", lease_s=2.0)
               for i in range(3)]
    for router in routers:
        router.start()
    await until(lambda: sum(r.leader for r in routers) == 1 and all(r.holder for r in routers), "one leader")
    await asyncio.sleep(1.0)  # renewals keep it: still exactly one, and everyone agrees who
    [first] = [r for r in routers if r.leader]
    assert {r.holder for r in routers} == {first.identity}
    lease = client.CoordinationV1Api(cluster.api).read_namespaced_lease("llmserve-router-leader", namespace)
    assert lease.spec.holder_identity == first.identity

    # a clean stop releases the Lease: a follower leads within a second
    await first.close(release=True)
    rest = [r for r in routers if r is not first]
    took = await until(lambda: sum(r.leader for r in rest) == 1, "a new leader after a release", timeout=3)
    print(f"\nfigure: a released Lease taken over in {took * 1000:.0f} ms")
    assert took < 1.5

    # a leader that dies (stops renewing, releases nothing) is replaced once its lease has run out
    [second] = [r for r in rest if r.leader]
    await second.close(release=False)
    [last] = [r for r in rest if r is not second]
    took = await until(lambda: last.leader, "the last router leading", timeout=6)
    print(f"figure: a dead leader replaced in {took:.2f} s (lease 2 s)")
    assert 0.5 < took < 4.5
    await last.close()
