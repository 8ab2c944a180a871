"""The Kubernetes backend's pure parts: the objects of a version, and what a pod's status means."""

from __future__ import annotations

import re
from pathlib import Path

from llmserve.replicas import k8s_objects as objects
from llmserve.replicas.k8s_pods import view
from llmserve.replicas.spec import EngineSpec
from llmserve.settings import KubernetesSettings

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def spec(model: str = "chat", version: str = "v1", **kw: object) -> EngineSpec:
    return EngineSpec(model_dir=Path("/models") / model / version, model_name=model, version=version, **kw)  # type: ignore[arg-type]


def test_names_are_dns_labels_unique_per_version_and_labels_are_valid() -> None:
    names = {objects.object_name(spec(m, v)) for m, v in
             [("a.b", "v1"), ("a-b", "v1"), ("a_b" * 30, "V1.2_rc"), ("chat", "v1"), ("chat", "v2")]}
    assert len(names) == 5
    assert all(DNS_1035.match(n) and len(n) <= 63 for n in names)
    for value in objects.labels(spec("a_b" * 30, "V1.2_rc")).values():
        assert len(value) <= 63 and re.match(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", value)


def test_the_pod_drains_gracefully_and_runs_the_engine_argv() -> None:
    settings = KubernetesSettings(prestop_s=10, shutdown_timeout_s=30, image="registry/llmserve:1")
    s = spec()
    body = objects.deployment(s, s, settings, replicas=2, memory_gib=3.0)
    pod = body["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["terminationGracePeriodSeconds"] >= 10 + 30
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "10"]
    argv = container["command"] + container["args"]
    assert argv[-2:] == ["--shutdown-timeout", "30"] and "vllm.entrypoints.openai.api_server" in argv
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert body["spec"]["replicas"] == 2 and body["spec"]["selector"]["matchLabels"] == {
        objects.LABEL_INSTANCE: objects.instance_label(s)}
    assert body["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "3072Mi"}
    assert "nodeSelector" not in pod and "nvidia.com/gpu" not in container["resources"]["limits"]


def test_gpus_become_requests_limits_a_toleration_and_a_node_selector() -> None:
    settings = KubernetesSettings()
    s = spec(gpus=2)
    body = objects.deployment(s, s, settings, 1, 40.0, gpus=2, gpu_type="NVIDIA-A100-SXM4-80GB")
    pod = body["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_a_version_folder_is_found_below_the_pods_models_path() -> None:
    settings = KubernetesSettings(models_path="/mnt/models")
    assert objects.pod_model_dir(spec(), Path("/models"), settings) == Path("/mnt/models/chat/v1")
    assert objects.pod_model_dir(spec(), Path("/elsewhere"), settings) == Path("/models/chat/v1")


def pod(containers: list[dict[str, object]], deleting: bool = False,
        conditions: list[dict[str, object]] | None = None) -> dict[str, object]:
    meta: dict[str, object] = {"name": "p", "uid": "u"}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-02T10:00:00Z"
    return {"metadata": meta, "spec": {"nodeName": "n"},
            "status": {"podIP": "10.0.0.2", "containerStatuses": containers, "conditions": conditions or []}}


def test_a_pod_is_routable_only_ready_and_not_terminating() -> None:
    ready = {"name": "engine", "ready": True, "restartCount": 0, "state": {"running": {}}}
    assert view(pod([ready])).ready
    assert not view(pod([ready], deleting=True)).ready and view(pod([ready], deleting=True)).terminating
    assert not view(pod([{**ready, "ready": False}])).ready
    assert not view(pod([])).ready


def test_failures_are_named_and_an_image_pull_is_fatal() -> None:
    pulling = {"name": "engine", "ready": False, "restartCount": 0,
               "state": {"waiting": {"reason": "ErrImagePull", "message": 'Failed to pull image "x": not found'}}}
    seen = view(pod([pulling]))
    assert seen.fatal and seen.failure == 'ErrImagePull: Failed to pull image "x": not found'
    crashing = {"name": "engine", "ready": False, "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
                "lastState": {"terminated": {"exitCode": 3, "message": "loading...\nCUDA out of memory"}}}
    seen = view(pod([crashing]))
    assert not seen.fatal and seen.restarts == 3
    assert seen.failure == "CrashLoopBackOff: back-off 10s; exit code 3: CUDA out of memory"
    unschedulable = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
    assert view(pod([], conditions=unschedulable)).unschedulable == \
        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


def test_the_packing_plans_placement_lands_on_the_pod() -> None:
    from llmserve.planner import load_fleet, make_plan, placement_for

    example = Path(objects.__file__).resolve().parent.parent / "planner" / "examples" / "a100-30-models.yaml"
    plan = make_plan(load_fleet(example), solver="ffd")
    shared = next(p for p in plan.placements if p.mps)  # a model sharing its GPU under MPS
    placement = placement_for(plan, shared.model)
    s = spec(shared.model)
    body = objects.apply_placement(objects.deployment(s, s, KubernetesSettings(), 1, 4.0), placement)
    pod = body["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == placement["kubernetes"]["spec"]["nodeSelector"]
    assert placement["kubernetes"]["metadata"]["labels"].items() <= pod["metadata"]["labels"].items()
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert {k: str(v) for k, v in placement["mps"].items()}.items() <= env.items()
    assert pod["metadata"]["labels"][objects.LABEL_INSTANCE] == objects.instance_label(s)  # the selector stays
