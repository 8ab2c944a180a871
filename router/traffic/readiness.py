"""Whether this router should get traffic (``/readyz``), and each model's own status.

A router's readiness is what load balancers and Kubernetes act on: an unready
router is taken out of rotation for *every* model. So one model's trouble must
not make it unready, or a registered-but-undeployed model, or one whose engine
crash-loops (and would crash-loop on every router alike), turns into an outage
of all models. Two rules, chosen by ``RouterSettings.readiness``:

- ``startup`` (the default): ready once the first start of every model that has
  a version with traffic, or a deploy in progress on this router, has
  *settled*: a replica was ready (or a predictor loaded), or the start failed
  (the replica is restarting with backoff, or the deploy failed), or the
  version runs no replicas on purpose (scaled to zero). Until then a new
  router stays out of rotation while its engines load (``llmserve up`` on a
  fresh machine deploys its model as it starts). After the router has been
  ready once it stays ready; models come and go in the per-model status.
- ``serving``: every model with traffic has a ready replica or predictor now.
  For a router that fronts a single model pool, where taking it out of rotation
  moves traffic to a router that can answer.

Models with no version holding traffic (registered only, a failed deployment,
versions at 0%) never count under either rule.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from router.traffic.catalog import Catalog, ServedModel, ServedVersion

Rule = Literal["startup", "serving"]


class ModelStatus(str, enum.Enum):
    SERVING = "serving"  # a version with traffic can answer
    STARTING = "starting"  # versions with traffic are loading for the first time
    UNAVAILABLE = "unavailable"  # versions with traffic started (or failed to) and none can answer now
    NO_TRAFFIC = "no_traffic"  # nothing to serve: registered only, failed, at 0%, or scaled to zero


@dataclass(frozen=True)
class Readiness:
    ready: bool
    models: dict[str, ModelStatus] = field(default_factory=dict)
    ready_replicas: dict[str, int] = field(default_factory=dict)

    @property
    def waiting_for(self) -> list[str]:
        return sorted(name for name, status in self.models.items()
                      if status in (ModelStatus.STARTING, ModelStatus.UNAVAILABLE))


def _settled(served: ServedVersion) -> bool:
    """Its first start is over: it answered once, failed to start, or runs no replicas at all."""
    if served.predictor is not None or not served.replicas:
        return True
    return any(e.ever_ready or e.restarts > 0 for e in served.replicas)


def _with_traffic(model: ServedModel) -> list[ServedVersion]:
    return [model.versions[v] for v, weight in model.split.items() if weight > 0 and v in model.versions]


def model_status(model: ServedModel) -> ModelStatus:
    versions = _with_traffic(model)
    if any(v.can_answer for v in versions):
        return ModelStatus.SERVING
    wanted = [v for v in versions if v.predictor is not None or v.replicas]
    if not wanted:
        return ModelStatus.NO_TRAFFIC
    return ModelStatus.UNAVAILABLE if all(_settled(v) for v in wanted) else ModelStatus.STARTING


def readiness(catalog: Catalog, rule: Rule, was_ready: bool, deploying: Iterable[str] = ()) -> Readiness:
    """This router's readiness under ``rule``; ``was_ready``: it has been ready before (``startup`` keeps it);
    ``deploying``: models with a deploy in progress here (a first start not yet in the catalog's split)."""
    models = {m.name: model_status(m) for m in catalog.models()}
    for name in deploying:
        if models.get(name) in (None, ModelStatus.NO_TRAFFIC):
            models[name] = ModelStatus.STARTING
    ready_replicas = {m.name: sum(len(v.ready_replicas) + (v.predictor is not None) for v in m.versions.values())
                      for m in catalog.models()}
    if rule == "serving":
        ready = not any(s in (ModelStatus.STARTING, ModelStatus.UNAVAILABLE) for s in models.values())
    else:
        ready = was_ready or not any(s is ModelStatus.STARTING for s in models.values())
    return Readiness(ready, models, ready_replicas)
