"""Engine settings measured on this machine: dtype, compilation and threads, side by side.

    python -m loadtest.engine_bench                  # every candidate, one stream / 16 / 64 concurrent
    python -m loadtest.engine_bench --tiny           # the configuration CI runs (two eager engines, seconds)
    llmserve tune                                    # the same, and the winner recorded in the version's manifest

Every candidate is a real vLLM engine started by the local backend exactly as the router starts
one (niceness, thread binding, KV cache), all of them up at once and idle but for the one being
measured: each load level is one ``loadtest.cli.bench`` run that interleaves the candidates in
rounds, so machine noise falls on all alike. The baseline is the stack's old default (bf16,
``--enforce-eager``, threads on one core); every figure is also given as a ratio to it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmserve.replicas.backend import ReplicaSet
from llmserve.replicas.hardware import Hardware
from llmserve.replicas.local import LocalBackend
from llmserve.replicas.spec import EngineSpec
from llmserve.replicas.tuning import router_reserved_cores
from llmserve.settings import EngineSettings, Settings
from loadtest.cli import BenchConfig, bench
from loadtest.overhead import free_port
from loadtest.report import write_json
from loadtest.runner import Target

MODEL = "bench"


@dataclass(frozen=True)
class Candidate:
    name: str
    dtype: str
    enforce_eager: bool
    cpu_threads: int

    def overrides(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "enforce_eager": self.enforce_eager, "cpu_threads": self.cpu_threads}

    def settings(self) -> dict[str, Any]:
        """What ``llmserve tune`` records as the winner (the thread count is the layout's to decide)."""
        return {"dtype": self.dtype, "enforce_eager": self.enforce_eager}


@dataclass(frozen=True)
class Level:
    name: str
    concurrency: int
    requests: int  # per candidate
    max_tokens: int
    rounds: int


FULL = (Level("1 stream", 1, 4, 128, 2), Level("16 concurrent", 16, 32, 64, 2), Level("64 concurrent", 64, 64, 64, 1))
TINY = (Level("1 stream", 1, 2, 8, 2), Level("4 concurrent", 4, 4, 8, 1))
DECIDING_LEVEL = 1  # the winner: most output tokens/s at 16 concurrent streams, with no failed request


def candidates_for(hardware: Hardware, tiny: bool = False) -> list[Candidate]:
    """The baseline first, then fp32 and bf16, eager and compiled, on every engine core."""
    cores = max(1, hardware.cores - router_reserved_cores(hardware.cores))
    baseline = Candidate("baseline: bf16, eager, 1 core", "bfloat16", True, 1)
    if tiny:
        return [dataclasses.replace(baseline, dtype="float32", name="fp32, eager, 1 core"),
                Candidate(f"fp32, eager, {cores} cores", "float32", True, cores)]
    # Where bf16 is emulated, compiling it is not measured: eager already shows the emulation's cost,
    # and each compiled start takes minutes.
    return [baseline] + [Candidate(f"{'fp32' if dtype == 'float32' else 'bf16'}, "
                                   f"{'eager' if eager else 'compiled'}, {cores} cores", dtype, eager, cores)
                         for dtype in ("float32", "bfloat16") for eager in (True, False)
                         if eager or dtype == "float32" or hardware.bf16_in_hardware or hardware.gpus]


def pick_winner(rows: Sequence[dict[str, Any]], level: str) -> dict[str, Any] | None:
    """The candidate with the most output tokens/s at ``level`` among those that failed no request."""
    clean = [r for r in rows if r["levels"].get(level) and all(lv["failed"] == 0 for lv in r["levels"].values())]
    return max(clean, key=lambda r: r["levels"][level]["output_tokens_per_s"], default=None)


async def _start(backend: LocalBackend, spec: EngineSpec) -> tuple[ReplicaSet, float]:
    began = time.monotonic()
    replica_set = await backend.start(spec, 1)
    await backend.wait_ready(replica_set.endpoints)
    return replica_set, time.monotonic() - began


def _rss_gib(backend: LocalBackend, replica_set: ReplicaSet) -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    pid = backend.process(replica_set.endpoints[0]).pid
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        return round(sum(p.memory_info().rss for p in procs) / (1 << 30), 2)
    except psutil.Error:
        return None


async def run(model_dir: Path, candidates: Sequence[Candidate], levels: Sequence[Level], logs_dir: Path,
              hardware: Hardware, kv_cache_gib: float = 1.0) -> dict[str, Any]:
    """Start every candidate, measure each level across all of them, stop them; the report."""
    engine = EngineSettings(first_port=free_port(), kv_cache_gib=kv_cache_gib, ready_timeout_s=1200)
    backend = LocalBackend(engine, logs_dir)
    started: list[tuple[Candidate, ReplicaSet, float]] = []
    rows: list[dict[str, Any]] = []
    try:
        for index, candidate in enumerate(candidates):
            spec = EngineSpec.from_settings(model_dir, MODEL, f"c{index}", engine.with_overrides(candidate.overrides()),
                                            hardware=hardware)
            replica_set, start_s = await _start(backend, spec)
            print(f"started {candidate.name} in {start_s:.1f} s", flush=True)
            started.append((candidate, replica_set, start_s))
        targets = [Target(c.name, f"{rs.endpoints[0].url}/v1", api_key=None) for c, rs, _ in started]
        results: dict[str, dict[str, Any]] = {c.name: {} for c in candidates}
        for level in levels:
            config = BenchConfig(model=MODEL, requests=level.requests, concurrency=level.concurrency,
                                 max_tokens=level.max_tokens, rounds=level.rounds, seed=0)
            report = await bench(targets, config)
            for name, summary in report["targets"].items():
                results[name][level.name] = {
                    "output_tokens_per_s": summary["output_throughput"], "p50_ttft_ms": summary["p50_ttft_ms"],
                    "p99_ttft_ms": summary["p99_ttft_ms"], "p50_itl_ms": summary["p50_itl_ms"],
                    "failed": summary["failed"]}
            print(f"measured {level.name}", flush=True)
        for candidate, replica_set, start_s in started:
            rows.append({"candidate": candidate.name, "settings": candidate.overrides(), "start_s": round(start_s, 1),
                         "rss_gib": _rss_gib(backend, replica_set),
                         "cores": replica_set.endpoints[0].details.get("cpus"),
                         "levels": results[candidate.name]})
    finally:
        for _, replica_set, _ in started:
            await backend.retire(replica_set, drain=False)
        await backend.close()
    _add_ratios(rows)
    deciding = levels[min(DECIDING_LEVEL, len(levels) - 1)].name
    winner = pick_winner(rows, deciding)
    return {"hardware": hardware.describe(), "model_dir": str(model_dir), "measured_at": _now(),
            "levels": [dataclasses.asdict(lv) for lv in levels], "deciding_level": deciding,
            "candidates": rows, "winner": winner["candidate"] if winner else None}


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    base = rows[0]["levels"]
    for row in rows:
        for name, figures in row["levels"].items():
            reference = base.get(name, {}).get("output_tokens_per_s") or 0
            figures["vs_baseline"] = round(figures["output_tokens_per_s"] / reference, 2) if reference else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def table(result: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per candidate, tokens/s (x baseline) per level."""
    levels = [lv["name"] for lv in result["levels"]]
    head = ["settings", "start s", "RSS GiB"] + [f"{n} tok/s" for n in levels] + ["1-stream TTFT p50 ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["candidates"]:
        cells = [row["candidate"] + (" **(winner)**" if row["candidate"] == result["winner"] else ""),
                 f"{row['start_s']:.1f}", str(row["rss_gib"] if row["rss_gib"] is not None else "-")]
        for name in levels:
            f = row["levels"].get(name, {})
            cells.append(f"{f.get('output_tokens_per_s', 0):.1f} ({f.get('vs_baseline') or 0:.2f}x)"
                         + (f", {f['failed']} failed" if f.get("failed") else ""))
        cells.append(f"{row['levels'].get(levels[0], {}).get('p50_ttft_ms', 0):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    hw = result["hardware"]
    lines.append(f"\n{hw['cpu_model']}, {hw['cores']} cores, features {', '.join(hw['cpu_features']) or 'none'}, "
                 f"{len(hw['gpus'])} GPU(s); winner at {result['deciding_level']}: {result['winner']}")
    return "\n".join(lines)


def write_report(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "result.json", result)
    (out_dir / "table.md").write_text(table(result) + "\n")
    try:
        _plot(result, out_dir / "tokens_per_s.png")
    except ImportError:  # matplotlib is optional: the table and JSON carry the figures
        pass


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv["name"] for lv in result["levels"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(result["candidates"]))
    for i, row in enumerate(result["candidates"]):
        values = [row["levels"].get(n, {}).get("output_tokens_per_s", 0) for n in levels]
        ax.bar([x + i * width for x in range(len(levels))], values, width, label=row["candidate"])
    ax.set_xticks([x + width * (len(result["candidates"]) - 1) / 2 for x in range(len(levels))], levels)
    ax.set_ylabel("output tokens/s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.engine_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="a prepared version (default: the bundled model's)")
    parser.add_argument("--tiny", action="store_true", help="two eager candidates, a few tokens (CI)")
    parser.add_argument("--out", type=Path, default=Path("loadtest-results/engine"), help="report folder")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache of each candidate engine")
    return parser.parse_args(argv)


def default_model_dir(settings: Settings) -> Path:
    return settings.model_repository / settings.model.name / settings.model.version


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings()
    model_dir = args.model_dir or default_model_dir(settings)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} is not a prepared model version: run `llmserve prepare` first")
    hardware = Hardware.detect()
    result = asyncio.run(run(model_dir, candidates_for(hardware, args.tiny), TINY if args.tiny else FULL,
                             args.out / "logs", hardware, args.kv_cache_gib))
    write_report(result, args.out)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
