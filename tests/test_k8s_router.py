"""The router on the Kubernetes backend, end to end on the real control plane (``tests/kube``).

Deploys go through the router's API; the Deployment, its ReplicaSet, the scheduler and the
Endpoints are the cluster's own, and the test kubelet runs the simulated engine as each pod's
process. Figures (deploy to ready, scale-up, a deleted pod's time to leave the routing) are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from llmserve.errors import BackendUnavailable
from llmserve.replicas.backend import EndpointState
from llmserve.replicas.kubernetes import KubernetesBackend
from llmserve.replicas.spec import EngineSpec
from llmserve.server import build
from llmserve.settings import AdmissionSettings, AutoscaleSettings, KubernetesSettings, RouterSettings, Settings
from loadtest.inprocess import serve_router
from loadtest.sim import SimEngineProgram
from router.store import Store
from router.store.redis_store import RedisStore
from router.store.sqlite import SQLiteStore
from tests.conftest import fast_engine_settings, free_port
from tests.kube.control_plane import ADMIN_TOKEN, VIEWER_TOKEN
from tests.kube.fixtures import IMAGE, Cluster
from tests.redis_server import redis_server
from tests.test_control_plane import MODEL, make_version

pytestmark = pytest.mark.kubernetes


def sim(spec: Any) -> SimEngineProgram:
    return SimEngineProgram(spec.model_name, spec.version, ttft_ms=5, itl_ms=5)


@dataclass
class K8sRouter:
    url: str
    backend: KubernetesBackend
    namespace: str
    apps: client.AppsV1Api
    core: client.CoreV1Api


@contextlib.asynccontextmanager
async def k8s_router(cluster: Cluster, tmp_path: Path, name: str, store: Store | None = None,
                     new_namespace: bool = True, **kube: Any) -> AsyncIterator[K8sRouter]:
    """A router on the Kubernetes backend; with ``store``, one of several sharing it (and the namespace),
    which leaves its Deployments to the others when it stops."""
    namespace = cluster.namespace(name) if new_namespace else name
    models = tmp_path / "models"
    make_version(models, "v1")
    make_version(models, "v2")
    settings = KubernetesSettings(namespace=namespace, image=IMAGE, prestop_s=2, shutdown_timeout_s=2,
                                  cpus_per_replica=0.1, **kube)
    backend = KubernetesBackend(settings, fast_engine_settings(ready_timeout_s=60), models, program=sim,
                                api=cluster.api, retire_on_close=store is None)
    router = RouterSettings(port=free_port(), admission=AdmissionSettings(enabled=False),
                            autoscale=AutoscaleSettings(interval_s=0.2, window_s=5))
    server = build(Settings(data_dir=tmp_path, router=router, auth="off"), backend=backend,
                   store=store or SQLiteStore(tmp_path / "db.sqlite"), models_dir=models)
    async with serve_router(server.app, router.port, backend) as url:
        yield K8sRouter(url, backend, namespace, client.AppsV1Api(cluster.api), client.CoreV1Api(cluster.api))


async def until(check: Any, what: str, timeout: float = 30.0) -> float:
    began = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - began
        assert time.monotonic() - began < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def status_of(http: httpx.AsyncClient, url: str, version: str) -> dict[str, Any]:
    state = (await http.get(f"{url}/api/v1/deployments/{MODEL}")).json()
    return next((v for v in state["versions"] if v["version"] == version), {})


async def deploy(http: httpx.AsyncClient, url: str, version: str, replicas: int = 1, traffic: int = 100,
                 gpu: int = 0) -> None:
    if version == "v1":
        assert (await http.post(f"{url}/api/v1/models", json={"model_name": MODEL})).status_code == 201
    created = await http.post(f"{url}/api/v1/deployments", json={
        "model_name": MODEL, "version": version, "traffic_percent": traffic,
        "resources": {"replicas": replicas, "gpu": gpu}})
    assert created.status_code == 202, created.text


async def chat(http: httpx.AsyncClient, url: str, user: str = "u") -> httpx.Response:
    return await http.post(f"{url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "user": user})


def deployments(r: K8sRouter) -> list[str]:
    return [d.metadata.name for d in r.apps.list_namespaced_deployment(r.namespace).items]


def ready_pods(r: K8sRouter) -> int:
    pods = r.core.list_namespaced_pod(r.namespace).items
    return sum(bool(p.status.container_statuses) and all(c.ready for c in p.status.container_statuses)
               and p.metadata.deletion_timestamp is None for p in pods)


async def test_a_version_is_a_deployment_that_serves_scales_by_the_autoscaler_and_goes_on_retire(
        cluster: Cluster, tmp_path: Path) -> None:
    async with k8s_router(cluster, tmp_path, "e2e-life") as r, httpx.AsyncClient(timeout=30) as http:
        began = time.monotonic()
        await deploy(http, r.url, "v1")
        await until(lambda: status_of(http, r.url, "v1"), "v1 recorded")
        took = await until(lambda: _active(http, r.url, "v1"), "v1 active")
        print(f"\nfigure: deploy to ready (1 replica, through the router's API): {time.monotonic() - began:.2f} s")
        assert took >= 0 and deployments(r) and ready_pods(r) == 1
        [name] = deployments(r)
        deployment = r.apps.read_namespaced_deployment(name, r.namespace)
        assert deployment.metadata.labels["llmserve.io/model"] == MODEL
        assert deployment.metadata.labels["llmserve.io/version"] == "v1"
        pod_spec = deployment.spec.template.spec
        assert pod_spec.termination_grace_period_seconds >= 2 + 2  # preStop + vLLM's drain
        assert pod_spec.containers[0].lifecycle.pre_stop._exec.command == ["sleep", "2"]
        answer = await chat(http, r.url)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == f"{MODEL}:v1"
        # the autoscaler: a floor of 3 is a bounds rule; it scales the Deployment through the backend
        began = time.monotonic()
        put = await http.put(f"{r.url}/api/v1/deployments/{MODEL}/autoscaling",
                             json={"min_replicas": 3, "max_replicas": 4})
        assert put.status_code == 200, put.text
        await until(lambda: ready_pods(r) == 3 and
                    sum(e.state is EndpointState.READY for e in r.backend.endpoints()) == 3, "three ready pods")
        print(f"figure: scale-up 1 -> 3 by the autoscaler, to all ready: {time.monotonic() - began:.2f} s")
        assert r.apps.read_namespaced_deployment_scale(name, r.namespace).spec.replicas == 3
        served = {(await chat(http, r.url, f"user-{i}")).headers.get("x-served-by") for i in range(30)}
        assert len(served) == 3  # least-outstanding across the three pods
        # v2 takes the traffic; v1, retired, leaves no Deployment and no Service behind
        await deploy(http, r.url, "v2", traffic=100)
        await until(lambda: _active(http, r.url, "v2"), "v2 active")
        await until(lambda: len(deployments(r)) == 2, "v2's Deployment")
        if (await status_of(http, r.url, "v1")).get("status") == "active":
            move = await http.put(f"{r.url}/api/v1/deployments/{MODEL}/traffic", json={"v2": 100})
            assert move.status_code == 200, move.text
            deleted = await http.delete(f"{r.url}/api/v1/deployments/{MODEL}/versions/v1")
            assert deleted.status_code in (200, 202), deleted.text
        await until(lambda: deployments(r) == [d for d in deployments(r) if d != name] and len(deployments(r)) == 1,
                    "v1's Deployment gone")
        assert name not in [s.metadata.name for s in r.core.list_namespaced_service(r.namespace).items]
        assert (await chat(http, r.url)).json()["model"] == f"{MODEL}:v2"


async def _active(http: httpx.AsyncClient, url: str, version: str) -> bool:
    return (await status_of(http, url, version)).get("status") == "active"


async def test_a_deleted_pod_leaves_the_routing_at_once_and_no_request_is_lost(cluster: Cluster,
                                                                                 tmp_path: Path) -> None:
    async with k8s_router(cluster, tmp_path, "e2e-delete") as r, httpx.AsyncClient(timeout=30) as http:
        await deploy(http, r.url, "v1", replicas=2)
        await until(lambda: _active(http, r.url, "v1"), "v1 active")
        results: list[int] = []
        stop = asyncio.Event()

        async def load(user: str) -> None:
            while not stop.is_set():
                results.append((await chat(http, r.url, user)).status_code)

        workers = [asyncio.create_task(load(f"user-{i}")) for i in range(6)]
        await until(lambda: len(results) > 50, "load running")
        victim = next(e for e in r.backend.endpoints() if e.state is EndpointState.READY)
        pod = victim.details["pod"]
        began = time.monotonic()
        r.core.delete_namespaced_pod(pod, r.namespace, _preload_content=False)
        await until(lambda: not victim.routable or victim.details.get("pod") != pod, "the pod out")
        left = time.monotonic() - began  # from before the delete call (within the 50 ms poll)
        print(f"\nfigure: pod deletion to no more new requests to it: {left * 1000:.0f} ms")
        assert left < 1.0
        await until(lambda: ready_pods(r) == 2 and victim.routable, "the replacement ready", timeout=30)
        before = len(results)
        await until(lambda: len(results) > before + 50, "load on the replacement")
        stop.set()
        await asyncio.gather(*workers)
        assert results and set(results) == {200}, {s: results.count(s) for s in set(results)}
        assert victim.restarts == 1 and victim.details["pod"] != pod


async def test_a_missing_image_fails_the_new_version_with_the_pods_reason_and_traffic_stays(
        cluster: Cluster, tmp_path: Path) -> None:
    async with k8s_router(cluster, tmp_path, "e2e-image") as r, httpx.AsyncClient(timeout=30) as http:
        await deploy(http, r.url, "v1")
        await until(lambda: _active(http, r.url, "v1"), "v1 active")
        # an operator points the engines at an image the registry does not have
        r.backend.settings = r.backend.settings.model_copy(update={"image": "llmserve:does-not-exist"})
        await deploy(http, r.url, "v2", traffic=10)
        await until(lambda: _failed(http, r.url, "v2"), "v2 failed", timeout=60)
        reason = (await status_of(http, r.url, "v2"))["reason"]
        assert "ErrImagePull" in reason and "llmserve:does-not-exist" in reason, reason
        answers = [await chat(http, r.url, f"user-{i}") for i in range(20)]
        assert {a.status_code for a in answers} == {200}
        assert {a.json()["model"] for a in answers} == {f"{MODEL}:v1"}


async def _failed(http: httpx.AsyncClient, url: str, version: str) -> bool:
    return (await status_of(http, url, version)).get("status") == "failed"


async def test_gpus_the_cluster_cannot_schedule_fail_the_deployment_after_a_bounded_wait(
        cluster: Cluster, tmp_path: Path) -> None:
    async with k8s_router(cluster, tmp_path, "e2e-gpu", schedule_timeout_s=3.0) as r, \
            httpx.AsyncClient(timeout=30) as http:
        began = time.monotonic()
        await deploy(http, r.url, "v1", gpu=1)
        await until(lambda: _failed(http, r.url, "v1"), "v1 failed", timeout=30)
        reason = (await status_of(http, r.url, "v1"))["reason"]
        assert "cannot be scheduled" in reason and "nvidia.com/gpu" in reason, reason
        assert time.monotonic() - began < 20


async def test_bad_credentials_and_missing_permissions_are_named_at_start(cluster: Cluster, tmp_path: Path) -> None:
    namespace = cluster.namespace("e2e-rbac")
    base = KubernetesSettings(namespace=namespace, image=IMAGE)
    engine = fast_engine_settings()
    with pytest.raises(BackendUnavailable, match="no kubeconfig file at"):
        KubernetesBackend(base.model_copy(update={"kubeconfig": tmp_path / "missing"}), engine, tmp_path)
    garbage = tmp_path / "garbage"
    garbage.write_text("this: [is not a kubeconfig")
    with pytest.raises(BackendUnavailable, match="does not work"):
        KubernetesBackend(base.model_copy(update={"kubeconfig": garbage}), engine, tmp_path)
    wrong = cluster.control_plane.kubeconfig(token="not-a-token", name="wrong")
    with pytest.raises(BackendUnavailable, match="rejected the kubeconfig's credentials"):
        KubernetesBackend(base.model_copy(update={"kubeconfig": wrong}), engine, tmp_path)
    viewer = cluster.control_plane.kubeconfig(token=VIEWER_TOKEN, name="viewer")
    refused = f"forbidden by RBAC in namespace {namespace}.*create deployments.apps"
    with pytest.raises(BackendUnavailable, match=refused):
        KubernetesBackend(base.model_copy(update={"kubeconfig": viewer}), engine, tmp_path)
    assert ADMIN_TOKEN not in str(viewer.read_text())


async def test_two_routers_share_the_pods_and_one_keeps_serving_when_the_other_stops(cluster: Cluster,
                                                                                      tmp_path: Path) -> None:
    namespace = cluster.namespace("e2e-routers")
    with redis_server() as url:
        async with contextlib.AsyncExitStack() as stack, httpx.AsyncClient(timeout=30) as http:
            a = await stack.enter_async_context(
                k8s_router(cluster, tmp_path / "a", namespace, store=RedisStore(url, "k8s:"), new_namespace=False))
            await deploy(http, a.url, "v1", replicas=2)
            await until(lambda: _active(http, a.url, "v1"), "v1 active")
            b_stack = contextlib.AsyncExitStack()
            b = await b_stack.enter_async_context(
                k8s_router(cluster, tmp_path / "b", namespace, store=RedisStore(url, "k8s:"), new_namespace=False))
            # b adopts the Deployment a created: the same two pods, not two more
            await until(lambda: sum(e.state is EndpointState.READY for e in b.backend.endpoints()) == 2,
                        "b routes to the two pods")
            assert len(deployments(b)) == 1 and ready_pods(b) == 2
            assert {e.url for e in b.backend.endpoints()} == {e.url for e in a.backend.endpoints()}
            results: list[int] = []
            stop = asyncio.Event()

            async def load(router_url: str) -> None:
                while not stop.is_set():
                    with contextlib.suppress(httpx.TransportError):  # a's own clients lose a; b's must not
                        results.append((await chat(http, router_url, "u")).status_code)

            on_b = asyncio.create_task(load(b.url))
            await until(lambda: len(results) > 30, "load on b")
            await stack.aclose()  # router a stops; its Deployments stay for b
            before = len(results)
            await until(lambda: len(results) > before + 50, "b serving after a stopped")
            stop.set()
            await on_b
            assert set(results) == {200} and ready_pods(b) == 2 and len(deployments(b)) == 1
            await b_stack.aclose()


async def test_a_canary_on_kubernetes_and_its_rollback_removes_its_deployment(cluster: Cluster,
                                                                               tmp_path: Path) -> None:
    async with k8s_router(cluster, tmp_path, "e2e-canary") as r, httpx.AsyncClient(timeout=30) as http:
        await deploy(http, r.url, "v1")
        await until(lambda: _active(http, r.url, "v1"), "v1 active")
        [v1_deployment] = deployments(r)
        await deploy(http, r.url, "v2", traffic=30)
        await until(lambda: _active(http, r.url, "v2"), "v2 active")
        assert len(deployments(r)) == 2
        models = [(await chat(http, r.url, f"user-{i}")).json()["model"] for i in range(60)]
        assert {f"{MODEL}:v1", f"{MODEL}:v2"} == set(models)  # split by user between the two Deployments
        back = await http.post(f"{r.url}/api/v1/deployments/{MODEL}/rollback", json={"to": "v1"})
        assert back.status_code in (200, 202), back.text
        await until(lambda: deployments(r) == [v1_deployment], "v2's Deployment gone")
        models = [(await chat(http, r.url, f"user-{i}")).json()["model"] for i in range(30)]
        assert set(models) == {f"{MODEL}:v1"}


async def test_a_restarted_router_adopts_its_deployment_and_binds_the_running_pods(cluster: Cluster,
                                                                                     tmp_path: Path) -> None:
    namespace = cluster.namespace("e2e-adopt")
    settings = KubernetesSettings(namespace=namespace, image=IMAGE, prestop_s=1, shutdown_timeout_s=1,
                                  cpus_per_replica=0.1)
    spec = EngineSpec(model_dir=tmp_path, model_name=MODEL, version="v1")
    first = KubernetesBackend(settings, fast_engine_settings(), tmp_path, program=sim, api=cluster.api)
    replica_set = await first.start(spec, 2)
    await first.wait_ready(replica_set.endpoints)
    pods = {e.details["pod"] for e in replica_set.endpoints}
    await first.close()  # a router's backend leaves its Deployments
    again = KubernetesBackend(settings, fast_engine_settings(), tmp_path, program=sim, api=cluster.api,
                              retire_on_close=True)
    began = time.monotonic()
    adopted = await again.start(spec, 2)
    await asyncio.wait_for(again.wait_ready(adopted.endpoints), timeout=10)
    print(f"\nfigure: a restarted router's backend bound the running pods in {time.monotonic() - began:.2f} s")
    assert {e.details["pod"] for e in adopted.endpoints} == pods  # the same pods: nothing restarted
    assert all(e.restarts == 0 for e in adopted.endpoints)
    await again.close()
