"""The Kubernetes replica backend: each model version a Deployment (and a Service) in one namespace.

``KubernetesBackend`` implements ``ReplicaBackend`` with the official client. ``start`` creates the
version's Deployment (or adopts the one a previous router left: a router restarting does not restart
its engines), ``scale`` goes through the scale subresource, ``retire`` deletes both objects once
in-flight requests have finished. Endpoints come from a watch of the pods (list, then watch from its
resourceVersion, relisting after a gap, as an informer does): a pod takes traffic while all its
containers are ready and it is not terminating, so a deleted pod stops getting requests as soon as
the watch says so, and its preStop hook keeps it serving the ones already sent.

An ``Endpoint`` is a replica *slot* of the Deployment, bound to one pod at a time: when its pod dies
and the ReplicaSet replaces it, the slot takes the new pod and counts a restart, as a local replica's
process would. The client is synchronous; calls run in threads and the watch thread hands events to
the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from llmserve.errors import BackendUnavailable, ReplicaStartError
from llmserve.replicas import k8s_objects as objects
from llmserve.replicas.backend import Endpoint, EndpointState, ReplicaSet
from llmserve.replicas.capacity import Capacity
from llmserve.replicas.k8s_client import api_client, check_access, describe
from llmserve.replicas.k8s_leader import LeaseElector
from llmserve.replicas.k8s_slots import PodSlots, Version
from llmserve.replicas.process import ReplicaProgram
from llmserve.replicas.spec import EngineSpec
from llmserve.settings import EngineSettings, KubernetesSettings

logger = logging.getLogger(__name__)

ProgramFactory = Callable[[EngineSpec], ReplicaProgram]
READY, STARTING, RESTARTING = EndpointState.READY, EndpointState.STARTING, EndpointState.RESTARTING
UNHEALTHY, DRAINING, STOPPED = EndpointState.UNHEALTHY, EndpointState.DRAINING, EndpointState.STOPPED


class KubernetesBackend:
    def __init__(self, settings: KubernetesSettings, engine: EngineSettings, models_dir: Path,
                 program: ProgramFactory = lambda spec: spec, api: client.ApiClient | None = None,
                 retire_on_close: bool = False) -> None:
        self.settings = settings
        self._engine = engine
        self._models_dir = Path(models_dir)
        self._program = program
        self._api = api or api_client(settings)
        check_access(self._api, settings.namespace)
        self._apps = client.AppsV1Api(self._api)
        self._core = client.CoreV1Api(self._api)
        self._retire_on_close = retire_on_close  # routers in a cluster leave their Deployments to the next
        self._book = PodSlots(settings.engine_port)
        # in a pod the host name is the pod's name: the Lease says which router leads
        self._elector = LeaseElector(self._api, settings.namespace, settings.leader_lease,
                                     f"{socket.gethostname()}-{os.getpid()}", settings.leader_lease_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._nodes: list[dict[str, float]] = []
        self._nodes_error: str | None = "the cluster's nodes are not listed yet"  # until the first list
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(2.0), trust_env=False)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- ReplicaBackend -----------------------------------------------------

    async def start(self, spec: EngineSpec, replicas: int) -> ReplicaSet:
        self._ensure_watch()
        program = self._program(dataclasses.replace(
            spec, model_dir=objects.pod_model_dir(spec, self._models_dir, self.settings)))
        generation = getattr(program, "generation", spec.generation)
        replica_set = ReplicaSet(dataclasses.replace(spec, generation=generation))
        version = Version(replica_set, objects.object_name(spec))
        self._book.versions[objects.instance_label(spec)] = version
        for _ in range(replicas):
            self._book.add_slot(version)
        memory = objects.memory_request_gib(spec)
        placement = self._placement(spec.model_name)
        body = objects.deployment(spec, program, self.settings, replicas, memory, spec.gpus,
                                       spec.gpu_type or (self.settings.gpu_type if spec.gpus else None))
        if placement is not None:
            body = objects.apply_placement(body, placement)
        ns = self.settings.namespace
        doing = f"creating Deployment {version.name}"
        if await _call(self._apps.create_namespaced_deployment, ns, body, doing=doing, ok=(409,)) == 409:
            # a previous router's: take it over with this spec (a changed template rolls out)
            await _call(self._apps.patch_namespaced_deployment, version.name, ns, body,
                        doing=f"adopting Deployment {version.name}", patch=True)
        await _call(self._core.create_namespaced_service, ns, objects.service(spec, self.settings),
                    doing=f"creating Service {version.name}", ok=(409,))
        self._resync(version)
        return replica_set

    async def scale(self, replica_set: ReplicaSet, replicas: int) -> list[Endpoint]:
        version = self._version(replica_set)
        live = [e for e in replica_set.live if e not in version.victims]
        if replicas == len(live):
            return []
        if replicas > len(live):
            added = [self._book.add_slot(version) for _ in range(replicas - len(live))]
            await self._patch_scale(version, replicas)
            self._resync(version)
            return added
        surplus = len(live) - replicas
        # slots without a pod serve nothing: they go first, and the ReplicaSet removes pods for the rest
        unbound = [e for e in reversed(live) if self._book.slots[e].pod is None][:surplus]
        for endpoint in unbound:
            self._book.drop(version, endpoint)
        version.victims_wanted += surplus - len(unbound)
        chosen_before = len(version.victims)
        await self._patch_scale(version, replicas)
        await self._until(lambda: version.victims_wanted <= 0, timeout=10.0)
        version.victims_wanted = 0
        await self._finish(version, version.victims[chosen_before:], drain=True)
        return []

    async def wait_ready(self, endpoints: Iterable[Endpoint]) -> None:
        await asyncio.gather(*(self._wait_ready(e) for e in endpoints))

    async def retire(self, replica_set: ReplicaSet, drain: bool = True) -> None:
        version = self._version(replica_set)
        version.retired = True
        live = [e for e in replica_set.endpoints if e.state is not STOPPED]
        for endpoint in live:
            endpoint.state = DRAINING
        if drain:  # the pods keep serving what they have; nothing new reaches them
            await self._idle(live)
        ns, name = self.settings.namespace, version.name
        for delete in (self._apps.delete_namespaced_deployment, self._core.delete_namespaced_service):
            await _call(delete, name, ns, propagation_policy="Background", doing=f"deleting {name}", ok=(404,))
        await self._until(lambda: not version.pods, timeout=objects.grace_period_s(self.settings) + 15.0)
        for endpoint in live:
            self._book.stopped(version, endpoint)

    def report_failure(self, endpoint: Endpoint, reason: str) -> None:
        if endpoint.state is READY:
            endpoint.last_error = reason
            endpoint.state = UNHEALTHY
            self._book.slots[endpoint].ejected = True
            task = asyncio.get_running_loop().create_task(self._readmit(endpoint))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def endpoints(self) -> list[Endpoint]:
        return [e for v in self._book.versions.values() for e in v.replica_set.endpoints if e.state is not STOPPED]

    def capacity(self, spec: EngineSpec) -> Capacity:
        """Replicas of ``spec`` the cluster's nodes have room for (allocatable CPU, memory, GPUs)."""
        if self._nodes_error:
            return Capacity(1000, f"not checked: {self._nodes_error}")
        cpu, memory = self.settings.cpus_per_replica, objects.memory_request_gib(spec)
        fits = 0
        for node in self._nodes:
            each = min(node["cpu"] // cpu, node["memory_gib"] // max(memory, 0.01))
            if spec.gpus:
                each = min(each, node["gpus"] // spec.gpus)
            fits += int(each)
        return Capacity(fits, f"{len(self._nodes)} node(s) at {cpu:g} CPU, {memory:.1f} GiB"
                        + (f", {spec.gpus} GPU" if spec.gpus else "") + " a replica")

    def _placement(self, model_name: str) -> dict[str, Any] | None:
        """The packing plan's placement of ``model_name`` (settings.placement_plan), if it places it."""
        if self.settings.placement_plan is None:
            return None
        from llmserve.planner import Plan, placement_for

        try:
            plan = Plan.model_validate_json(Path(self.settings.placement_plan).read_text())
        except (OSError, ValueError) as exc:
            raise BackendUnavailable(f"kubernetes.placement_plan {self.settings.placement_plan} cannot be read: "
                                     f"{exc}; write one with `llmserve plan --models FILE --json OUT`") from None
        try:
            return placement_for(plan, model_name)
        except KeyError:
            return None

    def leading(self) -> bool:
        """Whether this router holds the Lease that makes it the one to run the control loops."""
        self._elector.start()
        return self._elector.leader

    async def close(self) -> None:
        await self._elector.close(release=True)
        if self._retire_on_close:
            await asyncio.gather(*(self.retire(v.replica_set, drain=True) for v in list(self._book.versions.values())
                                   if not v.retired), return_exceptions=True)
        self._stop.set()
        for task in list(self._tasks):
            task.cancel()
        await self._http.aclose()

    async def _finish(self, version: Version, victims: list[Endpoint], drain: bool) -> None:
        """Victims of a scale-down: in-flight requests finish (bounded), their pods go, they leave the set."""
        if drain:
            await self._idle(victims)
        pods = {self._book.slots[e].pod for e in victims}
        await self._until(lambda: not (pods & set(version.pods)), timeout=objects.grace_period_s(self.settings) + 5)
        for endpoint in victims:
            self._book.drop(version, endpoint)

    async def _idle(self, endpoints: list[Endpoint]) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(e.idle() for e in endpoints)),
                                   timeout=self._engine.drain_timeout_s)

    async def _wait_ready(self, endpoint: Endpoint) -> None:
        deadline = time.monotonic() + self._engine.ready_timeout_s
        slot = self._book.slots[endpoint]
        while endpoint.state is not READY:
            failure = slot.failure
            if endpoint.state is STOPPED:
                raise ReplicaStartError(endpoint.id, "stopped before it was ready")
            if failure is not None and failure.failure and not endpoint.ever_ready and (
                    failure.fatal or failure.failure.startswith("CrashLoopBackOff")):
                raise ReplicaStartError(endpoint.id, f"pod {failure.name}: {failure.failure}")
            if failure is not None and failure.unschedulable and \
                    time.monotonic() - slot.since > self.settings.schedule_timeout_s:
                raise ReplicaStartError(endpoint.id, f"pod {failure.name} cannot be scheduled after "
                                        f"{self.settings.schedule_timeout_s:.0f}s: {failure.unschedulable}")
            if time.monotonic() > deadline:
                raise ReplicaStartError(endpoint.id, endpoint.last_error or
                                        f"not ready after {self._engine.ready_timeout_s:.0f}s")
            await self._until(lambda: False, timeout=0.5)

    async def _readmit(self, endpoint: Endpoint) -> None:
        """An endpoint the router saw refuse a connection comes back once its /health answers."""
        slot = self._book.slots[endpoint]
        while slot.ejected:
            await asyncio.sleep(self._engine.health_interval_s)
            with contextlib.suppress(httpx.HTTPError):
                if (await self._http.get(f"{endpoint.url}/health")).status_code == 200 and slot.ejected:
                    slot.ejected = False
                    if endpoint.state is UNHEALTHY and slot.pod in self._version_of(endpoint).pods and \
                            self._version_of(endpoint).pods[slot.pod].ready:
                        endpoint.state = READY
                        endpoint.last_error = None

    # -- the pod watch --------------------------------------------------------

    def _ensure_watch(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            for target in (self._watch, self._watch_nodes):
                thread = threading.Thread(target=target, daemon=True, name=f"k8s {target.__name__}")
                thread.start()
                self._threads.append(thread)

    def _watch(self) -> None:
        selector = f"app.kubernetes.io/managed-by={objects.MANAGED_BY}"
        ns = self.settings.namespace
        while not self._stop.is_set():
            try:
                listed: Any = self._core.list_namespaced_pod(ns, label_selector=selector, _preload_content=False,
                                                             _request_timeout=30)
                snapshot = json.loads(listed.data)
                self._deliver("SYNC", snapshot["items"])
                stream = watch.Watch()
                for event in stream.stream(self._core.list_namespaced_pod, ns, label_selector=selector,
                                           resource_version=snapshot["metadata"]["resourceVersion"],
                                           timeout_seconds=60, _request_timeout=90):
                    if self._stop.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._deliver(event["type"], [event["raw_object"]])
            except Exception as exc:  # a gap (410 Gone), a dropped connection: list again
                if not self._stop.is_set():
                    logger.debug("pod watch restarting: %s", exc)
                    self._stop.wait(0.5)

    def _deliver(self, kind: str, pods: list[dict[str, Any]]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._on_pods, kind, pods)

    def _on_pods(self, kind: str, pods: list[dict[str, Any]]) -> None:
        self._book.on_pods(kind, pods)
        self._pulse()

    def _resync(self, version: Version) -> None:
        """Bind pods already seen (an adopted Deployment's) to the version's new slots."""
        self._book.resync(version, objects.instance_label(version.replica_set.spec))
        self._pulse()

    def _watch_nodes(self) -> None:
        while not self._stop.is_set():
            try:
                listed: Any = self._core.list_node(_preload_content=False, _request_timeout=10)
                nodes = json.loads(listed.data)["items"]
                self._nodes = [_allocatable(n, self.settings.gpu_resource) for n in nodes
                               if not (n.get("spec") or {}).get("unschedulable")]
                self._nodes_error = None
            except Exception as exc:
                self._nodes_error = describe(exc, "listing the cluster's nodes")
            self._stop.wait(15.0)

    # -- helpers --------------------------------------------------------------

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.5))
        return True

    def _version_of(self, endpoint: Endpoint) -> Version:
        [version] = [v for v in self._book.versions.values() if endpoint in v.replica_set.endpoints]
        return version

    def _version(self, replica_set: ReplicaSet) -> Version:
        [version] = [v for v in self._book.versions.values() if v.replica_set is replica_set]
        return version

    async def _patch_scale(self, version: Version, replicas: int) -> None:
        await _call(self._apps.patch_namespaced_deployment_scale, version.name, self.settings.namespace,
                    {"spec": {"replicas": replicas}}, doing=f"scaling Deployment {version.name}", patch=True)


async def _call(method: Callable[..., Any], *args: Any, doing: str, ok: tuple[int, ...] = (), patch: bool = False,
                **kwargs: Any) -> int:
    """One API call in a thread, its answer left unparsed (the typed client's models reject some of an
    older apiserver's answers, a delete's Status for one); returns the HTTP status. ``ok``: statuses that
    are an answer, not an error (409: it exists already; 404: it is gone already)."""
    if patch:
        kwargs["_content_type"] = "application/merge-patch+json"
    try:
        response = await asyncio.to_thread(method, *args, _preload_content=False, **kwargs)
    except ApiException as exc:
        if exc.status in ok:
            return int(exc.status)
        raise BackendUnavailable(describe(exc, doing)) from None
    except Exception as exc:
        raise BackendUnavailable(describe(exc, doing)) from None
    return int(response.status)


def _allocatable(node: dict[str, Any], gpu_resource: str) -> dict[str, float]:
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    return {"cpu": _cpu(allocatable.get("cpu", "0")), "memory_gib": _memory_gib(allocatable.get("memory", "0")),
            "gpus": float(allocatable.get(gpu_resource, 0) or 0)}


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _memory_gib(quantity: str) -> float:
    for unit, factor in _UNITS.items():
        if quantity.endswith(unit):
            return float(quantity[: -len(unit)]) * factor / (1 << 30)
    return float(quantity) / (1 << 30)
