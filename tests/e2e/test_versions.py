"""Two real engine versions behind one router: a 50/50 split by user, then an instant rollback.

v2 is the bundled model prepared again under a new label, deployed with a
different engine setting (prefix caching off), so two real vLLM engines run
side by side.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time

import httpx
import pytest

from llmserve.settings import Settings
from router.split import choose_version
from tests.e2e.conftest import MODEL, Stack

pytestmark = pytest.mark.engine


def prepare_v2() -> None:
    repository = Settings().model_repository
    v1 = repository / MODEL / "v1"
    subprocess.run(
        [sys.executable, "-m", "llmserve.cli", "--models-dir", str(repository), "prepare",
         "--name", MODEL, "--version", "v2", "--source", str(v1)],
        check=True, capture_output=True, timeout=300,
    )


def wait_for(stack: Stack, version: str, status: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = httpx.get(f"{stack.url}/api/v1/deployments/{MODEL}", timeout=10).json()
        match = [v for v in state["versions"] if v["version"] == version and v["status"] == status]
        if match:
            return state
        failed = [v for v in state["versions"] if v["version"] == version and v["status"] == "failed"]
        assert not failed, f"{version} failed: {failed[0]['reason']}"
        assert time.monotonic() < deadline, f"{version} never became {status}"
        time.sleep(0.5)


def test_two_real_versions_split_by_user_then_roll_back(stack: Stack) -> None:
    prepare_v2()
    started = time.monotonic()
    response = httpx.post(f"{stack.url}/api/v1/deployments", json={
        "model_name": MODEL, "version": "v2", "traffic_percent": 50,
        "resources": {"replicas": 1}, "engine": {"enable_prefix_caching": False},
    }, timeout=30)
    assert response.status_code == 202, response.text
    state = wait_for(stack, "v2", "active")
    deploy_to_ready_s = time.monotonic() - started
    while "v2" not in state["split"] and time.monotonic() - started < 620:
        time.sleep(0.05)  # the split changes just after the status turns active
        state = httpx.get(f"{stack.url}/api/v1/deployments/{MODEL}", timeout=10).json()
    assert state["split"] == {"v1": 50, "v2": 50}
    v2 = next(v for v in state["versions"] if v["version"] == "v2")
    assert v2["engine"] == {"enable_prefix_caching": False} and v2["ready_replicas"] == 1

    users = [f"e2e-user-{i}" for i in range(200)]

    def ask(user: str) -> tuple[str, str, str]:
        r = httpx.post(f"{stack.url}/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 1, "user": user})
        assert r.status_code == 200, r.text
        return user, r.headers["x-model-version"], r.json()["model"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, users))
    for user, version, model_field in answers:
        assert model_field == f"{MODEL}:{version}"
        assert version == choose_version({"v1": 50, "v2": 50}, user)  # exactly the routing decision
    share_v2 = sum(version == "v2" for _, version, _ in answers) / len(answers)
    assert 0.43 <= share_v2 <= 0.57

    rollback = httpx.post(f"{stack.url}/api/v1/deployments/{MODEL}/rollback", timeout=30)
    assert rollback.status_code == 200
    body = rollback.json()
    assert (body["from"], body["to"]) == ("v2", "v1")
    after = [ask(u)[1] for u in users[:20]]
    assert set(after) == {"v1"}
    wait_for(stack, "v2", "retired", timeout=120)
    print(json.dumps({"deploy_to_ready_s": round(deploy_to_ready_s, 1), "rollback_applied_in_ms":
                      body["applied_in_ms"], "v2_share": share_v2}))

