"""A router SIGKILLed mid-deploy, mid-canary and mid-rollback, then restarted on the same store.

The rule (``router.control.recovery``): an interrupted rollout is rolled back
(the canary's evidence died with the router), an interrupted drain is
finished. Each scenario serves ``chat`` v1, starts the operation on v2, kills
the router at the named moment, restarts it on the same SQLite file and checks:

- the operation was settled as the rule says, within the lease after restart;
- v1 has all the traffic and no version is active at 0% without a lease;
- every deployment and history entry written before the kill is still there;
- v2 can be deployed again (nothing stuck as "deploying").

The load runs before the kill and after the restart (a single router that is
dead answers nobody; a fleet's load balancer retries on another router).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from loadtest.chaos.routers import MODEL, Control, RouterProcess, prepare
from loadtest.chaos.scenario import Load, Outcome, Scenario
from loadtest.chaos.tally import Tally, streamed_load

LEASE_S = 2.0

Moment = Callable[[Control], Awaitable[str]]


async def _mid_deploy(control: Control) -> str:
    """v2's engine takes seconds to start: kill while it is still deploying."""
    response = await control.deploy("v2")
    response.raise_for_status()
    await control.wait_for("v2", "deploying")
    await asyncio.sleep(0.5)
    return "failed"


async def _mid_canary(control: Control) -> str:
    """A canary at its first step (10%) with a long bake: kill while it bakes."""
    response = await control.deploy("v2", 0, {"type": "canary", "steps": [10, 50, 100], "bake_s": 600})
    response.raise_for_status()
    await control.wait_for("v2", "active", share=10, timeout_s=60)
    return "rolled_back"


async def _mid_rollback(control: Control) -> str:
    """v2 at 50%, then rolled back while a long stream pinned to v2 keeps it draining: kill then."""
    response = await control.deploy("v2", 50)
    response.raise_for_status()
    await control.wait_for("v2", "active", share=50, timeout_s=60)
    stream = asyncio.create_task(control.client.post(f"{control.url}/v1/chat/completions", json={
        "model": f"{MODEL}:v2", "stream": True, "max_tokens": 2000,
        "messages": [{"role": "user", "content": "a long story"}]}))
    await asyncio.sleep(0.5)  # the stream is on v2's replica
    (await control.client.post(f"{control.url}/api/v1/deployments/{MODEL}/rollback", json={})).raise_for_status()
    await control.wait_for("v2", "draining", timeout_s=10)
    stream.cancel()
    return "retired"


def _killed_at(moment: Moment, slow_start_s: float) -> Callable[[Load, Path], Awaitable[Outcome]]:
    async def run(load: Load, work: Path) -> Outcome:
        prepare(work / "models", "v1", "v2")
        router = RouterProcess(work / "data", work / "models", LEASE_S, deploy_slow_start_s=slow_start_s)
        tally = Tally()
        checks: dict[str, Any] = {}
        try:
            await router.start()
            async with httpx.AsyncClient(timeout=30) as client:
                control = Control(client, router.url)
                await control.register()
                (await control.deploy("v1")).raise_for_status()
                await control.wait_for("v1", "active", share=100, timeout_s=60)
                await streamed_load([router.url], MODEL, load.users, load.duration_s / 2, tally)
                expected = await moment(control)
                before = await control.state()
                router.kill()
            await router.wait_dead()
            checks["restart_s"] = round(await router.start(), 2)
            async with httpx.AsyncClient(timeout=30) as client:
                control = Control(client, router.url)
                restarted = time.monotonic()
                settled = await _wait_settled(control, timeout_s=LEASE_S * 3 + 10)
                checks["settled_in_s"] = round(time.monotonic() - restarted, 2)
                after = await control.state()
                checks.update(_state_checks(before, after, expected, settled))
                await streamed_load([router.url], MODEL, load.users, load.duration_s / 2, tally)
                redeploy = await control.deploy("v2", 0)
                checks["v2_deploys_again"] = redeploy.status_code == 202
        finally:
            await router.stop()
        return Outcome(tally, f"router SIGKILLed; v2 expected {expected}", checks)

    return run


async def _wait_settled(control: Control, timeout_s: float) -> dict[str, Any]:
    """Until v2's interrupted operation is settled; returns the history entry that settled it."""
    deadline = time.monotonic() + timeout_s
    while True:
        for entry in reversed(await control.history()):
            if entry["action"] in ("rollout_interrupted", "retire_interrupted") and \
                    entry["detail"].get("version") == "v2":
                return entry
        if time.monotonic() > deadline:
            raise TimeoutError(f"v2's interrupted operation was not settled within {timeout_s}s")
        await asyncio.sleep(0.1)


def _state_checks(before: dict[str, Any], after: dict[str, Any], expected: str,
                  settled: dict[str, Any]) -> dict[str, Any]:
    v2_status = [v["status"] for v in after["versions"] if v["version"] == "v2"][-1]
    status_for = {"failed": "failed", "rolled_back": "failed", "retired": "retired"}
    active_at_zero = [v["version"] for v in after["versions"] if v["status"] == "active"
                      and after["split"].get(v["version"], 0) == 0 and not v["operation"]]
    kept_history = [(h["action"], h["at"]) for h in after["history"]]
    return {
        "settled_as": settled["detail"]["settled"],
        "settled_as_expected": settled["detail"]["settled"] == expected and v2_status == status_for[expected],
        "v1_has_all_traffic": {v: w for v, w in after["split"].items() if w} == {"v1": 100},
        "no_unowned_active_at_0pct": not active_at_zero,
        "history_kept": all((h["action"], h["at"]) in kept_history for h in before["history"]),
        "deployments_kept": {v["id"] for v in before["versions"]} <= {v["id"] for v in after["versions"]},
    }


def scenarios() -> list[Scenario]:
    return [
        Scenario("router_kill_mid_deploy", "router SIGKILLed while v2 deploys", _killed_at(_mid_deploy, 5.0)),
        Scenario("router_kill_mid_canary", "router SIGKILLed while v2's canary bakes at 10%",
                 _killed_at(_mid_canary, 0.0)),
        Scenario("router_kill_mid_rollback", "router SIGKILLed while v2 drains after a rollback",
                 _killed_at(_mid_rollback, 0.0)),
    ]
