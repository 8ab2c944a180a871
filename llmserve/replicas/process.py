"""What the local backend runs for one replica: a program, and the process record around it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from llmserve.replicas.backend import Endpoint, EndpointState


class ReplicaProgram(Protocol):
    """A command line for one replica (``EngineSpec`` is one; the tests' simulated engine another)."""

    # read-only members, so that frozen dataclasses (EngineSpec) implement the protocol
    @property
    def model_name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def versioned_name(self) -> str: ...

    def command(self, host: str, port: int) -> list[str]: ...

    def environment(self) -> dict[str, str]: ...


@dataclass(eq=False)
class LocalReplica:
    """One replica process under the supervisor; ``endpoint`` is the part the router sees."""

    program: ReplicaProgram
    index: int
    endpoint: Endpoint
    host: str = "127.0.0.1"
    port: int = 0
    pid: int | None = None
    log_path: Path | None = None
    started_at: float | None = None
    ready_at: float | None = None
    consecutive_health_failures: int = field(default=0, repr=False)

    @classmethod
    def of(cls, program: ReplicaProgram, index: int, host: str = "127.0.0.1") -> LocalReplica:
        endpoint = Endpoint(f"{program.versioned_name}/{index}", program.model_name, program.version)
        return cls(program=program, index=index, endpoint=endpoint, host=host)

    @property
    def id(self) -> str:
        return self.endpoint.id

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def version(self) -> str:
        return self.program.version

    # The router-visible fields live on the endpoint; these keep the supervisor's code readable.
    @property
    def state(self) -> EndpointState:
        return self.endpoint.state

    @property
    def outstanding(self) -> int:
        return self.endpoint.outstanding

    @property
    def restarts(self) -> int:
        return self.endpoint.restarts

    @property
    def last_error(self) -> str | None:
        return self.endpoint.last_error

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        self.endpoint.last_error = value
