"""Which models and versions the router serves, their replicas and traffic split.

The catalog answers "which version serves this request": a version pinned by
the request wins; otherwise the model's traffic split, by weighted rendezvous
hashing of the user (``router.traffic.split``). While a version with traffic has no
ready replica (a deploy still warming up on this router, say), its share goes
to the versions that can answer rather than failing the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmserve.generation import GenerationDefaults
from llmserve.replicas.backend import Endpoint, ReplicaSet
from router.errors import InvalidRequest, ModelNotFound, NoReplicaReady, VersionNotFound
from router.traffic.split import choose_version

if TYPE_CHECKING:
    from router.predict.host import Predictor


@dataclass
class ServedVersion:
    """One version the router can send requests to: engine endpoints, or a predictor in this process."""

    model_name: str
    version: str
    max_model_len: int
    replicas: list[Endpoint] = field(default_factory=list)  # the replica set's own list: scaling shows here
    predictor: Predictor | None = None  # a traditional model served in the router process
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    replica_set: ReplicaSet | None = None  # what the backend started (None for a predictor)

    @classmethod
    def of(cls, replica_set: ReplicaSet) -> ServedVersion:
        spec = replica_set.spec
        return cls(spec.model_name, spec.version, spec.max_model_len, replicas=replica_set.endpoints,
                   generation=spec.generation, replica_set=replica_set)

    @property
    def versioned_name(self) -> str:
        return f"{self.model_name}:{self.version}"

    @property
    def output_limit(self) -> int:
        """The most output tokens a request to this version may ask for."""
        return self.generation.output_limit(self.max_model_len)

    @property
    def ready_replicas(self) -> list[Endpoint]:
        return [r for r in self.replicas if r.routable]

    @property
    def can_answer(self) -> bool:
        return self.predictor is not None or any(r.routable for r in self.replicas)


@dataclass
class ServedModel:
    name: str
    versions: dict[str, ServedVersion] = field(default_factory=dict)
    split: dict[str, int] = field(default_factory=dict)

    @property
    def is_predict(self) -> bool:
        return any(v.predictor is not None for v in self.versions.values())

    @property
    def default_version(self) -> str | None:
        """The version with the largest share (what an unkeyed client mostly gets)."""
        return max(self.split, key=lambda v: self.split[v]) if self.split else None


class Catalog:
    """Models by name; each has versions (each with replicas) and a traffic split."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}

    def add_version(self, served: ServedVersion, make_default: bool = False) -> None:
        model = self._models.setdefault(served.model_name, ServedModel(served.model_name))
        model.versions[served.version] = served
        if make_default or not model.split:
            model.split = {served.version: 100}

    def remove_version(self, model_name: str, version: str) -> ServedVersion | None:
        model = self._models.get(model_name)
        if model is None:
            return None
        model.split = {v: w for v, w in model.split.items() if v != version}
        return model.versions.pop(version, None)

    def set_split(self, model_name: str, split: dict[str, int]) -> None:
        """Replace a model's split in one assignment: a request sees the old or the new one, never a mix."""
        self._models.setdefault(model_name, ServedModel(model_name)).split = dict(split)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def find(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def get_model(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {name!r} does not exist; served models: {known}", param="model")
        return model

    def resolve(
        self, requested: str, pinned_version: str | None = None, user_key: str | None = None, *,
        retry_after_s: int, predict: bool = False,
    ) -> ServedVersion:
        """Map a request's model (``name`` or ``name:version``), pin and user to a version.

        ``predict`` says which API asks: a generative model on the predict API, or a
        traditional model on a generation API, is the caller's mistake (400).
        """
        name, _, suffix = requested.partition(":")
        model = self.get_model(name)
        if model.versions and model.is_predict != predict:
            raise InvalidRequest(
                f"model {name!r} is a traditional model: POST /api/v1/models/{name}/predict or "
                f"/v2/models/{name}/infer" if model.is_predict else
                f"model {name!r} is a generative model: use /v1/chat/completions, /v1/completions or "
                f"/api/v1/models/{name}/generate", param="model")
        if suffix and pinned_version and suffix != pinned_version:
            raise VersionNotFound(
                f"the model asks for version {suffix!r} but the request pins {pinned_version!r}; use one",
                param="model",
            )
        version = pinned_version or suffix
        if not version:
            split = model.split
            answering = {v: w for v, w in split.items() if w > 0 and v in model.versions
                         and model.versions[v].can_answer}
            if answering:
                split = answering
            if not any(w > 0 for w in split.values()):
                raise VersionNotFound(f"model {name!r} has no version with traffic; deploy one", param="model")
            version = choose_version(split, user_key)
            if version not in model.versions:  # in the split, not yet launched on this router
                raise NoReplicaReady(name, version, retry_after_s, detail="its replicas are not started here yet")
        served = model.versions.get(version)
        if served is None:
            known = ", ".join(sorted(model.versions)) or "none"
            raise VersionNotFound(f"model {name!r} has no version {version!r}; versions: {known}", param="version")
        return served

    def all_replicas(self) -> list[Endpoint]:
        return [r for m in self._models.values() for v in m.versions.values() for r in v.replicas]
