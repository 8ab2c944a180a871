"""The engine benchmark's pure parts: which candidates, which winner, the table."""

from __future__ import annotations

from typing import Any

from llmserve.replicas.hardware import Hardware
from loadtest.engine_bench import FULL, _add_ratios, candidates_for, pick_winner, table

TWO = Hardware("AMD EPYC", frozenset({"avx2"}), (0, 1), memory_gib=20)
EIGHT = Hardware("Intel Xeon", frozenset({"avx512_bf16"}), tuple(range(8)), memory_gib=64)


def row(name: str, tokens: dict[str, float], failed: int = 0) -> dict[str, Any]:
    return {"candidate": name, "settings": {}, "start_s": 1.0, "rss_gib": 1.0, "cores": None,
            "levels": {lv: {"output_tokens_per_s": v, "p50_ttft_ms": 10.0, "p99_ttft_ms": 20.0, "p50_itl_ms": 5.0,
                            "failed": failed} for lv, v in tokens.items()}}


def test_the_baseline_comes_first_then_each_dtype_and_mode_on_the_engine_cores() -> None:
    names = [c.name for c in candidates_for(TWO)]
    assert names[0].startswith("baseline") and len(names) == 4  # bf16 emulated here: not compiled
    assert "fp32, compiled, 2 cores" in names and "bf16, eager, 2 cores" in names
    assert "bf16, compiled, 7 cores" in [c.name for c in candidates_for(EIGHT)]
    assert all(c.cpu_threads == 7 for c in candidates_for(EIGHT)[1:])  # one core left to the router
    tiny = candidates_for(TWO, tiny=True)
    assert len(tiny) == 2 and all(c.enforce_eager and c.dtype == "float32" for c in tiny)


def test_the_winner_has_the_most_tokens_at_the_deciding_level_and_failed_nothing() -> None:
    rows = [row("base", {"a": 10, "b": 50}), row("fast but failing", {"a": 30, "b": 300}, failed=1),
            row("good", {"a": 12, "b": 120}), row("steady", {"a": 40, "b": 100})]
    assert pick_winner(rows, "b")["candidate"] == "good"  # type: ignore[index]
    assert pick_winner(rows, "a")["candidate"] == "steady"  # type: ignore[index]
    assert pick_winner([row("x", {"a": 1}, failed=2)], "a") is None


def test_ratios_are_against_the_first_row_and_the_table_names_the_winner() -> None:
    rows = [row("base", {FULL[0].name: 10.0}), row("twice", {FULL[0].name: 20.0})]
    _add_ratios(rows)
    assert rows[1]["levels"][FULL[0].name]["vs_baseline"] == 2.0
    result = {"levels": [{"name": FULL[0].name}], "candidates": rows, "winner": "twice",
              "deciding_level": FULL[0].name, "hardware": TWO.describe()}
    text = table(result)
    assert "twice **(winner)**" in text and "20.0 (2.00x)" in text and "AMD EPYC, 2 cores" in text
