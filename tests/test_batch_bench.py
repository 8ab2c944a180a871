"""``python -m loadtest.batch_bench --tiny``: the benchmark's whole path (a router over a simulated engine, online
load in off and on windows, a batch created and cancelled each on window) in a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import batch_bench


def test_the_tiny_batch_bench_measures_both_sides_at_both_loads_and_writes_its_result(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert batch_bench.main(["--tiny", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "result.json").read_text())
    for level in ("low", "high"):
        for side in ("off", "on"):
            assert report[level][side]["requests"] > 0 and report[level][side]["errors"] == 0
            assert report[level][side]["ttft_p99_ms"] is not None
        assert report[level]["ttft_p99_ratio"] is not None
        assert report[level]["batch_lines_completed"] > 0 and report[level]["batch_lines_failed"] == 0
        assert all(w["status"] == "cancelled" for w in report[level]["batch_windows"])
    assert report["batch_throughput_low_over_high"] is not None and isinstance(report["goal_met"], bool)
    assert "on / off" in capsys.readouterr().out
