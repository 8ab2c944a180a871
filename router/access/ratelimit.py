"""Per-key request and token limits that hold exactly across streams and routers.

Each key has two buckets, requests per minute and tokens per minute, that
refill continuously (``limit / 60`` a second) up to ``limit``: N requests at
once against an RPM of M < N admit exactly M, and a quiet key is never
refused. A request takes one request and *reserves* its worst case of tokens
(the prompt's estimate plus ``max_tokens``) in one atomic step, before it is
routed; when it ends, however it ends (complete, cut, refused downstream),
``settle`` gives back what it did not use, or takes what it used beyond the
reservation (a bucket may go below zero: the key waits for it to refill).
This is what LiteLLM's users report missing: its token count is added after
the response, per replica, and never for streams.

Where the buckets live decides what "exact" spans:

- ``LocalLimiter``: this router's memory. One router is exact; a restart
  starts with full buckets.
- ``RedisLimiter``: one Lua script per step, on Redis's clock, so every router
  sharing the store draws from the same buckets; a router restart keeps them.

``take`` is the pure rule both implement, with the clock injected.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bucket:
    level: float  # what is left; below zero after an overdraw
    at: float  # when it was last refilled (seconds)


@dataclass(frozen=True)
class Decision:
    """One bucket's answer, and what the response's x-ratelimit headers say about it."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: float  # until the bucket is full again
    retry_after_s: float  # until the amount asked for is there (0 when allowed)


def refill(bucket: Bucket, limit: int, now: float) -> Bucket:
    rate = limit / 60.0
    return Bucket(min(float(limit), bucket.level + max(0.0, now - bucket.at) * rate), now)


def take(bucket: Bucket | None, limit: int, amount: float, now: float) -> tuple[Bucket, Decision]:
    """Take ``amount`` from a bucket of ``limit`` per minute at ``now``, or refuse and take nothing.

    An amount above the limit can never fit: it is taken as the whole limit (the request waits for a
    full bucket, and ``settle`` charges the rest), rather than refusing the request for ever.
    """
    rate = limit / 60.0
    current = refill(bucket or Bucket(float(limit), now), limit, now)
    wanted = min(float(amount), float(limit))
    if current.level >= wanted:
        after = Bucket(current.level - wanted, now)
        return after, Decision(True, limit, max(0, math.floor(after.level)), (limit - after.level) / rate, 0.0)
    retry = (wanted - current.level) / rate
    return current, Decision(False, limit, max(0, math.floor(current.level)), (limit - current.level) / rate, retry)


def adjust(bucket: Bucket | None, limit: int, delta: float, now: float) -> Bucket:
    """Give back (``delta`` > 0) or take more (< 0) after the fact; never above the limit."""
    current = refill(bucket or Bucket(float(limit), now), limit, now)
    return Bucket(min(float(limit), current.level + delta), now)


@dataclass(frozen=True)
class Admission:
    """The outcome for one request: both buckets' decisions (None: no such limit on the key)."""

    requests: Decision | None
    tokens: Decision | None
    reserved: int  # tokens taken from the bucket (at most the TPM), to settle when the request ends
    local: bool = False  # taken from this router's buckets (Redis was down): settled there too

    @property
    def allowed(self) -> bool:
        return all(d is None or d.allowed for d in (self.requests, self.tokens))

    @property
    def retry_after_s(self) -> float:
        return max((d.retry_after_s for d in (self.requests, self.tokens) if d is not None and not d.allowed),
                   default=0.0)


class Limiter(Protocol):
    async def acquire(self, key_id: str, rpm: int | None, tpm: int | None, tokens: int) -> Admission:
        """One request and ``tokens`` reserved, both or neither."""
        ...

    async def settle(self, key_id: str, tpm: int | None, admission: Admission, used: int) -> None:
        """The request ended having used ``used`` tokens of those ``admission`` reserved."""
        ...


class LocalLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], Bucket] = {}

    async def acquire(self, key_id: str, rpm: int | None, tpm: int | None, tokens: int) -> Admission:
        now = self._clock()
        requests = tokens_decision = None
        new_requests = new_tokens = None
        if rpm is not None:
            new_requests, requests = take(self._buckets.get((key_id, "r")), rpm, 1, now)
        if tpm is not None:
            new_tokens, tokens_decision = take(self._buckets.get((key_id, "t")), tpm, tokens, now)
        admission = Admission(requests, tokens_decision, min(tokens, tpm) if tpm is not None else 0, local=True)
        if admission.allowed:  # both or neither: a refused request takes nothing from either bucket
            if new_requests is not None:
                self._buckets[(key_id, "r")] = new_requests
            if new_tokens is not None:
                self._buckets[(key_id, "t")] = new_tokens
        return admission

    async def settle(self, key_id: str, tpm: int | None, admission: Admission, used: int) -> None:
        if tpm is None or used == admission.reserved:
            return
        self._buckets[(key_id, "t")] = adjust(self._buckets.get((key_id, "t")), tpm, admission.reserved - used,
                                              self._clock())


# The same rule as ``take``, in Redis, on Redis's clock: KEYS[1] requests bucket, KEYS[2] tokens bucket;
# ARGV: rpm (0: none), tpm (0: none), tokens. Returns {allowed, r_level*1000, t_level*1000, r_retry_ms, t_retry_ms,
# r_ok, t_ok}: each bucket's own verdict besides the request's.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function state(key, limit, amount)
  if limit <= 0 then return nil end
  local b = redis.call('HMGET', key, 'level', 'at')
  local level = tonumber(b[1]) or limit
  local at = tonumber(b[2]) or now
  level = math.min(limit, level + math.max(0, now - at) * limit / 60)
  local wanted = math.min(amount, limit)
  return {level, wanted}
end
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local r = state(KEYS[1], rpm, 1)
local k = state(KEYS[2], tpm, tokens)
local allowed = 1
local r_retry, t_retry = 0, 0
if r and r[1] < r[2] then allowed = 0; r_retry = (r[2] - r[1]) * 60 / rpm end
if k and k[1] < k[2] then allowed = 0; t_retry = (k[2] - k[1]) * 60 / tpm end
local function store(key, b, limit)
  b[1] = b[1] - b[2]
  redis.call('HSET', key, 'level', b[1], 'at', now)
  -- kept until it would be full again (forgetting a full bucket is the same), an overdraw included
  redis.call('EXPIRE', key, math.ceil((limit - b[1]) * 60 / limit) + 1)
end
if allowed == 1 then
  if r then store(KEYS[1], r, rpm) end
  if k then store(KEYS[2], k, tpm) end
end
return {allowed, math.floor((r and r[1] or 0) * 1000), math.floor((k and k[1] or 0) * 1000),
        math.floor(r_retry * 1000), math.floor(t_retry * 1000),
        (r and r[1] >= r[2]) and 1 or 0, (k and k[1] >= k[2]) and 1 or 0}
"""

# KEYS[1] tokens bucket; ARGV: tpm, delta (tokens given back, negative to take).
_ADJUST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local limit, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(b[1]) or limit
local at = tonumber(b[2]) or now
level = math.min(limit, math.min(limit, level + math.max(0, now - at) * limit / 60) + delta)
redis.call('HSET', KEYS[1], 'level', level, 'at', now)
redis.call('EXPIRE', KEYS[1], math.ceil((limit - level) * 60 / limit) + 1)
return 1
"""


class RedisLimiter:
    def __init__(self, url: str, prefix: str = "llmserve:") -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._prefix = prefix
        self._acquire: Any = self._redis.register_script(_ACQUIRE)
        self._adjust: Any = self._redis.register_script(_ADJUST)

    def _keys(self, key_id: str) -> list[str]:
        # one hash tag per key: both buckets on one Redis Cluster slot, as a script needs
        return [f"{self._prefix}rl:{{{key_id}}}:requests", f"{self._prefix}rl:{{{key_id}}}:tokens"]

    async def acquire(self, key_id: str, rpm: int | None, tpm: int | None, tokens: int) -> Admission:
        allowed, r_level, t_level, r_retry, t_retry, r_ok, t_ok = await self._acquire(
            keys=self._keys(key_id), args=[rpm or 0, tpm or 0, tokens])
        return Admission(_decision(bool(allowed) or bool(r_ok), rpm, r_level / 1000, r_retry / 1000),
                         _decision(bool(allowed) or bool(t_ok), tpm, t_level / 1000, t_retry / 1000),
                         min(tokens, tpm) if tpm is not None else 0)

    async def settle(self, key_id: str, tpm: int | None, admission: Admission, used: int) -> None:
        if tpm is None or used == admission.reserved:
            return
        await self._adjust(keys=self._keys(key_id)[1:], args=[tpm, admission.reserved - used])

    async def close(self) -> None:
        await self._redis.aclose()


def _decision(allowed: bool, limit: int | None, level: float, retry_s: float) -> Decision | None:
    """One bucket's decision from the script's answer; ``allowed``: its own verdict."""
    if limit is None:
        return None
    return Decision(allowed, limit, max(0, math.floor(level)), (limit - level) * 60 / limit, retry_s)


def duration(seconds: float) -> str:
    """OpenAI's reset format, Go-style: ``1s``, ``6m0s``, ``120ms``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def headers(admission: Admission) -> dict[str, str]:
    """The x-ratelimit-* headers OpenAI clients read, for the limits the key has."""
    out: dict[str, str] = {}
    for kind, decision in (("requests", admission.requests), ("tokens", admission.tokens)):
        if decision is not None:
            out[f"x-ratelimit-limit-{kind}"] = str(decision.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(decision.remaining)
            out[f"x-ratelimit-reset-{kind}"] = duration(decision.reset_s)
    return out


class SharedLimiter:
    """``RedisLimiter`` while Redis answers; this router's own buckets while it does not, so a Redis
    outage degrades the limits to per-router ones instead of refusing (or admitting) everyone."""

    def __init__(self, shared: RedisLimiter, local: LocalLimiter | None = None) -> None:
        self._shared = shared
        self._local = local or LocalLimiter()
        self.degraded = False

    async def acquire(self, key_id: str, rpm: int | None, tpm: int | None, tokens: int) -> Admission:
        try:
            admission = await self._shared.acquire(key_id, rpm, tpm, tokens)
        except (RedisError, OSError) as exc:
            self._degrade(exc)
            return await self._local.acquire(key_id, rpm, tpm, tokens)
        self._recover()
        return admission

    async def settle(self, key_id: str, tpm: int | None, admission: Admission, used: int) -> None:
        if admission.local:  # taken from this router's buckets while Redis was down: given back there
            await self._local.settle(key_id, tpm, admission, used)
            return
        try:
            await self._shared.settle(key_id, tpm, admission, used)
        except (RedisError, OSError) as exc:
            self._degrade(exc)  # Redis took the tokens; it gets them back when it can (or never: safe side)

    def _degrade(self, exc: BaseException) -> None:
        if not self.degraded:
            logger.warning("rate limits fall back to this router's own counters: Redis fails (%s)",
                           type(exc).__name__)
        self.degraded = True

    def _recover(self) -> None:
        if self.degraded:
            logger.warning("rate limits are shared through Redis again")
        self.degraded = False

    async def close(self) -> None:
        await self._shared.close()
