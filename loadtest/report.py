"""Writing a run's results: JSON (every setting and figure), CSV (one row per request),
PNG plots and one self-contained HTML page that embeds them."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from loadtest.runner import Record

CSV_FIELDS = ("index", "target", "intended_s", "sent_s", "ok", "status", "error", "ttft_ms", "tpot_ms", "e2el_ms",
              "queue_wait_ms", "generator_lag_ms", "input_tokens", "output_tokens", "version", "served_by", "user",
              "priority")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(_clean(result), indent=2) + "\n")


def emit(report: dict[str, Any], output: str | None) -> None:
    """A benchmark's JSON report: printed, and written to ``output`` when one is given."""
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")


def write_csv(path: Path, records: list[Record]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_FIELDS)
        for r in records:
            if r.warmup:
                continue
            writer.writerow([r.index, r.target, f"{r.intended_s:.6f}", f"{r.sent_s:.6f}", int(r.ok), r.status,
                             r.error, _fmt(r.ttft_ms), _fmt(r.tpot_ms), _fmt(r.e2el_ms), f"{r.queue_wait_ms:.3f}",
                             f"{r.generator_lag_s * 1000:.3f}", r.input_tokens, r.output_tokens, r.version,
                             r.served_by, r.user or "", r.priority or ""])


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def plots(records: list[Record], runs: list[dict[str, Any]] | None, out_dir: Path) -> dict[str, str]:
    """PNG files (and their base64 for the HTML): latency CDFs per target, TTFT over time with the
    offered load, and for a sweep throughput and goodput against the offered rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    images: dict[str, str] = {}
    measured = [r for r in records if not r.warmup]
    targets = sorted({r.target for r in measured})

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for target in targets:
        for ax, key in zip(axes, ("ttft_ms", "e2el_ms"), strict=True):
            values = sorted(v for r in measured if r.target == target and r.ok
                            and (v := getattr(r, key)) is not None)
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=target)
    for ax, title in zip(axes, ("TTFT (ms)", "end-to-end latency (ms)"), strict=True):
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    images["latency_cdf.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 4))
    for target in targets:
        points = [(r.sent_s, r.ttft_ms) for r in measured if r.target == target and r.ok and r.ttft_ms is not None]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=6, label=f"TTFT {target}")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("TTFT (ms)")
    load = ax.twinx()
    if measured:
        end = max(r.intended_s for r in measured)
        width = max(end / 40, 0.25)
        bins = [i * width for i in range(int(end / width) + 2)]
        counts = [sum(1 for r in measured if b <= r.intended_s < b + width) / width for b in bins]
        load.step(bins, counts, where="post", color="grey", alpha=0.6, label="offered requests/s")
    load.set_ylabel("offered requests/s")
    ax.legend(loc="upper left")
    images["ttft_over_time.png"] = _png(fig)
    plt.close(fig)

    if runs:
        fig, ax = plt.subplots(figsize=(7, 4))
        rates = [run["offered_rate"] for run in runs]
        ax.plot(rates, [run["summary"]["request_throughput"] for run in runs], marker="o", label="throughput")
        ax.plot(rates, [run["summary"]["request_goodput"] for run in runs], marker="o", label="goodput")
        ax.plot(rates, rates, linestyle=":", color="grey", label="offered")
        ax.set_xlabel("offered requests/s")
        ax.set_ylabel("requests/s")
        ax.grid(alpha=0.3)
        ax.legend()
        images["sweep.png"] = _png(fig)
        plt.close(fig)

    for name, data in images.items():
        (out_dir / name).write_bytes(base64.b64decode(data))
    return images


def write_html(path: Path, result: dict[str, Any], images: dict[str, str]) -> None:
    rows = []
    for target, summary in result.get("targets", {}).items():
        cells = "".join(
            f"<td>{_cell(summary.get(key))}</td>"
            for key in ("completed", "failed", "request_throughput", "output_throughput", "request_goodput",
                        "p50_ttft_ms", "p99_ttft_ms", "p99_ttft_from_intended_ms", "p50_tpot_ms", "p99_tpot_ms",
                        "p99_itl_ms", "p99_e2el_ms"))
        rows.append(f"<tr><th>{html.escape(target)}</th>{cells}</tr>")
    header = ("<tr><th>target</th><th>completed</th><th>failed</th><th>req/s</th><th>tokens/s</th><th>goodput</th>"
              "<th>TTFT p50</th><th>TTFT p99</th><th>TTFT p99 from intended</th><th>TPOT p50</th><th>TPOT p99</th>"
              "<th>ITL p99</th><th>E2E p99</th></tr>")
    figures = "".join(f'<h2>{html.escape(name)}</h2><img src="data:image/png;base64,{data}">'
                      for name, data in images.items())
    settings = html.escape(json.dumps(_clean(result.get("settings", {})), indent=2))
    extra = ""
    if "sweep" in result:
        extra = f"<h2>Sweep</h2><pre>{html.escape(json.dumps(_clean(result['sweep']), indent=2))}</pre>"
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>llmserve load test</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;border-bottom:1px solid #ddd}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>llmserve load test</h1><p>{html.escape(str(result.get('started_at', '')))}</p>"
        f"<table>{header}{''.join(rows)}</table>{extra}{figures}<h2>Settings</h2><pre>{settings}</pre>"
        "</body></html>"
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.1f}"
    return html.escape(str(value))
