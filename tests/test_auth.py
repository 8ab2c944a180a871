"""The gateway lets no one in who does not belong: keys, scopes, models, limits, and no secret anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from llmserve.settings import AuthSettings, RouterSettings
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion
from router.store.sqlite import SQLiteStore
from tests.conftest import RunningRouter, free_port, run_router
from tests.test_predict_api import XGB, deploy, features

ADMIN = "sk-ls-" + "a" * 43


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@asynccontextmanager
async def keyed_router(tmp_path: Path, example_models: Path | None = None
                       ) -> AsyncIterator[tuple[RunningRouter, httpx.AsyncClient]]:
    """A router with authentication on, one chat model over the simulated engine, a SQLite store and the
    configured admin key; with ``example_models``, the XGBoost fraud model deployed too."""
    if example_models is not None:
        shutil.copytree(example_models / XGB, tmp_path / "models" / XGB)
    settings = RouterSettings(port=free_port(), retry_after_s=2,
                              auth=AuthSettings(enabled=True, admin_key=SecretStr(ADMIN)))
    chat = StaticVersion(SimEngineProgram("chat", "v1", ttft_ms=2, itl_ms=1))
    async with run_router([chat], tmp_path, router_settings=settings, store=SQLiteStore(tmp_path / "db")) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        if example_models is not None:
            admin = httpx.AsyncClient(base_url=router.url, timeout=30, headers=bearer(ADMIN))
            async with admin:
                assert (await admin.post("/api/v1/models", json={"model_name": XGB, "framework": "xgboost"})
                        ).status_code == 201
                await deploy(admin, XGB, "v1", 100)
        yield router, client


async def create_key(client: httpx.AsyncClient, **fields: object) -> dict:
    response = await client.post("/api/v1/keys", headers=bearer(ADMIN), json={"name": "k", **fields})
    assert response.status_code == 201, response.text
    return response.json()


async def engine_requests(router: RunningRouter) -> float:
    """Requests the chat model's simulated engine finished or aborted: what reached an engine."""
    total = 0.0
    async with httpx.AsyncClient(timeout=5) as client:
        for endpoint in router.backend.endpoints():
            text = (await client.get(f"{endpoint.url}/metrics")).text
            total += sum(float(line.split()[-1]) for line in text.splitlines()
                         if line.startswith(("sim_requests_finished_total", "sim_requests_aborted_total")))
    return total


CHAT = {"model": "chat", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
INFERENCE_ROUTES = [
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "chat", "prompt": "hi", "max_tokens": 4}),
    ("POST", "/api/v1/models/chat/generate", {"prompt": "hi", "max_tokens": 4}),
    ("POST", f"/api/v1/models/{XGB}/predict", {"inputs": [{"features": [0.0] * 8}]}),
    ("POST", f"/v2/models/{XGB}/infer", {"inputs": [{"name": "features", "shape": [1, 8], "datatype": "FP32",
                                                    "data": [0.0] * 8}]}),
]
CONTROL_ROUTES = [
    ("GET", "/api/v1/models", None), ("GET", "/api/v1/deployments/chat", None), ("GET", "/api/v1/replicas", None),
    ("POST", "/api/v1/models", {"model_name": "new"}), ("POST", "/api/v1/deployments/chat/rollback", {}),
    ("PUT", "/api/v1/deployments/chat/traffic", {"v1": 100}),
    ("GET", "/api/v1/keys", None), ("POST", "/api/v1/keys", {"name": "x"}), ("DELETE", "/api/v1/keys/key_x", None),
    ("GET", "/v1/models", None), ("GET", f"/v2/models/{XGB}", None),
]


async def test_no_request_without_a_valid_key_reaches_an_engine_or_a_predictor(tmp_path: Path, example_models: Path
                                                                              ) -> None:
    async with keyed_router(tmp_path, example_models) as (router, client):
        revoked = await create_key(client, name="gone", scopes=["inference"])
        assert (await client.delete(f"/api/v1/keys/{revoked['key_id']}", headers=bearer(ADMIN))).status_code == 200
        expired = await create_key(client, name="old", scopes=["inference"], expires_at=time.time() + 1)
        await asyncio.sleep(1.1)
        before = await engine_requests(router)
        bad = [{}, bearer("sk-ls-unknown"), bearer(revoked["key"]), bearer(expired["key"]),
               {"authorization": "Basic x"}, {"authorization": "Bearer"}, bearer("sk-" + "x" * 10_000),
               {"x-api-key": "sk-ls-é".encode("latin-1")}, {"x-api-key": ""}]
        for headers in bad:
            for method, path, body in INFERENCE_ROUTES + CONTROL_ROUTES:
                response = await client.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (headers, path, response.text)
                error = response.json()["error"]
                message = error if path.startswith("/v2") else error["message"]
                assert isinstance(message, str) and message
                if not path.startswith("/v2"):
                    assert error["code"] == "invalid_api_key" and response.headers["www-authenticate"] == "Bearer"
        assert await engine_requests(router) == before
        for probe in ("/healthz", "/readyz", "/metrics", "/v2/health/live"):
            assert (await client.get(probe)).status_code == 200, probe
        assert "revoked" in (await client.post("/v1/chat/completions", json=CHAT, headers=bearer(revoked["key"]))
                             ).json()["error"]["message"]


async def test_every_scope_boundary_holds(tmp_path: Path, example_models: Path) -> None:
    async with keyed_router(tmp_path, example_models) as (router, client):
        inference = (await create_key(client, name="app", scopes=["inference"]))["key"]
        reader = (await create_key(client, name="dash", scopes=["read"]))["key"]
        deployer = (await create_key(client, name="ci", scopes=["deploy", "read"]))["key"]
        for method, path, body in CONTROL_ROUTES:
            if path in ("/v1/models", f"/v2/models/{XGB}"):
                continue  # what inference clients list
            response = await client.request(method, path, json=body, headers=bearer(inference))
            assert response.status_code == 403, (path, response.text)
            assert response.json()["error"]["code"] == "insufficient_scope"
        for method, path, body in INFERENCE_ROUTES:
            response = await client.request(method, path, json=body, headers=bearer(reader))
            assert response.status_code == 403, (path, response.text)
        assert (await client.get("/api/v1/deployments/chat", headers=bearer(reader))).status_code == 404  # no store
        # record of chat: a static version, so not in the store; the model list of the store is readable
        assert (await client.get("/api/v1/models", headers=bearer(reader))).status_code == 200
        assert (await client.post("/api/v1/models", json={"model_name": "new"}, headers=bearer(reader))
                ).status_code == 403
        created = await client.post("/api/v1/models", json={"model_name": "new"}, headers=bearer(deployer))
        assert created.status_code == 201
        for method, path, body in [("GET", "/api/v1/keys", None), ("POST", "/api/v1/keys", {"name": "x"})]:
            assert (await client.request(method, path, json=body, headers=bearer(deployer))).status_code == 403
        history = (await client.get("/api/v1/deployments/new", headers=bearer(deployer))).json()["history"]
        assert history[-1]["actor"].startswith("ci (key_")  # the key's name and id, not a header's claim
        answer = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(inference))
        assert answer.status_code == 200, answer.text


async def test_a_key_for_some_models_finds_no_others(tmp_path: Path, example_models: Path) -> None:
    async with keyed_router(tmp_path, example_models) as (router, client):
        key = (await create_key(client, name="fraud-only", scopes=["inference"], models=[XGB]))["key"]
        chat = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
        unknown = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=bearer(key))
        assert chat.status_code == unknown.status_code == 404
        assert chat.json()["error"]["code"] == "model_not_found"
        assert "chat" not in chat.json()["error"]["message"].replace("'chat'", "")  # not listed among the known
        assert [m["id"] for m in (await client.get("/v1/models", headers=bearer(key))).json()["data"]] == []
        predicted = await client.post(f"/api/v1/models/{XGB}/predict", headers=bearer(key),
                                      json={"inputs": [{"features": r} for r in features(2)]})
        assert predicted.status_code == 200, predicted.text
        # a key whose model list names a model deleted since: it still gets nothing else
        ghost = (await create_key(client, name="ghost", scopes=["inference"], models=["deleted-model"]))["key"]
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=bearer(ghost))).status_code == 404


async def test_requests_at_once_against_an_rpm_admit_exactly_that_many_with_openai_headers(tmp_path: Path) -> None:
    async with keyed_router(tmp_path) as (router, client):
        key = (await create_key(client, name="small", scopes=["inference"], rpm=5, tpm=100_000))["key"]
        before = await engine_requests(router)
        answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
                                         for _ in range(12)))
        ok = [a for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code == 429]
        assert len(ok) == 5 and len(refused) == 7
        assert await engine_requests(router) - before == 5  # the refused never reached the engine
        error = refused[0].json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
        assert int(refused[0].headers["retry-after"]) >= 1
        assert refused[0].headers["x-ratelimit-remaining-requests"] == "0"
        assert ok[0].headers["x-ratelimit-limit-requests"] == "5"
        assert ok[0].headers["x-ratelimit-limit-tokens"] == "100000"
        stream = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(key))
        assert stream.status_code == 429  # the bucket is empty; a stream answers the same before any byte


async def test_a_streams_tokens_are_reserved_then_settled_to_what_it_used(tmp_path: Path) -> None:
    async with keyed_router(tmp_path) as (router, client):
        key = (await create_key(client, name="tokens", scopes=["inference"], tpm=600))["key"]
        body = {**CHAT, "max_tokens": 250, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=bearer(key)) as stream:
            assert stream.status_code == 200
            reserved_left = int(stream.headers["x-ratelimit-remaining-tokens"])
            assert reserved_left < 600 - 250  # the prompt's estimate and max_tokens, before the first byte
            lines = stream.aiter_lines()
            for _ in range(6):  # a few tokens, then the client goes away: the rest is given back
                await anext(lines)
        await asyncio.sleep(0.3)
        small = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}, headers=bearer(key))
        assert small.status_code == 200
        assert int(small.headers["x-ratelimit-remaining-tokens"]) > reserved_left + 150
        # a whole answer is charged what the engine reports it used (its prompt and its completion)
        whole = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 200}, headers=bearer(key))
        assert whole.status_code == 200
        too_big = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 590}, headers=bearer(key))
        assert too_big.status_code == 429 and too_big.json()["error"]["type"] == "tokens"
        assert "reserves" in too_big.json()["error"]["message"]


async def test_a_keys_secret_is_in_no_log_metric_or_store_row(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    caplog.set_level(logging.DEBUG)
    async with keyed_router(tmp_path) as (router, client):
        created = await create_key(client, name="secret-test", scopes=["inference", "read"], rpm=100)
        secret = created["key"]
        assert secret.startswith("sk-ls-") and len(secret) == 49
        await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(secret))
        await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret[:-1] + "x"))  # a wrong one
        listing = (await client.get("/api/v1/keys", headers=bearer(ADMIN))).json()
        metrics = (await client.get("/metrics")).text
        assert f'llmserve_key_requests_total{{key_id="{created["key_id"]}",status="200"}}' in metrics
        await asyncio.sleep(0.7)  # the inference log writer's batch
    for text in (caplog.text, metrics, str(listing)):
        assert secret not in text and secret[6:] not in text and ADMIN not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and secret[6:].encode() not in data, path
    assert created["hint"] in str(listing)


async def test_a_fresh_data_dir_gets_one_admin_key_stored_as_a_hash_in_a_file_only_its_user_reads(
        tmp_path: Path) -> None:
    from router.access.auth import hash_key
    from router.access.bootstrap import ADMIN_KEY_FILE, first_admin_key

    store = SQLiteStore(tmp_path / "db")
    secret = await first_admin_key(store, tmp_path)
    assert secret is not None and secret.startswith("sk-ls-")
    path = tmp_path / ADMIN_KEY_FILE
    assert path.read_text().strip() == secret and path.stat().st_mode & 0o777 == 0o600
    (stored,) = await store.list_keys()
    assert stored.scopes == ("admin",) and stored.key_hash == hash_key(secret)
    assert secret not in str(stored.to_dict())
    assert await first_admin_key(store, tmp_path) is None  # a live admin key exists: no second one
    await store.revoke_key(stored.key_id, time.time())
    assert await first_admin_key(store, tmp_path) not in (None, secret)  # revoked: a new one
    await store.close()


async def test_the_keys_command_creates_lists_and_revokes(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    import json

    from llmserve.cli import main

    async with keyed_router(tmp_path) as (router, client):
        base = ["--data-dir", str(tmp_path), "keys", "--url", router.url, "--key", ADMIN]
        assert await asyncio.to_thread(main, [*base, "create", "ci", "--scopes", "deploy,read", "--rpm", "10"]) == 0
        created = json.loads(capsys.readouterr().out)
        assert created["scopes"] == ["deploy", "read"] and created["rpm"] == 10 and created["key"].startswith("sk-ls-")
        assert (await client.get("/api/v1/models", headers=bearer(created["key"]))).status_code == 200
        assert await asyncio.to_thread(main, [*base, "list"]) == 0
        listed = json.loads(capsys.readouterr().out)["keys"]
        assert [k["name"] for k in listed] == ["ci"] and "key" not in listed[0] and "key_hash" not in listed[0]
        assert await asyncio.to_thread(main, [*base, "revoke", created["key_id"]]) == 0
        assert (await client.get("/api/v1/models", headers=bearer(created["key"]))).status_code == 401
        assert await asyncio.to_thread(main, [*base[:-2], "--key", "sk-ls-wrong", "list"]) == 1
        assert "invalid_api_key" in capsys.readouterr().err


async def test_two_routers_on_one_redis_enforce_one_rpm_and_a_revocation_reaches_both(tmp_path: Path) -> None:
    from router.store.redis_store import RedisStore
    from tests.redis_server import redis_server

    with redis_server() as url:
        routers = []
        async with contextlib.AsyncExitStack() as stack:
            for name in ("a", "b"):
                settings = RouterSettings(port=free_port(), retry_after_s=2,
                                          auth=AuthSettings(admin_key=SecretStr(ADMIN)))
                chat = StaticVersion(SimEngineProgram("chat", "v1", ttft_ms=2, itl_ms=1))
                routers.append(await stack.enter_async_context(run_router(
                    [chat], tmp_path / name, router_settings=settings, store=RedisStore(url, "two:"),
                    shared_limits_url=url)))
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
            a, b = (r.url for r in routers)
            created = await client.post(f"{a}/api/v1/keys", headers=bearer(ADMIN),
                                        json={"name": "shared", "scopes": ["inference"], "rpm": 6})
            key = created.json()["key"]
            await asyncio.sleep(0.2)  # router b hears of the key on the store's feed
            answers = await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", json=CHAT,
                                                         headers=bearer(key))
                                             for _ in range(8) for url in (a, b)))
            assert sorted(r.status_code for r in answers) == [200] * 6 + [429] * 10  # one limit, not two
            await client.delete(f"{a}/api/v1/keys/{created.json()['key_id']}", headers=bearer(ADMIN))
            await asyncio.sleep(0.2)
            refused = await client.post(f"{b}/v1/chat/completions", json=CHAT, headers=bearer(key))
            assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]
