"""Replica life cycle under the supervisor, with simulated engines as the processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from llmserve.errors import ReplicaStartError
from llmserve.replicas.backend import EndpointState
from llmserve.replicas.supervisor import PortAllocator, Supervisor
from loadtest.sim import SimEngineProgram
from tests.conftest import ScriptProgram, fast_engine_settings

CRASHES_AT_START = ScriptProgram("import sys; print('CUDA out of memory, pretend'); sys.exit(3)", "bad")


async def test_replica_becomes_ready_and_logs_to_a_file(tmp_path: Path) -> None:
    supervisor = Supervisor(fast_engine_settings(), tmp_path)
    try:
        replica = supervisor.start(SimEngineProgram("demo", "v1"), 0)
        assert replica.state is EndpointState.STARTING
        await supervisor.wait_ready(replica)
        assert replica.state is EndpointState.READY
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{replica.base_url}/health")).status_code == 200
        assert replica.log_path is not None and "starting demo:v1/0" in replica.log_path.read_text()
    finally:
        await supervisor.shutdown()
    assert replica.state is EndpointState.STOPPED


async def test_crashed_replica_is_restarted_with_backoff(tmp_path: Path) -> None:
    supervisor = Supervisor(fast_engine_settings(), tmp_path)
    try:
        replica = supervisor.start(SimEngineProgram("demo", "v1"), 0)
        await supervisor.wait_ready(replica)
        first_pid = replica.pid
        os.killpg(first_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while replica.state is EndpointState.READY and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert replica.state in (EndpointState.RESTARTING, EndpointState.STARTING)
        await supervisor.wait_ready(replica, timeout=20)
        assert replica.pid != first_pid and replica.restarts == 1
    finally:
        await supervisor.shutdown()


async def test_a_replica_that_cannot_start_reports_why(tmp_path: Path) -> None:
    supervisor = Supervisor(fast_engine_settings(), tmp_path)
    try:
        replica = supervisor.start(CRASHES_AT_START, 0)
        for _ in range(300):  # the first crash: quick on an idle machine, seconds on a loaded one
            if replica.last_error:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(ReplicaStartError, match="CUDA out of memory, pretend"):
            await supervisor.wait_ready(replica, timeout=0.2)
        await asyncio.sleep(1.0)
        assert replica.restarts >= 1  # keeps trying, backing off
    finally:
        await supervisor.shutdown()


async def test_stop_waits_for_in_flight_requests_then_stops(tmp_path: Path) -> None:
    supervisor = Supervisor(fast_engine_settings(drain_timeout_s=5.0), tmp_path)
    try:
        replica = supervisor.start(SimEngineProgram("demo", "v1"), 0)
        await supervisor.wait_ready(replica)
        replica.endpoint.outstanding = 1  # as the router counts a request in flight
        stopping = asyncio.create_task(supervisor.stop(replica))
        await asyncio.sleep(0.3)
        assert replica.state is EndpointState.DRAINING and not stopping.done()
        replica.endpoint.outstanding = 0
        await asyncio.wait_for(stopping, timeout=5)
        assert replica.state is EndpointState.STOPPED
    finally:
        await supervisor.shutdown()


async def test_health_check_failure_ejects_and_recovery_readmits(tmp_path: Path) -> None:
    supervisor = Supervisor(fast_engine_settings(), tmp_path)
    try:
        replica = supervisor.start(SimEngineProgram("demo", "v1"), 0)
        await supervisor.wait_ready(replica)
        os.killpg(replica.pid, signal.SIGSTOP)  # alive but unresponsive
        deadline = time.monotonic() + 10
        while replica.state is not EndpointState.UNHEALTHY and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert replica.state is EndpointState.UNHEALTHY
        os.killpg(replica.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while replica.state is not EndpointState.READY and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert replica.state is EndpointState.READY and replica.restarts == 0
    finally:
        await supervisor.shutdown()


def test_port_allocator_skips_busy_ports() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        allocator = PortAllocator("127.0.0.1", port)
        first = allocator.allocate()
        second = allocator.allocate()
    assert first != port and second != first


async def test_engine_threads_get_the_least_used_core_and_the_log_says_why(tmp_path: Path) -> None:
    from llmserve.replicas.tuning import assign_cores, cpu_list

    cpus = sorted(os.sched_getaffinity(0))
    prints_binding = ("import os, time; "
                      "print('BIND' + '=' + os.environ.get('VLLM_CPU_OMP_THREADS_BIND', '-'), flush=True); ")
    program = ScriptProgram(prints_binding + "time.sleep(30)")
    supervisor = Supervisor(fast_engine_settings(), tmp_path)
    try:
        first = supervisor.start(program, 0)
        for _ in range(200):  # launched in the background
            if "cpus" in first.endpoint.details:
                break
            await asyncio.sleep(0.02)
        second = supervisor.start(program, 1)
        for _ in range(200):
            if "cpus" in second.endpoint.details:
                break
            await asyncio.sleep(0.02)
        sole, _ = assign_cores(cpus, [], None)
        then, _ = assign_cores(cpus, [sole], None)
        assert first.endpoint.details["cpus"]["cores"] == cpu_list(sole)
        assert second.endpoint.details["cpus"]["cores"] == cpu_list(then)
        assert first.log_path is not None
        for _ in range(200):
            if "BIND=" in first.log_path.read_text():
                break
            await asyncio.sleep(0.05)
        log = first.log_path.read_text()
        assert f"BIND={cpu_list(sole)}" in log and f"cores = {cpu_list(sole)} (" in log
    finally:
        await supervisor.shutdown()
