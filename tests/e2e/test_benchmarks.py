"""The long benchmarks, on a tiny configuration against the session's real stack."""

from __future__ import annotations

import pytest

from loadtest.overhead import QUICK, measure
from tests.e2e.conftest import MODEL, Stack

pytestmark = pytest.mark.engine


def test_router_overhead_benchmark_runs_end_to_end(stack: Stack) -> None:
    result = measure(stack.url, QUICK, MODEL, api_key=stack.key)
    assert result["engine"] != result["router"]
    for name, scenario in result["scenarios"].items():
        assert scenario["failed"] == 0, name
        assert scenario["direct_output_tokens_per_s"] > 0 and scenario["router_output_tokens_per_s"] > 0
        assert 0.5 < scenario["output_throughput_ratio"] < 2.0
