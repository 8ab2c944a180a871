"""The Redis store's batches: a mixin of ``RedisStore``.

Layout (under the store's prefix): ``batch:<id>`` the record as JSON; ``batches`` a sorted set of the
batch ids scored by creation time (the listing); ``batch-lines:<id>`` a hash of line number -> what the
line gave, written with HSETNX so the first record of a line wins. ``change_batch`` runs under WATCH of the
batch's key: of two routers claiming a batch, one wins.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection

import redis.asyncio as redis
from redis.exceptions import WatchError

from router.store.base import BatchLineRecord, BatchRecord, Conflict
from router.store.redis_errors import reachable


def _load(raw: str | bytes) -> BatchRecord:
    return BatchRecord.from_dict(json.loads(raw))


class RedisBatches:
    """The ``Store`` batch methods of ``RedisStore``, on its connection and under its prefix."""

    _redis: redis.Redis
    _prefix: str

    def _batch_key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    @reachable
    async def add_batch(self, batch: BatchRecord) -> None:
        key = self._batch_key("batch", batch.id)
        async with self._redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                if await pipe.exists(key):
                    raise Conflict(f"batch {batch.id!r} exists")
                pipe.multi()
                pipe.set(key, json.dumps(batch.to_dict()))
                pipe.zadd(self._batch_key("batches"), {batch.id: batch.created_at})
                await pipe.execute()
            except WatchError:
                raise Conflict(f"batch {batch.id!r} was written meanwhile") from None

    @reachable
    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        raw = await self._redis.get(self._batch_key("batch", batch_id))
        return None if raw is None else _load(raw)

    @reachable
    async def list_batches(self) -> list[BatchRecord]:
        ids = await self._redis.zrevrange(self._batch_key("batches"), 0, -1)
        if not ids:
            return []
        raws = await self._redis.mget([self._batch_key("batch", _text(i)) for i in ids])
        return [_load(raw) for raw in raws if raw is not None]

    @reachable
    async def change_batch(self, batch_id: str, change: Callable[[BatchRecord], BatchRecord | None]
                           ) -> BatchRecord | None:
        key = self._batch_key("batch", batch_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    new = change(_load(raw)) if raw is not None else None
                    if new is None:
                        await pipe.reset()
                        return None
                    pipe.multi()
                    pipe.set(key, json.dumps(new.to_dict()))
                    await pipe.execute()
                    return new
                except WatchError:
                    continue

    @reachable
    async def add_batch_lines(self, batch_id: str, lines: Collection[BatchLineRecord]) -> int:
        if not lines:
            return 0
        key = self._batch_key("batch-lines", batch_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            for line in lines:
                pipe.hsetnx(key, str(line.line), json.dumps({"custom_id": line.custom_id,
                                                             "status_code": line.status_code, "body": line.body}))
            added = await pipe.execute()
        return sum(int(a) for a in added)

    @reachable
    async def batch_lines(self, batch_id: str) -> list[BatchLineRecord]:
        raw = await self._redis.hgetall(self._batch_key("batch-lines", batch_id))
        lines = []
        for number, value in raw.items():
            data = json.loads(value)
            lines.append(BatchLineRecord(int(_text(number)), data["custom_id"], data["status_code"], data["body"]))
        return sorted(lines, key=lambda line: line.line)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
