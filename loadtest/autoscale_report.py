"""The autoscaling benchmark's report: the settings, the ratios against fixed-max, the goals, a table, a plot.

The goals (the issue's): the autoscaled run keeps at least 99% of fixed-max's SLO
attainment for at most 60% of its replica-seconds, changes direction at most
once per (compressed) 10 minutes in every steady phase, and no run loses a
request. Each is judged on the unrounded figures; the ratios shown are cut
towards a miss (attainment down, cost up), so a miss is never rounded into a pass.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path
from typing import Any

RUNS = ("autoscaled", "fixed_min", "fixed_max")
ATTAINMENT_GOAL = 0.99
COST_GOAL = 0.60


def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    cpu = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "load_before": [round(v, 2) for v in load_before]}


def _cut(value: float, up: bool) -> float:
    """``value`` to 4 digits, rounded towards a miss: up for a cost, down for an attainment."""
    return (math.ceil if up else math.floor)(value * 10_000) / 10_000


def finish(settings: dict[str, Any], runs: dict[str, Any], cold: dict[str, Any], info: dict[str, Any]
           ) -> dict[str, Any]:
    """The report: ``settings`` (what was run), the runs, the ratios to fixed_max and the goals."""
    auto, best = runs["autoscaled"], runs["fixed_max"]
    auto_att = auto["met_slo"] / auto["requests"] if auto["requests"] else 0.0
    best_att = best["met_slo"] / best["requests"] if best["requests"] else 0.0
    attainment_ratio = auto_att / best_att if best_att else 0.0
    cost_ratio = auto["replica_seconds_raw"] / best["replica_seconds_raw"] if best["replica_seconds_raw"] else math.inf
    steady = auto["direction_changes_steady"]
    goals = {
        "attainment_at_least_99pct_of_fixed_max": attainment_ratio >= ATTAINMENT_GOAL,
        "replica_seconds_at_most_60pct_of_fixed_max": cost_ratio <= COST_GOAL,
        "direction_changes_within_one_per_10_min_steady": all(s["within"] for s in steady.values()),
        "no_request_lost": all(runs[name]["lost"] == 0 for name in RUNS) and cold["lost"] == 0,
    }
    goals["all"] = all(goals.values())
    info["load_after"] = [round(v, 2) for v in os.getloadavg()]
    return {
        "benchmark": "autoscale",
        **settings,
        "requests": auto["requests"],
        **{name: {k: v for k, v in runs[name].items() if not k.endswith("_raw")} for name in RUNS},
        "cold_start": {k: v for k, v in cold.items() if k not in ("timeline", "replica_seconds_raw")},
        "ratios": {"attainment_vs_fixed_max": _cut(attainment_ratio, up=False),
                   "replica_seconds_vs_fixed_max": _cut(cost_ratio, up=True)},
        "goals": goals,
        "machine": info,
    }


def table(report: dict[str, Any]) -> str:
    """A markdown table of the three runs, the ratios and the goals (what the README shows)."""
    head = ("| run | SLO attainment | TTFT ok | TPOT ok | goodput (req/s) | replica-seconds | direction changes "
            "| failed | lost | TTFT p99 (ms) | cold-start holds |")
    rows = [head, "|" + "---|" * 11]
    for name in RUNS:
        r = report[name]
        rows.append(f"| {name} | {r['slo_attainment']:.2%} | {r['ttft_attainment']:.2%} | {r['tpot_attainment']:.2%} "
                    f"| {r['goodput']:.2f} | {r['replica_seconds']:.0f} | {r['direction_changes']} | {r['failed']} "
                    f"| {r['lost']} | {r['ttft_p99_ms']} | {r['cold_start']['holds']} |")
    cold = report["cold_start"]
    hold = cold["cold_start"]
    ratios, goals = report["ratios"], report["goals"]
    lines = [
        "\n".join(rows), "",
        f"autoscaled / fixed_max: SLO attainment {ratios['attainment_vs_fixed_max']:.4f} (goal >= 0.99: "
        f"{goals['attainment_at_least_99pct_of_fixed_max']}), replica-seconds "
        f"{ratios['replica_seconds_vs_fixed_max']:.4f} "
        f"(goal <= 0.60: {goals['replica_seconds_at_most_60pct_of_fixed_max']})",
        "direction changes in steady phases (changes / allowed): " + ", ".join(
            f"{k} {v['changes']}/{v['allowed']:g}" for k, v in report["autoscaled"]["direction_changes_steady"].items())
        + f" (goal: {goals['direction_changes_within_one_per_10_min_steady']})",
        f"cold start from zero: {cold['requests']} requests, {hold['holds']} held, mean wait {hold['wait_mean_s']} s, "
        f"max <= {hold['wait_max_le_s']} s, failed {cold['failed']}, lost {cold['lost']}",
        f"no request lost: {goals['no_request_lost']}; all goals met: {goals['all']}",
    ]
    return "\n".join(lines)


def draw(report: dict[str, Any], path: str) -> str | None:
    """Replicas over time for each run, the offered load on a second axis; below, SLO attainment per 10 s."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    trace = report["trace"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, height_ratios=[3, 2])
    colours = {"autoscaled": "tab:blue", "fixed_min": "tab:red", "fixed_max": "tab:green"}
    for name in RUNS:
        points = report[name]["timeline"]
        top.step([p[0] for p in points], [p[1] for p in points], where="post", color=colours[name],
                 label=f"{name} live replicas", linewidth=2 if name == "autoscaled" else 1.2,
                 alpha=1.0 if name == "autoscaled" else 0.7)
        ready = [p[2] for p in points] if name == "autoscaled" else None
        if ready:
            top.step([p[0] for p in points], ready, where="post", color=colours[name], linestyle=":",
                     label="autoscaled ready replicas")
    top.set_ylabel("replicas")
    top.set_ylim(0, max(report["fixed_max"]["max_live_replicas"], 1) + 0.5)
    load = top.twinx()
    times, rates = [], []
    for phase in trace["phases"]:
        times += [phase["start_s"], phase["end_s"]]
        rates += phase["rate_per_s"]
    load.plot(times, rates, color="grey", alpha=0.6, label="offered load (req/s)")
    load.fill_between(times, rates, color="grey", alpha=0.12)
    load.set_ylabel("offered requests/s")
    load.set_ylim(0, max(rates) * 1.15)
    for phase in trace["phases"]:
        top.axvline(phase["start_s"], color="black", alpha=0.08)
        top.text(phase["start_s"] + 0.5, 0.1, phase["name"], fontsize=8, alpha=0.6)
    handles = top.get_legend_handles_labels()
    extra = load.get_legend_handles_labels()
    top.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper right", fontsize=8)
    top.set_title(f"autoscaling over a compressed day (x{report['compression']['factor']:g}): replicas and load")
    for name in RUNS:
        series = report[name]["attainment_bins"]
        bottom.plot([b[0] for b in series], [b[1] for b in series], color=colours[name], marker=".", label=name)
    bottom.set_ylabel("SLO attainment per bin")
    bottom.set_xlabel("seconds since the trace's start")
    bottom.set_ylim(-0.05, 1.05)
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8, loc="lower left")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
