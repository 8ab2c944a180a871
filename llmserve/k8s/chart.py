"""The Helm chart in deploy/helm/llmserve, written from the same builder as ``llmserve k8s manifests``.

CI has no helm binary, so the chart is not hand-written Go templating that CI could not render:
each template is the builder's object with Helm expressions in place of the values
(``{{ .Values.router.replicas }}``, ``{{ .Release.Namespace }}``), and optional parts inside
``{{- if }}`` blocks. ``tests/test_k8s_manifests.py`` checks the committed chart is what this writes,
and that putting the default values into those expressions gives back the manifests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import yaml

from llmserve.k8s import manifests
from llmserve.k8s.values import MonitoringValues, RedisValues, RouterValues, Values

# placeholder -> the Helm expression it becomes (integers lose their quotes)
EXPRESSIONS = {
    "'@replicas@'": "{{ .Values.router.replicas }}",
    "'@image@'": "{{ .Values.router.image | quote }}",
    "'@cpu@'": "{{ .Values.router.cpu | quote }}",
    "'@memory@'": "{{ .Values.router.memory | quote }}",
    "'@secret@'": "{{ .Values.router.admin_key_secret }}",
    "@ns@": "{{ .Release.Namespace }}",
}
CONDITIONS = {"llmserve-redis": ".Values.redis.enabled", "ServiceMonitor": ".Values.monitoring.service_monitor",
              "llmserve-dashboard": ".Values.monitoring.grafana_dashboard"}
CHART = {"apiVersion": "v2", "name": "llmserve", "version": "0.1.0", "appVersion": "0.1.0", "type": "application",
         "description": "llmserve: the router (API gateway, traffic router, control plane) that runs vLLM engines "
         "as Deployments, with Redis and monitoring"}


def _templated() -> Values:
    """Values whose fields are placeholders (unvalidated: an int field holds a string)."""
    router = RouterValues.model_construct(replicas=cast(int, "@replicas@"), image="@image@", cpu="@cpu@",
                                          memory="@memory@", admin_key_secret="@secret@")
    return Values.model_construct(namespace="@ns@", router=router, redis=RedisValues(),
                                  monitoring=MonitoringValues(), engine_image=None, models_pvc=None)


def _condition(obj: dict[str, Any]) -> str | None:
    return CONDITIONS.get(obj["metadata"]["name"]) or CONDITIONS.get(obj["kind"])


def templates() -> dict[str, str]:
    """File name -> template text."""
    found: dict[str, str] = {}
    for obj in manifests.objects(_templated()):
        text = _escape(yaml.safe_dump(obj, sort_keys=False, width=1000))
        for placeholder, expression in EXPRESSIONS.items():
            text = text.replace(placeholder, expression)
        condition = _condition(obj)
        if condition:
            text = f"{{{{- if {condition} }}}}\n{text}{{{{- end }}}}\n"
        found[f"{obj['kind'].lower()}-{obj['metadata']['name'].replace('@ns@', 'ns')}.yaml"] = text
    return found


OPEN, CLOSE = '{{ "{{" }}', '{{ "}}" }}'


def _escape(text: str) -> str:
    """Literal braces (the Grafana dashboard's ``{{version}}`` legends) as Helm prints them, so Helm
    does not read them as template actions."""
    return text.replace("{{", "\0o").replace("}}", "\0c").replace("\0o", OPEN).replace("\0c", CLOSE)


def render_defaults(template: str, values: Values) -> str:
    """The template with ``values`` put into its expressions: a check of the generator, not Helm."""
    text = template
    for expression, value in {"{{ .Values.router.replicas }}": str(values.router.replicas),
                              "{{ .Values.router.image | quote }}": f'"{values.router.image}"',
                              "{{ .Values.router.cpu | quote }}": f'"{values.router.cpu}"',
                              "{{ .Values.router.memory | quote }}": f'"{values.router.memory}"',
                              "{{ .Values.router.admin_key_secret }}": values.router.admin_key_secret,
                              "{{ .Release.Namespace }}": values.namespace}.items():
        text = text.replace(expression, value)
    text = text.replace(OPEN, "{{").replace(CLOSE, "}}")
    lines = text.splitlines()
    if lines and lines[0].startswith("{{- if "):
        lines = lines[1:-1]
    return "\n".join(lines) + "\n"


def write(out: Path) -> list[Path]:
    (out / "templates").mkdir(parents=True, exist_ok=True)
    written = [out / "Chart.yaml", out / "values.yaml"]
    written[0].write_text(yaml.safe_dump(CHART, sort_keys=False))
    defaults = Values().model_dump(exclude={"namespace"})
    written[1].write_text("# llmserve's chart values (llmserve/k8s/values.py has each field's description)\n"
                          + yaml.safe_dump(defaults, sort_keys=False))
    for name, text in templates().items():
        path = out / "templates" / name
        path.write_text(text)
        written.append(path)
    return written
