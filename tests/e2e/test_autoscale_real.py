"""The autoscaler on the real engine: under load, the bundled model's version scales 1 -> 2 vLLM replicas
and serves from both; lowering max_replicas drains it back to one with no stream lost."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import MODEL, Stack

pytestmark = pytest.mark.engine


def _live(stack: Stack) -> list[dict[str, object]]:
    return [r for r in stack.replicas() if r["model"] == MODEL and r["state"] != "stopped"]


def test_the_real_engine_scales_one_to_two_under_load_and_serves_from_both(stack: Stack) -> None:
    url = f"{stack.url}/api/v1/deployments/{MODEL}/autoscaling"
    version = next(v["version"] for v in stack.http.get(f"{stack.url}/api/v1/deployments/{MODEL}").json()["versions"]
                   if v["status"] == "active" and v["traffic_percent"] == 100)
    policy = {"version": version, "min_replicas": 1, "max_replicas": 2, "target_in_flight_per_replica": 1,
              "up_delay_s": 2, "down_delay_s": 3600}
    response = stack.http.put(url, json=policy, timeout=30)
    assert response.status_code == 200, response.text
    served_by: set[str] = set()
    failures: list[str] = []
    stop = threading.Event()

    def user(n: int) -> None:
        with httpx.Client(headers=stack.headers, timeout=300) as client:
            while not stop.is_set():
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {n}."}],
                        "max_tokens": 24, "stream": True}
                with client.stream("POST", f"{stack.url}/v1/chat/completions", json=body) as answer:
                    text = answer.read().decode()
                if answer.status_code != 200 or "[DONE]" not in text or '"error"' in text:
                    failures.append(f"{answer.status_code}: {text[:200]}")
                else:
                    served_by.add(answer.headers["x-served-by"])

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        users = [pool.submit(user, n) for n in range(4)]
        try:
            deadline = time.monotonic() + 600
            while len([r for r in _live(stack) if r["state"] == "ready"]) < 2:
                assert time.monotonic() < deadline, f"never scaled to 2: {stack.http.get(url).json()}"
                time.sleep(1)
            scaled_in_s = time.monotonic() - started
            both = time.monotonic() + 120
            while len(served_by) < 2 and time.monotonic() < both:
                time.sleep(0.5)
        finally:
            stop.set()
        for done in users:
            done.result()
    assert not failures, failures[:3]
    assert len(served_by) == 2, served_by
    view = stack.http.get(url).json()
    decisions = next(v for v in view["versions"] if v["version"] == version)["decisions"]
    assert any(d["from"] == 1 and d["to"] == 2 and d["direction"] == "up" for d in decisions), decisions
    print(f"scaled 1 -> 2 real replicas in {scaled_in_s:.1f}s under 4 streaming users")

    back = stack.http.put(url, json={**policy, "max_replicas": 1}, timeout=30)
    assert back.status_code == 200, back.text
    deadline = time.monotonic() + 120
    while len(_live(stack)) > 1:
        assert time.monotonic() < deadline, "never drained back to one replica"
        time.sleep(0.5)
    off = stack.http.put(url, json={"version": version, "mode": "off"}, timeout=30)
    assert off.status_code == 200
