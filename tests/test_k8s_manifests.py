"""The manifests a platform team applies, and the Helm chart: valid against current Kubernetes schemas
(kubernetes-validate, strict), the least RBAC the backend needs, the admin key only in a Secret."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from llmserve.cli import main
from llmserve.k8s import chart
from llmserve.k8s.manifests import objects
from llmserve.k8s.values import RedisValues, Values
from llmserve.replicas.k8s_client import NEEDED

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "llmserve"
NO_SCHEMA = {"ServiceMonitor"}  # a Prometheus Operator CRD: kubernetes-validate ships no schema for it


def every_variant() -> list[list[dict[str, Any]]]:
    return [objects(Values()), objects(Values(redis=RedisValues(enabled=False, url="redis://r:6379/0"),
                                              models_pvc="models", engine_image="llmserve:gpu"))]


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_every_object_validates_strictly_against_kubernetes(version: str) -> None:
    for variant in every_variant():
        for obj in variant:
            if obj["kind"] in NO_SCHEMA:
                continue
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_service_monitor_scrapes_the_routers_metrics_port() -> None:
    [monitor] = [o for o in objects(Values()) if o["kind"] == "ServiceMonitor"]
    [service] = [o for o in objects(Values()) if o["kind"] == "Service" and o["metadata"]["name"] == "llmserve-router"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert {p["name"] for p in service["spec"]["ports"]} == {"http"}


def test_the_role_grants_exactly_what_the_backend_checks_for() -> None:
    [role] = [o for o in objects(Values()) if o["kind"] == "Role"]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert granted == set(NEEDED)
    assert "*" not in str(role["rules"])
    [cluster_role] = [o for o in objects(Values()) if o["kind"] == "ClusterRole"]
    assert cluster_role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]}]


def test_the_router_runs_the_kubernetes_backend_with_its_key_from_a_secret() -> None:
    found = {(o["kind"], o["metadata"]["name"]): o for o in objects(Values(namespace="ml"))}
    settings = found[("ConfigMap", "llmserve-settings")]["data"]
    assert settings["LLMSERVE_BACKEND"] == "kubernetes" and settings["LLMSERVE_KUBERNETES__NAMESPACE"] == "ml"
    assert settings["LLMSERVE_ROUTER__HOST"] == "0.0.0.0" and "ADMIN" not in str(settings)
    assert settings["LLMSERVE_REDIS_URL"] == "redis://llmserve-redis.ml.svc:6379/0"
    router = found[("Deployment", "llmserve-router")]["spec"]
    [container] = router["template"]["spec"]["containers"]
    assert router["replicas"] == 2 and router["template"]["spec"]["serviceAccountName"] == "llmserve-router"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["env"] == [{"name": "LLMSERVE_ADMIN_KEY", "valueFrom": {"secretKeyRef": {
        "name": "llmserve-admin", "key": "admin-key"}}}]
    assert not any(o["kind"] == "Secret" for o in found.values())  # the key is never in what we print
    assert found[("PodDisruptionBudget", "llmserve-router")]["spec"]["minAvailable"] == 1
    assert found[("ConfigMap", "llmserve-dashboard")]["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_the_committed_chart_is_what_the_builder_writes_and_renders_to_the_manifests() -> None:
    written = {p.name: p.read_text() for p in (CHART / "templates").iterdir()}
    assert written == chart.templates(), "run `llmserve k8s chart` and commit deploy/helm/llmserve"
    assert yaml.safe_load((CHART / "values.yaml").read_text()) == Values().model_dump(exclude={"namespace"})
    values = Values(namespace="team-a")
    rendered = [yaml.safe_load(chart.render_defaults(text, values)) for text in chart.templates().values()]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(rendered, key=key) == sorted(objects(values), key=key)
    leftover = [t for t in (chart.render_defaults(t, values) for t in written.values()) if "{{ ." in t or "{{-" in t]
    assert not leftover


def test_bad_values_exit_2_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {"router:\n  replicas: 0\n": "router.replicas", "rooter: {}\n": "rooter",
             "redis:\n  enabled: false\n": "redis.url", "router: [": "cannot be read as YAML"}
    for text, named in cases.items():
        path = tmp_path / "values.yaml"
        path.write_text(text)
        assert main(["k8s", "manifests", "--values", str(path)]) == 2
        assert named in capsys.readouterr().err
    assert main(["k8s", "manifests", "--values", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_manifests_prints_every_object_as_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["k8s", "manifests"]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert printed == objects(Values())


def test_the_dockerfile_copies_only_what_exists_and_runs_a_real_command() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
        *sources, _target = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"
    assert 'CMD ["llmserve", "up"]' in text
    assert "LLMSERVE_ROUTER__HOST=0.0.0.0" in text and "LLMSERVE_AUTH=off" not in text
