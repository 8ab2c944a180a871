"""What the app's lifespan owns: the one place for the router's mutable state."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from llmserve.replicas.endpoint import Replica
from llmserve.settings import RouterSettings
from router.relay.relay import Relay
from router.store.base import InferenceLog
from router.traffic.catalog import Catalog

if TYPE_CHECKING:
    from router.admission.shedding import Admission
    from router.control.plane import ControlPlane
    from router.observe.metrics import RouterMetrics
    from router.observe.samples import SampleWindows


class EngineBackend(Protocol):
    """Starts and stops the engine replicas behind the catalog (``llmserve.replicas.local`` locally)."""

    async def start(self, catalog: Catalog) -> None: ...

    async def stop(self) -> None: ...

    def report_failure(self, replica: Replica, reason: str) -> None: ...


@dataclass
class RouterState:
    settings: RouterSettings
    catalog: Catalog
    relay: Relay
    backend: EngineBackend
    started_at: float = field(default_factory=time.time)
    sse_ping_s: int = 15
    control: ControlPlane | None = None
    log_sink: Callable[[InferenceLog], None] | None = None
    metrics: RouterMetrics | None = None
    samples: SampleWindows | None = None
    admission: Admission | None = None
