"""Per-key limits: the bucket rule, this router's buckets, and Redis buckets shared by two routers."""

from __future__ import annotations

import asyncio

import pytest

from router.access.ratelimit import Bucket, LocalLimiter, RedisLimiter, duration, headers, take
from tests.redis_server import redis_server


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_refills_continuously_and_refuses_without_taking() -> None:
    bucket, decision = take(None, limit=60, amount=60, now=0.0)
    assert decision.allowed and decision.remaining == 0 and bucket.level == 0
    bucket, decision = take(bucket, 60, 1, now=0.5)  # half a request refilled: not enough
    assert not decision.allowed and decision.retry_after_s == pytest.approx(0.5) and bucket.level == 0.5
    bucket, decision = take(bucket, 60, 1, now=1.0)
    assert decision.allowed and decision.reset_s == pytest.approx(60.0)
    # more than the whole limit at once waits for a full bucket instead of being refused for ever
    _, decision = take(Bucket(60.0, 0.0), 60, 500, now=0.0)
    assert decision.allowed


def test_the_reset_headers_use_openais_duration_format() -> None:
    assert [duration(s) for s in (0.12, 1.0, 59.2, 360.0)] == ["120ms", "1s", "1m0s", "6m0s"]
    clock = Clock()
    admission = asyncio.run(LocalLimiter(clock).acquire("k", rpm=60, tpm=1000, tokens=16))
    assert headers(admission) == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59", "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "984", "x-ratelimit-reset-tokens": "960ms"}


async def test_requests_at_once_admit_exactly_the_limit_and_a_refusal_takes_no_tokens() -> None:
    limiter = LocalLimiter(Clock())
    results = await asyncio.gather(*(limiter.acquire("k", rpm=7, tpm=None, tokens=0) for _ in range(20)))
    assert sum(a.allowed for a in results) == 7
    tokens = LocalLimiter(Clock())
    first = await tokens.acquire("k", rpm=None, tpm=100, tokens=80)
    refused = await tokens.acquire("k", rpm=None, tpm=100, tokens=30)  # 20 left: refused, nothing taken
    assert first.allowed and not refused.allowed and refused.retry_after_s == pytest.approx(6.0)
    assert (await tokens.acquire("k", rpm=None, tpm=100, tokens=20)).allowed


async def test_a_stream_that_used_less_than_it_reserved_gives_the_rest_back() -> None:
    limiter = LocalLimiter(Clock())
    reserved = await limiter.acquire("k", rpm=None, tpm=100, tokens=90)
    await limiter.settle("k", 100, reserved, used=10)  # a stream cut after 10 tokens
    assert (await limiter.acquire("k", rpm=None, tpm=100, tokens=90)).allowed
    await limiter.settle("k", 100, reserved, used=150)  # used more than reserved: the key owes it
    assert not (await limiter.acquire("k", rpm=None, tpm=100, tokens=1)).allowed


async def test_two_routers_on_one_redis_enforce_one_limit_not_two() -> None:
    with redis_server() as url:
        a, b = RedisLimiter(url, "t:"), RedisLimiter(url, "t:")
        try:
            results = await asyncio.gather(*(limiter.acquire("key_1", rpm=10, tpm=1000, tokens=50)
                                             for limiter in (a, b) for _ in range(15)))
            assert sum(r.allowed for r in results) == 10  # the RPM, across both
            # tokens: 10 x 50 reserved of 1000; router b's streams each used 5 of their 50
            taken = [r for r in results if r.allowed]
            for admission in taken[:5]:
                await b.settle("key_1", 1000, admission, used=5)
            after = await a.acquire("key_2", rpm=None, tpm=1000, tokens=0)
            assert after.allowed and after.tokens is not None and after.tokens.remaining == 1000
            left = await a.acquire("key_1", rpm=None, tpm=1000, tokens=0)
            assert left.tokens is not None and 720 <= left.tokens.remaining <= 730  # 500 + 5 x 45 back
        finally:
            await a.close()
            await b.close()


async def test_a_reservation_above_the_tpm_gives_back_no_more_than_it_took() -> None:
    limiter = LocalLimiter(Clock())
    admissions = []
    for _ in range(5):  # each asks for 9x the limit and uses little: a refund must not refill the bucket
        admission = await limiter.acquire("k", rpm=None, tpm=1000, tokens=9000)
        admissions.append(admission)
        if admission.allowed:
            await limiter.settle("k", 1000, admission, used=950)
    assert [a.allowed for a in admissions] == [True, False, False, False, False]
    assert admissions[0].reserved == 1000
