"""etcd + kube-apiserver + kube-controller-manager + kube-scheduler on loopback, for the tests.

Everything binds 127.0.0.1 and must run inside a network namespace of its own (``scripts/k8s_tests.sh``
makes one): a controller or kubelet outside it would probe pod addresses in private ranges. The
apiserver authenticates a static admin token and a second, unprivileged one (``viewer``) so the tests
can show what an RBAC refusal looks like.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ETCD_PORT = 12379
APISERVER_PORT = 16443
ADMIN_TOKEN = "llmserve-test-admin-token"
VIEWER_TOKEN = "llmserve-test-viewer-token"


def bin_dir() -> Path:
    cache = Path(os.environ.get("LLMSERVE_K8S_CACHE", Path.home() / ".cache" / "llmserve"))
    return cache / "k8s-1.20.2" / "bin"


def in_private_netns() -> bool:
    """Whether this process runs in a network namespace with nothing but loopback (the tests' rule)."""
    return [name for _index, name in socket.if_nameindex()] == ["lo"]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _wait_port(port: int, process: subprocess.Popen[bytes], name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on {port} within {timeout:.0f}s")


@dataclass
class ControlPlane:
    workdir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{APISERVER_PORT}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "serving.crt"

    def kubeconfig(self, token: str = ADMIN_TOKEN, name: str = "admin") -> Path:
        """A kubeconfig file for ``token`` (the admin's by default)."""
        path = self.workdir / f"kubeconfig-{name}"
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: test\n  cluster:\n    server: {self.url}\n"
            f"    certificate-authority: {self.ca_file}\n"
            f"users:\n- name: {name}\n  user:\n    token: {token}\n"
            f"contexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\n"
            "current-context: test\n")
        return path

    def start(self) -> ControlPlane:
        if not in_private_netns():
            raise RuntimeError("the test control plane runs only inside a network namespace of its own "
                               "(scripts/k8s_tests.sh)")
        bins = bin_dir()
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        _openssl("genrsa", "-out", str(w / "sa.key"), "2048")
        _openssl("rsa", "-in", str(w / "sa.key"), "-pubout", "-out", str(w / "sa.pub"))
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                 "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(w / "serving.key"),
                 "-out", str(w / "serving.crt"))
        (w / "tokens.csv").write_text(f"{ADMIN_TOKEN},admin,admin,system:masters\n"
                                      f"{VIEWER_TOKEN},viewer,viewer\n")
        self._run("etcd", ["etcd", "--data-dir", str(w / "etcd"), "--unsafe-no-fsync",
                           f"--listen-client-urls=http://127.0.0.1:{ETCD_PORT}",
                           f"--advertise-client-urls=http://127.0.0.1:{ETCD_PORT}",
                           "--listen-peer-urls=http://127.0.0.1:12380"])
        _wait_port(ETCD_PORT, self.processes["etcd"], "etcd")
        self._run("kube-apiserver", [
            str(bins / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={APISERVER_PORT}",
            "--insecure-port=0", f"--tls-cert-file={w / 'serving.crt'}", f"--tls-private-key-file={w / 'serving.key'}",
            f"--token-auth-file={w / 'tokens.csv'}", "--authorization-mode=RBAC",
            f"--service-account-key-file={w / 'sa.pub'}", f"--service-account-signing-key-file={w / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/24", "--enable-priority-and-fairness=false"])
        self._wait_ready()
        admin = self.kubeconfig()
        self._run("kube-controller-manager", [
            str(bins / "kube-controller-manager"), f"--kubeconfig={admin}", "--leader-elect=false",
            "--secure-port=0", "--port=0", "--controllers=*,-nodeipam,-service,-route,-cloud-node-lifecycle",
            f"--service-account-private-key-file={w / 'sa.key'}", "--use-service-account-credentials=false",
            "--concurrent-deployment-syncs=5", "--concurrent-replicaset-syncs=5", "--concurrent-endpoint-syncs=5"])
        self._run("kube-scheduler", [str(bins / "kube-scheduler"), f"--kubeconfig={admin}",
                                     "--leader-elect=false", "--secure-port=0", "--port=0"])
        return self

    def _run(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        while time.monotonic() < deadline:
            if self.processes["kube-apiserver"].poll() is not None:
                raise RuntimeError(f"kube-apiserver exited: see {self.workdir / 'kube-apiserver.log'}")
            try:
                if httpx.get(f"{self.url}/readyz", verify=str(self.ca_file), headers=headers,
                             timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"kube-apiserver not ready within {timeout:.0f}s")

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
