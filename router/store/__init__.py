"""The control plane's durable state: SQLite by default, Redis to share it between routers."""

from router.store.base import (
    RESYNC,
    Conflict,
    DeploymentRecord,
    DeploymentStatus,
    HistoryEntry,
    InferenceLog,
    ModelRecord,
    NotFound,
    Store,
    StoreError,
    TrafficRecord,
    Unavailable,
)

__all__ = [
    "Conflict",
    "DeploymentRecord",
    "DeploymentStatus",
    "HistoryEntry",
    "InferenceLog",
    "ModelRecord",
    "NotFound",
    "RESYNC",
    "Store",
    "StoreError",
    "TrafficRecord",
    "Unavailable",
]
