"""The control plane's store fails under load: Redis shared by two routers goes down, or SQLite's disk
fills up or turns read-only.

- ``redis_outage``: two routers share a Redis, which is SIGKILLed a third of
  the way in and started again on the same append-only file a third later.
  Both routers keep serving from memory; a control-plane write answers 503
  ``store_unavailable`` with ``Retry-After`` within about a second; once Redis
  is back, a split changed through one router is served by the other within
  ``reconverged_s``; everything written before the outage is still there.
- ``sqlite_disk_full``: the router's data dir is a small tmpfs in a mount
  namespace of its own; a third of the way in it is filled, a third later
  freed. Writes answer 503 meanwhile, serving goes on, and writes work again
  afterwards without a restart.
- ``sqlite_read_only``: a disk turns read-only under a running process only
  by the kernel's hand (ext4's ``errors=remount-ro``), and what follows is
  usually a restart on it: so the router is SIGKILLed, its tmpfs remounted
  read-only, and the router started again on it. It comes up serving its last
  configuration from the store opened read-only, refuses writes with 503, and
  takes writes again once the disk is remounted read-write, without a restart.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from loadtest.chaos.routers import MODEL, Control, RouterProcess, prepare
from loadtest.chaos.scenario import Load, Outcome, Scenario
from loadtest.chaos.tally import Tally, streamed_load
from loadtest.redis_server import RedisServer

LEASE_S = 2.0


async def _refused_write(client: httpx.AsyncClient, url: str, name: str) -> dict[str, Any]:
    """A control-plane write while the store is down: how it was answered, and how fast."""
    started = time.monotonic()
    response = await client.post(f"{url}/api/v1/models", json={"model_name": name, "framework": "vllm"})
    code = response.json().get("error", {}).get("code") if response.headers.get("content-type", "").startswith(
        "application/json") else None
    return {"status": response.status_code, "code": code, "retry_after": response.headers.get("retry-after"),
            "seconds": round(time.monotonic() - started, 3)}


def _write_refused_well(answers: list[dict[str, Any]]) -> bool:
    return all(a["status"] == 503 and a["code"] == "store_unavailable" and a["retry_after"] and a["seconds"] < 2.5
               for a in answers)


async def _serving_version(client: httpx.AsyncClient, url: str) -> set[str]:
    """The versions a few quick requests to ``url`` were served by."""
    seen = set()
    for i in range(6):
        response = await client.post(f"{url}/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 1, "user": f"probe-{i}", "messages": [{"role": "user", "content": "hi"}]})
        seen.add(response.headers.get("x-model-version", f"status {response.status_code}"))
    return seen


async def _until(predicate: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"not reached within {timeout_s}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _kept(control: Control, before: dict[str, Any], names: list[str]) -> dict[str, bool]:
    after = await control.state()
    listed = {m["model_name"] for m in (await control.client.get(f"{control.url}/api/v1/models")).json()["models"]}
    history = {(h["action"], h["at"]) for h in after["history"]}
    return {"models_kept": set(names) <= listed,
            "history_kept": all((h["action"], h["at"]) in history for h in before["history"]),
            "deployments_kept": {v["id"] for v in before["versions"]} <= {v["id"] for v in after["versions"]}}


async def _redis_outage(load: Load, work: Path) -> Outcome:
    prepare(work / "models", "v1", "v2")
    redis = RedisServer(work / "redis")
    redis.start()
    routers = [RouterProcess(work / name, work / "models", LEASE_S, redis_url=redis.url) for name in ("a", "b")]
    tally, checks = Tally(), dict[str, Any]()
    try:
        for router in routers:
            await router.start()
        async with httpx.AsyncClient(timeout=30) as client:
            a, b = (Control(client, r.url) for r in routers)
            await a.register()
            (await a.deploy("v1")).raise_for_status()
            await a.wait_for("v1", "active", share=100, timeout_s=60)
            (await a.deploy("v2", 10)).raise_for_status()
            await a.wait_for("v2", "active", share=10, timeout_s=60)
            await _until(lambda: _versions_on(b, {"v1", "v2"}), 60)  # b runs both too
            kept = [f"kept-{i}" for i in range(3)]
            for name in kept:
                (await client.post(f"{a.url}/api/v1/models", json={"model_name": name})).raise_for_status()
            before = await a.state()
            traffic = asyncio.create_task(streamed_load([r.url for r in routers], MODEL, load.users,
                                                        load.duration_s, tally))
            await asyncio.sleep(load.duration_s / 3)
            redis.kill()
            refused = [await _refused_write(client, r.url, "during-outage") for r in routers]
            checks["write_during_outage"] = f"{refused[0]['status']} {refused[0]['code']} in {refused[0]['seconds']}s"
            checks["writes_refused_fast"] = _write_refused_well(refused)
            await asyncio.sleep(load.duration_s / 3)
            redis.start()
            back = time.monotonic()
            # the first write after the outage, through router a; router b must serve by it
            await _until(lambda: _put_split(a, {"v2": 100}), 10)
            await _until(lambda: _only(b, "v2"), 10)
            checks["reconverged_s"] = round(time.monotonic() - back, 2)
            checks["reconverged_within_1s"] = checks["reconverged_s"] < 1.0
            await traffic
            checks.update(await _kept(b, before, kept))
    finally:
        for router in routers:
            await router.stop()
        redis.stop()
    return Outcome(tally, f"Redis SIGKILLed for {load.duration_s / 3:.0f}s under two routers", checks)


async def _versions_on(control: Control, versions: set[str]) -> bool:
    state = await control.state()
    return versions <= {v["version"] for v in state["versions"] if v["ready_replicas"] > 0}


async def _put_split(control: Control, split: dict[str, int]) -> bool:
    response = await control.client.put(f"{control.url}/api/v1/deployments/{MODEL}/traffic", json=split)
    return response.status_code == 200


async def _only(control: Control, version: str) -> bool:
    return await _serving_version(control.client, control.url) == {version}


def _in_namespace(pid: int, *command: str) -> None:
    """Run ``command`` in the mount namespace of process ``pid`` (where the data dir is the small tmpfs)."""
    subprocess.run(["nsenter", "-t", str(pid), "-m", "--", *command], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def _tmpfs_shell(data: Path, then: str) -> list[str]:
    """A command line: a mount namespace of its own where ``data`` is a 64 MiB tmpfs, then ``then``."""
    return ["unshare", "-m", "--", "sh", "-c", f'mount -t tmpfs -o size=64m tmpfs "$0" && {then}', str(data)]


def _need_namespaces() -> None:
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        raise RuntimeError("unshare and nsenter (util-linux) are needed to give the router a disk of its own")


async def _serve_v1(control: Control) -> dict[str, Any]:
    await control.register()
    (await control.deploy("v1")).raise_for_status()
    await control.wait_for("v1", "active", share=100, timeout_s=60)
    return await control.state()


async def _refused_then_mended(control: Control, mend: Callable[[], None], checks: dict[str, Any]) -> None:
    refused = await _refused_write(control.client, control.url, "while-broken")
    checks["write_while_broken"] = f"{refused['status']} {refused['code']} in {refused['seconds']}s"
    checks["writes_refused_fast"] = _write_refused_well([refused])
    await asyncio.to_thread(mend)
    mended = time.monotonic()
    await _until(lambda: _register(control, "after-mend"), 10)
    checks["writes_again_after_s"] = round(time.monotonic() - mended, 2)


async def _disk_full(load: Load, work: Path) -> Outcome:
    _need_namespaces()
    prepare(work / "models", "v1")
    data = work / "data"
    data.mkdir(parents=True)
    router = RouterProcess(data, work / "models", LEASE_S, wrap=_tmpfs_shell(data, 'exec "$@"'),
                           log=work / "router.log")
    tally, checks = Tally(), dict[str, Any]()
    try:
        await router.start()
        async with httpx.AsyncClient(timeout=30) as client:
            control = Control(client, router.url)
            before = await _serve_v1(control)
            traffic = asyncio.create_task(streamed_load([router.url], MODEL, load.users, load.duration_s, tally))
            await asyncio.sleep(load.duration_s / 3)
            await asyncio.to_thread(_in_namespace, router.pid, "dd", "if=/dev/zero", f"of={data / 'filler'}",
                                    "bs=1M")

            def unfill() -> None:
                _in_namespace(router.pid, "rm", "-f", str(data / "filler"))

            await asyncio.sleep(load.duration_s / 3)
            await _refused_then_mended(control, unfill, checks)
            await traffic
            checks.update(await _kept(control, before, ["after-mend"]))
    finally:
        await router.stop()
    return Outcome(tally, "the data dir's tmpfs filled, then freed", checks)


async def _read_only_restart(load: Load, work: Path) -> Outcome:
    _need_namespaces()
    prepare(work / "models", "v1")
    data = work / "data"
    data.mkdir(parents=True)
    # the namespace (and its tmpfs) outlives the router: a process that only holds it
    holder = subprocess.Popen(_tmpfs_shell(data, "exec sleep 100000"))
    await asyncio.sleep(0.5)
    router = RouterProcess(data, work / "models", LEASE_S, wrap=["nsenter", "-t", str(holder.pid), "-m", "--"],
                           log=work / "router.log")
    tally, checks = Tally(), dict[str, Any]()
    try:
        await router.start()
        async with httpx.AsyncClient(timeout=30) as client:
            control = Control(client, router.url)
            before = await _serve_v1(control)
            await streamed_load([router.url], MODEL, load.users, load.duration_s / 2, tally)
            router.kill()
            await router.wait_dead()
            await asyncio.to_thread(_in_namespace, holder.pid, "mount", "-o", "remount,ro", str(data))
            checks["restart_on_read_only_s"] = round(await router.start(), 2)
            traffic = asyncio.create_task(streamed_load([router.url], MODEL, load.users, load.duration_s / 2,
                                                        tally))
            await asyncio.sleep(load.duration_s / 4)

            def read_write() -> None:
                _in_namespace(holder.pid, "mount", "-o", "remount,rw", str(data))

            await _refused_then_mended(control, read_write, checks)
            await traffic
            checks.update(await _kept(control, before, ["after-mend"]))
    finally:
        await router.stop()
        holder.kill()
        holder.wait()
    return Outcome(tally, "router restarted on its data dir remounted read-only, then read-write", checks)


async def _register(control: Control, name: str) -> bool:
    response = await control.client.post(f"{control.url}/api/v1/models", json={"model_name": name})
    return response.status_code in (201, 409)  # 409: an earlier try got through


def scenarios() -> list[Scenario]:
    return [
        Scenario("redis_outage", "Redis SIGKILLed and restarted under two routers", _redis_outage),
        Scenario("sqlite_disk_full", "the SQLite store's disk fills up, then frees", _disk_full),
        Scenario("sqlite_read_only", "router restarted on a read-only disk, which turns writable",
                 _read_only_restart),
    ]
