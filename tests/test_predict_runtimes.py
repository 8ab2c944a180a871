"""Runtimes and the dynamic batcher, on real example models built by the tests."""

from __future__ import annotations

import asyncio
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from llmserve.models.examples import EXAMPLES, fraud_dataset
from llmserve.models.predict_manifest import ManifestError, PredictManifest
from router.predict.batcher import BatchingConfig, DynamicBatcher, Overloaded
from router.predict.runtimes import load_runtime


def test_every_example_model_loads_and_agrees_with_its_training_figures(example_models: Path) -> None:
    data = fraud_dataset(4000)
    x = data.x_test[:200]
    outputs = {}
    for name in EXAMPLES:
        folder = example_models / name / "v1"
        manifest = PredictManifest.read(folder)
        assert manifest.framework in ("xgboost", "sklearn", "onnx", "pytorch")
        out = load_runtime(folder, manifest).predict({"features": x})
        assert out["probabilities"].shape == (200, 2) and out["label"].shape == (200,)
        assert np.allclose(out["probabilities"].sum(axis=1), 1, atol=1e-4)
        assert (out["label"] == out["probabilities"].argmax(axis=1)).all()
        accuracy = float((out["label"] == data.y_test[:200]).mean())
        assert accuracy > 0.9, (name, accuracy)
        outputs[name] = out
    # the same network, exported two ways, answers the same
    assert np.allclose(outputs["fraud-onnx"]["probabilities"], outputs["fraud-pytorch"]["probabilities"], atol=1e-4)


def test_pickles_are_refused_with_how_to_convert(example_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    manifest = PredictManifest.read(example_models / "fraud-sklearn" / "v1")
    for file, content in (("model.pkl", b"anything"), ("model.onnx", pickle.dumps({"a": 1}))):
        (folder / file).write_bytes(content)
        bad = PredictManifest(**{**manifest.__dict__, "file": file})
        with pytest.raises(ManifestError) as refused:
            load_runtime(folder, bad)
        assert "never unpickles" in str(refused.value) and "skl2onnx" in str(refused.value)


@pytest.mark.parametrize("name", ["fraud-xgboost", "fraud-onnx", "fraud-pytorch"])
def test_a_corrupt_model_file_is_a_clear_error(example_models: Path, tmp_path: Path, name: str) -> None:
    manifest = PredictManifest.read(example_models / name / "v1")
    (tmp_path / manifest.file).write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ManifestError) as failed:
        load_runtime(tmp_path, manifest)
    assert manifest.file in str(failed.value)


class CountingRuntime:
    """A test double: records batch sizes; fixed plus per-row cost, like a real model."""

    def __init__(self, fixed_s: float = 0.002, per_row_s: float = 0.00001) -> None:
        self.batches: list[int] = []
        self.fixed_s, self.per_row_s = fixed_s, per_row_s

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["features"]
        self.batches.append(len(x))
        time.sleep(self.fixed_s + self.per_row_s * len(x))
        return {"score": x[:, 0] * 2}


def rows(n: int, start: float = 0) -> dict[str, np.ndarray]:
    return {"features": (np.arange(n, dtype=np.float32)[:, None] + start).repeat(3, axis=1)}


async def test_concurrent_requests_are_batched_and_each_gets_its_own_rows() -> None:
    runtime = CountingRuntime()
    batcher = DynamicBatcher(runtime, BatchingConfig(max_batch_size=64, max_wait_ms=5))
    results = await asyncio.gather(*(batcher.submit(rows(1, start=i)) for i in range(200)))
    assert [float(r["score"][0]) for r in results] == [2.0 * i for i in range(200)]
    assert sum(runtime.batches) == 200 and max(runtime.batches) <= 64
    assert len(runtime.batches) < 40  # 200 requests in far fewer model calls
    await batcher.close()


async def test_batching_off_runs_every_request_alone() -> None:
    runtime = CountingRuntime(fixed_s=0.0005)
    batcher = DynamicBatcher(runtime, BatchingConfig(enabled=False))
    await asyncio.gather(*(batcher.submit(rows(2)) for _ in range(20)))
    assert runtime.batches == [2] * 20
    await batcher.close()


async def test_a_lone_request_at_low_load_is_not_held_for_the_window() -> None:
    runtime = CountingRuntime(fixed_s=0.0)
    batcher = DynamicBatcher(runtime, BatchingConfig(max_wait_ms=200))
    waits = []
    for _ in range(5):
        started = time.perf_counter()
        await batcher.submit(rows(1))
        waits.append(time.perf_counter() - started)
        await asyncio.sleep(0.05)
    assert max(waits) < 0.1  # not the 200 ms window
    fixed = DynamicBatcher(CountingRuntime(fixed_s=0.0), BatchingConfig(max_wait_ms=200, adaptive=False))
    started = time.perf_counter()
    await fixed.submit(rows(1))
    assert time.perf_counter() - started >= 0.19  # the non-adaptive batcher does wait
    await batcher.close()
    await fixed.close()


async def test_an_oversize_request_is_split_and_answered_in_order() -> None:
    runtime = CountingRuntime(fixed_s=0.0)
    batcher = DynamicBatcher(runtime, BatchingConfig(max_batch_size=10))
    result = await batcher.submit(rows(25))
    assert result["score"].tolist() == [2.0 * i for i in range(25)]
    assert sorted(runtime.batches) == [5, 10, 10]
    await batcher.close()


async def test_a_full_queue_is_refused_at_once_with_retry_after() -> None:
    runtime = CountingRuntime(fixed_s=0.05)
    batcher = DynamicBatcher(runtime, BatchingConfig(max_batch_size=8, max_queue_rows=16))
    first = [asyncio.create_task(batcher.submit(rows(8)))]
    await asyncio.sleep(0.01)  # that batch runs
    first += [asyncio.create_task(batcher.submit(rows(8))) for _ in range(2)]
    await asyncio.sleep(0.001)  # two wait: 16 rows queued
    started = time.perf_counter()
    with pytest.raises(Overloaded) as refused:
        await batcher.submit(rows(8))
    assert time.perf_counter() - started < 0.01
    assert refused.value.status == 429 and refused.value.retry_after_s >= 1
    await asyncio.gather(*first)
    await batcher.close()


async def test_a_deadline_the_queue_cannot_meet_is_a_503_before_waiting() -> None:
    runtime = CountingRuntime(fixed_s=0.05)
    batcher = DynamicBatcher(runtime, BatchingConfig(max_batch_size=4))
    await asyncio.gather(*(batcher.submit(rows(4)) for _ in range(3)))  # learn the drain rate
    backlog = [asyncio.create_task(batcher.submit(rows(4))) for _ in range(6)]
    await asyncio.sleep(0.005)
    with pytest.raises(Overloaded) as refused:
        await batcher.submit(rows(1), deadline_ms=20)
    assert refused.value.status == 503 and "deadline" in refused.value.reason
    await asyncio.gather(*backlog)
    await batcher.close()


async def test_critical_rows_go_before_batch_rows() -> None:
    runtime = CountingRuntime(fixed_s=0.02)
    batcher = DynamicBatcher(runtime, BatchingConfig(max_batch_size=1))
    order: list[str] = []

    async def ask(priority: str) -> None:
        await batcher.submit(rows(1), priority=priority)
        order.append(priority)

    blocker = asyncio.create_task(ask("standard"))
    await asyncio.sleep(0.005)
    tasks = [asyncio.create_task(ask(p)) for p in ("batch", "batch", "critical")]
    await asyncio.gather(blocker, *tasks)
    assert order.index("critical") < order.index("batch")
    await batcher.close()


def test_the_distilled_tree_mimics_the_boosted_model_and_is_cheaper(example_models: Path) -> None:
    folder = example_models / "fraud-xgboost-lite" / "v1"
    manifest = PredictManifest.read(folder)
    report = manifest.extra["report"]
    assert manifest.framework == "sklearn" and report["teacher"].endswith("fraud-xgboost/v1")
    assert report["agreement"] > 0.9
    assert report["us_per_row_batch_1"]["student"] < report["us_per_row_batch_1"]["teacher"]
    data = fraud_dataset(4000)
    teacher = load_runtime(example_models / "fraud-xgboost" / "v1",
                           PredictManifest.read(example_models / "fraud-xgboost" / "v1"))
    student = load_runtime(folder, manifest)
    agree = (teacher.predict({"features": data.x_test})["label"] == student.predict({"features": data.x_test})["label"])
    assert abs(float(agree.mean()) - report["agreement"]) < 0.05
