"""Local supervision of engine replicas: start, ready, health, restart, drain, stop.

Each replica runs under ``llmserve.replicas._guard`` in a process group of its own, so
stopping it (or the supervisor dying) takes the engine's child processes
with it. One asyncio task per replica runs its life cycle loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx

from llmserve.errors import ReplicaStartError
from llmserve.replicas.backend import EndpointState
from llmserve.replicas.process import LocalReplica, ReplicaProgram
from llmserve.replicas.tuning import assign_cores, cpu_list
from llmserve.settings import EngineSettings

logger = logging.getLogger(__name__)

_LOG_TAIL_BYTES = 2000


class PortAllocator:
    """Free loopback ports from a starting point up, never handing out one twice."""

    def __init__(self, host: str, first_port: int) -> None:
        self._host = host
        self._next = first_port
        self._taken: set[int] = set()

    def allocate(self, preferred: int | None = None) -> int:
        if preferred and preferred not in self._taken and self._is_free(preferred):
            self._taken.add(preferred)
            return preferred
        port = self._next
        while port < 65535:
            if port not in self._taken and self._is_free(port):
                self._taken.add(port)
                self._next = port + 1
                return port
            port += 1
        raise RuntimeError(f"no free port on {self._host} from {self._next}")

    def release(self, port: int) -> None:
        self._taken.discard(port)

    def _is_free(self, port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self._host, port))
            except OSError:
                return False
        return True


class Supervisor:
    """Runs replicas as local processes and keeps them alive.

    Life cycle of one replica (``_run``):
    1. allocate a port and launch the guarded process, its output appended to a log file;
    2. wait until ``/health`` answers and a one-token warm-up succeeds -> READY;
    3. watch the process and health-check it; failures eject it (UNHEALTHY), success re-admits it;
    4. if the process exits unexpectedly, wait an exponential backoff and go to 1;
    5. on stop: DRAINING until in-flight requests finish (bounded), then SIGTERM, then SIGKILL.
    """

    def __init__(
        self,
        settings: EngineSettings,
        logs_dir: Path,
        host: str = "127.0.0.1",
    ) -> None:
        self._settings = settings
        self._logs_dir = Path(logs_dir)
        self._host = host
        self._ports = PortAllocator(host, settings.first_port)
        self._tasks: dict[LocalReplica, asyncio.Task[None]] = {}
        self._processes: dict[LocalReplica, asyncio.subprocess.Process] = {}
        self._ready_events: dict[LocalReplica, asyncio.Event] = {}
        # set when a replica that was never ready fails a launch: waiting for it is pointless,
        # although it keeps being relaunched with backoff (the cause may pass: a port, a file)
        self._first_start_failed: dict[LocalReplica, asyncio.Event] = {}
        self._stopping: set[LocalReplica] = set()
        self._stop_tasks: dict[LocalReplica, asyncio.Future[None]] = {}
        self._cores: dict[LocalReplica, tuple[int, ...]] = {}  # replica -> the cores its engine threads bind
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0), trust_env=False)
        self.replicas: list[LocalReplica] = []

    # -- public API ---------------------------------------------------------

    def start(self, program: ReplicaProgram, index: int) -> LocalReplica:
        """Launch a replica in the background; returns at once in state STARTING."""
        replica = LocalReplica.of(program, index, self._host)
        safe_name = replica.id.replace("/", "-").replace(":", "-")
        replica.log_path = self._logs_dir / "replicas" / f"{safe_name}.log"
        replica.endpoint.details["log_path"] = str(replica.log_path)
        self.replicas.append(replica)
        self._ready_events[replica] = asyncio.Event()
        self._first_start_failed[replica] = asyncio.Event()
        self._tasks[replica] = asyncio.create_task(self._run(replica), name=f"replica {replica.id}")
        return replica

    async def wait_ready(self, replica: LocalReplica, timeout: float | None = None) -> None:
        """Block until the replica is READY; raise ReplicaStartError if it fails first."""
        timeout = self._settings.ready_timeout_s if timeout is None else timeout
        task = self._tasks[replica]
        ready = asyncio.create_task(self._ready_events[replica].wait())
        failed = asyncio.create_task(self._first_start_failed[replica].wait())
        try:
            done, _ = await asyncio.wait({ready, failed, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            failed.cancel()
        if replica.state is EndpointState.READY:
            return
        reason = replica.last_error or ("timed out" if not done else f"state {replica.state.value}")
        raise ReplicaStartError(replica.id, reason, replica.log_path)

    def report_failure(self, replica: LocalReplica, reason: str) -> None:
        """The router saw a refused connection: eject until a health check passes."""
        if replica.state is EndpointState.READY:
            replica.last_error = reason
            self._set_state(replica, EndpointState.UNHEALTHY)

    async def stop(self, replica: LocalReplica, drain: bool = True) -> None:
        """Drain (bounded) and stop one replica; it is not restarted.

        The stop runs as its own task: a caller that is cancelled (a shutdown
        overtaking a drain) does not leave the replica half-stopped, and a
        second caller waits for the same stop.
        """
        task = self._stop_tasks.get(replica)
        if task is None:
            task = self._stop_tasks[replica] = asyncio.ensure_future(self._stop(replica, drain))
        await asyncio.shield(task)

    async def _stop(self, replica: LocalReplica, drain: bool) -> None:
        self._stopping.add(replica)
        if drain and replica.state is not EndpointState.STOPPED:
            self._set_state(replica, EndpointState.DRAINING)
            with contextlib.suppress(asyncio.TimeoutError):  # bounded: a stuck request does not block the stop
                await asyncio.wait_for(replica.endpoint.idle(), timeout=self._settings.drain_timeout_s)
        await self._terminate(replica)
        task = self._tasks.get(replica)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set_state(replica, EndpointState.STOPPED)
        self._ports.release(replica.port)
        self._cores.pop(replica, None)

    async def shutdown(self) -> None:
        await asyncio.gather(*(self.stop(r) for r in list(self.replicas)), return_exceptions=True)
        await self._http.aclose()

    # -- the life cycle loop ------------------------------------------------

    async def _run(self, replica: LocalReplica) -> None:
        backoff = self._settings.restart_backoff_initial_s
        while replica not in self._stopping:
            try:
                # 1. launch
                await self._launch(replica)
                # 2. ready
                await self._wait_until_ready(replica)
                self._set_state(replica, EndpointState.READY)
                replica.ready_at = time.monotonic()
                if replica.started_at is not None:  # with compilation on, the first start includes compiling
                    replica.endpoint.details["start_s"] = round(replica.ready_at - replica.started_at, 1)
                replica.last_error = None
                self._ready_events[replica].set()
                logger.info("replica %s ready on %s (pid %s)", replica.id, replica.base_url, replica.pid)
                # 3. watch
                await self._watch(replica)
            except asyncio.CancelledError:
                raise
            except ReplicaStartError as exc:
                replica.last_error = exc.reason
                logger.warning("%s", exc)
                if not replica.restarts and replica.ready_at is None:
                    self._first_start_failed[replica].set()
            except Exception:
                logger.exception("replica %s: unexpected error in its life cycle", replica.id)
            if replica in self._stopping:
                return
            # 4. crashed or failed to start: restart after a backoff
            await self._terminate(replica)
            if replica.ready_at is not None and time.monotonic() - replica.ready_at > 60:
                backoff = self._settings.restart_backoff_initial_s  # it had been stable
            replica.endpoint.restarts += 1
            self._set_state(replica, EndpointState.RESTARTING)
            self._ready_events[replica].clear()
            logger.warning("replica %s restarting in %.1fs (restart %d)", replica.id, backoff, replica.restarts)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._settings.restart_backoff_max_s)

    async def _launch(self, replica: LocalReplica) -> None:
        if replica.port:  # a restart: keep the same port if it is still free
            self._ports.release(replica.port)
        replica.port = self._ports.allocate(preferred=replica.port or None)
        replica.endpoint.url = replica.base_url
        command = replica.program.command(self._host, replica.port)
        env = {**os.environ, **replica.program.environment()}
        if "VLLM_CPU_OMP_THREADS_BIND" not in replica.program.environment():
            cores = self._pick_cores(replica)
            if cores:
                env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list(cores)
        choices = getattr(replica.program, "choices", None)
        if choices:
            replica.endpoint.details["engine_settings"] = choices
        notes = _choice_notes(replica)
        with _replica_log(replica, command, notes) as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "llmserve.replicas._guard",
                "--parent-pid",
                str(os.getpid()),
                "--grace",
                str(self._settings.stop_timeout_s),
                "--nice",
                str(self._settings.nice),
                "--",
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._processes[replica] = process
        replica.pid = replica.endpoint.details["pid"] = process.pid
        replica.started_at = time.monotonic()
        replica.ready_at = None  # last_error stays until it is ready: a crash loop keeps saying why
        self._set_state(replica, EndpointState.STARTING)

    def _pick_cores(self, replica: LocalReplica) -> tuple[int, ...]:
        """The cores this replica's engine threads bind to (``tuning.assign_cores``), kept across restarts.

        vLLM's CPU backend binds its threads to the first core by default; two engines on the
        same machine would then share core 0 and the second one's requests would queue behind
        the first one's compute (seen: a canary 14x slower than stable on two cores).
        """
        if not self._settings.spread_cpus:
            return ()
        if replica in self._cores:
            return self._cores[replica]
        cpus = sorted(os.sched_getaffinity(0))
        held = [cores for r, cores in self._cores.items() if r.state is not EndpointState.STOPPED]
        cores, reason = assign_cores(cpus, held, getattr(replica.program, "cpu_threads", None))
        self._cores[replica] = cores
        replica.endpoint.details["cpus"] = {"cores": cpu_list(cores), "reason": reason}
        logger.info("replica %s binds its engine threads to cores %s: %s", replica.id, cpu_list(cores), reason)
        return cores

    async def _wait_until_ready(self, replica: LocalReplica) -> None:
        process = self._processes[replica]
        deadline = time.monotonic() + self._settings.ready_timeout_s
        while True:
            if process.returncode is not None:
                reason = f"process exited with code {process.returncode}: {self._log_tail(replica)}"
                raise ReplicaStartError(replica.id, reason, replica.log_path)
            if time.monotonic() > deadline:
                reason = f"not ready after {self._settings.ready_timeout_s:.0f}s"
                raise ReplicaStartError(replica.id, reason, replica.log_path)
            if await self._healthy(replica):
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=0.5)
        await self._warm_up(replica)

    async def _warm_up(self, replica: LocalReplica) -> None:
        """One one-token completion, so the first user request does not pay for lazy initialisation."""
        body = {"model": replica.program.versioned_name, "prompt": "Hello", "max_tokens": 1}
        try:
            response = await self._http.post(f"{replica.base_url}/v1/completions", json=body, timeout=120.0)
        except httpx.HTTPError as exc:
            raise ReplicaStartError(replica.id, f"warm-up request failed: {exc!r}", replica.log_path) from exc
        if response.status_code != 200:
            raise ReplicaStartError(
                replica.id, f"warm-up answered {response.status_code}: {response.text[:200]}", replica.log_path
            )

    async def _watch(self, replica: LocalReplica) -> None:
        """Health-check until the process exits."""
        process = self._processes[replica]
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=self._settings.health_interval_s)
            if process.returncode is not None:
                if replica in self._stopping:
                    return
                replica.last_error = f"process exited with code {process.returncode}"
                logger.warning("replica %s exited with code %s", replica.id, process.returncode)
                return
            if replica.state is EndpointState.DRAINING:
                continue
            if await self._healthy(replica):
                replica.consecutive_health_failures = 0
                if replica.state is EndpointState.UNHEALTHY:
                    logger.info("replica %s healthy again", replica.id)
                    self._set_state(replica, EndpointState.READY)
            else:
                replica.consecutive_health_failures += 1
                if (
                    replica.state is EndpointState.READY
                    and replica.consecutive_health_failures >= self._settings.health_failures_to_eject
                ):
                    replica.last_error = "failed health checks"
                    self._set_state(replica, EndpointState.UNHEALTHY)

    async def _healthy(self, replica: LocalReplica) -> bool:
        try:
            response = await self._http.get(f"{replica.base_url}/health", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _terminate(self, replica: LocalReplica) -> None:
        """SIGTERM the replica's process group, SIGKILL it after the grace period."""
        process = self._processes.get(replica)
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=self._settings.stop_timeout_s + 2)
        except asyncio.TimeoutError:
            logger.warning("replica %s ignored SIGTERM; killing it", replica.id)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    def _set_state(self, replica: LocalReplica, state: EndpointState) -> None:
        if replica.state is not state:
            replica.endpoint.state = state
            if state is EndpointState.READY:
                replica.endpoint.ever_ready = True

    @staticmethod
    def _log_tail(replica: LocalReplica) -> str:
        if replica.log_path is None or not replica.log_path.exists():
            return ""
        with replica.log_path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _LOG_TAIL_BYTES))
            lines = fh.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""


def _choice_notes(replica: LocalReplica) -> str:
    """The engine settings chosen for the hardware and why (``EngineSpec.choices``), for the replica's log."""
    choices = getattr(replica.program, "choices", None) or {}
    lines = [f"  {name} = {c.get('value')} ({c.get('source')}: {c.get('reason')})" for name, c in choices.items()]
    cpus = replica.endpoint.details.get("cpus")
    if cpus:
        lines.append(f"  cores = {cpus['cores']} ({cpus['reason']})")
    return "".join(f"{line}\n" for line in lines)


@contextlib.contextmanager
def _replica_log(replica: LocalReplica, command: list[str], notes: str = "") -> Iterator[BinaryIO | None]:
    """The replica's log file; None (its output goes to the router's own) when the disk cannot take it:
    read-only or full, a replica that cannot log must still start."""
    assert replica.log_path is not None
    log: BinaryIO | None = None
    try:
        replica.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = replica.log_path.open("ab")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        log.write(f"\n=== {stamp} starting {replica.id}: {' '.join(command)}\n{notes}".encode())
        log.flush()
    except OSError as exc:
        logger.warning("cannot write the log of %s at %s (%s); its output goes to the router's", replica.id,
                       replica.log_path, exc)
        if log is not None:
            with contextlib.suppress(OSError):
                log.close()
        log = None
    try:
        yield log
    finally:
        if log is not None:
            with contextlib.suppress(OSError):
                log.close()
