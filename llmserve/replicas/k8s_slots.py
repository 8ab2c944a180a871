"""The replica slots of the Kubernetes backend: which pod each endpoint stands for, and its state.

An ``Endpoint`` is a slot of a version's Deployment, bound to one pod at a time; pod events (from the
backend's watch) bind, rebind and update them. Nothing here calls the API, so the bookkeeping is
the same whoever feeds it the pods.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llmserve.replicas import k8s_objects as objects
from llmserve.replicas.backend import LIVE_STATES, Endpoint, EndpointState, ReplicaSet
from llmserve.replicas.k8s_pods import PodView, view

READY, STARTING, RESTARTING = EndpointState.READY, EndpointState.STARTING, EndpointState.RESTARTING
UNHEALTHY, DRAINING, STOPPED = EndpointState.UNHEALTHY, EndpointState.DRAINING, EndpointState.STOPPED


@dataclass(eq=False)
class Slot:
    pod: str | None = None
    pod_restarts: int = 0
    since: float = field(default_factory=time.monotonic)  # when it last needed a pod: the schedule timeout
    lost: bool = False  # its pod went away: the next pod it takes is a restart
    failure: PodView | None = None  # the pod's start failure, while it has one
    ejected: bool = False  # the router saw it refuse a connection: out until its /health answers


@dataclass(eq=False)
class Version:
    replica_set: ReplicaSet
    name: str
    bound: dict[str, Endpoint] = field(default_factory=dict)  # pod name -> slot's endpoint
    pods: dict[str, PodView] = field(default_factory=dict)
    victims_wanted: int = 0  # a scale-down waits to see which pods the ReplicaSet deletes
    victims: list[Endpoint] = field(default_factory=list)
    retired: bool = False
    next_index: int = 0


class PodSlots:
    """The versions a backend runs and their slots, kept current from pod events."""

    def __init__(self, engine_port: int) -> None:
        self._port = engine_port
        self.versions: dict[str, Version] = {}  # instance label -> version
        self.slots: dict[Endpoint, Slot] = {}
        # every pod the watch has shown, by instance, owned here or not: a version started later (a
        # Deployment a previous router left) binds the pods that exist already, which send no event
        self.seen: dict[str, dict[str, PodView]] = {}

    def add_slot(self, version: Version) -> Endpoint:
        spec = version.replica_set.spec
        endpoint = Endpoint(f"{spec.versioned_name}/{version.next_index}", spec.model_name, spec.version)
        endpoint.details["deployment"] = version.name
        version.next_index += 1
        self.slots[endpoint] = Slot()
        version.replica_set.endpoints.append(endpoint)
        return endpoint

    def drop(self, version: Version, endpoint: Endpoint) -> None:
        self.stopped(version, endpoint)
        if endpoint in version.replica_set.endpoints:
            version.replica_set.endpoints.remove(endpoint)

    def stopped(self, version: Version, endpoint: Endpoint) -> None:
        endpoint.state = STOPPED
        slot = self.slots[endpoint]
        if slot.pod is not None:
            version.bound.pop(slot.pod, None)
            slot.pod = None
        if endpoint in version.victims:
            version.victims.remove(endpoint)

    def on_pods(self, kind: str, pods: list[dict[str, Any]]) -> None:
        if kind == "SYNC":  # pods deleted during a gap in the watch are gone now
            present = {(p["metadata"]["labels"].get(objects.LABEL_INSTANCE), p["metadata"]["name"]) for p in pods}
            for instance, version in self.versions.items():
                for name in [n for n in version.pods if (instance, n) not in present]:
                    self.on_pod(version, "DELETED", version.pods[name])
            for instance, known in self.seen.items():
                for name in [n for n in known if (instance, n) not in present]:
                    del known[name]
        for pod in pods:
            instance = (pod["metadata"].get("labels") or {}).get(objects.LABEL_INSTANCE, "")
            seen = view(pod)
            if kind == "DELETED":
                self.seen.get(instance, {}).pop(seen.name, None)
            else:
                self.seen.setdefault(instance, {})[seen.name] = seen
            owner = self.versions.get(instance)
            if owner is not None:
                self.on_pod(owner, "DELETED" if kind == "DELETED" else "MODIFIED", seen)

    def on_pod(self, version: Version, kind: str, pod: PodView) -> None:
        endpoint = version.bound.get(pod.name)
        if kind == "DELETED" or pod.terminating:
            if kind == "DELETED":
                version.pods.pop(pod.name, None)
            else:
                version.pods[pod.name] = pod
            if endpoint is None:
                return
            if endpoint in version.victims or version.retired:
                endpoint.state = DRAINING
            elif version.victims_wanted > 0:  # the ReplicaSet chose this pod for a scale-down
                version.victims_wanted -= 1
                version.victims.append(endpoint)
                endpoint.state = DRAINING
            else:  # deleted or evicted under us: the slot waits for the replacement pod
                slot = self.slots[endpoint]
                version.bound.pop(pod.name, None)
                slot.pod, slot.lost, slot.since, slot.failure = None, True, time.monotonic(), None
                endpoint.state = RESTARTING
                endpoint.last_error = f"pod {pod.name} " + ("deleted" if kind == "DELETED" else "terminating")
            return
        version.pods[pod.name] = pod
        if version.retired:
            return
        if endpoint is None:
            free = [e for e in version.replica_set.endpoints if e.state in LIVE_STATES
                    and e not in version.victims and self.slots[e].pod is None]
            endpoint = free[0] if free else self.add_slot(version)  # more pods than slots: scaled from outside
            slot = self.slots[endpoint]
            slot.pod, slot.pod_restarts = pod.name, pod.restarts
            if slot.lost:
                endpoint.restarts += 1
                slot.lost = False
            version.bound[pod.name] = endpoint
        self._apply(endpoint, pod)

    def _apply(self, endpoint: Endpoint, pod: PodView) -> None:
        slot = self.slots[endpoint]
        restarted = pod.restarts > slot.pod_restarts
        if restarted:
            endpoint.restarts += pod.restarts - slot.pod_restarts
            slot.pod_restarts = pod.restarts
        if pod.ip:
            endpoint.url = f"http://{pod.ip}:{self._port}"
        endpoint.details.update(pod=pod.name, node=pod.node, pod_ip=pod.ip)
        slot.failure = pod if (pod.failure or pod.unschedulable) else None
        if endpoint.state is DRAINING:
            return
        if pod.ready:
            if not slot.ejected:
                endpoint.state = READY
                endpoint.ever_ready = True
                endpoint.last_error = None
            return
        if pod.failure or pod.unschedulable:
            endpoint.last_error = pod.failure or f"unschedulable: {pod.unschedulable}"
        if endpoint.ever_ready:
            endpoint.state = RESTARTING if (restarted or pod.failure) else UNHEALTHY
        elif endpoint.state is not RESTARTING or not pod.failure:
            endpoint.state = RESTARTING if pod.failure else STARTING

    def resync(self, version: Version, instance: str) -> None:
        """Bind pods already seen (an adopted Deployment's) to the version's new slots."""
        for pod in list(self.seen.get(instance, {}).values()):
            self.on_pod(version, "MODIFIED", pod)
