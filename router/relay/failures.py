"""How a stream that ended abnormally is told to its client: in-band, the status line being long gone."""

from __future__ import annotations

import json
from dataclasses import dataclass

from router.relay.relay import Upstream, UpstreamBroken, UpstreamStalled, UpstreamTimedOut


def stream_failure_message(upstream: Upstream, exc: UpstreamBroken, chunks: int) -> str:
    """What the in-band error event of a stream that ended abnormally tells the client."""
    if isinstance(exc, UpstreamTimedOut):
        return f"{exc}; the output is incomplete ({chunks} chunks sent)"
    if isinstance(exc, UpstreamStalled):
        return (f"replica {upstream.replica.id}: {exc} (LLMSERVE_ROUTER__FIRST_TOKEN_TIMEOUT_S and "
                "__IDLE_STREAM_TIMEOUT_S); the request was aborted and the output is incomplete, retry it")
    return (f"replica {upstream.replica.id} failed mid-stream after {chunks} chunks ({exc}); "
            "the output is incomplete, retry the request")


@dataclass(frozen=True)
class StreamFailure:
    """How a stream that ended abnormally is recorded (``status``) and told to the client (``event``)."""

    status: int  # 504 for a timeout or a stall, 502 for a failed replica
    code: str
    message: str

    @classmethod
    def of(cls, upstream: Upstream, exc: UpstreamBroken, chunks: int) -> StreamFailure:
        timeout = isinstance(exc, (UpstreamTimedOut, UpstreamStalled))
        return cls(504 if timeout else 502, exc.code, stream_failure_message(upstream, exc, chunks))

    def event(self) -> str:
        return error_event(self.message, self.code, "timeout" if self.status == 504 else "server_error")


def error_event(message: str, code: str, error_type: str = "server_error") -> str:
    return json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}})
