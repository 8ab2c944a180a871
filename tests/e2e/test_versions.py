"""Two real engine versions behind one router: a 50/50 split by user, then an instant rollback;
then a canary rollout of a third version that earns its way to 100% under load.

v2 and v3 are the bundled model prepared again under new labels; v2 runs with
a different engine setting (prefix caching off), so two real vLLM engines run
side by side.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from llmserve.settings import Settings
from router.traffic.split import choose_version
from tests.e2e.conftest import ADMIN_KEY, MODEL, Stack

pytestmark = pytest.mark.engine


def prepare(version: str) -> None:
    repository = Settings().model_repository
    v1 = repository / MODEL / "v1"
    subprocess.run(
        [sys.executable, "-m", "llmserve.cli", "--models-dir", str(repository), "prepare",
         "--name", MODEL, "--version", version, "--source", str(v1), "--no-warm"],
        check=True, capture_output=True, timeout=300,
    )


def wait_for(stack: Stack, version: str, status: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = stack.http.get(f"{stack.url}/api/v1/deployments/{MODEL}", timeout=10).json()
        match = [v for v in state["versions"] if v["version"] == version and v["status"] == status]
        if match:
            return state
        failed = [v for v in state["versions"] if v["version"] == version and v["status"] == "failed"]
        assert not failed, f"{version} failed: {failed[0]['reason']}"
        assert time.monotonic() < deadline, f"{version} never became {status}"
        time.sleep(0.5)


def test_two_real_versions_split_by_user_then_roll_back(stack: Stack) -> None:
    prepare("v2")
    started = time.monotonic()
    response = stack.http.post(f"{stack.url}/api/v1/deployments", json={
        "model_name": MODEL, "version": "v2", "traffic_percent": 50,
        "resources": {"replicas": 1}, "engine": {"enable_prefix_caching": False},
    }, timeout=30)
    assert response.status_code == 202, response.text
    state = wait_for(stack, "v2", "active")
    deploy_to_ready_s = time.monotonic() - started
    while "v2" not in state["split"] and time.monotonic() - started < 620:
        time.sleep(0.05)  # the split changes just after the status turns active
        state = stack.http.get(f"{stack.url}/api/v1/deployments/{MODEL}", timeout=10).json()
    assert state["split"] == {"v1": 50, "v2": 50}
    v2 = next(v for v in state["versions"] if v["version"] == "v2")
    assert v2["engine"] == {"enable_prefix_caching": False} and v2["ready_replicas"] == 1

    users = [f"e2e-user-{i}" for i in range(200)]

    def ask(user: str) -> tuple[str, str, str]:
        r = stack.http.post(f"{stack.url}/v1/completions", timeout=120, json={
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

    rollback = stack.http.post(f"{stack.url}/api/v1/deployments/{MODEL}/rollback", timeout=30)
    assert rollback.status_code == 200
    body = rollback.json()
    assert (body["from"], body["to"]) == ("v2", "v1")
    after = [ask(u)[1] for u in users[:20]]
    assert set(after) == {"v1"}
    wait_for(stack, "v2", "retired", timeout=120)
    print(json.dumps({"deploy_to_ready_s": round(deploy_to_ready_s, 1), "rollback_applied_in_ms":
                      body["applied_in_ms"], "v2_share": share_v2}))



def stream_once(url: str, user: str, prompt: str) -> tuple[bool, str]:
    """One streamed completion; (answered in full, the version that served it)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": True, "user": user}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120,
                          headers={"authorization": f"Bearer {ADMIN_KEY}"}) as r:
            if r.status_code != 200:
                return False, r.headers.get("x-model-version", "")
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            ok = lines[-1:] == ["data: [DONE]"] and not any('"error"' in line for line in lines)
            return ok, r.headers["x-model-version"]
    except httpx.HTTPError:
        return False, ""


def test_a_real_canary_rollout_reaches_100_percent_under_load_with_no_failed_request(stack: Stack) -> None:
    prepare("v3")
    stop = threading.Event()
    outcomes: list[tuple[bool, str]] = []

    def user(index: int) -> None:
        # a fresh user id per request: four fixed ids could all hash to stable and starve the canary
        n = 0
        while not stop.is_set():
            n += 1
            outcomes.append(stream_once(stack.url, f"canary-user-{index}-{n}", f"Tell me fact {n} about {index}:"))

    # On two shared cores both engines' TTFT is noisy, and the second engine shares its core with the router
    # and the load (seen: canary p50 2x stable's on a busy machine). The test is about the rollout's mechanics
    # under load (each step analysed and promoted, no request lost), so the tolerance is generous (2x), the
    # confidence high and the steps few; the analysis' power is measured on seeded samples instead.
    strategy = {"type": "canary", "steps": [20, 50, 100], "bake_s": 3, "min_samples": 30,
                "max_samples": 600, "ttft_tolerance": 1.0, "confidence": 0.99}
    started = time.monotonic()
    response = stack.http.post(f"{stack.url}/api/v1/deployments", timeout=30, json={
        "model_name": MODEL, "version": "v3", "resources": {"replicas": 1}, "strategy": strategy})
    assert response.status_code == 202, response.text
    # The load starts once v3's engine is up: on these two cores a vLLM worker starting beside a
    # saturated engine was seen to stall in its initialisation (see the README's known issues).
    wait_for(stack, "v3", "active")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        users = [pool.submit(user, i) for i in range(4)]
        try:
            canary: dict = {}
            while time.monotonic() - started < 600:
                got = stack.http.get(f"{stack.url}/api/v1/deployments/{MODEL}/canary", timeout=10)
                if got.status_code == 200:
                    canary = got.json()
                    if canary["status"] != "running":
                        break
                time.sleep(0.5)
            time.sleep(1.0)  # a few requests at 100%
        finally:
            stop.set()
            for done in users:
                done.result()
    assert canary.get("status") == "promoted", json.dumps(canary)[:2000]
    assert [d["decision"] for d in canary["decisions"]] == ["promote", "promote"]
    assert stack.http.get(f"{stack.url}/api/v1/deployments/{MODEL}", timeout=10).json()["split"] == {"v3": 100}
    failed = [o for o in outcomes if not o[0]]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed"
    served = {v for _, v in outcomes}
    assert {"v1", "v3"} <= served
    print(json.dumps({"canary_rollout_s": round(time.monotonic() - started, 1), "requests": len(outcomes),
                      "evidence": [{k: d[k] for k in ("step_percent", "stable_samples", "canary_samples",
                                                      "ttft_p50_ratio", "p_within")}
                                   for d in canary["decisions"]]}))
