"""The Redis store's async jobs: a mixin of ``RedisStore``.

Layout (under the store's prefix): ``job:<id>`` the record as JSON; ``jobs:leases`` a sorted set of the
unfinished jobs scored by their lease's end (the live lease: renewals change only the score);
``jobs:finished`` the succeeded and failed ones scored by their finish time, ``jobs:expired`` the expired
ones likewise. Every change to a job runs under WATCH of its key (and of the leases, for an orphan), so
an orphan is settled by one router only and a runner's late write cannot undo another router's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection
from typing import Any

import redis.asyncio as redis
from redis.exceptions import WatchError

from router.store.base import Conflict, JobRecord
from router.store.redis_errors import reachable

# KEYS[1] the leases, KEYS[2..] the jobs; ARGV[1] runner, ARGV[2] until, ARGV[3..] the ids (as the keys).
# A lease is extended only for a job still unfinished (in the set) and still the runner's.
_RENEW = """
local renewed = 0
for i = 2, #KEYS do
  local id = ARGV[i + 1]
  if redis.call('ZSCORE', KEYS[1], id) then
    local raw = redis.call('GET', KEYS[i])
    if raw and cjson.decode(raw)['runner'] == ARGV[1] then
      redis.call('ZADD', KEYS[1], ARGV[2], id)
      renewed = renewed + 1
    end
  end
end
return renewed
"""


def _load(raw: str | bytes) -> JobRecord:
    return JobRecord.from_dict(json.loads(raw))


class RedisJobs:
    """The ``Store`` job methods of ``RedisStore``, on its connection and under its prefix."""

    _redis: redis.Redis
    _prefix: str

    def _job_key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    def _stage(self, pipe: Any, job: JobRecord) -> None:
        """Queue the writes of ``job`` and of its place in the three sets on a MULTI pipeline."""
        leases, finished, expired = (self._job_key("jobs", name) for name in ("leases", "finished", "expired"))
        pipe.set(self._job_key("job", job.id), json.dumps(job.to_dict()))
        if job.unfinished:
            pipe.zadd(leases, {job.id: job.lease_until})
        else:
            pipe.zrem(leases, job.id)
            done_at = job.finished_at if job.finished_at is not None else 0.0
            pipe.zadd(expired if job.status == "expired" else finished, {job.id: done_at})
            pipe.zrem(finished if job.status == "expired" else expired, job.id)

    async def _change_job(self, job_id: str, change: Callable[[JobRecord, float | None], JobRecord | None],
                          ) -> JobRecord | None:
        """Read a job and its lease under WATCH, write what ``change`` returns (None: nothing); retried when
        another writer won meanwhile. Returns what was written."""
        key, leases = self._job_key("job", job_id), self._job_key("jobs", "leases")
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key, leases)
                    raw = await pipe.get(key)
                    lease = await pipe.zscore(leases, job_id)
                    new = change(_load(raw), lease) if raw is not None else None
                    if new is None:
                        await pipe.reset()
                        return None
                    pipe.multi()
                    self._stage(pipe, new)
                    await pipe.execute()
                    return new
                except WatchError:
                    continue

    @reachable
    async def add_job(self, job: JobRecord) -> None:
        key = self._job_key("job", job.id)
        async with self._redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                if await pipe.exists(key):
                    raise Conflict(f"async job {job.id!r} exists")
                pipe.multi()
                self._stage(pipe, job)
                await pipe.execute()
            except WatchError:
                raise Conflict(f"async job {job.id!r} was written meanwhile") from None

    @reachable
    async def get_job(self, job_id: str) -> JobRecord | None:
        raw = await self._redis.get(self._job_key("job", job_id))
        if raw is None:
            return None
        job = _load(raw)
        lease = await self._redis.zscore(self._job_key("jobs", "leases"), job_id)
        return dataclasses.replace(job, lease_until=float(lease)) if lease is not None and job.unfinished else job

    @reachable
    async def save_job(self, job: JobRecord) -> bool:
        def change(stored: JobRecord, lease: float | None) -> JobRecord | None:
            if stored.runner != job.runner or stored.status == "expired":
                return None
            return job if lease is None else dataclasses.replace(job, lease_until=max(job.lease_until, lease))

        return await self._change_job(job.id, change) is not None

    @reachable
    async def renew_jobs(self, runner: str, job_ids: Collection[str], until: float) -> int:
        ids = list(job_ids)
        if not ids:
            return 0
        keys = [self._job_key("jobs", "leases"), *(self._job_key("job", i) for i in ids)]
        return int(await self._redis.eval(_RENEW, len(keys), *keys, runner, repr(until), *ids))

    @reachable
    async def fail_orphaned_jobs(self, now: float, settled_by: str, outcome: dict[str, Any]) -> list[JobRecord]:
        def change(stored: JobRecord, lease: float | None) -> JobRecord | None:
            if not stored.unfinished or lease is None or lease >= now:
                return None  # finished, or renewed, meanwhile
            return dataclasses.replace(stored, status="failed", runner=settled_by, finished_at=now, outcome=outcome,
                                       lease_until=lease)

        lapsed = await self._redis.zrangebyscore(self._job_key("jobs", "leases"), "-inf", f"({now!r}")
        settled = [await self._change_job(_text(job_id), change) for job_id in lapsed]
        return [job for job in settled if job is not None]

    @reachable
    async def expire_jobs(self, now: float, retention_s: float) -> tuple[int, int]:
        expired_set = self._job_key("jobs", "expired")
        # deleted first: a job expired by this very call stays (expired) until the next one
        old = await self._redis.zrangebyscore(expired_set, "-inf", repr(now - 2 * retention_s))
        forgotten = [_text(i) for i in old]
        if forgotten:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(*(self._job_key("job", i) for i in forgotten))
                pipe.zrem(expired_set, *forgotten)
                await pipe.execute()

        def change(stored: JobRecord, _lease: float | None) -> JobRecord | None:
            if stored.status not in ("succeeded", "failed"):
                return None
            return dataclasses.replace(stored, status="expired", outcome=None)

        due = await self._redis.zrangebyscore(self._job_key("jobs", "finished"), "-inf", repr(now - retention_s))
        expired = [await self._change_job(_text(job_id), change) for job_id in due]
        return sum(job is not None for job in expired), len(forgotten)


def _text(value: object) -> str:
    """A member of a sorted set as text: the client decodes responses, but its types cannot say so."""
    return value.decode() if isinstance(value, bytes) else str(value)
