"""Which models and versions the router serves, and their replicas.

The catalog answers "which version serves this request": a version pinned by
the request wins; otherwise the model's default version. (The traffic split
and canaries replace the default with a weighted, per-user choice.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmserve.replica import Replica
from router.errors import ModelNotFound, VersionNotFound


@dataclass
class ServedVersion:
    model_name: str
    version: str
    max_model_len: int
    replicas: list[Replica] = field(default_factory=list)

    @property
    def versioned_name(self) -> str:
        return f"{self.model_name}:{self.version}"

    @property
    def ready_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.routable]


@dataclass
class ServedModel:
    name: str
    versions: dict[str, ServedVersion] = field(default_factory=dict)
    default_version: str | None = None


class Catalog:
    """Models by name; each has versions, each version its replicas."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}

    def add_version(self, served: ServedVersion, make_default: bool = True) -> None:
        model = self._models.setdefault(served.model_name, ServedModel(served.model_name))
        model.versions[served.version] = served
        if make_default or model.default_version is None:
            model.default_version = served.version

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def get_model(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {name!r} does not exist; served models: {known}", param="model")
        return model

    def resolve(self, requested: str, pinned_version: str | None = None) -> ServedVersion:
        """Map a request's model (``name`` or ``name:version``) and optional pin to a version."""
        name, _, suffix = requested.partition(":")
        model = self.get_model(name)
        version = pinned_version or suffix or model.default_version
        if suffix and pinned_version and suffix != pinned_version:
            raise VersionNotFound(
                f"the model asks for version {suffix!r} but the request pins {pinned_version!r}; use one",
                param="model",
            )
        served = model.versions.get(version or "")
        if served is None:
            known = ", ".join(sorted(model.versions)) or "none"
            raise VersionNotFound(
                f"model {name!r} has no version {version!r}; versions: {known}", param="version"
            )
        return served

    def all_replicas(self) -> list[Replica]:
        return [r for m in self._models.values() for v in m.versions.values() for r in v.replicas]
