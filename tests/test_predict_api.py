"""The predict APIs through the real router: design JSON, .npy, Open Inference Protocol v2, bad input,
and traditional models on the control plane (deploy, split, pin, canary, rollback)."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np

from llmserve.models.examples import EXAMPLES, fraud_dataset
from router.store.sqlite import SQLiteStore
from tests.conftest import RunningRouter, run_router

XGB = "fraud-xgboost"


@asynccontextmanager
async def predict_router(tmp_path: Path, models: Path, names: tuple[str, ...] = (XGB,),
                         batching: dict | None = None) -> AsyncIterator[tuple[RunningRouter, httpx.AsyncClient]]:
    repo = tmp_path / "models"
    for name in names:
        shutil.copytree(models / name, repo / name)
    async with run_router([], tmp_path, store=SQLiteStore(tmp_path / "db")) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        for name in names:
            framework = json.loads((repo / name / "v1" / "manifest.json").read_text())["framework"]
            assert (await client.post("/api/v1/models", json={"model_name": name, "framework": framework})
                    ).status_code == 201
            await deploy(client, name, "v1", 100, batching=batching)
        yield router, client


async def deploy(client: httpx.AsyncClient, name: str, version: str, percent: int, expect: str = "active",
                 **extra: object) -> dict:
    body = {"model_name": name, "version": version, "traffic_percent": percent,
            **{k: v for k, v in extra.items() if v is not None}}
    created = await client.post("/api/v1/deployments", json=body)
    assert created.status_code == 202, created.text
    deadline = time.monotonic() + 30
    while True:
        state = (await client.get(f"/api/v1/deployments/{name}")).json()
        match = [v for v in state["versions"] if v["version"] == version and v["status"] == expect]
        if match and (expect != "active" or percent == 0 or version in state["split"]):
            return match[0]
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.02)


def features(n: int = 3) -> list[list[float]]:
    return fraud_dataset(4000).x_test[:n].tolist()


async def test_the_design_predict_call_answers_one_prediction_per_input(tmp_path: Path, example_models: Path
                                                                         ) -> None:
    async with predict_router(tmp_path, example_models, EXAMPLES) as (_, client):
        for name in EXAMPLES:
            rows = features(3)
            response = await client.post(f"/api/v1/models/{name}/predict",
                                         json={"inputs": [{"features": r} for r in rows]})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model_name"] == name and body["version"] == "v1"
            assert response.headers["x-model-version"] == "v1" and response.headers["x-request-id"]
            assert len(body["predictions"]) == 3
            for p in body["predictions"]:
                assert p["label"] in (0, 1) and abs(sum(p["probabilities"]) - 1) < 1e-4
                assert p["score"] == p["probabilities"][1]
        # /v1/models lists generative models only; /readyz counts the loaded predictors
        assert (await client.get("/v1/models")).json()["data"] == []
        assert (await client.get("/readyz")).json()["ready_replicas"] == {name: 1 for name in EXAMPLES}


async def test_npy_bodies_and_oip_v2_json_and_binary_give_the_same_answers(tmp_path: Path, example_models: Path
                                                                           ) -> None:
    x = np.asarray(features(50), dtype=np.float32)
    async with predict_router(tmp_path, example_models) as (_, client):
        as_json = (await client.post(f"/api/v1/models/{XGB}/predict",
                                     json={"inputs": [{"features": r} for r in x.tolist()]})).json()
        expected = np.asarray([p["probabilities"] for p in as_json["predictions"]], dtype=np.float32)

        buffer = io.BytesIO()
        np.save(buffer, x)
        npy = await client.post(f"/api/v1/models/{XGB}/predict", content=buffer.getvalue(),
                                headers={"content-type": "application/x-npy"})
        assert npy.status_code == 200, npy.text
        assert np.allclose(npy.json()["outputs"]["probabilities"], expected)

        assert (await client.get("/v2/health/live")).json() == {"live": True}
        assert (await client.get("/v2/health/ready")).status_code == 200
        meta = (await client.get(f"/v2/models/{XGB}")).json()
        assert meta["platform"] == "xgboost" and meta["versions"] == ["v1"]
        assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}]
        assert (await client.get(f"/v2/models/{XGB}/versions/v1/ready")).json()["ready"] is True

        v2 = await client.post(f"/v2/models/{XGB}/infer", json={
            "id": "req-1", "inputs": [{"name": "features", "shape": [50, 30], "datatype": "FP32",
                                       "data": x.reshape(-1).tolist()}]})
        assert v2.status_code == 200, v2.text
        body = v2.json()
        assert body["id"] == "req-1" and body["model_version"] == "v1"
        outputs = {o["name"]: o for o in body["outputs"]}
        assert outputs["probabilities"]["shape"] == [50, 2] and outputs["label"]["datatype"] == "INT64"
        assert np.allclose(np.asarray(outputs["probabilities"]["data"]).reshape(50, 2), expected)

        # binary tensor extension, as tritonclient sends it: JSON header, then raw little-endian bytes
        header = json.dumps({"inputs": [{"name": "features", "shape": [50, 30], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
        binary = await client.post(f"/v2/models/{XGB}/versions/v1/infer", content=header + x.tobytes(), headers={
            "inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"})
        assert binary.status_code == 200, binary.text
        length = int(binary.headers["inference-header-content-length"])
        out_header = json.loads(binary.content[:length])
        assert out_header["outputs"][0]["parameters"]["binary_data_size"] == 50 * 2 * 4
        probabilities = np.frombuffer(binary.content[length:], dtype="<f4").reshape(50, 2)
        assert np.allclose(probabilities, expected)


async def test_bad_predict_input_gets_a_clear_4xx(tmp_path: Path, example_models: Path) -> None:
    row = features(1)[0]
    async with predict_router(tmp_path, example_models) as (router, client):
        async def predict(body: object, name: str = XGB, **kwargs: object) -> httpx.Response:
            return await client.post(f"/api/v1/models/{name}/predict", json=body, **kwargs)

        cases = [
            (await predict({"inputs": [{"features": row}]}, name="nope"), 404, "does not exist"),
            (await predict({"inputs": [{"features": row}], "params": {"version": "v9"}}), 404, "v9"),
            (await predict({"rows": []}), 400, '"inputs"'),
            (await predict({"inputs": []}), 400, "non-empty"),
            (await predict({"inputs": [{"features": row[:29]}]}), 400, "[-1, 30]"),
            (await predict({"inputs": [{"features": row}, {"features": row[:5]}]}), 400, "ragged"),
            (await predict({"inputs": [{"features": [*row[:29], "x"]}]}), 400, "numbers only"),
            (await predict({"inputs": [{"features": [*row[:29], True]}]}), 400, "numbers only"),
            (await predict({"inputs": [{"features": row, "extra": 1}]}), 400, "unknown fields"),
            (await predict({"inputs": [{"features": row}]}, headers={"x-priority": "urgent"}), 400, "X-Priority"),
            (await predict({"inputs": [{"features": row}]}, headers={"x-deadline-ms": "soon"}), 400, "deadline"),
        ]
        nan = await client.post(f"/api/v1/models/{XGB}/predict", content=json.dumps(
            {"inputs": [{"features": [*row[:29], float("nan")]}]}), headers={"content-type": "application/json"})
        cases.append((nan, 400, "NaN or infinity"))
        v2_dtype = await client.post(f"/v2/models/{XGB}/infer", json={"inputs": [
            {"name": "features", "shape": [1, 30], "datatype": "FP64", "data": row}]})
        cases.append((v2_dtype, 400, "FP32"))
        v2_count = await client.post(f"/v2/models/{XGB}/infer", json={"inputs": [
            {"name": "features", "shape": [2, 30], "datatype": "FP32", "data": row}]})
        cases.append((v2_count, 400, "needs 60"))
        v2_missing = await client.post("/v2/models/nope/infer", json={"inputs": []})
        cases.append((v2_missing, 404, "nope"))
        many = np.zeros((70_000, 30), dtype=np.float32)
        buffer = io.BytesIO()
        np.save(buffer, many)
        oversize = await client.post(f"/api/v1/models/{XGB}/predict", content=buffer.getvalue(),
                                     headers={"content-type": "application/x-npy"})
        cases.append((oversize, 413, "70000 rows"))
        pickled = await client.post(f"/api/v1/models/{XGB}/predict", content=b"\x93NUMPY" + b"\x00" * 50,
                                    headers={"content-type": "application/x-npy"})
        cases.append((pickled, 400, ".npy"))
        for response, status, words in cases:
            assert response.status_code == status, (response.status_code, response.text)
            body = response.json()
            message = body["error"] if isinstance(body["error"], str) else body["error"]["message"]
            assert words in message, (words, message)
        # v2 errors are {"error": "..."} (also for a route that does not exist); the design API's are
        # OpenAI-shaped with the field named
        assert isinstance(v2_dtype.json()["error"], str)
        no_route = await client.get(f"/v2/models/{XGB}/config")
        assert no_route.status_code == 404 and isinstance(no_route.json()["error"], str)
        shape_error = cases[4][0].json()["error"]
        assert shape_error["param"] == "features"
        # a generative model on the predict API is the caller's mistake, and the other way round
        chat = await client.post("/v1/chat/completions", json={"model": XGB, "messages": [
            {"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "predict" in chat.json()["error"]["message"]
        # nothing was lost: the model still answers
        assert (await predict({"inputs": [{"features": row}]})).status_code == 200


async def test_a_pickled_or_corrupt_model_fails_its_deployment_with_the_reason(tmp_path: Path,
                                                                                example_models: Path) -> None:
    async with predict_router(tmp_path, example_models) as (router, client):
        repo = tmp_path / "models" / XGB
        for version, file, content in (("v2", "model.pkl", b"\x80\x04K\x01."), ("v3", "model.ubj", b"\x00bad")):
            shutil.copytree(repo / "v1", repo / version)
            manifest = json.loads((repo / version / "manifest.json").read_text())
            (repo / version / "model.ubj").unlink()
            (repo / version / file).write_bytes(content)
            (repo / version / "manifest.json").write_text(json.dumps({**manifest, "file": file}))
        failed = await deploy(client, XGB, "v2", 50, expect="failed")
        assert "never unpickles" in failed["reason"] and "save_model" in failed["reason"]
        corrupt = await deploy(client, XGB, "v3", 50, expect="failed")
        assert "not a loadable XGBoost model" in corrupt["reason"]
        missing = await deploy(client, XGB, "v4", 50, expect="failed")
        assert "manifest.json" in missing["reason"]
        state = (await client.get(f"/api/v1/deployments/{XGB}")).json()
        assert state["split"] == {"v1": 100}
        rolling = await client.post("/api/v1/deployments", json={
            "model_name": XGB, "version": "v5", "strategy": {"type": "rolling"}})
        assert rolling.status_code == 400 and rolling.json()["error"]["param"] == "strategy.type"


async def test_versions_of_a_traditional_model_split_pin_and_roll_back(tmp_path: Path, example_models: Path) -> None:
    async with predict_router(tmp_path, example_models) as (router, client):
        repo = tmp_path / "models" / XGB
        shutil.copytree(repo / "v1", repo / "v2")
        await deploy(client, XGB, "v2", 50, batching={"max_batch_size": 8, "max_wait_ms": 1})
        row = features(1)[0]

        async def version_for(user: str) -> str:
            response = await client.post(f"/api/v1/models/{XGB}/predict", json={"inputs": [{"features": row}]},
                                         headers={"x-user-id": user})
            assert response.status_code == 200
            return response.json()["version"]

        versions = [await version_for(f"user-{i}") for i in range(100)]
        assert 30 <= versions.count("v2") <= 70
        assert [await version_for(f"user-{i}") for i in range(20)] == versions[:20]  # sticky
        pinned = await client.post(f"/v2/models/{XGB}/versions/v1/infer", json={"inputs": [
            {"name": "features", "shape": [1, 30], "datatype": "FP32", "data": row}]})
        assert pinned.json()["model_version"] == "v1"

        stop = asyncio.Event()
        statuses: list[int] = []

        async def load() -> None:
            while not stop.is_set():
                statuses.append((await client.post(f"/api/v1/models/{XGB}/predict",
                                                   json={"inputs": [{"features": row}]})).status_code)

        users = [asyncio.create_task(load()) for _ in range(4)]
        await asyncio.sleep(0.2)
        back = await client.post(f"/api/v1/deployments/{XGB}/rollback", json={})
        assert back.status_code == 200 and back.json()["to"] == "v1"
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*users)
        assert statuses and set(statuses) == {200}
        assert {await version_for(f"user-{i}") for i in range(20)} == {"v1"}
        metrics = (await client.get("/metrics")).text
        assert f'llmserve_predict_rows_total{{model="{XGB}",version="v1"}}' in metrics
        assert "llmserve_predict_batch_rows_bucket" in metrics


def test_the_predict_benchmark_runs_on_a_tiny_configuration(tmp_path: Path, example_models: Path) -> None:
    from loadtest.predict_bench import main

    for name in ("fraud-xgboost", "fraud-onnx"):
        shutil.copytree(example_models / name, tmp_path / name)
    output = tmp_path / "report.json"
    assert main(["--quick", "--models-dir", str(tmp_path), "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    for name, figures in report["batched_1000_rows"].items():
        assert figures["errors"] == 0 and figures["rows_per_s"] > 0, name
    for name, figures in report["single_row"].items():
        assert figures["batching_on"]["errors"] == 0 and figures["batching_off"]["errors"] == 0, name
        assert figures["throughput_ratio"] > 0


async def test_a_predict_canary_is_judged_on_latency_and_promoted(tmp_path: Path, example_models: Path) -> None:
    async with predict_router(tmp_path, example_models) as (router, client):
        repo = tmp_path / "models" / XGB
        shutil.copytree(repo / "v1", repo / "v2")
        row = features(1)[0]
        stop = asyncio.Event()
        statuses: list[int] = []

        async def load(index: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                response = await client.post(f"/api/v1/models/{XGB}/predict", json={"inputs": [{"features": row}]},
                                             headers={"x-user-id": f"user-{index}-{n}"})
                statuses.append(response.status_code)

        users = [asyncio.create_task(load(i)) for i in range(4)]
        created = await client.post("/api/v1/deployments", json={
            "model_name": XGB, "version": "v2",
            "strategy": {"type": "canary", "steps": [25, 100], "bake_s": 0.2, "min_samples": 30,
                         "ttft_tolerance": 0.5}})
        assert created.status_code == 202
        deadline = time.monotonic() + 60
        canary: dict = {}
        while time.monotonic() < deadline:
            got = await client.get(f"/api/v1/deployments/{XGB}/canary")
            if got.status_code == 200 and got.json()["status"] != "running":
                canary = got.json()
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*users)
        assert canary.get("status") == "promoted", canary
        decision = canary["decisions"][0]
        assert decision["decision"] == "promote" and decision["canary_samples"] >= 30
        assert (await client.get(f"/api/v1/deployments/{XGB}")).json()["split"] == {"v2": 100}
        assert set(statuses) == {200}
