"""Leases on the operations a router drives, and how an orphaned one is settled (pure rules, then the store)."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.control.leases import DEPLOY, RETIRE, Leases, orphaned
from router.control.recovery import Settlement, settlement
from router.store import DeploymentRecord, DeploymentStatus, ModelRecord
from router.store.sqlite import SQLiteStore


def record(status: DeploymentStatus, operation: str = DEPLOY, driver: str = "router-a", lease_until: float = 100.0,
           version: str = "v2") -> DeploymentRecord:
    return DeploymentRecord(id=f"id-{version}", model_name="chat", version=version, status=status, model_dir="/m",
                            operation=operation, driver=driver, lease_until=lease_until)


def test_an_operation_is_orphaned_once_its_lease_expired_or_no_task_here_drives_it() -> None:
    live = record(DeploymentStatus.DEPLOYING)
    assert not orphaned(live, now=99.0, me="router-b", driving_here=set())
    assert orphaned(live, now=101.0, me="router-b", driving_here=set())
    # our own lease: orphaned as soon as no task here drives it, without waiting for the lease
    assert orphaned(live, now=50.0, me="router-a", driving_here=set())
    assert not orphaned(live, now=500.0, me="router-a", driving_here={"id-v2"})
    assert not orphaned(record(DeploymentStatus.ACTIVE, operation="", driver="", lease_until=0), 500.0, "b", set())
    # a drain recorded before deployments had leases
    assert orphaned(record(DeploymentStatus.DRAINING, operation="", driver="", lease_until=0), 1.0, "b", set())


@pytest.mark.parametrize(("status", "operation", "split", "expected"), [
    (DeploymentStatus.DEPLOYING, DEPLOY, {"v1": 100}, Settlement.FAIL),
    (DeploymentStatus.ACTIVE, DEPLOY, {"v1": 90, "v2": 10}, Settlement.ROLL_BACK),  # mid-canary
    (DeploymentStatus.ACTIVE, DEPLOY, {"v1": 100}, Settlement.ROLL_BACK),  # active, its share not yet given
    (DeploymentStatus.ACTIVE, DEPLOY, {"v2": 100}, Settlement.COMPLETE),  # rolling back would leave nothing
    (DeploymentStatus.ACTIVE, DEPLOY, {"v1": 0, "v2": 100}, Settlement.COMPLETE),
    (DeploymentStatus.ACTIVE, RETIRE, {"v1": 100}, Settlement.FINISH_RETIRE),  # the rollback's switch happened
    (DeploymentStatus.ACTIVE, RETIRE, {"v1": 50, "v2": 50}, Settlement.UNDO_RETIRE),  # it never did
    (DeploymentStatus.DRAINING, RETIRE, {"v1": 100}, Settlement.FINISH_RETIRE),
])
def test_an_interrupted_rollout_is_rolled_back_and_an_interrupted_drain_finished(
        status: DeploymentStatus, operation: str, split: dict[str, int], expected: Settlement) -> None:
    assert settlement(record(status, operation), split) is expected


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_leases_are_renewed_released_and_lost_to_a_claim(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "llmserve.db")
    await store.create_model(ModelRecord("chat"))
    await store.create_deployment(record(DeploymentStatus.DEPLOYING, operation="", driver="", lease_until=0))
    clock, lost = Clock(), []
    mine = Leases(store, "router-a", lease_s=10, on_lost=lost.append, clock=clock)
    other = Leases(store, "router-b", lease_s=10, clock=clock)

    assert await mine.take("id-v2", DEPLOY)
    clock.now += 8
    await mine.renew()
    (stored,) = await store.list_deployments("chat")
    assert (stored.driver, stored.lease_until) == ("router-a", 1018.0)
    assert not orphaned(stored, clock.now + 5, "router-b", other.driving())  # renewed: not yet expired

    clock.now += 20  # router-a stopped renewing (say, its store calls failed); router-b claims it
    assert await other.take("id-v2", DEPLOY, expected=(stored.driver, stored.lease_until))
    assert not await other.take("id-v2", DEPLOY, expected=(stored.driver, stored.lease_until))  # once only
    await mine.renew()
    assert lost == ["id-v2"] and mine.driving() == set()

    await other.release("id-v2", RETIRE)  # not the operation it holds: nothing happens
    assert (await store.list_deployments("chat"))[0].driver == "router-b"
    await other.release("id-v2", DEPLOY)
    (stored,) = await store.list_deployments("chat")
    assert (stored.operation, stored.driver) == ("", "") and other.driving() == set()
    await store.close()


def test_a_store_outage_is_a_503_with_retry_after_that_says_inference_still_serves() -> None:
    from router.errors import StoreUnavailable, as_api_error
    from router.store import Unavailable

    error = as_api_error(Unavailable("Redis cannot be reached (ConnectionError)"))
    assert isinstance(error, StoreUnavailable)
    assert (error.status_code, error.code, error.headers["Retry-After"]) == (503, "store_unavailable", "2")
    assert "Redis cannot be reached" in error.message and "inference still serves" in error.message
