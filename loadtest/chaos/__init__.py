"""Faults under a steady streamed load, and what every client saw: ``python -m loadtest.chaos``.

Each scenario starts what it needs (routers over simulated engines from
``loadtest.simstack``, a Redis, a store on a broken disk), runs closed-loop
streaming chat clients (the load runner's own ``send``), injects its fault
part way, and classifies every request (``tally``):

- ``ok``: a complete stream (``[DONE]``) with text;
- ``refused``: a graceful no: 429/503 with ``Retry-After``, or a fallback answer;
- ``failed_clean``: the stream ended with an in-band error event (the status
  line was long gone), or a 5xx with an error body: a clear answer;
- ``lost``: no clear answer: a dropped connection, a cut stream without an
  error event, or a client-side timeout (a hang).

``longest_stall_ms`` is the longest silence a client saw (to the first byte,
or between two chunks). Each scenario also reports its own checks (the fault's
replica back in rotation, the routers reconverged, nothing written lost); a
scenario misses when anything is lost or a check is false.

The soak (``soak``) injects no fault: it runs an open-loop load at 70% of the
capacity it measures for the whole duration (``--duration-s 1800`` is the
30-minute soak) and checks the router's memory, descriptors, threads and tasks
stay flat; it sizes its own load, so ``--users`` does not apply to it.
"""

from __future__ import annotations

from loadtest.chaos import clients, replicas, restarts, soak, stores
from loadtest.chaos.scenario import Load, Outcome, Scenario, report
from loadtest.chaos.tally import Tally, outcome_of


def scenarios() -> list[Scenario]:
    """Every scenario, in the order the table lists them."""
    return [*replicas.scenarios(), *clients.scenarios(), *stores.scenarios(), *restarts.scenarios(),
            *soak.scenarios()]  # the soak last: the longest


def table(results: list[dict[str, object]]) -> str:
    rows = ["| scenario | sent | ok | refused | failed (clean error) | lost | longest stall | checks |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        checks = r["checks"]
        assert isinstance(checks, dict)
        shown = ", ".join(f"{k}: {v}" for k, v in checks.items())
        rows.append(f"| {r['scenario']}: {r['summary']} | {r['sent']} | {r['ok']} | {r['refused']} | "
                    f"{r['failed_clean']} | {r['lost']} | {r['longest_stall_ms']:.0f} ms | {shown} |")
    return "\n".join(rows)


__all__ = ["Load", "Outcome", "Scenario", "Tally", "outcome_of", "report", "scenarios", "table"]
