"""Predict bulk scoring: the rows of JSONL, ``.npy`` and CSV files (pure), a batch over them against the example
XGBoost model through a real router on loopback (predictions equal the online API's, in row order; bad rows
named; request_counts in rows; chunks through the version's batcher), a router that dies holding a predict
batch (every row exactly once), and the ``llmserve batch`` commands against that router."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from llmserve.batches_settings import BatchesSettings
from llmserve.models.examples import build_examples, fraud_dataset
from llmserve.settings import RouterSettings
from router.batches import rows
from router.batches.files import FileStore
from router.batches.models import Batch, Line
from router.batches.runner import BatchRunner, LineAnswer
from router.store.sqlite import SQLiteStore
from tests.conftest import RunningRouter, free_port, run_router
from tests.test_batches import Clock, _poll
from tests.test_predict_api import deploy

XGB = "fraud-xgboost"
ENDPOINT = f"/api/v1/models/{XGB}/predict"
FAST = BatchesSettings(scan_interval_s=0.2, progress_interval_s=0.1, lease_s=5, max_concurrency=8,
                       predict_chunk_rows=16)


@pytest.fixture(scope="module")
def xgb_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("xgb-models")
    build_examples(models, rows=2000, names=(XGB,))
    return models


def features(n: int) -> np.ndarray:
    return fraud_dataset(2000).x_test[:n]


def jsonl_rows(x: np.ndarray) -> bytes:
    return b"".join(json.dumps({"features": row}).encode() + b"\n" for row in x.tolist())


def npy_of(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x)
    return buffer.getvalue()


# -- the rows of a file: pure --------------------------------------------------------------------------------

def test_rows_of_jsonl_npy_and_csv_are_numbered_from_one_and_bad_rows_are_named() -> None:
    content = b'{"features": [1, 2]}\n\n{oops\n[1, 2]\n{"features": [3, 4]}\n'
    read = rows.read_rows(content)
    assert read.count == 4 and sorted(read.bad) == [1, 2]
    assert read.bad[1]["code"] == "invalid_json_line" and read.bad[1]["message"].startswith("row 2: line 3")
    assert read.bad[2]["code"] == "invalid_row"
    lines = rows.chunks(read, 3)
    assert [line.custom_id for line in lines] == ["rows 1-3", "rows 4-4"]
    assert lines[0].body is not None and lines[0].body["rows"] == [1] and len(lines[0].body["bad"]) == 2
    assert sum(rows.rows_in(line) for line in lines) == 4

    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    assert rows.count_rows(npy_of(x)) == 6
    read = rows.read_rows(npy_of(x))
    assert read.count == 6 and read.array is not None and not read.bad
    assert [line.custom_id for line in rows.chunks(read, 4)] == ["rows 1-4", "rows 5-6"]
    with pytest.raises(rows.InputFileError):
        rows.read_rows(rows.NPY_MAGIC + b"\x00" * 40)

    read = rows.read_rows(b"a,b\n1,2\n3,x\n5\n7,8\n")
    assert read.count == 4 and sorted(read.bad) == [1, 2] and read.array is not None
    assert read.array[3].tolist() == [7.0, 8.0]
    assert rows.predict_model(ENDPOINT) == XGB and rows.predict_model("/v1/chat/completions") is None


def test_the_output_is_in_row_order_and_rows_never_run_are_named_for_a_cancelled_batch() -> None:
    from router.store.base import BatchLineRecord

    read = rows.read_rows(b"".join(b'{"f": %d}\n' % i for i in range(5)) + b"{bad\n")
    lines = rows.chunks(read, 2)  # rows 1-2, 3-4, 5-6 (6 is bad)
    done = [BatchLineRecord(2, "rows 3-4", 200, {"body": {
        "predictions": [[4, "v1", {"label": 1}], [3, "v1", {"label": 0}]], "errors": []}})]
    assert rows.counts(done[0]) == (2, 0)
    out, errors = rows.render(done, lines, "cancelled")
    assert [json.loads(o)["row"] for o in out.splitlines()] == [3, 4]
    named = [json.loads(e) for e in errors.splitlines()]
    assert [(e["row"], e["error"]["code"]) for e in named] == [
        (1, "batch_cancelled"), (2, "batch_cancelled"), (5, "batch_cancelled"), (6, "invalid_json_line")]


# -- a router that dies holding a predict batch ---------------------------------------------------------------

async def test_a_predict_batch_whose_router_died_is_resumed_with_every_row_exactly_once(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db")
    files = FileStore(tmp_path / "files")
    clock = Clock()
    upload = await files.save(jsonl_rows(np.ones((100, 2))) + b"{bad\n", "rows.jsonl", "batch", None)
    batch = Batch(endpoint=ENDPOINT, input_file_id=upload.id, completion_window="24h", created_at=clock.now,
                  expires_at=clock.now + 86400, chunk_rows=10)
    await store.add_batch(batch.to_record())
    scored: dict[int, int] = {}
    gate = asyncio.Event()

    async def fake(b: Batch, line: Line, request_id: str) -> LineAnswer:
        assert line.body is not None
        if b.runner == "a" and len(scored) >= 40:
            await gate.wait()  # router A hangs here until it "dies"
        for row in line.body["rows"]:
            scored[row] = scored.get(row, 0) + 1
        return LineAnswer(200, {"predictions": [[r, "v1", {"label": r % 2}] for r in line.body["rows"]],
                                "errors": line.body["bad"]})

    settings = BatchesSettings(scan_interval_s=0.05, progress_interval_s=0.05, lease_s=5, max_concurrency=2)
    a = BatchRunner(settings, store, files, fake, clock=clock, runner="a")
    await a.scan()

    async def some_recorded() -> bool:
        return len(await store.batch_lines(batch.id)) >= 3

    await _poll(some_recorded)

    async def no_release(batch_id: str) -> None:
        return None

    a._release = no_release  # type: ignore[method-assign]
    await a.close()
    clock.offset += 6
    b = BatchRunner(settings, store, files, fake, clock=clock, runner="b")
    await b.scan()

    async def finished() -> bool:
        record = await store.get_batch(batch.id)
        return record is not None and record.status == "completed"

    await _poll(finished)
    done = Batch.of(await store.get_batch(batch.id))  # type: ignore[arg-type]
    assert (done.total, done.completed, done.failed) == (101, 100, 1)
    assert done.output_file_id is not None and done.error_file_id is not None
    out = [json.loads(line) for line in (await files.content(done.output_file_id) or b"").splitlines()]
    assert [o["row"] for o in out] == list(range(1, 101))
    errors = [json.loads(line) for line in (await files.content(done.error_file_id) or b"").splitlines()]
    assert [(e["row"], e["error"]["code"]) for e in errors] == [(101, "invalid_json_line")]
    assert sorted(scored) == list(range(1, 101)) and set(scored.values()) == {1}  # no recorded chunk ran again
    await b.close()
    await store.close()


# -- through a real router ------------------------------------------------------------------------------------

@asynccontextmanager
async def predict_batch_router(tmp_path: Path, models: Path) -> AsyncIterator[tuple[RunningRouter, httpx.AsyncClient]]:
    """A router on loopback with a SQLite store, fast batch settings and the example XGBoost model deployed."""
    import shutil

    shutil.copytree(models / XGB, tmp_path / "models" / XGB)
    settings = RouterSettings(port=free_port(), retry_after_s=1, batches=FAST)
    async with run_router([], tmp_path, router_settings=settings, store=SQLiteStore(tmp_path / "db")) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        assert (await client.post("/api/v1/models", json={"model_name": XGB, "framework": "xgboost"})
                ).status_code == 201
        await deploy(client, XGB, "v1", 100)
        yield router, client


async def upload(client: httpx.AsyncClient, name: str, content: bytes) -> str:
    response = await client.post("/v1/files", files={"file": (name, content)}, data={"purpose": "batch"})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def settled(client: httpx.AsyncClient, batch_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = (await client.get(f"/v1/batches/{batch_id}")).json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return dict(batch)
        assert time.monotonic() < deadline, batch
        await asyncio.sleep(0.1)


async def lines_of(client: httpx.AsyncClient, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(line) for line in (await client.get(f"/v1/files/{file_id}/content")).text.splitlines()]


async def test_a_predict_batch_scores_jsonl_npy_and_csv_rows_in_order_and_names_bad_rows(
        tmp_path: Path, xgb_models: Path) -> None:
    x = features(50)
    async with predict_batch_router(tmp_path, xgb_models) as (router, client):
        online = (await client.post(ENDPOINT, json={"inputs": [{"features": r} for r in x.tolist()]})).json()
        expected = [p["probabilities"] for p in online["predictions"]]
        good = jsonl_rows(x).splitlines()
        bad = [b"{oops", json.dumps({"features": x[0].tolist()[:5]}).encode(),
               json.dumps({"features": [*x[0].tolist()[:29], "x"]}).encode()]
        content = b"\n".join(good[:10] + [bad[0]] + good[10:30] + [bad[1]] + good[30:] + [bad[2]]) + b"\n"
        csv = b"," .join(f"f{i}".encode() for i in range(30)) + b"\n" + b"".join(
            b",".join(str(v).encode() for v in row) + b"\n" for row in x.tolist()) + b"1,2,x\n"
        results = {}
        for name, data in (("rows.jsonl", content), ("rows.npy", npy_of(x)), ("rows.csv", csv)):
            created = await client.post("/v1/batches", json={"input_file_id": await upload(client, name, data),
                                                             "endpoint": ENDPOINT, "completion_window": "1h"})
            assert created.status_code == 200, created.text
            results[name] = await settled(client, created.json()["id"])
        batch = results["rows.jsonl"]
        assert batch["status"] == "completed"
        assert batch["request_counts"] == {"total": 53, "completed": 50, "failed": 3}
        out = await lines_of(client, batch["output_file_id"])
        bad_rows = {11, 32, 53}
        assert [o["row"] for o in out] == [r for r in range(1, 54) if r not in bad_rows]
        assert np.allclose([o["prediction"]["probabilities"] for o in out], expected, atol=1e-6)
        assert all(o["version"] == "v1" and "score" in o["prediction"] for o in out)
        errors = await lines_of(client, batch["error_file_id"])
        assert [(e["row"], e["error"]["code"]) for e in errors] == [
            (11, "invalid_json_line"), (32, "invalid_request"), (53, "invalid_request")]
        assert errors[1]["error"]["status_code"] == 400 and errors[1]["error"]["message"].startswith("row 32:")

        npy = results["rows.npy"]
        assert npy["status"] == "completed" and npy["request_counts"] == {"total": 50, "completed": 50, "failed": 0}
        assert npy["error_file_id"] is None
        out = await lines_of(client, npy["output_file_id"])
        assert np.allclose([o["prediction"]["probabilities"] for o in out], expected, atol=1e-6)

        table = results["rows.csv"]
        assert table["request_counts"] == {"total": 51, "completed": 50, "failed": 1}
        out = await lines_of(client, table["output_file_id"])
        assert np.allclose([o["prediction"]["probabilities"] for o in out], expected, atol=1e-5)
        assert [e["row"] for e in await lines_of(client, table["error_file_id"])] == [51]

        # the chunks queued on the version's batcher (in the batch band), as online requests do
        exposition = (await client.get("/metrics")).text
        predicted = [float(line.split()[-1]) for line in exposition.splitlines()
                     if line.startswith("llmserve_predict_rows_total{") and XGB in line]
        assert predicted and predicted[0] >= 4 * 50  # the online call's rows and each file's, through the batcher
        assert 'llmserve_batches_finished_total{status="completed"} 3.0' in exposition

        # refused up front: a model the router does not serve, a generative model's predict endpoint
        unknown = await client.post("/v1/batches", json={"input_file_id": await upload(client, "r.jsonl", content),
                                                         "endpoint": "/api/v1/models/nope/predict"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        broken = await client.post("/v1/batches", json={"input_file_id": await upload(client, "x.npy", b"\x93NUMPYxx"),
                                                        "endpoint": ENDPOINT})
        failed = await settled(client, broken.json()["id"])
        assert failed["status"] == "failed" and failed["errors"]["data"][0]["code"] == "invalid_npy"
