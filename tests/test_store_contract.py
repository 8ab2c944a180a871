"""One contract, two real backends: SQLite (a file) and Redis (a real redis-server)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from router.store import (
    RESYNC,
    ApiKeyRecord,
    Conflict,
    DeploymentRecord,
    DeploymentStatus,
    HistoryEntry,
    InferenceLog,
    JobRecord,
    ModelRecord,
    NotFound,
    Store,
)
from router.store.sqlite import MIGRATIONS, SQLiteStore


def deployment(version: str, status: DeploymentStatus = DeploymentStatus.DEPLOYING) -> DeploymentRecord:
    return DeploymentRecord(id=uuid.uuid4().hex, model_name="chat", version=version, status=status,
                            model_dir=f"/models/chat/{version}")


async def test_models_are_created_once_and_listed(store: Store) -> None:
    await store.create_model(ModelRecord("chat", "a chat model", "vllm", "team-a"))
    with pytest.raises(Conflict):
        await store.create_model(ModelRecord("chat"))
    model = await store.get_model("chat")
    assert model is not None and model.owner == "team-a" and model.description == "a chat model"
    assert [m.name for m in await store.list_models()] == ["chat"]
    assert await store.get_model("nope") is None


async def test_deployments_refuse_a_live_duplicate_version(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.create_deployment(deployment("v1"))
    await store.create_model(ModelRecord("chat"))
    first = deployment("v1")
    await store.create_deployment(first)
    with pytest.raises(Conflict, match="already deployed"):
        await store.create_deployment(deployment("v1"))
    await store.update_deployment(first.id, DeploymentStatus.FAILED, "model folder missing")
    await store.create_deployment(deployment("v1"))  # a failed one does not block the label
    records = await store.list_deployments("chat")
    assert [r.status for r in records] == [DeploymentStatus.FAILED, DeploymentStatus.DEPLOYING]
    assert records[0].reason == "model folder missing"
    with pytest.raises(NotFound):
        await store.update_deployment("nope", DeploymentStatus.ACTIVE)


async def test_traffic_is_compare_and_set_with_history(store: Store) -> None:
    assert (await store.get_traffic("chat")).revision == 0
    first = await store.set_traffic("chat", {"v1": 100}, 0, HistoryEntry("chat", "deploy", "alice", {"v": "v1"}))
    assert first.revision == 1 and first.split == {"v1": 100} and first.updated_by == "alice"
    with pytest.raises(Conflict, match="changed meanwhile"):
        await store.set_traffic("chat", {"v1": 50, "v2": 50}, 0, HistoryEntry("chat", "traffic", "bob"))
    second = await store.set_traffic("chat", {"v1": 90, "v2": 10}, 1, HistoryEntry("chat", "traffic", "bob"))
    assert (await store.get_traffic("chat")) == second
    history = await store.history("chat")
    assert [(h.action, h.actor) for h in history] == [("deploy", "alice"), ("traffic", "bob")]
    assert history[0].detail == {"v": "v1"}


async def test_concurrent_traffic_changes_one_wins_one_conflicts(store: Store) -> None:
    await store.set_traffic("chat", {"v1": 100}, 0, HistoryEntry("chat", "deploy", "a"))
    results = await asyncio.gather(
        *(store.set_traffic("chat", {"v1": 100 - i, "v2": i}, 1, HistoryEntry("chat", "traffic", f"u{i}"))
          for i in range(1, 6)),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, Exception)]
    assert len(winners) == 1 and all(isinstance(r, Conflict) for r in results if r not in winners)
    assert (await store.get_traffic("chat")) == winners[0]
    assert len(await store.history("chat")) == 2  # no torn writes


async def test_inference_logs_by_day_with_retention(store: Store) -> None:
    day1 = time.mktime((2026, 11, 27, 12, 0, 0, 0, 0, 0)) - time.timezone
    day2 = day1 + 86400
    logs = [
        InferenceLog("r1", "chat", "v1", "chat:v1/0", 42, 120.5, 900.0, 16, 200, day1),
        InferenceLog("r2", "chat", "v2", "chat:v2/0", None, None, 3.0, None, 503, day2,
                     route="/v1/chat/completions", reason="no_replica_ready"),
        InferenceLog("r3", "other", "v1", "other:v1/0", 7, 50.0, 60.0, 2, 200, day2),
    ]
    await store.write_inference_logs(logs)
    assert await store.inference_logs("20261127") == [logs[0]]
    assert await store.inference_logs("20261128", model_name="chat") == [logs[1]]
    assert await store.drop_inference_logs_before("20261128") == ["20261127"]
    assert await store.inference_logs("20261127") == []
    assert len(await store.inference_logs("20261128")) == 2
    with pytest.raises(ValueError):
        await store.inference_logs("2026-11-28; DROP TABLE models")


async def test_changes_are_announced_after_a_resync_marker(store: Store) -> None:
    seen: list[str] = []
    subscribed = asyncio.Event()

    async def listen() -> None:
        async for name in store.changes():
            seen.append(name)
            if name == RESYNC:
                subscribed.set()  # the feed says it is listening: changes from now on are announced
            else:
                return

    listener = asyncio.create_task(listen())
    await asyncio.wait_for(subscribed.wait(), timeout=2)
    await store.create_model(ModelRecord("chat"))
    await asyncio.wait_for(listener, timeout=2)
    assert seen == [RESYNC, "chat"]


async def test_the_driver_of_a_deployment_is_compare_and_set_and_cleared_by_a_terminal_status(store: Store) -> None:
    await store.create_model(ModelRecord("chat"))
    await store.create_deployment(deployment("v1"))
    record_id = (await store.list_deployments("chat"))[0].id
    assert await store.set_driver(record_id, "deploy", "router-a", 100.0)
    assert not await store.set_driver(record_id, "deploy", "router-b", 200.0, expected=("router-a", 99.0))
    assert await store.set_driver(record_id, "deploy", "router-b", 200.0, expected=("router-a", 100.0))
    (record,) = await store.list_deployments("chat")
    assert (record.operation, record.driver, record.lease_until) == ("deploy", "router-b", 200.0)
    await store.update_deployment(record_id, DeploymentStatus.ACTIVE)
    assert (await store.list_deployments("chat"))[0].driver == "router-b"  # not terminal: still driven
    await store.update_deployment(record_id, DeploymentStatus.FAILED, "broken")
    (record,) = await store.list_deployments("chat")
    assert (record.operation, record.driver, record.lease_until) == ("", "", 0.0)
    with pytest.raises(NotFound):
        await store.set_driver("nope", "deploy", "router-a", 1.0)


async def test_sqlite_state_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "llmserve.db"
    first = SQLiteStore(path)
    await first.create_model(ModelRecord("chat"))
    await first.set_traffic("chat", {"v1": 100}, 0, HistoryEntry("chat", "deploy", "a"))
    await first.close()
    again = SQLiteStore(path)
    assert again.schema_version == len(MIGRATIONS)
    assert (await again.get_traffic("chat")).split == {"v1": 100}
    assert [m.name for m in await again.list_models()] == ["chat"]
    await again.close()


async def test_engine_overrides_round_trip(store: Store) -> None:
    await store.create_model(ModelRecord("chat"))
    record = DeploymentRecord(id="d1", model_name="chat", version="v2", status=DeploymentStatus.DEPLOYING,
                              model_dir="/m", engine={"enable_prefix_caching": False, "max_num_seqs": 8})
    await store.create_deployment(record)
    assert (await store.list_deployments("chat"))[0].engine == {"enable_prefix_caching": False, "max_num_seqs": 8}


async def test_sqlite_migrates_a_version_1_database(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + "\nPRAGMA user_version=1;")
    db.execute("INSERT INTO models VALUES ('chat', '', 'vllm', '', 0)")
    db.execute("INSERT INTO deployments VALUES ('d1', 'chat', 'v1', 'active', '/m', 1, 0, NULL, 0, 0)")
    db.commit()
    db.close()
    store = SQLiteStore(path)
    assert store.schema_version == len(MIGRATIONS)
    [record] = await store.list_deployments("chat")
    assert record.version == "v1" and record.engine == {}
    await store.close()


def api_key(name: str, key_id: str) -> ApiKeyRecord:
    return ApiKeyRecord(key_id=key_id, name=name, key_hash=key_id * 4, hint="sk-...abcd", scopes=("inference",),
                        models=("chat",), rpm=60, tpm=1000, priorities=("standard", "batch"), expires_at=2e9)


async def test_api_keys_are_created_listed_and_revoked_and_a_live_name_is_unique(store: Store) -> None:
    first = api_key("ci", "key_a")
    await store.create_key(first)
    assert await store.list_keys() == [first]  # every field round-trips, tuples included
    with pytest.raises(Conflict):
        await store.create_key(api_key("ci", "key_b"))
    revoked = await store.revoke_key("key_a", at=1234.5)
    assert revoked.revoked_at == 1234.5 and (await store.revoke_key("key_a", at=9.0)).revoked_at == 1234.5
    await store.create_key(api_key("ci", "key_b"))  # the name is free once its key is revoked
    assert [k.key_id for k in await store.list_keys()] == ["key_a", "key_b"]
    with pytest.raises(NotFound):
        await store.revoke_key("key_nope", at=1.0)


async def test_the_desired_replicas_and_the_policy_are_set_and_announced(store: Store) -> None:
    await store.create_model(ModelRecord("chat"))
    record = deployment("v1", DeploymentStatus.ACTIVE)
    await store.create_deployment(record)
    changes = store.changes()
    assert await asyncio.wait_for(changes.__anext__(), 5) == RESYNC
    await store.set_scaling(record.id, autoscaling={"min_replicas": 0, "max_replicas": 3})
    await store.set_scaling(record.id, replicas=3)
    assert await asyncio.wait_for(changes.__anext__(), 5) == "chat"
    (stored,) = await store.list_deployments("chat")
    assert (stored.replicas, stored.autoscaling) == (3, {"min_replicas": 0, "max_replicas": 3})
    with pytest.raises(NotFound):
        await store.set_scaling("nope", replicas=1)


async def test_a_named_lease_has_one_holder_until_it_expires(store: Store) -> None:
    assert await store.claim_lease("autoscale:d1", "router-a", until=100.0, now=0.0)
    assert await store.claim_lease("autoscale:d1", "router-a", until=150.0, now=50.0)  # renewed by its holder
    assert not await store.claim_lease("autoscale:d1", "router-b", until=200.0, now=149.0)
    assert await store.claim_lease("autoscale:d2", "router-b", until=200.0, now=149.0)  # another name is free
    assert await store.claim_lease("autoscale:d1", "router-b", until=300.0, now=151.0)  # expired: taken over
    assert not await store.claim_lease("autoscale:d1", "router-a", until=400.0, now=200.0)
    results = await asyncio.gather(*(store.claim_lease("race", f"r{i}", until=10.0, now=0.0) for i in range(8)))
    assert sum(results) == 1


# -- async jobs -------------------------------------------------------------------------------------------


def job_record(job_id: str, runner: str = "router-a", lease_until: float = 130.0, **fields: object) -> JobRecord:
    detail = {"kind": "generate", "model": "chat", "owner": "key_a", "request_id": f"req-{job_id}",
              "callback_url": None}
    return JobRecord(id=job_id, status="queued", runner=runner, lease_until=lease_until, created_at=100.0,
                     detail=detail, **fields)  # type: ignore[arg-type]


async def test_a_job_round_trips_and_only_its_runner_writes_it_until_it_expires(store: Store) -> None:
    queued = job_record("job_1", callback_status="pending")
    await store.add_job(queued)
    assert await store.get_job("job_1") == queued
    assert await store.get_job("job_nope") is None
    with pytest.raises(Conflict):
        await store.add_job(queued)
    running = replace(queued, status="running", started_at=101.5)
    assert await store.save_job(running)
    assert not await store.save_job(replace(running, runner="router-b", status="failed"))  # not b's
    outcome = {"status_code": 200, "body": {"text": "hi", "usage": {"completion_tokens": 2}, "n": 2**40 + 0.5}}
    done = replace(running, status="succeeded", finished_at=102.25, outcome=outcome)
    assert await store.save_job(done)
    assert await store.save_job(replace(done, callback_status="delivered"))
    assert await store.get_job("job_1") == replace(done, callback_status="delivered")
    assert not await store.save_job(job_record("job_never_added"))


async def test_finished_jobs_expire_after_the_retention_then_are_deleted(store: Store) -> None:
    outcome = {"status_code": 500, "body": {"error": {"message": "boom"}}}
    await store.add_job(job_record("job_old"))
    await store.save_job(replace(job_record("job_old"), status="failed", finished_at=100.0, outcome=outcome))
    await store.add_job(job_record("job_new"))
    await store.save_job(replace(job_record("job_new"), status="succeeded", finished_at=150.0, outcome=outcome))
    await store.add_job(job_record("job_live"))  # unfinished: never expires
    assert await store.expire_jobs(now=159.0, retention_s=60) == (0, 0)
    assert await store.expire_jobs(now=160.0, retention_s=60) == (1, 0)
    old = await store.get_job("job_old")
    assert old is not None and (old.status, old.outcome, old.finished_at) == ("expired", None, 100.0)
    assert not await store.save_job(replace(old, status="succeeded", outcome=outcome))  # a late write: refused
    assert await store.expire_jobs(now=215.0, retention_s=60) == (1, 0)
    assert await store.expire_jobs(now=220.0, retention_s=60) == (0, 1)
    assert await store.get_job("job_old") is None
    assert (await store.get_job("job_new")) is not None and (await store.get_job("job_live")) is not None
    assert await store.expire_jobs(now=270.0, retention_s=60) == (0, 1)
    assert await store.get_job("job_new") is None


async def test_orphaned_jobs_fail_once_and_renewed_ones_do_not(store: Store) -> None:
    for job_id in ("job_a1", "job_a2"):
        await store.add_job(job_record(job_id, runner="router-a", lease_until=130.0))
    await store.add_job(job_record("job_b", runner="router-b", lease_until=130.0))
    await store.save_job(replace(job_record("job_a2", lease_until=130.0), status="running", started_at=101.0))
    assert await store.renew_jobs("router-b", ["job_b", "job_a1"], until=200.0) == 1  # only its own
    assert (await store.get_job("job_b")).lease_until == 200.0  # type: ignore[union-attr]
    assert await store.fail_orphaned_jobs(now=130.0, settled_by="router-b", outcome={}) == []  # not before its end
    error = {"status_code": 503, "body": {"error": {"message": "the router running this job stopped"}}}
    results = await asyncio.gather(*(store.fail_orphaned_jobs(now=131.0, settled_by=f"router-{i}", outcome=error)
                                     for i in range(4)))
    settled = [job for batch in results for job in batch]
    assert sorted(job.id for job in settled) == ["job_a1", "job_a2"]  # each once, whoever raced
    for job in settled:
        stored = await store.get_job(job.id)
        assert stored == job and (stored.status, stored.finished_at, stored.outcome) == ("failed", 131.0, error)
    assert (await store.get_job("job_a2")).started_at == 101.0  # type: ignore[union-attr]
    # the stopped runner comes back to life: its writes and renewals no longer count
    assert not await store.save_job(replace(job_record("job_a1"), status="succeeded", finished_at=140.0))
    assert await store.renew_jobs("router-a", ["job_a1", "job_a2"], until=300.0) == 0
    assert (await store.get_job("job_b")).status == "queued"  # type: ignore[union-attr]
    assert await store.fail_orphaned_jobs(now=199.0, settled_by="router-c", outcome=error) == []
