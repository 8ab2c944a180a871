"""Redis backend: one control plane shared by several routers.

Layout (prefix ``llmserve:`` by default):

- ``model:<name>`` JSON, ``models`` set of names;
- ``deployment:<id>`` JSON, ``deployments:<model>`` set of ids;
- ``traffic:<model>`` JSON ``{split, revision, updated_at, updated_by}``, changed
  only inside WATCH/MULTI so concurrent updates cannot tear it;
- ``history:<model>`` list of JSON entries;
- ``logs:<YYYYMMDD>`` list of JSON inference logs (one key per UTC day);
- every change is published on ``changes`` with the model name, which is how
  the other routers learn of it within milliseconds.

When Redis cannot be reached every call fails within ``timeout_s`` with
``Unavailable`` (the API answers 503 with ``Retry-After``) instead of hanging:
the routers keep serving from memory, and the change feed's restart tells
them to reconcile everything once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import redis.asyncio as redis
from redis.exceptions import WatchError

from router.store.base import (
    KEYS_CHANGED,
    LIVE_STATUSES,
    RESYNC,
    TERMINAL_STATUSES,
    ApiKeyRecord,
    Conflict,
    DeploymentRecord,
    DeploymentStatus,
    HistoryEntry,
    InferenceLog,
    ModelRecord,
    NotFound,
    TrafficRecord,
    Unavailable,
)
from router.store.redis_batches import RedisBatches
from router.store.redis_errors import UNREACHABLE, reachable
from router.store.redis_jobs import RedisJobs

# KEYS[1] the lease; ARGV holder, until, now. Taken when absent, expired or the holder's own.
_CLAIM = """
local held = redis.call('HMGET', KEYS[1], 'holder', 'until')
if held[1] and held[1] ~= ARGV[1] and tonumber(held[2]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'until', ARGV[2])
return 1
"""

class RedisStore(RedisJobs, RedisBatches):
    def __init__(self, url: str, prefix: str = "llmserve:", timeout_s: float = 1.0) -> None:
        # Short socket time-outs: a control-plane write against a dead Redis fails in about a second
        # instead of hanging the API call; the change feed's own health check notices a silent peer.
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s, health_check_interval=5)
        self._prefix = prefix

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    async def close(self) -> None:
        await self._redis.aclose()

    async def _publish(self, model_name: str) -> None:
        await self._redis.publish(self._key("changes"), model_name)

    async def changes(self) -> AsyncIterator[str]:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self._key("changes"))
            yield RESYNC  # subscribed: whatever changed before this moment is for a full reconcile
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    yield str(message["data"])
        except UNREACHABLE as exc:
            raise Unavailable(f"the Redis change feed broke ({type(exc).__name__}: {exc})") from exc
        finally:
            # A listener cancelled mid-read can leave the connection waiting for a reply that
            # never comes; bound the goodbye so a shutdown cannot hang on it.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.unsubscribe(), timeout=2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), timeout=2)

    # -- models ---------------------------------------------------------------

    @reachable
    async def create_model(self, model: ModelRecord) -> None:
        created = await self._redis.set(self._key("model", model.name), json.dumps(model.__dict__), nx=True)
        if not created:
            raise Conflict(f"model {model.name!r} already exists")
        await self._redis.sadd(self._key("models"), model.name)
        await self._publish(model.name)

    @reachable
    async def get_model(self, name: str) -> ModelRecord | None:
        raw = await self._redis.get(self._key("model", name))
        return ModelRecord(**json.loads(raw)) if raw else None

    @reachable
    async def list_models(self) -> list[ModelRecord]:
        names = sorted(_text(await self._redis.smembers(self._key("models"))))
        models = [await self.get_model(n) for n in names]
        return [m for m in models if m is not None]

    # -- deployments ----------------------------------------------------------

    @reachable
    async def create_deployment(self, deployment: DeploymentRecord) -> None:
        if await self.get_model(deployment.model_name) is None:
            raise NotFound(f"model {deployment.model_name!r} is not registered")
        index = self._key("deployments", deployment.model_name)
        async with self._redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(index)
                existing = [await self._get_deployment(i) for i in _text(await pipe.smembers(index))]
                clash = next((d for d in existing if d and d.version == deployment.version
                              and d.status in LIVE_STATUSES), None)
                if clash:
                    raise Conflict(
                        f"version {deployment.version!r} of {deployment.model_name!r} is already deployed "
                        f"(deployment {clash.id}, {clash.status.value}); choose a new version label"
                    )
                pipe.multi()
                pipe.set(self._key("deployment", deployment.id), json.dumps(deployment.to_dict()))
                pipe.sadd(index, deployment.id)
                await pipe.execute()
            except WatchError:
                raise Conflict(f"deployments of {deployment.model_name!r} changed meanwhile; retry") from None
        await self._publish(deployment.model_name)

    async def _get_deployment(self, deployment_id: str) -> DeploymentRecord | None:
        raw = await self._redis.get(self._key("deployment", deployment_id))
        return DeploymentRecord.from_dict(json.loads(raw)) if raw else None

    async def _change_deployment(self, deployment_id: str, change: Callable[[dict[str, Any]], bool]) -> bool:
        """Read, ``change`` in place and write a deployment record under WATCH (retried when another writer
        won); ``change`` returning False leaves it as it was. True when it was written."""
        key = self._key("deployment", deployment_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        raise NotFound(f"deployment {deployment_id!r} does not exist", "deployment")
                    data: dict[str, Any] = json.loads(raw)
                    if not change(data):
                        await pipe.reset()
                        return False
                    pipe.multi()
                    pipe.set(key, json.dumps(data))
                    await pipe.execute()
                    break
                except WatchError:
                    continue
        await self._publish(str(data["model_name"]))
        return True

    @reachable
    async def update_deployment(self, deployment_id: str, status: DeploymentStatus, reason: str | None = None) -> None:
        def change(data: dict[str, Any]) -> bool:
            data.update(status=status.value, updated_at=time.time())
            if status in TERMINAL_STATUSES:
                data.update(operation="", driver="", lease_until=0.0)
            if reason is not None:
                data["reason"] = reason
            return True

        await self._change_deployment(deployment_id, change)

    @reachable
    async def set_driver(
        self, deployment_id: str, operation: str, driver: str, lease_until: float,
        expected: tuple[str, float] | None = None,
    ) -> bool:
        def change(data: dict[str, Any]) -> bool:
            if expected is not None and (data.get("driver", ""), data.get("lease_until", 0.0)) != expected:
                return False
            data.update(operation=operation, driver=driver, lease_until=lease_until)
            return True

        return await self._change_deployment(deployment_id, change)

    @reachable
    async def set_scaling(self, deployment_id: str, replicas: int | None = None,
                          autoscaling: dict[str, Any] | None = None) -> None:
        def change(data: dict[str, Any]) -> bool:
            if replicas is not None:
                data["replicas"] = replicas
            if autoscaling is not None:
                data["autoscaling"] = autoscaling
            return True

        await self._change_deployment(deployment_id, change)

    @reachable
    async def claim_lease(self, name: str, holder: str, until: float, now: float) -> bool:
        # one script: the read and the write of a claim are atomic however many routers race for it
        taken = await self._redis.eval(_CLAIM, 1, self._key("lease", name), holder, repr(until), repr(now))
        return bool(taken)

    @reachable
    async def list_deployments(self, model_name: str | None = None) -> list[DeploymentRecord]:
        names = [model_name] if model_name else sorted(_text(await self._redis.smembers(self._key("models"))))
        records: list[DeploymentRecord] = []
        for name in names:
            for deployment_id in _text(await self._redis.smembers(self._key("deployments", name))):
                record = await self._get_deployment(deployment_id)
                if record:
                    records.append(record)
        return sorted(records, key=lambda d: d.created_at)

    # -- traffic and history --------------------------------------------------

    @reachable
    async def get_traffic(self, model_name: str) -> TrafficRecord:
        raw = await self._redis.get(self._key("traffic", model_name))
        if raw is None:
            return TrafficRecord(model_name, {})
        data = json.loads(raw)
        return TrafficRecord(model_name, data["split"], data["revision"], data["updated_at"], data["updated_by"])

    @reachable
    async def set_traffic(
        self, model_name: str, split: dict[str, int], expected_revision: int, entry: HistoryEntry
    ) -> TrafficRecord:
        key = self._key("traffic", model_name)
        async with self._redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                raw = await pipe.get(key)
                current = json.loads(raw)["revision"] if raw else 0
                if current != expected_revision:
                    raise Conflict(
                        f"the traffic of {model_name!r} changed meanwhile (revision {current}, "
                        f"expected {expected_revision}); read it again and retry"
                    )
                record = TrafficRecord(model_name, dict(split), current + 1, entry.at, entry.actor)
                pipe.multi()
                pipe.set(key, json.dumps({"split": record.split, "revision": record.revision,
                                          "updated_at": record.updated_at, "updated_by": record.updated_by}))
                pipe.rpush(self._key("history", model_name), json.dumps(entry.__dict__))
                await pipe.execute()
            except WatchError:
                raise Conflict(f"the traffic of {model_name!r} changed meanwhile; read it again and retry") from None
        await self._publish(model_name)
        return record

    @reachable
    async def append_history(self, entry: HistoryEntry) -> None:
        await self._redis.rpush(self._key("history", entry.model_name), json.dumps(entry.__dict__))
        await self._publish(entry.model_name)

    @reachable
    async def history(self, model_name: str, limit: int = 100) -> list[HistoryEntry]:
        raws = await self._redis.lrange(self._key("history", model_name), -limit, -1)
        return [HistoryEntry(**json.loads(raw)) for raw in raws]

    # -- API keys -------------------------------------------------------------

    @reachable
    async def create_key(self, key: ApiKeyRecord) -> None:
        names = self._key("key_names")  # live name -> key id
        async with self._redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(names)
                live = await pipe.hget(names, key.name)
                if live:
                    holder = _text([live])[0]
                    raise Conflict(f"an API key named {key.name!r} exists ({holder}); revoke it or choose another name")
                pipe.multi()
                pipe.set(self._key("api_key", key.key_id), json.dumps(key.to_dict()))
                pipe.hset(names, key.name, key.key_id)
                pipe.rpush(self._key("api_keys"), key.key_id)
                await pipe.execute()
            except WatchError:
                raise Conflict(f"API keys changed meanwhile; retry creating {key.name!r}") from None
        await self._publish(KEYS_CHANGED)

    @reachable
    async def list_keys(self) -> list[ApiKeyRecord]:
        ids = _text(await self._redis.lrange(self._key("api_keys"), 0, -1))
        raws = await self._redis.mget([self._key("api_key", i) for i in ids]) if ids else []
        return [ApiKeyRecord.from_dict(json.loads(raw)) for raw in raws if raw]

    @reachable
    async def revoke_key(self, key_id: str, at: float) -> ApiKeyRecord:
        key = self._key("api_key", key_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        raise NotFound(f"API key {key_id!r} does not exist", "key")
                    record = ApiKeyRecord.from_dict(json.loads(raw))
                    if record.revoked_at is not None:
                        await pipe.reset()
                        return record
                    record = ApiKeyRecord.from_dict({**record.to_dict(), "revoked_at": at})
                    pipe.multi()
                    pipe.set(key, json.dumps(record.to_dict()))
                    pipe.hdel(self._key("key_names"), record.name)
                    await pipe.execute()
                    break
                except WatchError:
                    continue
        await self._publish(KEYS_CHANGED)
        return record

    # -- inference logs -------------------------------------------------------

    @reachable
    async def write_inference_logs(self, logs: list[InferenceLog]) -> None:
        if not logs:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for log in logs:
                pipe.rpush(self._key("logs", log.day), json.dumps(log.__dict__))
                pipe.sadd(self._key("log_days"), log.day)
            await pipe.execute()

    @reachable
    async def inference_logs(self, day: str, model_name: str | None = None) -> list[InferenceLog]:
        if not (len(day) == 8 and day.isdigit()):
            raise ValueError(f"day must be YYYYMMDD, got {day!r}")
        logs = [InferenceLog(**json.loads(r)) for r in await self._redis.lrange(self._key("logs", day), 0, -1)]
        return [log for log in logs if model_name is None or log.model_name == model_name]

    @reachable
    async def drop_inference_logs_before(self, day: str) -> list[str]:
        days = sorted(d for d in _text(await self._redis.smembers(self._key("log_days"))) if d < day)
        if days:
            await self._redis.delete(*(self._key("logs", d) for d in days))
            await self._redis.srem(self._key("log_days"), *days)
        return days


def _text(values: Iterable[bytes | str]) -> list[str]:
    """Set members as text: the client decodes responses, but its types cannot say so."""
    return [v.decode() if isinstance(v, bytes) else v for v in values]
