"""Property-based fuzzing of every route from the router's own OpenAPI schema (schemathesis + hypothesis).

The target is ``python -m loadtest.simstack``: the real router app over a simulated chat model, with a
SQLite store and the example traditional models deployed. Every operation gets generated requests, some
with real model names in the path so they reach past the 404. The properties: never a 5xx, and every
error answers in the documented JSON shape (OpenAI's ``{"error": {...}}``; ``{"error": "..."}`` under /v2).
``LLMSERVE_FUZZ_EXAMPLES`` sets the cases per operation (CI: 25).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import free_port

EXAMPLES_PER_OPERATION = int(os.environ.get("LLMSERVE_FUZZ_EXAMPLES", "25"))
# real names, so generated requests reach the handlers' deeper checks; and one that is not served
MODEL_NAMES = ("demo", "fraud-xgboost", "fraud-onnx", "fraud-pytorch", "fraud-sklearn", "no-such-model")


@pytest.fixture(scope="module")
def router_url(example_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    data = tmp_path_factory.mktemp("fuzz")
    log = (data / "router.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "loadtest.simstack", "--port", str(port), "--data-dir",
                                str(data), "--predict-models", str(example_models)], stdout=log, stderr=log,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (data / "router.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the fuzz target did not get ready"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def error_shape_problem(path: str, status: int, body: Any) -> str | None:
    """What is wrong with an error answer's body, or None."""
    if status < 400:
        return None
    if not isinstance(body, dict) or "error" not in body:
        return f"{status} without an 'error' object: {str(body)[:200]}"
    error = body["error"]
    if path.startswith("/v2"):
        return None if isinstance(error, str) and error else f"/v2 error is not a message: {error!r}"
    if not isinstance(error, dict) or not {"message", "type", "code"} <= set(error):
        return f"{status} error lacks message/type/code: {error!r}"
    return None


class Tally:
    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.problems: list[str] = []

    def report(self, where: str, status: int, problem: str | None) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if problem:
            self.problems.append(f"{where}: {problem}")


def test_no_generated_request_gets_a_server_error_or_a_malformed_error(router_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{router_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25  # every route is in the schema
    tally = Tally()
    for operation in operations:
        fuzz(operation, tally)
    cases = sum(tally.statuses.values())
    print(f"fuzzed {cases} requests over {len(operations)} operations; statuses {dict(sorted(tally.statuses.items()))}")
    assert not tally.problems, f"{len(tally.problems)} problems, first ones:\n" + "\n".join(tally.problems[:15])
    assert cases >= len(operations) * 2


def fuzz(operation: Any, tally: Tally) -> None:
    """Send one operation's generated cases and tally what came back."""

    @given(case=operation.as_strategy(), name=st.sampled_from(MODEL_NAMES), real=st.booleans())
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Any, name: str, real: bool) -> None:
        if real and case.path_parameters and "model_name" in case.path_parameters:
            case.path_parameters["model_name"] = name
        response = case.call(timeout=30)
        where = f"{operation.label} {case.path_parameters or ''} body={str(case.body)[:120]}"
        problem = None
        content_type = response.headers.get("content-type") or ""
        content_type = content_type[0] if isinstance(content_type, list) else content_type  # headers may be lists
        if response.status_code >= 500:
            problem = f"{response.status_code} {response.text[:300]}"
        elif response.status_code >= 400 and "json" in content_type:
            problem = error_shape_problem(case.formatted_path, response.status_code, response.json())
        elif response.status_code >= 400:
            problem = f"{response.status_code} answered {content_type!r}, not JSON"
        tally.report(where, response.status_code, problem)

    check()
