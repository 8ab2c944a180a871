"""What the app's lifespan owns: the one place for the router's mutable state.

Parts that can be switched off are still there, as null objects: ``metrics``
is ``NoMetrics`` when Prometheus metrics are disabled and ``log_sink`` drops
records when there is no store to write them to. Only ``control`` can be
absent: a router without a store serves its static versions and has no
control plane (its control API answers 404 saying so).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmserve.loops import Tasks
from llmserve.replicas.backend import ReplicaBackend
from llmserve.settings import RouterSettings
from router.access.auth import KeyRing
from router.access.ratelimit import Limiter, LocalLimiter
from router.admission.shedding import Admission
from router.batches.runner import BatchRunner
from router.control.autoscale.loop import Autoscaler
from router.control.plane import ControlPlane
from router.jobs.runner import JobRunner
from router.observe.metrics import Metrics, NoMetrics
from router.observe.samples import SampleWindows
from router.relay.relay import Relay
from router.store.base import InferenceLog
from router.traffic.catalog import Catalog
from router.traffic.cold_start import ColdStarts
from router.traffic.demand import Demand
from router.traffic.shadow import Shadows


def drop_log(_log: InferenceLog) -> None:
    """The inference-log sink of a router without a store."""


@dataclass
class RouterState:
    settings: RouterSettings
    catalog: Catalog
    relay: Relay
    backend: ReplicaBackend
    samples: SampleWindows
    admission: Admission
    metrics: Metrics = field(default_factory=NoMetrics)
    control: ControlPlane | None = None
    log_sink: Callable[[InferenceLog], None] = drop_log
    started_at: float = field(default_factory=time.time)
    sse_ping_s: int = 15
    was_ready: bool = False  # /readyz has said ready once (the startup rule keeps it so)
    keys: KeyRing = field(default_factory=KeyRing)  # every API key's record, from the store
    limiter: Limiter = field(default_factory=LocalLimiter)  # per-key buckets (Redis-backed with a Redis store)
    background: Tasks = field(default_factory=Tasks)  # short work after a response (settling a key's tokens)
    demand: Demand = field(default_factory=Demand)  # requests per version and class: the autoscaler's signal
    cold_starts: ColdStarts | None = None  # holds requests for versions scaled to zero (with a control plane)
    autoscaler: Autoscaler | None = None
    jobs: JobRunner | None = None  # async requests (started by the lifespan)
    shadows: Shadows = field(default_factory=Shadows)  # shadow versions, their replays and reports
    batches: BatchRunner | None = None  # the Batch API (with a store only: started by the lifespan)
