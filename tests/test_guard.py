"""The replica guard leaves no orphan processes, however its parent goes away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

# A "replica" that starts a grandchild, like vLLM's API server starts its engine core.
REPLICA = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(child.pid, flush=True)
    time.sleep(120)
""")

# A stand-in supervisor: starts the guard in a new session, reports its pid, then waits.
PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    guard = subprocess.Popen(
        [sys.executable, "-m", "llmserve.replicas._guard", "--parent-pid", str(os.getpid()), "--grace", "2",
         "--", sys.executable, "-c", sys.argv[1]],
        start_new_session=True, stdout=sys.stdout)
    print(guard.pid, flush=True)
    time.sleep(120)
""")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        remaining = [p for p in pids if alive(p)]
        if not remaining:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def start_parent() -> tuple[subprocess.Popen[str], int, int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, REPLICA], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    guard_pid = int(parent.stdout.readline())
    grandchild_pid = int(parent.stdout.readline())
    return parent, guard_pid, grandchild_pid


def test_sigkill_of_the_parent_takes_the_whole_replica_group_down() -> None:
    parent, guard_pid, grandchild_pid = start_parent()
    assert alive(guard_pid) and alive(grandchild_pid)
    parent.kill()
    parent.wait()
    assert wait_gone([guard_pid, grandchild_pid]) == []


def test_sigterm_to_the_group_stops_everything() -> None:
    parent, guard_pid, grandchild_pid = start_parent()
    try:
        os.killpg(guard_pid, signal.SIGTERM)
        assert wait_gone([guard_pid, grandchild_pid]) == []
    finally:
        parent.kill()
        parent.wait()


def test_leftover_children_are_killed_when_the_replica_exits_by_itself() -> None:
    replica = textwrap.dedent("""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(child.pid, flush=True)
    """)
    guard = subprocess.Popen(
        [sys.executable, "-m", "llmserve.replicas._guard", "--parent-pid", str(os.getpid()), "--grace", "1",
         "--", sys.executable, "-c", replica],
        start_new_session=True, stdout=subprocess.PIPE, text=True,
    )
    assert guard.stdout is not None
    orphan = int(guard.stdout.readline())
    assert guard.wait(timeout=10) == 0
    assert wait_gone([orphan]) == []
