"""Per-request bookkeeping: ids, timings and the log line written at the end.

Every inference request is recorded exactly once, whatever its outcome: an
answer, a refusal the router makes itself (bad input, unknown model, a full
queue, no ready replica, a timeout) or a client that went away. The record
goes to the metrics, the request log and ``inference_logs`` with its status
and, for a failure, its reason (the error code the client saw).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from router.errors import APIError, as_api_error
from router.relay.sse import has_text
from router.traffic.split import user_bucket

if TYPE_CHECKING:
    from router.observe.samples import SampleWindows
from router.store.base import InferenceLog

logger = logging.getLogger("router.requests")

# A stream's inter-token gaps go to the observer in batches of this many: a record holds at most
# this many, however long its stream (one float a token, kept to the end, grew a 60,000-token
# stream's record by 2 MB), and the histogram is not touched on every chunk.
GAP_BATCH = 256


class RequestObserver(Protocol):
    """Who counts requests as they start and finish (``router.observe.metrics.RouterMetrics``)."""

    def started(self, model: str, version: str) -> None: ...

    def inter_token_gaps(self, model: str, version: str, gaps_s: list[float]) -> None: ...

    def finished(self, record: RequestRecord, latency_s: float, counted_in_flight: bool) -> None: ...


@dataclass
class RequestRecord:
    """What happened to one inference request; logged once when it ends."""

    request_id: str
    route: str
    model: str = ""
    version: str = ""
    replica: str = ""
    stream: bool = False
    status_code: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    admitted_at: float | None = None  # when admission let it through (after any wait for room)
    chunks: int = 0
    error: str | None = None  # the message of a failure, for the request log
    reason: str | None = None  # the error code of a failure
    user: str | None = None
    key_id: str | None = None  # the caller's API key (its id: the secret is never kept)
    priority: str = "standard"  # its admission class (critical, standard, batch)
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    on_finish: list[Callable[[RequestRecord], None]] = field(default_factory=list, repr=False)
    sink: Callable[[InferenceLog], None] | None = field(default=None, repr=False)
    metrics: RequestObserver | None = field(default=None, repr=False)
    samples: SampleWindows | None = field(default=None, repr=False)
    gaps_s: list[float] = field(default_factory=list, repr=False)
    tap: list[bytes] | None = field(default=None, repr=False)  # the answer's bytes, kept for a shadow's replay
    text_chunks: int = 0
    _last_chunk_at: float | None = field(default=None, repr=False)
    _in_flight: bool = field(default=False, repr=False)
    _begun: bool = field(default=False, repr=False)  # routed to a version: a sample of its latency and errors
    _finished: bool = field(default=False, repr=False)

    def resolved(self, model: str, version: str) -> None:
        """The request names a served version (it may still be refused)."""
        self.model, self.version = model, version

    def begin(self, model: str, version: str, stream: bool) -> None:
        """The request is routed: count it in flight for its version."""
        self.model, self.version, self.stream = model, version, stream
        self._begun = True
        if self.metrics is not None:
            self.metrics.started(model, version)
            self._in_flight = True

    def mark_chunk(self, data: bytes | None = None) -> None:
        """A chunk was relayed; only chunks with output text count for TTFT and ITL (vLLM's definition)."""
        self.chunks += 1
        if data is not None and not has_text(data):
            return
        now = time.perf_counter()
        self.text_chunks += 1
        if self.first_token_at is None:
            self.first_token_at = now
        elif self._last_chunk_at is not None:
            self.gaps_s.append(now - self._last_chunk_at)
            if len(self.gaps_s) >= GAP_BATCH:
                if self.metrics is not None:
                    self.metrics.inter_token_gaps(self.model, self.version, self.gaps_s)
                self.gaps_s = []
        self._last_chunk_at = now

    def note_usage(self, data: bytes) -> None:
        """Take the output token count from a chunk or body that carries usage (cheap check first)."""
        if b'"usage":{' not in data and b'"usage": {' not in data:
            return
        try:
            usage = json.loads(data).get("usage") or {}
        except ValueError:
            return
        if isinstance(usage, dict) and "completion_tokens" in usage:
            self.output_tokens = int(usage["completion_tokens"])
            if isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else (self.first_token_at - self.started) * 1000

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first (a stream with at least two text chunks)."""
        if self.first_token_at is None or self._last_chunk_at is None or self.text_chunks < 2:
            return None
        return (self._last_chunk_at - self.first_token_at) * 1000 / (self.text_chunks - 1)

    def failed(self, reason: str, message: str) -> None:
        self.reason, self.error = reason, message[:300]

    def fail(self, exc: BaseException) -> None:
        """Finish with the outcome an exception stands for (how the error handlers will answer it)."""
        if isinstance(exc, APIError):
            self.failed(exc.code, exc.message)
            self.finish(exc.status_code)
        elif isinstance(exc, asyncio.CancelledError):
            self.failed("client_disconnected", "the client went away")
            self.finish(499)
        else:
            self.failed("internal_error", f"{type(exc).__name__}: {exc}")
            self.finish(500)

    @contextlib.contextmanager
    def failures(self, headers: Mapping[str, str] | None = None) -> Iterator[None]:
        """Finish the record for any exception that escapes, as the error handlers will answer it. A
        client-facing error (a domain error becomes one here, by ``router.errors.as_api_error``) also
        gets ``headers`` (those known when it is raised: a mapping the block may fill)."""
        try:
            yield
        except BaseException as exc:
            error = as_api_error(exc)
            if error is None:
                self.fail(exc)
                raise
            if headers:
                error.headers = {**headers, **error.headers}
            self.fail(error)
            if error is exc:
                raise
            raise error from None

    def finish(self, status_code: int | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        if status_code is not None:
            self.status_code = status_code
        latency_ms = (time.perf_counter() - self.started) * 1000
        ttft = self.ttft_ms
        if self.output_tokens is None and self.text_chunks:
            self.output_tokens = self.text_chunks  # a stream without usage: one token a chunk
        if self.metrics is not None:
            self.metrics.finished(self, latency_ms / 1000, self._in_flight)
            self._in_flight = False
        logger.info(
            "request %s %s model=%s version=%s replica=%s status=%s stream=%s ttft_ms=%s latency_ms=%.1f chunks=%d%s",
            self.request_id,
            self.route,
            self.model or "-",
            self.version or "-",
            self.replica or "-",
            self.status_code,
            self.stream,
            f"{ttft:.1f}" if ttft is not None else "-",
            latency_ms,
            self.chunks,
            f" reason={self.reason} error={self.error!r}" if self.reason else "",
            extra={"request_id": self.request_id},
        )
        if self.samples is not None and self._begun and self.status_code != 499:
            # A prediction arrives whole: its latency is what a canary of a predict model is judged on.
            # Timed from admission, not arrival: the wait for room is the router's queue, not the version's
            # speed, and counted in the TTFT signal it kept a version saturated by its own waiters (the soak
            # after a 4 s stall: a third of the requests refused for minutes).
            since = self.admitted_at if self.admitted_at is not None else self.started
            end = time.perf_counter() if self.route in ("predict", "v2_infer") else self.first_token_at
            signal = None if end is None else (end - since) * 1000
            self.samples.record(self.model, self.version, signal, self.status_code, self.priority,
                                self.tpot_ms, latency_ms)
        for hook in self.on_finish:
            try:
                hook(self)
            except Exception:  # accounting after the fact must not break the request's own record
                logger.exception("a finish hook of request %s failed", self.request_id)
        if self.sink is not None:
            self.sink(InferenceLog(
                request_id=self.request_id, model_name=self.model, version=self.version, replica=self.replica,
                user_bucket=user_bucket(self.user), ttft_ms=ttft, latency_ms=latency_ms,
                output_tokens=self.output_tokens, status_code=self.status_code, route=self.route,
                reason=self.reason,
            ))


def user_key(headers: Mapping[str, str], body_user: str | None, key_id: str | None = None) -> str | None:
    """Who the request is for, for a sticky version choice: the body's ``user``, else the
    ``X-User-Id`` header, else the API key's id (never its secret); None (a random choice) when
    there is nothing."""
    if body_user:
        return body_user
    header = headers.get("x-user-id")
    if header:
        return header
    return f"key:{key_id}" if key_id else None


def served_headers(request_id: str, version: str, replica_id: str) -> dict[str, str]:
    return {"x-request-id": request_id, "x-model-version": version, "x-served-by": replica_id}
