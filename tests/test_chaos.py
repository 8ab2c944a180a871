"""The chaos command's scenarios on a CI-sized configuration: under each fault, no request is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.chaos import run_scenario, scenarios, table


@pytest.mark.parametrize("scenario", scenarios(), ids=lambda s: s.name)
async def test_every_request_under_the_fault_gets_a_clear_answer(scenario, tmp_path: Path) -> None:
    result = await run_scenario(scenario, users=4, duration_s=4.0, work=tmp_path)
    print(table([result]))
    assert result["sent"] >= 10 and result["ok"] >= result["sent"] // 2
    assert result["lost"] == 0, result["lost_examples"]
    assert result["longest_stall_ms"] < 5000  # nothing waits past the router's time-outs (1 s first token here)
    if scenario.name in ("slow_replica", "hung_replica"):  # the hung one's requests go to the other replica
        assert result["failed_clean"] == 0
