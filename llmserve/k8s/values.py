"""The few choices the router's manifests leave to the operator (strict: a typo is an error)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmserve.errors import LLMServeError


class ValuesError(LLMServeError):
    """A values file that cannot be read or does not fit the schema (the message names the field)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouterValues(Strict):
    replicas: int = Field(2, ge=1, le=100, description="Router pods; all serve, one leads the control loops.")
    image: str = Field("llmserve:latest", min_length=1, description="The image (the Dockerfile's).")
    cpu: str = Field("1", description="CPU request of a router pod.")
    memory: str = Field("2Gi", description="Memory request (and limit) of a router pod.")
    admin_key_secret: str = Field("llmserve-admin", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                                  description="A Secret with key admin-key: the first admin API key.")


class RedisValues(Strict):
    enabled: bool = Field(True, description="Run a Redis beside the routers; off: bring your own (url).")
    url: str | None = Field(None, description="Your Redis, when enabled is off.")
    image: str = "redis:7-alpine"


class MonitoringValues(Strict):
    service_monitor: bool = Field(True, description="A ServiceMonitor for the Prometheus Operator.")
    grafana_dashboard: bool = Field(True, description="The dashboard as a ConfigMap for Grafana's sidecar.")


class Values(Strict):
    namespace: str = Field("llmserve", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    router: RouterValues = Field(default_factory=RouterValues)
    redis: RedisValues = Field(default_factory=RedisValues)
    monitoring: MonitoringValues = Field(default_factory=MonitoringValues)
    engine_image: str | None = Field(None, description="The engines' image; default: the router's.")
    models_pvc: str | None = Field(None, description="A PersistentVolumeClaim with the model repository.")

    @classmethod
    def load(cls, path: Path | None) -> Values:
        if path is None:
            return cls()
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValuesError(f"--values {path}: cannot be read as YAML: {exc}") from None
        try:
            values = cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise ValuesError(f"--values {path}: {field}: {first['msg']}; see deploy/helm/llmserve/values.yaml "
                              "for the fields") from None
        if not values.redis.enabled and not values.redis.url:
            raise ValuesError(f"--values {path}: redis.url: needed when redis.enabled is false (the routers "
                              "share their control plane through it)")
        return values
