"""The session's cluster: one control plane and one test kubelet, shared by every Kubernetes test.

Only inside ``scripts/k8s_tests.sh`` (``LLMSERVE_K8S_TESTS=1`` in a network namespace of its own);
elsewhere the tests marked ``kubernetes`` are skipped by ``tests/conftest.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config

from tests.kube.control_plane import ControlPlane
from tests.kube.kubelet import TestKubelet

IMAGE = "llmserve:test"  # the one image the test kubelet can "pull"


def enabled() -> bool:
    return os.environ.get("LLMSERVE_K8S_TESTS") == "1"


@dataclass
class Cluster:
    control_plane: ControlPlane
    api: client.ApiClient
    kubelet: TestKubelet

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig()

    def namespace(self, name: str) -> str:
        """A fresh namespace (each test its own, so leftovers of one never confuse another)."""
        client.CoreV1Api(self.api).create_namespace({"metadata": {"name": name}}, _preload_content=False)
        return name


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not enabled():
        pytest.skip("the Kubernetes tests run inside scripts/k8s_tests.sh")
    workdir = tmp_path_factory.mktemp("cluster")
    control_plane = ControlPlane(workdir).start()
    api = config.new_client_from_config(str(control_plane.kubeconfig()))
    # a node with room for many small engines and no GPU: a GPU request stays unschedulable
    kubelet = TestKubelet(api, workdir / "pods", images=frozenset({IMAGE}), cpu="64", memory="256Gi").start()
    try:
        yield Cluster(control_plane, api, kubelet)
    finally:
        kubelet.stop()
        control_plane.stop()
