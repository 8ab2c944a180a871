"""Errors of the serving side: model preparation and engine replicas.

    LLMServeError
    ├── PrepareError          a model source could not become a version
    ├── ReplicaStartError     an engine replica exited or timed out before ready
    ├── EngineSettingsError   a version's engine settings do not fit together
    ├── LaunchFailed          a version could not be started (not prepared, no host for it)
    └── ManifestError         (llmserve.models.predict_manifest) a predict folder is unusable

None of them is an HTTP error: a failed deployment records the message as its
reason; the router maps its own errors to HTTP responses in ``router.errors``.
"""

from __future__ import annotations

from pathlib import Path


class LLMServeError(Exception):
    """Base of every error llmserve raises on purpose."""


class PrepareError(LLMServeError):
    """A model source could not be turned into a model version.

    The message is one line naming the file and what was expected, so the CLI
    can print it as is.
    """

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ReplicaStartError(LLMServeError):
    """An engine replica exited or timed out before it became ready."""

    def __init__(self, replica_id: str, reason: str, log_path: Path | None = None) -> None:
        self.replica_id = replica_id
        self.reason = reason
        self.log_path = log_path
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"replica {replica_id} did not become ready: {reason}{where}")


class EngineSettingsError(LLMServeError):
    """A version's engine settings do not fit together (a default output length above its limit, say)."""


class LaunchFailed(LLMServeError):
    """A version could not be started here; the message says why and how to fix it."""


class BackendUnavailable(LLMServeError):
    """The replica backend cannot work: a cluster that cannot be reached, credentials it rejects, or
    permissions it does not grant (the message names which)."""
