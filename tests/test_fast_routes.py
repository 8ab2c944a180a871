"""The predict fast path (``router.gateway.fast_routes``): taken for the predict routes, the same answers as the
FastAPI routes, bad input refused with the right 4xx and a JSON body, and everything else left to FastAPI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from router.api.predict import PREDICT_PATH, V2_INFER_PATH, V2_VERSION_INFER_PATH
from router.errors import InvalidRequest, install_error_handlers
from router.gateway.fast_routes import FastRoute, FastRoutes
from tests.test_auth import bearer, create_key, keyed_router
from tests.test_predict_api import XGB, features, predict_router


def fast_routes_of(app: Any) -> FastRoutes:
    """The app's FastRoutes layer (its middleware stack is built by the first request)."""
    layer = app.middleware_stack
    while not isinstance(layer, FastRoutes):
        layer = layer.app
    return layer


# -- the middleware alone, over a small FastAPI app --------------------------------------------------------------


async def _fast(request: Request, params: dict[str, str]) -> Response:
    if params["name"] == "bad":
        raise InvalidRequest("bad name", param="name")
    if params["name"] == "boom":
        raise RuntimeError("a bug")
    return JSONResponse({"by": "fast", **params})


def _small_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/things/{name}/do")
    async def do(name: str) -> dict[str, str]:
        return {"by": "fastapi", "name": name}

    @app.get("/things/{name}/do")
    async def look(name: str) -> dict[str, str]:
        return {"by": "fastapi-get", "name": name}

    app.add_middleware(FastRoutes, routes=(FastRoute("POST", "/things/{name}/do", _fast),))
    return app


async def test_only_the_given_method_and_path_take_the_fast_path() -> None:
    app = _small_app()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        fast = await client.post("/things/x/do")
        assert fast.json() == {"by": "fast", "name": "x"}
        assert fast_routes_of(app).taken == {"/things/{name}/do": 1}
        # another method, a trailing slash, an empty or extra segment: FastAPI's, as before
        assert (await client.get("/things/x/do")).json() == {"by": "fastapi-get", "name": "x"}
        assert (await client.post("/things/x/do/")).status_code in (307, 404)
        assert (await client.post("/things//do")).status_code == 404
        assert (await client.post("/things/x/y/do")).status_code == 404
        assert fast_routes_of(app).taken == {"/things/{name}/do": 1}


async def test_fast_path_errors_are_answered_by_the_apps_own_handlers() -> None:
    app = _small_app()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        bad = await client.post("/things/bad/do")
        assert bad.status_code == 400
        assert bad.json() == {"error": {"message": "bad name", "type": "invalid_request_error", "param": "name",
                                        "code": "invalid_request"}}
        boom = await client.post("/things/boom/do")  # no handler of its own: the catch-all's 500, no traceback
        assert boom.status_code == 500 and "internal error" in boom.json()["error"]["message"]
        assert "RuntimeError" not in boom.text


def test_a_route_template_matches_one_non_empty_segment_a_parameter() -> None:
    route = FastRoute("POST", "/v2/models/{model_name}/versions/{version}/infer", _fast)
    assert route.shape == ("POST", 7)
    assert route.match("/v2/models/m/versions/v1/infer".split("/")) == {"model_name": "m", "version": "v1"}
    assert route.match("/v2/models/m/versions//infer".split("/")) is None
    assert route.match("/v2/models/m/version/v1/infer".split("/")) is None


# -- the real router --------------------------------------------------------------------------------------------


async def test_predict_and_v2_infer_take_the_fast_path_with_the_same_answers(tmp_path: Path, example_models: Path
                                                                             ) -> None:
    rows = features(2)
    v2 = {"inputs": [{"name": "features", "shape": [2, 30], "datatype": "FP32",
                      "data": [v for r in rows for v in r]}]}
    async with predict_router(tmp_path, example_models) as (router, client):
        design = await client.post(f"/api/v1/models/{XGB}/predict", json={"inputs": [{"features": r} for r in rows]},
                                   headers={"x-request-id": "fast-1"})
        assert design.status_code == 200, design.text
        assert design.headers["x-request-id"] == "fast-1" and design.json()["id"] == "fast-1"
        assert design.headers["x-model-version"] == "v1" and design.headers["x-served-by"] == "router"
        assert len(design.json()["predictions"]) == 2
        plain = await client.post(f"/v2/models/{XGB}/infer", json=v2)
        pinned = await client.post(f"/v2/models/{XGB}/versions/v1/infer", json=v2)
        assert plain.status_code == pinned.status_code == 200
        assert plain.json()["outputs"] == pinned.json()["outputs"]
        probabilities = [p["probabilities"] for p in design.json()["predictions"]]
        got = {o["name"]: o for o in plain.json()["outputs"]}["probabilities"]["data"]
        assert got == pytest.approx([v for p in probabilities for v in p])
        assert fast_routes_of(router.app).taken == {PREDICT_PATH: 1, V2_INFER_PATH: 1, V2_VERSION_INFER_PATH: 1}
        # the access log's counter labels them by the FastAPI route's template, as before
        metrics = (await client.get("/metrics")).text
        for template in (PREDICT_PATH, V2_INFER_PATH, V2_VERSION_INFER_PATH):
            assert f'method="POST",route="{template}",status="200"' in metrics, template


async def test_bad_input_on_the_fast_path_gets_the_right_4xx_with_a_json_body(tmp_path: Path,
                                                                               example_models: Path) -> None:
    row = features(1)[0]
    json_type = {"content-type": "application/json"}
    async with predict_router(tmp_path, example_models) as (router, client):
        design = f"/api/v1/models/{XGB}/predict"
        cases = [  # path, body, status, code (design API) or None (/v2: {"error": "..."}), words
            (design, b'{"inputs": [', 400, "invalid_json", "not valid JSON"),
            (design, b"[1, 2]", 400, "invalid_json", "object"),
            (design, json.dumps({"inputs": [{"features": row[:29]}]}).encode(), 400, "invalid_request", "[-1, 30]"),
            (design, json.dumps({"inputs": [{"features": [row, row]}]}).encode(), 400, "invalid_request", "shape"),
            ("/api/v1/models/nope/predict", json.dumps({"inputs": [{"features": row}]}).encode(), 404,
             "model_not_found", "does not exist"),
            (f"/v2/models/{XGB}/infer", b"{not json", 400, None, "JSON"),
            (f"/v2/models/{XGB}/infer", json.dumps({"inputs": [{"name": "features", "shape": [1, 29],
                                                                "datatype": "FP32", "data": row[:29]}]}).encode(),
             400, None, "[-1, 30]"),
            (f"/v2/models/{XGB}/versions/v1/infer", json.dumps({"inputs": [{"name": "features", "shape": [3, 30],
                                                                            "datatype": "FP32", "data": row}]}
                                                               ).encode(), 400, None, "needs 90"),
            ("/v2/models/nope/infer", json.dumps({"inputs": []}).encode(), 404, None, "nope"),
            (f"/v2/models/{XGB}/versions/v9/infer", json.dumps({"inputs": []}).encode(), 404, None, "v9"),
        ]
        for path, body, status, code, words in cases:
            response = await client.post(path, content=body, headers=json_type)
            assert response.status_code == status, (path, body, response.text)
            assert response.headers["content-type"] == "application/json"
            assert response.headers["x-request-id"]
            error = response.json()["error"]
            if code is None:
                assert isinstance(error, str) and words in error, (path, error)
            else:
                assert error["code"] == code and words in error["message"], (path, error)
        shape = await client.post(design, json={"inputs": [{"features": row[:29]}]})
        assert shape.json()["error"]["param"] == "features"
        assert sum(fast_routes_of(router.app).taken.values()) == len(cases) + 1
        metrics = (await client.get("/metrics")).text
        assert f'method="POST",route="{PREDICT_PATH}",status="400"' in metrics
        assert f'method="POST",route="{V2_VERSION_INFER_PATH}",status="404"' in metrics


async def test_the_fast_path_asks_for_a_key_and_its_scope(tmp_path: Path, example_models: Path) -> None:
    body = {"inputs": [{"features": features(1)[0]}]}
    v2 = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": features(1)[0]}]}
    async with keyed_router(tmp_path, example_models) as (router, client):
        reader = (await create_key(client, name="dash", scopes=["read"]))["key"]
        app_key = (await create_key(client, name="app", scopes=["inference"]))["key"]
        missing = await client.post(f"/api/v1/models/{XGB}/predict", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "invalid_api_key"
        v2_missing = await client.post(f"/v2/models/{XGB}/infer", json=v2)
        assert v2_missing.status_code == 401 and "API key" in v2_missing.json()["error"]
        scope = await client.post(f"/api/v1/models/{XGB}/predict", json=body, headers=bearer(reader))
        assert scope.status_code == 403 and scope.json()["error"]["code"] == "insufficient_scope"
        ok = await client.post(f"/v2/models/{XGB}/versions/v1/infer", json=v2, headers=bearer(app_key))
        assert ok.status_code == 200, ok.text
        # the key's requests per minute: the second of two is refused, with the OpenAI headers
        small = (await create_key(client, name="small", scopes=["inference"], rpm=1))["key"]
        first = await client.post(f"/api/v1/models/{XGB}/predict", json=body, headers=bearer(small))
        second = await client.post(f"/api/v1/models/{XGB}/predict", json=body, headers=bearer(small))
        assert first.status_code == 200 and first.headers["x-ratelimit-limit-requests"] == "1"
        assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(second.headers["retry-after"]) >= 1 and second.headers["x-ratelimit-remaining-requests"] == "0"
        assert fast_routes_of(router.app).taken == {PREDICT_PATH: 4, V2_INFER_PATH: 1, V2_VERSION_INFER_PATH: 1}
