"""Routers as processes of their own (``python -m loadtest.simstack``), to SIGKILL and restart, and the
control-plane calls the scenarios make against them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from loadtest.overhead import free_port
from loadtest.simstack import sim_model_folder

MODEL = "chat"


class RouterProcess:
    """One router over simulated engines with a SQLite store in ``data_dir`` (or a shared Redis)."""

    def __init__(self, data_dir: Path, models_dir: Path, lease_s: float, redis_url: str | None = None,
                 deploy_slow_start_s: float = 0.0, wrap: Sequence[str] = (), log: Path | None = None) -> None:
        """``wrap``: a command line the router runs under (``unshare -m sh -c ...``: its own mount namespace);
        ``log``: where its output goes (default ``data_dir/router.log``)."""
        self.data_dir = data_dir
        self.log = log or data_dir / "router.log"
        self._wrap = list(wrap)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = ["--port", str(self.port), "--data-dir", str(data_dir), "--models-dir", str(models_dir),
                      "--lease-s", str(lease_s), "--deploy-slow-start-s", str(deploy_slow_start_s)]
        if redis_url:
            self._args += ["--redis-url", redis_url]
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, timeout_s: float = 60) -> float:
        """Start it and wait until /readyz answers 200; returns the seconds that took."""
        started = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log.open("ab")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH"))
                                                           if p)}
        self._process = await asyncio.create_subprocess_exec(
            *self._wrap, sys.executable, "-m", "loadtest.simstack", *self._args, stdout=log, stderr=log, env=env,
            start_new_session=True)
        log.close()
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                if self._process.returncode is not None:
                    raise RuntimeError(f"the router exited ({self._process.returncode}); see {self.log}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return time.monotonic() - started
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"the router on {self.url} was not ready after {timeout_s}s")
                await asyncio.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs; its engines go with it (their guard watches the router)."""
        assert self._process is not None
        os.killpg(self._process.pid, signal.SIGKILL)

    async def wait_dead(self) -> None:
        assert self._process is not None
        await self._process.wait()
        await asyncio.sleep(0.5)  # the engine guards notice their parent died and stop the engines

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self._process.wait(), timeout=20)
            except asyncio.TimeoutError:
                self.kill()
                await self._process.wait()


@contextlib.asynccontextmanager
async def running(*routers: RouterProcess) -> AsyncIterator[None]:
    try:
        for router in routers:
            await router.start()
        yield
    finally:
        for router in routers:
            await router.stop()


def prepare(models_dir: Path, *versions: str) -> None:
    """The model folders a deploy checks for (a manifest; the simulated engine needs no weights)."""
    for version in versions:
        sim_model_folder(models_dir, MODEL, version, "chaos")


class Control:
    """The control-plane API calls of the scenarios, against one router."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url

    async def register(self) -> None:
        response = await self.client.post(f"{self.url}/api/v1/models", json={
            "model_name": MODEL, "description": "chaos", "framework": "vllm", "owner": "chaos"})
        response.raise_for_status()

    async def deploy(self, version: str, percent: int = 100, strategy: dict[str, Any] | None = None) -> httpx.Response:
        return await self.client.post(f"{self.url}/api/v1/deployments", json={
            "model_name": MODEL, "version": version, "traffic_percent": percent, "resources": {"replicas": 1},
            **({"strategy": strategy} if strategy else {})})

    async def state(self) -> dict[str, Any]:
        response = await self.client.get(f"{self.url}/api/v1/deployments/{MODEL}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def history(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = (await self.state())["history"]
        return entries

    async def status_of(self, version: str) -> str | None:
        # the newest deployment of the version: an older failed one may share its label
        versions = [v for v in (await self.state())["versions"] if v["version"] == version]
        return versions[-1]["status"] if versions else None

    async def wait_for(self, version: str, status: str, share: int | None = None, timeout_s: float = 30) -> float:
        """Wait until ``version`` has ``status`` (and ``share`` % of the traffic); returns the seconds waited."""
        started = time.monotonic()
        while True:
            state = await self.state()
            if await self.status_of(version) == status and (share is None or state["split"].get(version, 0) == share):
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"{MODEL}:{version} never became {status} at {share}%: {state}")
            await asyncio.sleep(0.05)
