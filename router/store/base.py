"""The control plane's durable state, behind one interface with two backends.

``SQLiteStore`` (the default: a file in the data dir) and ``RedisStore`` (for
several routers sharing one control plane) implement ``Store``; the same
contract tests run against both. The request path never reads the store: the
router keeps what it routes by in memory and reloads it when ``changes()``
says a model changed.
"""

from __future__ import annotations

import enum
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol


class StoreError(Exception):
    """Base of the store's errors."""


class Conflict(StoreError):
    """A uniqueness or concurrent-update conflict: the change was not applied."""


class NotFound(StoreError):
    """Something the change refers to does not exist; ``kind`` says what."""

    def __init__(self, message: str, kind: str = "model") -> None:
        super().__init__(message)
        self.kind = kind


class Unavailable(StoreError):
    """The store cannot be reached or written (Redis down, a full or read-only disk): nothing was
    changed. Serving goes on from what the router holds in memory; only control-plane writes fail."""


class DeploymentStatus(str, enum.Enum):
    DEPLOYING = "deploying"
    ACTIVE = "active"
    DRAINING = "draining"
    RETIRED = "retired"
    FAILED = "failed"


LIVE_STATUSES = frozenset({DeploymentStatus.DEPLOYING, DeploymentStatus.ACTIVE, DeploymentStatus.DRAINING})


@dataclass(frozen=True)
class ModelRecord:
    name: str
    description: str = ""
    framework: str = "vllm"
    owner: str = ""
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class DeploymentRecord:
    id: str
    model_name: str
    version: str
    status: DeploymentStatus
    model_dir: str
    replicas: int = 1
    gpu: int = 0
    reason: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    engine: dict[str, Any] = field(default_factory=dict)  # EngineSettings overrides for this version
    # An operation in progress on this deployment ("deploy": its rollout; "retire": a rollback or delete
    # draining it), the router driving it, and until when that router's lease holds. A router that
    # dies mid-way stops renewing; another (or its restart) finds the lease expired and settles it.
    operation: str = ""
    driver: str = ""
    lease_until: float = 0.0
    # The version's autoscaling policy (``router.control.autoscale.policy``, its dict form); {}: none.
    # With a policy, ``replicas`` is the autoscaler's desired count, which every router converges to.
    autoscaling: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "status": self.status.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeploymentRecord":
        return cls(**{**data, "status": DeploymentStatus(data["status"])})


@dataclass(frozen=True)
class TrafficRecord:
    model_name: str
    split: dict[str, int]
    revision: int = 0
    updated_at: float = 0.0
    updated_by: str = ""


@dataclass(frozen=True)
class HistoryEntry:
    model_name: str
    action: str
    actor: str
    detail: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key as the store holds it: its SHA-256, never the secret (shown once, at creation)."""

    key_id: str
    name: str
    key_hash: str  # hex SHA-256 of the secret
    hint: str  # "sk-...Y1RA": tells keys apart in a listing, useless to guess with
    scopes: tuple[str, ...]
    owner: str = ""
    models: tuple[str, ...] | None = None  # None: every model
    rpm: int | None = None  # requests per minute; None: unlimited
    tpm: int | None = None  # tokens per minute (prompt + completion; rows for predict)
    priority: str = "standard"  # the default class of its requests
    priorities: tuple[str, ...] = ("critical", "standard", "batch")  # the classes X-Priority may ask for
    expires_at: float | None = None
    revoked_at: float | None = None
    created_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ApiKeyRecord":
        models = data.get("models")
        return cls(**{**data, "scopes": tuple(data["scopes"]), "priorities": tuple(data["priorities"]),
                      "models": tuple(models) if models is not None else None})


@dataclass(frozen=True)
class InferenceLog:
    request_id: str
    model_name: str
    version: str
    replica: str
    user_bucket: int | None
    ttft_ms: float | None
    latency_ms: float
    output_tokens: int | None
    status_code: int
    timestamp: float = field(default_factory=time.time)
    route: str = ""  # the API that answered: /v1/chat/completions, generate, predict, ...
    reason: str | None = None  # why it was not a success: the error code (model_not_found, overloaded, ...)

    @property
    def day(self) -> str:
        return time.strftime("%Y%m%d", time.gmtime(self.timestamp))


UNFINISHED_JOB_STATUSES = ("queued", "running")


@dataclass(frozen=True)
class JobRecord:
    """An async job as the store keeps it (``router.jobs`` maps its ``Job`` to and from this).

    The store reads only ``status``, ``runner``, ``lease_until`` and ``finished_at``; the rest round-trips.
    ``runner``: the router running it, which renews ``lease_until`` while it is queued or running (the
    router that settles an orphan takes its place). ``outcome``: ``{"status_code", "body"}`` once finished,
    None again once expired. ``detail``: kind, model, owner (API key id), request id, callback URL.
    """

    id: str
    status: str  # queued, running, succeeded, failed, expired
    runner: str
    lease_until: float
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    outcome: dict[str, Any] | None = None
    callback_status: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def unfinished(self) -> bool:
        return self.status in UNFINISHED_JOB_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobRecord":
        return cls(**data)


UNFINISHED_BATCH_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")


@dataclass(frozen=True)
class BatchRecord:
    """A batch (the OpenAI Batch API) as the store keeps it (``router.batches`` maps its ``Batch`` to and
    from this). The store reads only ``id``, ``status`` and ``created_at``; ``runner`` and ``lease_until``
    (the router running it, and until when unless renewed) change only through ``change_batch``, whose
    compare-and-change makes one router the runner; ``detail`` round-trips."""

    id: str
    status: str
    created_at: float
    runner: str = ""
    lease_until: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def unfinished(self) -> bool:
        return self.status in UNFINISHED_BATCH_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BatchRecord":
        return cls(**data)


@dataclass(frozen=True)
class BatchLineRecord:
    """What one line of a batch gave, recorded once (the first record of a line number wins): the line's
    ``custom_id``, and the status and JSON body of its answer (or of its error)."""

    line: int
    custom_id: str
    status_code: int
    body: dict[str, Any]


class Store(Protocol):
    async def close(self) -> None: ...

    # models
    async def create_model(self, model: ModelRecord) -> None: ...
    async def get_model(self, name: str) -> ModelRecord | None: ...
    async def list_models(self) -> list[ModelRecord]: ...

    # deployments: one record per (model, version); a live one makes the version a duplicate
    async def create_deployment(self, deployment: DeploymentRecord) -> None: ...
    async def update_deployment(
        self, deployment_id: str, status: DeploymentStatus, reason: str | None = None
    ) -> None: ...
    async def list_deployments(self, model_name: str | None = None) -> list[DeploymentRecord]: ...
    # the desired replicas and/or the autoscaling policy of a deployment (a change every router sees)
    async def set_scaling(self, deployment_id: str, replicas: int | None = None,
                          autoscaling: dict[str, Any] | None = None) -> None: ...

    # a named lease: taken when free, expired at ``now`` or already ``holder``'s; False when another holds it
    async def claim_lease(self, name: str, holder: str, until: float, now: float) -> bool: ...

    # the operation in progress on a deployment: set when ``expected`` (driver, lease_until) is what is
    # stored (None: unconditionally); False when it was not. A terminal status (retired, failed) clears it.
    async def set_driver(
        self, deployment_id: str, operation: str, driver: str, lease_until: float,
        expected: tuple[str, float] | None = None,
    ) -> bool: ...

    # traffic: compare-and-set on the revision, history written in the same transaction
    async def get_traffic(self, model_name: str) -> TrafficRecord: ...
    async def set_traffic(
        self, model_name: str, split: dict[str, int], expected_revision: int, entry: HistoryEntry
    ) -> TrafficRecord: ...
    async def append_history(self, entry: HistoryEntry) -> None: ...
    async def history(self, model_name: str, limit: int = 100) -> list[HistoryEntry]: ...

    # API keys: a live name is unique (Conflict); revoking keeps the record, marked
    async def create_key(self, key: ApiKeyRecord) -> None: ...
    async def list_keys(self) -> list[ApiKeyRecord]: ...
    async def revoke_key(self, key_id: str, at: float) -> ApiKeyRecord: ...

    # inference logs, partitioned by UTC day
    async def write_inference_logs(self, logs: list[InferenceLog]) -> None: ...
    async def inference_logs(self, day: str, model_name: str | None = None) -> list[InferenceLog]: ...
    async def drop_inference_logs_before(self, day: str) -> list[str]: ...

    # async jobs, seen by every router sharing the store. ``save_job`` writes only while the stored record is
    # still ``job.runner``'s and not expired (False otherwise: another router settled it, or it expired).
    async def add_job(self, job: JobRecord) -> None: ...
    async def get_job(self, job_id: str) -> JobRecord | None: ...
    async def save_job(self, job: JobRecord) -> bool: ...
    # extend the lease of ``runner``'s unfinished jobs among ``job_ids``; how many were extended
    async def renew_jobs(self, runner: str, job_ids: Collection[str], until: float) -> int: ...
    # every unfinished job whose lease ended before ``now``: failed with ``outcome``, finished at ``now``,
    # runner ``settled_by``; each is settled by one caller only, however many race. Returns them as stored.
    async def fail_orphaned_jobs(self, now: float, settled_by: str, outcome: dict[str, Any]) -> list[JobRecord]: ...
    # drop the outcome of jobs finished ``retention_s`` or more before ``now`` (status expired), and delete
    # expired jobs after as long again; (expired now, deleted)
    async def expire_jobs(self, now: float, retention_s: float) -> tuple[int, int]: ...

    # batches (the OpenAI Batch API), seen by every router sharing the store. ``change_batch`` reads the
    # record and writes what ``change`` returns (None: nothing) atomically (one router wins a race);
    # ``add_batch_lines`` records the lines not yet recorded and says how many were new.
    async def add_batch(self, batch: BatchRecord) -> None: ...
    async def get_batch(self, batch_id: str) -> BatchRecord | None: ...
    async def list_batches(self) -> list[BatchRecord]: ...  # newest first
    async def change_batch(self, batch_id: str, change: Callable[[BatchRecord], BatchRecord | None]
                           ) -> BatchRecord | None: ...
    async def add_batch_lines(self, batch_id: str, lines: Collection[BatchLineRecord]) -> int: ...
    async def batch_lines(self, batch_id: str) -> list[BatchLineRecord]: ...  # by line number

    # change notifications: model names whose control-plane state changed (from any router); RESYNC
    # ("") whenever the feed (re)starts, for what it may have missed: reconcile every model
    def changes(self) -> AsyncIterator[str]: ...


RESYNC = ""
KEYS_CHANGED = "#keys"  # in the change feed when an API key is created or revoked (no model is named so)
TERMINAL_STATUSES = frozenset({DeploymentStatus.RETIRED, DeploymentStatus.FAILED})
