"""The control plane's durable state: SQLite by default, Redis to share it between routers."""

from router.store.base import (
    KEYS_CHANGED,
    RESYNC,
    ApiKeyRecord,
    Conflict,
    DeploymentRecord,
    DeploymentStatus,
    HistoryEntry,
    InferenceLog,
    JobRecord,
    ModelRecord,
    NotFound,
    Store,
    StoreError,
    TrafficRecord,
    Unavailable,
)

__all__ = [
    "KEYS_CHANGED",
    "ApiKeyRecord",
    "Conflict",
    "DeploymentRecord",
    "DeploymentStatus",
    "HistoryEntry",
    "InferenceLog",
    "JobRecord",
    "ModelRecord",
    "NotFound",
    "RESYNC",
    "Store",
    "StoreError",
    "TrafficRecord",
    "Unavailable",
]
