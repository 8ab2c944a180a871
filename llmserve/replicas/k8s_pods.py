"""What a pod's status says about its replica: pure functions of the pod as the API returns it (a dict).

The rule every anchor converged on decides traffic: a pod takes requests when all its containers are
ready and it has no deletionTimestamp (a terminating pod that still passes readiness is out at once).
The rest turns the kubelet's and the scheduler's words into a reason an operator can act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# waiting reasons that will not pass by themselves (an image that does not exist, a bad config)
FATAL_WAITING = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                           "CreateContainerConfigError", "CreateContainerError", "RunContainerError"})


@dataclass(frozen=True)
class PodView:
    name: str
    uid: str
    ip: str
    node: str
    ready: bool  # all containers ready and not terminating: routable
    terminating: bool
    restarts: int
    created: str
    failure: str | None  # why it does not start: a fatal waiting reason or a crash loop, with its message
    fatal: bool  # the failure will not pass without a change (an image, a config)
    unschedulable: str | None  # the scheduler's message while it cannot place the pod


def view(pod: dict[str, Any]) -> PodView:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    terminating = bool(meta.get("deletionTimestamp"))
    ready = bool(containers) and all(c.get("ready") for c in containers) and not terminating
    failure, fatal = None, False
    for c in containers:
        waiting = (c.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if not reason or reason in ("ContainerCreating", "PodInitializing"):
            continue
        last = ((c.get("lastState") or {}).get("terminated") or {})
        said = waiting.get("message") or ""
        if last:
            said = (f"{said}; " if said else "") + f"exit code {last.get('exitCode')}: {_tail(last.get('message'))}"
        failure, fatal = f"{reason}: {said}".rstrip(": "), reason in FATAL_WAITING
        break
    unschedulable = None
    for condition in status.get("conditions") or []:
        if (condition.get("type") == "PodScheduled" and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"):
            unschedulable = condition.get("message") or "the scheduler cannot place the pod"
    return PodView(name=meta.get("name", ""), uid=meta.get("uid", ""), ip=status.get("podIP") or "",
                   node=(pod.get("spec") or {}).get("nodeName") or "", ready=ready, terminating=terminating,
                   restarts=sum(int(c.get("restartCount") or 0) for c in containers),
                   created=meta.get("creationTimestamp") or "", failure=failure, fatal=fatal,
                   unschedulable=unschedulable)


def _tail(message: object, limit: int = 300) -> str:
    """The end of a termination message (the container's last log lines): the error is usually last."""
    text = str(message or "").strip()
    lines = text.splitlines()
    return (lines[-1] if lines else "")[-limit:]
