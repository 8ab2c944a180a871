"""``python -m loadtest run|sweep|bench`` (also ``llmserve loadtest ...``).

    # open loop: Poisson arrivals at 4 req/s for 60 s against the router, SLOs for goodput
    python -m loadtest run --target router=http://127.0.0.1:8000/v1 --model smollm2-135m-instruct \\
        --rate 4 --duration 60 --slo ttft:500 tpot:100
    # a spike: 2 req/s, 5x for 10 s from t=20 s
    python -m loadtest run ... --rate 2 --shape spike --spike-factor 5 --spike-start 20 --spike-duration 10
    # the highest rate that holds the SLO
    python -m loadtest sweep ... --rates 1,2,4,8 --duration 30 --slo ttft:500 tpot:100
    # the router against the engine behind it: 64 requests each, 8 at a time, interleaved in rounds
    python -m loadtest bench --target direct=http://127.0.0.1:8100/v1 --target router=http://127.0.0.1:8000/v1 \\
        --model smollm2-135m-instruct -n 64 -c 8 --max-tokens 64

Each run or sweep writes ``result.json``, ``requests.csv``, PNG plots and
``report.html`` to ``--output-dir`` (default ``loadtest-results/<time>``).
``bench`` prints one JSON report (and writes it to ``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from loadtest import report
from loadtest.metrics import BENCH_COMPARISON, compare, summarize
from loadtest.runner import Record, RunPlan, Target, busy_s, execute, now_iso
from loadtest.schedule import Shape, intended_send_times
from loadtest.slo import SLO, parse_slo
from loadtest.workload import LengthDistribution, RequestSpec, Workload, load_prompt_file, parse_length


class UsageError(Exception):
    """A bad argument: printed as one line, exit code 2."""


def _target(text: str) -> Target:
    name, sep, url = text.partition("=")
    if not sep:
        name, url = "target", text
    kind = "chat"
    if "@" in name:
        name, kind = name.split("@", 1)
    if kind not in ("chat", "completions", "generate"):
        raise argparse.ArgumentTypeError(f"unknown endpoint {kind!r} in {text!r}: use NAME@chat, NAME@completions "
                                         "or NAME@generate")
    if not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"unknown target {text!r}: expected NAME=http://HOST:PORT/v1")
    return Target(name=name, base_url=url.rstrip("/"), endpoint=kind)


class _OneLineErrors(argparse.ArgumentParser):
    """Bad arguments are one line naming the argument (exit 2), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="python -m loadtest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "sweep"):
        p = sub.add_parser(name, help="one run at a shape" if name == "run" else "runs at rising rates")
        p.add_argument("--target", action="append", required=True, type=_target,
                       help="NAME=URL (OpenAI base URL ending in /v1; NAME@generate=ROUTER_URL for the "
                            "generate API); repeat to interleave targets")
        p.add_argument("--model", required=True)
        p.add_argument("--duration", type=float, default=30.0, help="seconds of load per run")
        p.add_argument("--max-requests", type=int, default=None, help="stop sending after this many")
        p.add_argument("--arrival", choices=("poisson", "gamma", "constant"), default="poisson")
        p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: < 1 burstier, > 1 smoother")
        p.add_argument("--concurrency-cap", type=int, default=None,
                       help="at most this many in flight; the wait is reported")
        p.add_argument("--input-len", default="fixed:32", help="synthetic prompts: fixed:N, uniform:LO:HI, ...")
        p.add_argument("--output-len", default="fixed:64", help="max_tokens distribution")
        p.add_argument("--dataset", choices=("bundled", "synthetic"), default="bundled")
        p.add_argument("--prompts-file", type=Path, help="JSONL with prompt or messages per line")
        p.add_argument("--users", type=int, default=0, help="distinct user ids to send (0: none)")
        p.add_argument("--priorities", default="", help="comma-separated priority classes to mix in")
        p.add_argument("--slo", nargs="*", default=[], help="e.g. ttft:500 tpot:100 (milliseconds)")
        p.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--request-timeout", type=float, default=300.0)
        p.add_argument("--output-dir", type=Path)
        if name == "run":
            p.add_argument("--rate", type=float, help="requests/s (open loop)")
            p.add_argument("--closed-users", type=int, help="closed loop: this many users back to back")
            p.add_argument("--shape", choices=("constant", "ramp", "spike"), default="constant")
            p.add_argument("--ramp-to", type=float, help="ramp: the rate at the end")
            p.add_argument("--spike-factor", type=float, default=4.0)
            p.add_argument("--spike-start", type=float, default=10.0)
            p.add_argument("--spike-duration", type=float, default=5.0)
        else:
            p.add_argument("--rates", required=True, help="comma-separated offered rates, ascending")
            p.add_argument("--attainment", type=float, default=0.99,
                           help="fraction of requests that must meet the SLO for a rate to hold it")
    bench_parser = sub.add_parser("bench", help="targets compared closed loop, interleaved in rounds")
    bench_parser.add_argument("--target", action="append", required=True, type=_target,
                              help="NAME=BASE_URL (OpenAI base URL ending in /v1); repeat to compare")
    bench_parser.add_argument("--model", required=True)
    bench_parser.add_argument("--requests", "-n", type=int, default=32, help="per target")
    bench_parser.add_argument("--concurrency", "-c", type=int, default=4)
    bench_parser.add_argument("--max-tokens", type=int, default=64, help="every answer's length (ignore_eos)")
    bench_parser.add_argument("--rounds", type=int, default=4, help="interleaving rounds when comparing targets")
    bench_parser.add_argument("--completions", action="store_true",
                              help="use /completions instead of /chat/completions")
    bench_parser.add_argument("--seed", type=int, default=0)
    bench_parser.add_argument("--request-timeout", type=float, default=300.0)
    bench_parser.add_argument("--output", help="also write the JSON here")
    return parser


def _validate(args: argparse.Namespace) -> tuple[SLO, LengthDistribution, LengthDistribution]:
    try:
        slo = parse_slo(args.slo)
        input_len = parse_length(args.input_len)
        output_len = parse_length(args.output_len)
        if args.prompts_file is not None:
            load_prompt_file(args.prompts_file)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.duration <= 0:
        raise UsageError("--duration must be positive")
    if args.command == "run":
        if (args.rate is None) == (args.closed_users is None):
            raise UsageError("give exactly one of --rate (open loop) or --closed-users (closed loop)")
        if args.rate is not None and args.rate <= 0:
            raise UsageError("--rate must be positive")
        if args.shape == "ramp" and not args.ramp_to:
            raise UsageError("--shape ramp needs --ramp-to")
    return slo, input_len, output_len


async def _preflight(targets: list[Target]) -> None:
    """Fail fast, in one line, on a target that does not answer."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        for target in targets:
            url = target.base_url + ("/healthz" if target.endpoint == "generate" else "/models")
            try:
                async with session.get(url, headers=target.headers()) as response:
                    if response.status >= 500:
                        raise UsageError(f"target {target.name} ({url}) answered {response.status}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise UsageError(f"target {target.name} is unreachable at {url}: {type(exc).__name__}") from None


def _workload(args: argparse.Namespace, input_len: LengthDistribution, output_len: LengthDistribution,
              seed: int) -> Workload:
    priorities = [p for p in args.priorities.split(",") if p]
    return Workload(source=args.dataset, input_length=input_len, output_length=output_len, users=args.users,
                    priorities=priorities, seed=seed, prompt_file=args.prompts_file)


async def _one_run(args: argparse.Namespace, shape: Shape | None, closed_users: int | None, slo: SLO,
                   input_len: LengthDistribution, output_len: LengthDistribution, warmup: int
                   ) -> tuple[list[Record], float, dict[str, Any]]:
    intended = [] if shape is None else intended_send_times(
        shape, args.duration, args.arrival, args.burstiness, args.max_requests, args.seed)
    plan = RunPlan(targets=args.target, model=args.model, intended=intended, users=closed_users or 0,
                   max_requests=args.max_requests or 0, duration_s=args.duration,
                   concurrency_cap=args.concurrency_cap, warmup=warmup, request_timeout_s=args.request_timeout)
    workload = _workload(args, input_len, output_len, args.seed)
    records, duration = await _with_progress(plan, workload, len(intended) or None)
    summaries = {t.name: summarize([r for r in records if r.target == t.name], duration, slo) for t in args.target}
    return records, duration, summaries


async def _with_progress(plan: RunPlan, workload: Workload, total: int | None) -> tuple[list[Record], float]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]load"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), transient=True) as progress:
        task = progress.add_task("load", total=total, status="")
        done = {"ok": 0, "failed": 0}

        def tick(record: Record) -> None:
            done["ok" if record.ok else "failed"] += 1
            progress.update(task, advance=1, status=f"ok {done['ok']} failed {done['failed']}")

        return await execute(plan, workload, on_progress=tick)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else [t.__dict__ for t in v] if k == "target" else v)
            for k, v in vars(args).items()}


def _table(summaries: dict[str, dict[str, Any]]) -> str:
    keys = ("completed", "failed", "request_throughput", "output_throughput", "request_goodput", "p50_ttft_ms",
            "p99_ttft_ms", "p99_ttft_from_intended_ms", "p50_tpot_ms", "p99_tpot_ms", "p99_e2el_ms", "late_sends")
    lines = ["target      " + " ".join(f"{k[:14]:>14}" for k in keys)]
    for name, s in summaries.items():
        values = [s[k] for k in keys]
        lines.append(f"{name[:11]:<11} " + " ".join(
            f"{v:>14.1f}" if isinstance(v, float) else f"{v!s:>14}" for v in values))
    return "\n".join(lines)


def _output_dir(args: argparse.Namespace) -> Path:
    out = args.output_dir or Path("loadtest-results") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write(out: Path, result: dict[str, Any], records: list[Record], runs: list[dict[str, Any]] | None) -> None:
    report.write_json(out / "result.json", result)
    report.write_csv(out / "requests.csv", records)
    images = report.plots(records, runs, out)
    report.write_html(out / "report.html", result, images)


async def cmd_run(args: argparse.Namespace) -> int:
    slo, input_len, output_len = _validate(args)
    await _preflight(args.target)
    shape = None
    if args.rate is not None:
        shape = Shape(args.shape, args.rate, args.ramp_to, args.spike_factor, args.spike_start, args.spike_duration)
    started = now_iso()
    records, duration, summaries = await _one_run(args, shape, args.closed_users, slo, input_len, output_len,
                                                  args.warmup)
    out = _output_dir(args)
    result: dict[str, Any] = {"started_at": started, "settings": _settings(args), "duration": duration,
                              "targets": summaries}
    if len(summaries) > 1:
        result["comparison"] = compare(summaries)
    _write(out, result, records, None)
    print(_table(summaries))
    for name, ratios in result.get("comparison", {}).items():
        print(f"{name}: " + ", ".join(f"{k} {v:+.2f}" if "added" in k else f"{k} {v:.3f}"
                                      for k, v in ratios.items()))
    print(f"report: {out / 'report.html'}")
    return 0


def saturation_point(runs: list[dict[str, Any]]) -> float | None:
    """The first offered rate where throughput stopped growing with the load and latency climbed."""
    for before, after in zip(runs, runs[1:], strict=False):
        grew_offered = after["offered_rate"] / before["offered_rate"] - 1
        grew_served = after["summary"]["request_throughput"] / max(before["summary"]["request_throughput"], 1e-9) - 1
        latency_up = after["summary"]["p99_ttft_ms"] > 1.5 * before["summary"]["p99_ttft_ms"]
        if grew_served < 0.5 * grew_offered and latency_up:
            return float(after["offered_rate"])
    return None


async def cmd_sweep(args: argparse.Namespace) -> int:
    slo, input_len, output_len = _validate(args)
    try:
        rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        raise UsageError(f"--rates must be comma-separated numbers, got {args.rates!r}") from None
    if not rates or any(r <= 0 for r in rates) or rates != sorted(rates):
        raise UsageError("--rates must be positive and ascending")
    await _preflight(args.target)
    started = now_iso()
    runs: list[dict[str, Any]] = []
    all_records: list[Record] = []
    for step, rate in enumerate(rates):
        records, duration, summaries = await _one_run(args, Shape("constant", rate), None, slo, input_len,
                                                      output_len, args.warmup if step == 0 else 0)
        summary = summaries[args.target[0].name]
        runs.append({"offered_rate": rate, "duration": duration, "summary": summary})
        offset = max((r.intended_s for r in all_records), default=0.0) + 1.0
        for record in records:
            record.intended_s += offset
            record.sent_s += offset
        all_records.extend(records)
        print(f"rate {rate:g}/s: throughput {summary['request_throughput']:.2f}/s, goodput "
              f"{summary['request_goodput']:.2f}/s, SLO met by {summary['slo_attainment'] * 100:.1f}%, "
              f"TTFT p99 {summary['p99_ttft_ms']:.0f} ms", flush=True)
    holding = [run["offered_rate"] for run in runs if run["summary"]["slo_attainment"] >= args.attainment]
    sweep = {"highest_rate_holding_slo": max(holding) if holding else None, "attainment_required": args.attainment,
             "slo_ms": slo.limits_ms, "saturation_rate": saturation_point(runs)}
    out = _output_dir(args)
    result = {"started_at": started, "settings": _settings(args), "sweep": sweep, "runs": runs,
              "targets": {f"{args.target[0].name} @ {run['offered_rate']:g}/s": run["summary"] for run in runs}}
    _write(out, result, all_records, runs)
    print(f"highest rate holding the SLO: {sweep['highest_rate_holding_slo']}; saturation: "
          f"{sweep['saturation_rate']}")
    print(f"report: {out / 'report.html'}")
    return 0


# The bench's prompts: short questions, so that TTFT is mostly the serving path's, not prefill.
BENCH_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning a new language.",
    "What is the boiling point of water at sea level?",
    "Summarize the plot of Romeo and Juliet.",
    "How do airplanes stay in the air?",
    "List five fruits that are rich in vitamin C.",
)


@dataclass(frozen=True)
class BenchConfig:
    model: str
    requests: int  # per target
    concurrency: int
    max_tokens: int
    rounds: int
    seed: int
    chat: bool = True  # False: /completions
    timeout_s: float = 300.0


class PromptList:
    """Requests drawn (seeded) from a fixed list of prompts, each answered with exactly ``max_tokens``."""

    def __init__(self, prompts: Sequence[str], max_tokens: int, seed: int) -> None:
        self._prompts, self._max_tokens, self._rng = list(prompts), max_tokens, random.Random(seed)

    def next(self) -> RequestSpec:
        return RequestSpec(None, self._rng.choice(self._prompts), self._max_tokens, None, None)


async def bench(targets: list[Target], config: BenchConfig) -> dict[str, Any]:
    """Each target sent ``config.requests`` streamed requests, ``config.concurrency`` at a time, the
    targets interleaved in ``config.rounds`` rounds; the report has each target's figures (vLLM's
    names) and, for two or more, each against the first (``BENCH_COMPARISON``)."""
    if not config.chat:
        targets = [replace(t, endpoint="completions") if t.endpoint == "chat" else t for t in targets]
    plan = RunPlan(targets=targets, model=config.model, intended=[], users=config.concurrency,
                   max_requests=config.requests, warmup=min(config.concurrency, 4) * len(targets),
                   request_timeout_s=config.timeout_s, rounds=config.rounds,
                   # Greedy and fixed-length (ignore_eos) answers make the targets comparable.
                   extra_body={"temperature": 0.0})
    records, _ = await execute(plan, PromptList(BENCH_PROMPTS, config.max_tokens, config.seed))
    summaries: dict[str, dict[str, Any]] = {}
    for target in targets:
        own = [r for r in records if r.target == target.name]
        summaries[target.name] = summarize(own, busy_s(own))  # throughput over its own turns only
    result: dict[str, Any] = {
        "config": {**config.__dict__, "targets": {t.name: t.base_url for t in targets}},
        "targets": summaries,
    }
    if len(targets) > 1:
        result["comparison"] = compare(summaries, BENCH_COMPARISON)
    return result


async def cmd_bench(args: argparse.Namespace) -> int:
    if min(args.requests, args.concurrency, args.max_tokens, args.rounds) < 1:
        raise UsageError("--requests, --concurrency, --max-tokens and --rounds must be at least 1")
    await _preflight(args.target)
    config = BenchConfig(model=args.model, requests=args.requests, concurrency=args.concurrency,
                         max_tokens=args.max_tokens, rounds=args.rounds, seed=args.seed, chat=not args.completions,
                         timeout_s=args.request_timeout)
    result = await bench(args.target, config)
    report.emit(result, args.output)
    return 1 if any(t["failed"] for t in result["targets"].values()) else 0


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        return asyncio.run(command(args))
    except UsageError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
