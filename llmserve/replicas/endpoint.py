"""One engine replica as the supervisor and the router both see it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from llmserve.generation import GenerationDefaults


class ReplicaState(str, enum.Enum):
    STARTING = "starting"  # process launched, not yet answering health checks and warm-up
    READY = "ready"  # receives traffic
    UNHEALTHY = "unhealthy"  # ejected: failed health checks or refused connections
    RESTARTING = "restarting"  # crashed; waiting out the backoff before a new process
    DRAINING = "draining"  # no new traffic; in-flight requests finish
    STOPPED = "stopped"
    FAILED = "failed"  # gave up: will not be restarted


class ReplicaProgram(Protocol):
    """What the supervisor needs to know to run a replica (EngineSpec implements it)."""

    # read-only members, so that frozen dataclasses (EngineSpec) implement the protocol
    @property
    def model_name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def generation(self) -> GenerationDefaults:
        """What the engine does when a request leaves things out."""
        ...

    @property
    def versioned_name(self) -> str: ...

    def command(self, host: str, port: int) -> list[str]: ...

    def environment(self) -> dict[str, str]: ...


@dataclass(eq=False)
class Replica:
    """Mutable run-time state of one replica; owned by the supervisor.

    The router reads ``state`` and keeps ``outstanding`` (requests it has in
    flight on this replica) up to date for least-outstanding balancing and
    for draining.
    """

    program: ReplicaProgram
    index: int
    host: str = "127.0.0.1"
    port: int = 0
    state: ReplicaState = ReplicaState.STARTING
    pid: int | None = None
    outstanding: int = 0
    restarts: int = 0
    log_path: Path | None = None
    last_error: str | None = None
    started_at: float | None = None
    ready_at: float | None = None
    consecutive_health_failures: int = field(default=0, repr=False)

    @property
    def id(self) -> str:
        return f"{self.program.versioned_name}/{self.index}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def model_name(self) -> str:
        return self.program.model_name

    @property
    def version(self) -> str:
        return self.program.version

    @property
    def routable(self) -> bool:
        return self.state is ReplicaState.READY

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "model": self.model_name,
            "version": self.version,
            "state": self.state.value,
            "url": self.base_url,
            "pid": self.pid,
            "outstanding": self.outstanding,
            "restarts": self.restarts,
            "log_path": str(self.log_path) if self.log_path else None,
            "last_error": self.last_error,
        }
