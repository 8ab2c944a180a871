"""The chaos command's scenarios on a CI-sized configuration: under each fault, no request is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.chaos import Load, outcome_of, scenarios, table
from loadtest.chaos.__main__ import run_one
from loadtest.runner import Record

CI_LOAD = Load(users=4, duration_s=4.0)


@pytest.mark.parametrize("scenario", [s for s in scenarios() if not s.real_engine], ids=lambda s: s.name)
async def test_every_request_under_the_fault_gets_a_clear_answer(scenario, tmp_path: Path) -> None:
    result = await run_one(scenario, CI_LOAD, tmp_path)
    print(table([result]))
    assert result["sent"] >= 10 and result["ok"] >= result["sent"] // 2
    assert result["missed"] == [], (result["missed"], result["lost_examples"])
    assert result["longest_stall_ms"] < 5000  # nothing waits past the router's time-outs (1 s first token here)
    if scenario.name in ("slow_replica", "hung_replica"):  # the hung one's requests go to the other replica
        assert result["failed_clean"] == 0


def test_a_cut_stream_counts_as_lost_and_an_error_event_as_a_clear_answer() -> None:
    cut = Record(0, "router", 0.0, 0.0, ok=True, status=200, first_token_s=0.1)  # text, then no [DONE]
    complete = Record(1, "router", 0.0, 0.0, ok=True, status=200, first_token_s=0.1, complete=True)
    errored = Record(2, "router", 0.0, 0.0, status=200, error="replica failed", error_event=True)
    refused = Record(3, "router", 0.0, 0.0, status=429, retry_after="1")
    dropped = Record(4, "router", 0.0, 0.0, error="ServerDisconnectedError")
    assert [outcome_of(r) for r in (cut, complete, errored, refused, dropped)] == [
        "lost", "ok", "failed_clean", "refused", "lost"]
