"""A test kubelet: the node agent of the test cluster, running each pod's command as a local process.

No container runtime can run images here, so this plays the kubelet's part: it registers a Node,
watches the pods the (real) scheduler binds to it, and for each one runs its container's command on
this machine (the "image" is the host's file system; an image not in ``images`` fails to pull, as a
missing image would), probes its readiness over HTTP, restarts it with back-off when it exits, and on
deletion runs the preStop hook, sends SIGTERM, waits out the grace period and sends SIGKILL, exactly
in the kubelet's order. Status goes through the pods' status subresource, so everything above (the
Deployment and ReplicaSet controllers, the Endpoints controller, RBAC) is the real thing.

Its one difference from a kubelet: pods share the test's network namespace, each on an address of its
own added to loopback (Endpoints refuse 127.0.0.0/8), so a command binding 0.0.0.0 is narrowed to its
pod's address.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

MERGE = "application/merge-patch+json"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Pod:
    namespace: str
    name: str
    uid: str
    ip: str
    spec: dict[str, Any]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    ready: bool = False
    deleting: threading.Event = field(default_factory=threading.Event)
    gone: threading.Event = field(default_factory=threading.Event)
    grace_s: float = 30.0

    @property
    def container(self) -> dict[str, Any]:
        return dict(self.spec["containers"][0])


class TestKubelet:
    __test__ = False  # not a pytest class

    def __init__(self, api: client.ApiClient, workdir: Path, node: str = "node-1",
                 images: frozenset[str] = frozenset({"llmserve:test"}), cpu: str = "32", memory: str = "128Gi",
                 gpus: int = 0, labels: dict[str, str] | None = None, subnet: int = 0) -> None:
        self.core = client.CoreV1Api(api)
        self.node = node
        self.images = images
        self._workdir = workdir
        self._capacity = {"cpu": cpu, "memory": memory, "pods": "110"}
        if gpus:
            self._capacity["nvidia.com/gpu"] = str(gpus)
        self._labels = {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux", **(labels or {})}
        self._subnet = subnet
        self._ips = itertools.count(2)
        self._pods: dict[str, _Pod] = {}  # uid -> pod
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._http = httpx.Client(timeout=1.0, trust_env=False)

    # -- node ---------------------------------------------------------------

    def start(self) -> TestKubelet:
        self._workdir.mkdir(parents=True, exist_ok=True)
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node, "labels": self._labels},
                "status": self._node_status()}
        with contextlib.suppress(ApiException):
            self.core.create_node(body)
        self.core.patch_node_status(self.node, {"status": self._node_status()}, _content_type=MERGE)
        for target in (self._heartbeat, self._watch):
            thread = threading.Thread(target=target, daemon=True, name=f"kubelet {self.node} {target.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def _node_status(self) -> dict[str, Any]:
        now = _now()
        return {"capacity": self._capacity, "allocatable": self._capacity,
                "addresses": [{"type": "InternalIP", "address": f"10.244.{self._subnet}.1"}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "test kubelet is posting ready status", "lastHeartbeatTime": now,
                                "lastTransitionTime": now}],
                "nodeInfo": {"kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2", "machineID": "",
                             "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "test",
                             "containerRuntimeVersion": "test://1", "operatingSystem": "linux",
                             "architecture": "amd64"}}

    def _heartbeat(self) -> None:
        while not self._stop.wait(5.0):
            with contextlib.suppress(Exception):
                self.core.patch_node_status(self.node, {"status": self._node_status()}, _content_type=MERGE)

    # -- pods ---------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(self.core.list_pod_for_all_namespaces,
                                           field_selector=f"spec.nodeName={self.node}", timeout_seconds=30):
                    if self._stop.is_set():
                        break
                    self._on_event(event["type"], event["raw_object"])
            except Exception:
                time.sleep(0.5)

    def _on_event(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            known = self._pods.get(uid)
            if known is None and kind != "DELETED" and not meta.get("deletionTimestamp"):
                known = self._pods[uid] = _Pod(meta["namespace"], meta["name"], uid,
                                               f"10.244.{self._subnet}.{next(self._ips)}", pod["spec"],
                                               self._workdir / f"{meta['namespace']}_{meta['name']}.log")
                threading.Thread(target=self._run, args=(known,), daemon=True, name=f"pod {meta['name']}").start()
                return
        if known is None:
            return
        if kind == "DELETED":  # force-deleted (no grace): kill at once
            known.grace_s = 0
            known.deleting.set()
            known.gone.set()
        elif meta.get("deletionTimestamp") and not known.deleting.is_set():
            known.grace_s = float(meta.get("deletionGracePeriodSeconds") or 0)
            known.deleting.set()

    def _run(self, pod: _Pod) -> None:
        subprocess.run(["ip", "addr", "add", f"{pod.ip}/32", "dev", "lo"], capture_output=True)
        try:
            self._life(pod)
        finally:
            self._kill(pod, 0)
            subprocess.run(["ip", "addr", "del", f"{pod.ip}/32", "dev", "lo"], capture_output=True)
            if not pod.gone.is_set():
                # the grace period in the body: the client leaves a query parameter of 0 out
                with contextlib.suppress(ApiException):
                    self.core.delete_namespaced_pod(pod.name, pod.namespace,
                                                    body={"gracePeriodSeconds": 0, "preconditions": {"uid": pod.uid}},
                                                    _preload_content=False)
            with self._lock:
                self._pods.pop(pod.uid, None)

    def _life(self, pod: _Pod) -> None:
        container = pod.container
        image = container.get("image", "")
        if image not in self.images:
            self._status(pod, "Pending", waiting=("ErrImagePull", f'Failed to pull image "{image}": rpc error: '
                                                  f'code = NotFound desc = failed to pull and unpack image '
                                                  f'"{image}": not found'))
            pod.deleting.wait()
            return
        backoff = 1.0
        last: dict[str, Any] | None = None
        while not pod.deleting.is_set():
            started = _now()
            pod.process = self._spawn(pod, container)
            pod.ready = False
            self._status(pod, "Running", running=started, last=last)
            self._probe_until_exit(pod, container, started, last)
            if pod.deleting.is_set():
                break
            code = pod.process.wait()
            pod.restarts += 1
            pod.ready = False
            last = {"terminated": {"exitCode": code, "reason": "Error" if code else "Completed",
                                   "message": self._log_tail(pod), "startedAt": started, "finishedAt": _now()}}
            self._status(pod, "Running", waiting=("CrashLoopBackOff", f"back-off {backoff:.0f}s restarting failed "
                                                  f"container={container['name']} pod={pod.name}"), last=last)
            if pod.deleting.wait(backoff):
                break
            backoff = min(backoff * 2, 10.0)
        self._terminate(pod, container)

    def _spawn(self, pod: _Pod, container: dict[str, Any]) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = _expand(str(item["value"]), env)
            elif (item.get("valueFrom") or {}).get("fieldRef"):
                path = item["valueFrom"]["fieldRef"]["fieldPath"]
                env[item["name"]] = {"status.podIP": pod.ip, "metadata.name": pod.name,
                                     "metadata.namespace": pod.namespace,
                                     "status.hostIP": f"10.244.{self._subnet}.1"}.get(path, "")
        argv = [_expand(a, env) for a in [*(container.get("command") or []), *(container.get("args") or [])]]
        argv = [pod.ip if a == "0.0.0.0" else a for a in argv]
        log = pod.log_path.open("ab")
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=container.get("workingDir") or None)

    def _probe_until_exit(self, pod: _Pod, container: dict[str, Any], started: str,
                          last: dict[str, Any] | None) -> None:
        probe = container.get("readinessProbe") or {}
        http = probe.get("httpGet") or {}
        period = float(probe.get("periodSeconds") or 10)
        failures_to_unready = int(probe.get("failureThreshold") or 3)
        failures = 0
        assert pod.process is not None
        while pod.process.poll() is None and not pod.deleting.is_set():
            if not http:
                ok = True
            else:
                try:
                    url = f"http://{pod.ip}:{http['port']}{http.get('path', '/')}"
                    ok = self._http.get(url, timeout=float(probe.get("timeoutSeconds") or 1)).status_code < 400
                except httpx.HTTPError:
                    ok = False
            failures = 0 if ok else failures + 1
            ready = ok if not pod.ready else failures < failures_to_unready
            if ready != pod.ready:
                pod.ready = ready
                self._status(pod, "Running", running=started, last=last)
            pod.deleting.wait(period if pod.ready else min(period, 0.5))

    def _terminate(self, pod: _Pod, container: dict[str, Any]) -> None:
        """The kubelet's order: preStop hook, SIGTERM, the rest of the grace period, SIGKILL."""
        deadline = time.monotonic() + pod.grace_s
        hook = (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command")
        if hook and pod.grace_s > 0 and pod.process is not None and pod.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(hook, timeout=max(0.1, deadline - time.monotonic()), capture_output=True)
        self._kill(pod, max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _kill(pod: _Pod, grace_s: float) -> None:
        process = pod.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def _status(self, pod: _Pod, phase: str, running: str | None = None, waiting: tuple[str, str] | None = None,
                last: dict[str, Any] | None = None) -> None:
        container = pod.container
        state: dict[str, Any] = ({"running": {"startedAt": running}} if running else
                                 {"waiting": {"reason": waiting[0], "message": waiting[1]}} if waiting else {})
        ready = "True" if pod.ready else "False"
        now = _now()
        status = {"phase": phase, "hostIP": f"10.244.{self._subnet}.1", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}],
                  "startTime": now,
                  "conditions": [{"type": t, "status": s, "lastTransitionTime": now} for t, s in
                                 (("Initialized", "True"), ("Ready", ready), ("ContainersReady", ready),
                                  ("PodScheduled", "True"))],
                  "containerStatuses": [{"name": container["name"], "image": container.get("image", ""),
                                         "imageID": "", "ready": pod.ready, "restartCount": pod.restarts,
                                         "started": running is not None, "state": state,
                                         "lastState": last or {}}]}
        with contextlib.suppress(ApiException):
            self.core.patch_namespaced_pod_status(pod.name, pod.namespace, {"status": status}, _content_type=MERGE,
                                                  _preload_content=False)

    @staticmethod
    def _log_tail(pod: _Pod, limit: int = 2048) -> str:
        """FallbackToLogsOnError: the end of the container's output becomes its termination message."""
        try:
            data = pod.log_path.read_bytes()[-limit:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip()

    # -- test helpers --------------------------------------------------------

    def crash(self, namespace: str, name: str) -> None:
        """Kill a pod's process as a crash would (SIGKILL): the kubelet restarts it in the same pod."""
        with self._lock:
            [pod] = [p for p in self._pods.values() if (p.namespace, p.name) == (namespace, name)]
        assert pod.process is not None
        os.killpg(pod.process.pid, signal.SIGKILL)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            pods = list(self._pods.values())
        for pod in pods:
            pod.grace_s = 0
            pod.deleting.set()
            pod.gone.set()
            self._kill(pod, 0)
        self._http.close()


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)
