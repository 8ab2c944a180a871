"""One real stack per test session: ``llmserve up`` with the bundled model on vLLM.

The stack is started exactly as a user starts it (the same command, a
subprocess), on free loopback ports, with its data in a temporary folder and
the model repository shared with ``llmserve prepare`` so the conversion runs
once per machine. At teardown it is stopped with Ctrl-C (SIGINT) and the test
session fails if any engine process outlives it.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from llmserve.replicas._guard import group_members
from llmserve.settings import Settings
from tests.conftest import free_port

MODEL = "smollm2-135m-instruct"
MAX_TOKENS_DEFAULT = 96  # shorter than the shipped default, so that the test of it is quick
START_TIMEOUT_S = 900.0
ADMIN_KEY = "sk-ls-e2e" + "k" * 40  # the stack's LLMSERVE_ADMIN_KEY: authentication is on, as it ships


@dataclass
class Stack:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    data_dir: Path
    key: str = ADMIN_KEY

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}

    @functools.cached_property
    def http(self) -> httpx.Client:
        """A client that sends the stack's key (full URLs, as the tests write them); one per session."""
        return httpx.Client(headers=self.headers)

    def replicas(self) -> list[dict[str, object]]:
        return httpx.get(f"{self.url}/api/v1/replicas", timeout=5, headers=self.headers).json()["replicas"]

    def replica(self) -> dict[str, object]:
        return self.replicas()[0]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llmserve up exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"stack not ready after {timeout:.0f}s:\n{self.log_tail()}")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("llmserve-data")
    port = free_port()
    env = {
        **os.environ,
        "LLMSERVE_DATA_DIR": str(data_dir),
        "LLMSERVE_MODELS_DIR": str(Settings().model_repository),
        "LLMSERVE_ENGINE__FIRST_PORT": str(free_port()),
        "LLMSERVE_ENGINE__HEALTH_INTERVAL_S": "0.5",
        "LLMSERVE_ENGINE__RESTART_BACKOFF_INITIAL_S": "0.5",
        "LLMSERVE_ENGINE__KV_CACHE_GIB": "1",
        "LLMSERVE_ROUTER__RETRY_AFTER_S": "2",
        "LLMSERVE_ENGINE__MAX_TOKENS_DEFAULT": str(MAX_TOKENS_DEFAULT),
        "HF_HUB_OFFLINE": "1",
        "LLMSERVE_ADMIN_KEY": ADMIN_KEY,
        "LLMSERVE_API_KEY": ADMIN_KEY,  # for the load tools the benchmarks run against it
        # one engine per version under test: a distilled student left in the shared repository stays off
        "LLMSERVE_SERVE_STUDENT": "0",
    }
    log_path = data_dir / "stack.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmserve.cli", "up", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    running = Stack(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path, data_dir=data_dir)
    try:
        running.wait_ready()
        yield running
    finally:
        if "http" in running.__dict__:
            running.http.close()
        guards = [int(r["pid"]) for r in running.replicas()] if process.poll() is None else []
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"llmserve up did not stop within 90s of Ctrl-C:\n{running.log_tail()}")
        deadline = time.monotonic() + 10
        leftovers = [p for g in guards for p in group_members(g)]
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.2)
            leftovers = [p for g in guards for p in group_members(g)]
        assert not leftovers, f"engine processes outlived the stack: {leftovers}"
