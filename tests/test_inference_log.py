"""Batched inference-log writing and retention."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from router.observe.inference_log import InferenceLogWriter
from router.store import InferenceLog
from router.store.sqlite import SQLiteStore

NOW = time.mktime((2026, 11, 29, 12, 0, 0, 0, 0, 0)) - time.timezone


def row(i: int, timestamp: float = NOW) -> InferenceLog:
    return InferenceLog(f"r{i}", "chat", "v1", "chat:v1/0", i % 10, 12.5, 100.0, 8, 200, timestamp)


async def test_rows_are_written_in_batches_off_the_request_path(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db")
    writer = InferenceLogWriter(store, max_batch=100, flush_interval_s=0.05, clock=lambda: NOW)
    writer.start()
    started = time.perf_counter()
    for i in range(250):
        writer.submit(row(i))
    submit_s = time.perf_counter() - started
    assert submit_s < 0.05  # submit never waits for the disk
    deadline = time.monotonic() + 5
    while writer.written < 250 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await writer.close()
    rows = await store.inference_logs("20261129")
    assert [r.request_id for r in rows] == [f"r{i}" for i in range(250)]
    await store.close()


async def test_a_full_buffer_drops_the_oldest_rows_and_counts_them(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db")
    writer = InferenceLogWriter(store, max_buffer=10, clock=lambda: NOW)
    for i in range(15):
        writer.submit(row(i))
    assert writer.dropped == 5
    await writer.flush()
    assert [r.request_id for r in await store.inference_logs("20261129")] == [f"r{i}" for i in range(5, 15)]
    await store.close()


async def test_retention_drops_old_day_partitions(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db")
    await store.write_inference_logs([row(1, NOW - 40 * 86400), row(2, NOW - 2 * 86400), row(3)])
    writer = InferenceLogWriter(store, retention_days=30, flush_interval_s=0.01, clock=lambda: NOW)
    writer.start()
    await asyncio.sleep(0.1)
    await writer.close()
    old_day = time.strftime("%Y%m%d", time.gmtime(NOW - 40 * 86400))
    recent_day = time.strftime("%Y%m%d", time.gmtime(NOW - 2 * 86400))
    assert await store.inference_logs(old_day) == []
    assert len(await store.inference_logs(recent_day)) == 1
    await store.close()


class FlakyStore(SQLiteStore):
    """A store whose next ``failures`` writes fail, as a locked or unreachable database does."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    async def write_inference_logs(self, logs: list[InferenceLog]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise OSError("database is locked")
        await super().write_inference_logs(logs)


async def test_a_failed_write_keeps_its_batch_for_the_next_try_in_order(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "db", failures=1)
    writer = InferenceLogWriter(store, max_batch=4, clock=lambda: NOW)
    for i in range(10):
        writer.submit(row(i))
    try:
        await writer.flush()
    except OSError:
        pass
    else:
        raise AssertionError("the first write was meant to fail")
    assert writer.written == 0 and writer.dropped == 0
    await writer.flush()
    assert [r.request_id for r in await store.inference_logs("20261129")] == [f"r{i}" for i in range(10)]
    assert writer.written == 10
    await store.close()


async def test_the_writer_loop_survives_a_failed_write_and_writes_the_rows_later(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "db", failures=2)
    writer = InferenceLogWriter(store, max_batch=100, flush_interval_s=0.02, clock=lambda: NOW)
    writer.start()
    for i in range(5):
        writer.submit(row(i))
    deadline = time.monotonic() + 5
    while writer.written < 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await writer.close()
    assert [r.request_id for r in await store.inference_logs("20261129")] == [f"r{i}" for i in range(5)]
    await store.close()
