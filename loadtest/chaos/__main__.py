"""``python -m loadtest.chaos``: run the scenarios, print the table (JSON on stderr)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from loadtest.chaos import Load, Outcome, Scenario, Tally, report, scenarios, table


async def run_one(scenario: Scenario, load: Load, work: Path) -> dict[str, object]:
    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    outcome = await scenario.run(load, work)
    return report(scenario, outcome, time.monotonic() - started)


async def run_guarded(scenario: Scenario, load: Load, work: Path) -> dict[str, object]:
    """``run_one``, with a scenario that breaks reported as a miss (the others still run)."""
    try:
        return await run_one(scenario, load, work)
    except Exception as exc:  # the table must show every scenario, a broken one as broken
        empty = report(scenario, Outcome(Tally(), "the scenario broke"), 0.0)
        return {**empty, "missed": [f"{type(exc).__name__}: {exc}"], "checks": {"ran": False}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.chaos",
                                     description="Faults under a steady streamed load, and what every client saw.")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--real-engine", action="store_true",
                        help="also run the scenarios with real vLLM engines (minutes each; --only can name them too)")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    names = {n for n in args.only.split(",") if n}
    chosen = [s for s in scenarios() if s.name in names or (not names and (args.real_engine or not s.real_engine))]
    unknown = names - {s.name for s in scenarios()}
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {[s.name for s in scenarios()]}")
    load = Load(args.users, args.duration_s)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        results = [asyncio.run(run_guarded(s, load, Path(tmp) / s.name)) for s in chosen]
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    print(table(results))
    print(json.dumps(results, indent=2), file=sys.stderr)
    return 1 if any(r["missed"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
