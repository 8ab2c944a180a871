"""A tiny process that owns one replica's process group.

Usage: ``python -m llmserve.replicas._guard --parent-pid PID --grace S -- CMD ARGS...``

The supervisor starts the guard as the leader of a new process group; the
guard starts the replica command inside that group, so the engine's own
children (vLLM's engine core and workers) are in it too. The guard then makes
sure the whole group goes away:

1. when the supervisor dies, however it dies (SIGKILL included): the kernel
   sends the guard SIGTERM through ``PR_SET_PDEATHSIG``;
2. when the guard itself is asked to stop (SIGTERM/SIGINT);
3. when the replica command exits on its own, leaving children behind.

In each case it sends SIGTERM to the group, waits up to the grace period for
the command to exit, then SIGKILLs the group.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not Linux: fall back to the supervisor's own cleanup
        return
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _kill_group(sig: int) -> None:
    try:
        os.killpg(os.getpgrp(), sig)
    except ProcessLookupError:
        pass


def _terminate(child: subprocess.Popen[bytes], grace_s: float) -> int:
    """SIGTERM the group, give the command the grace period, then SIGKILL whatever is left but ourselves."""
    # Ignore our own copy of the group-wide SIGTERM we are about to send.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
    _kill_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # Once the command is gone, its leftovers (engine core, workers) go at once: they may hold
    # what a restart needs. They are killed one by one, not with the group, so that the guard
    # lives to report the command's exit code.
    for pid in group_members(os.getpgrp()):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return child.wait()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, fields[2] the process group id.
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry))
    return members


def _group_has_others() -> bool:
    return any(pid != os.getpid() for pid in group_members(os.getpgrp()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmserve.replicas._guard")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--grace", type=float, default=15.0)
    parser.add_argument("--nice", type=int, default=0, help="added CPU niceness for the command")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")

    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != args.parent_pid:  # the parent died before prctl took effect
        return 1

    # The command gets a parent-death signal too, so that even a SIGKILL of
    # the guard itself does not leave the engine running on its port.
    def before_exec() -> None:
        _set_parent_death_signal(signal.SIGTERM)
        if args.nice:
            os.nice(args.nice)

    child = subprocess.Popen(command, preexec_fn=before_exec)
    while not stop_requested:
        try:
            code = child.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            continue
        # The command exited on its own: clean up what it left and report its code.
        if _group_has_others():
            _terminate(child, min(args.grace, 5.0))
        return code
    return _terminate(child, args.grace)


if __name__ == "__main__":
    sys.exit(main())
