"""The naive-server benchmark's own logic: its levels, the check that the servers never ran together, the table."""

from __future__ import annotations

import argparse

import pytest

from loadtest.naive_bench import ENGINE, NAIVE, Level, overlapping_turns, parse_levels, table
from loadtest.runner import Record


def record(target: str, round_index: int, sent: float, done: float, warmup: bool = False) -> Record:
    return Record(index=0, target=target, intended_s=sent, sent_s=sent, done_s=done, round_index=round_index,
                  warmup=warmup)


def test_levels_parse_and_fill_two_rounds_only_when_the_requests_allow() -> None:
    assert parse_levels("1:4,16:16,64") == (Level(1, 4), Level(16, 16), Level(64, 64))
    assert [level.rounds for level in parse_levels("1:4,16:16,8:20")] == [2, 1, 2]
    for bad in ("x", "4:2", "0:1", "1:y"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_levels(bad)


def test_turns_that_overlap_are_counted_and_turns_one_after_another_are_not() -> None:
    one_after_another = [record(ENGINE, 0, 0, 1), record(ENGINE, 0, 0.5, 2), record(NAIVE, 0, 2.1, 5),
                         record(NAIVE, 1, 5.1, 6), record(ENGINE, 1, 6.2, 7)]
    assert overlapping_turns(one_after_another) == 0
    # a straggler of the engine's turn still running when the naive turn began
    assert overlapping_turns([*one_after_another, record(ENGINE, 0, 0.5, 2.5)]) == 1
    # warm-up requests are not part of any turn
    assert overlapping_turns([*one_after_another, record(NAIVE, 0, 0, 9, warmup=True)]) == 0


def test_the_table_has_a_row_per_level_with_the_ratio() -> None:
    figures = {"output_throughput": 100.0, "p50_ttft_ms": 10.0, "p99_ttft_ms": 20.0}
    result = {"levels": {"32": {"concurrency": 32, "requests_per_server": 32, "engine_over_naive": 8.5,
                                ENGINE: figures, NAIVE: {**figures, "output_throughput": 11.76}}}}
    lines = table(result).splitlines()
    assert len(lines) == 3
    assert lines[2] == "| 32 | 32 | 100.0 | 11.8 | 8.50x | 10 / 20 ms | 10 / 20 ms |"
