"""``llmserve batch``: the commands against a real router on loopback (auth on, the admin key found in the data
dir as ``llmserve up`` leaves it), scoring the example XGBoost model's rows: submit, wait (a progress bar),
status, list, download, cancel, and the errors a user sees."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from llmserve import batch_cli
from llmserve.cli import build_parser
from llmserve.settings import AuthSettings, RouterSettings
from router.store.sqlite import SQLiteStore
from tests.conftest import RunningRouter, free_port, run_router
from tests.test_auth import ADMIN
from tests.test_batch_predict import FAST, XGB, features, npy_of, xgb_models  # noqa: F401 (a fixture)
from tests.test_predict_api import deploy


@asynccontextmanager
async def cli_router(tmp_path: Path, models: Path) -> AsyncIterator[RunningRouter]:
    shutil.copytree(models / XGB, tmp_path / "models" / XGB)
    settings = RouterSettings(port=free_port(), retry_after_s=1, batches=FAST,
                              auth=AuthSettings(enabled=True, admin_key=SecretStr(ADMIN)))
    async with run_router([], tmp_path, router_settings=settings, store=SQLiteStore(tmp_path / "db")) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30, headers={"authorization": f"Bearer {ADMIN}"}) as client:
        assert (await client.post("/api/v1/models", json={"model_name": XGB, "framework": "xgboost"})
                ).status_code == 201
        await deploy(client, XGB, "v1", 100)
        yield router


async def llmserve_batch(data_dir: Path, url: str, *argv: str) -> tuple[int, str]:
    """``llmserve --data-dir D batch --url U ARGV...`` in a thread (the router answers on this loop)."""
    args = build_parser().parse_args(["--data-dir", str(data_dir), "batch", "--url", url, *argv])
    out = io.StringIO()
    code = await asyncio.to_thread(batch_cli.run, args, data_dir, out)
    return code, out.getvalue()


async def test_llmserve_batch_commands_submit_wait_download_list_and_cancel(
        tmp_path: Path, xgb_models: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capfd: pytest.CaptureFixture[str]) -> None:
    for variable in ("LLMSERVE_API_KEY", "LLMSERVE_ADMIN_KEY", "LLMSERVE_URL"):
        monkeypatch.delenv(variable, raising=False)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "admin-key").write_text(ADMIN + "\n")  # where `llmserve up` leaves the first admin key
    x = features(40)
    (tmp_path / "rows.npy").write_bytes(npy_of(x))
    async with cli_router(tmp_path, xgb_models) as router:
        code, out = await llmserve_batch(data_dir, router.url, "submit", str(tmp_path / "rows.npy"), "--model", XGB)
        assert code == 0, capfd.readouterr().err
        batch_id = out.strip()
        assert batch_id.startswith("batch_")

        code, out = await llmserve_batch(data_dir, router.url, "wait", batch_id, "--interval", "0.1")
        assert code == 0 and "40/40" in out and "completed" in out

        code, out = await llmserve_batch(data_dir, router.url, "status", batch_id)
        assert code == 0 and "completed" in out and "40 completed, 0 failed of 40" in out
        code, out = await llmserve_batch(data_dir, router.url, "status", batch_id, "--json")
        assert json.loads(out)["endpoint"] == f"/api/v1/models/{XGB}/predict"
        code, out = await llmserve_batch(data_dir, router.url, "list")
        assert code == 0 and batch_id in out

        target = tmp_path / "predictions.jsonl"
        code, out = await llmserve_batch(data_dir, router.url, "download", batch_id, "-o", str(target))
        assert code == 0 and str(target) in out
        rows = [json.loads(line) for line in target.read_text().splitlines()]
        assert [r["row"] for r in rows] == list(range(1, 41)) and all("label" in r["prediction"] for r in rows)
        code, _ = await llmserve_batch(data_dir, router.url, "download", batch_id, "--errors")
        assert code == 1 and "has no error file" in capfd.readouterr().err

        # a large batch cancelled at once: cancelling, then cancelled with what finished
        (tmp_path / "many.npy").write_bytes(npy_of(np.tile(x, (500, 1))))
        code, out = await llmserve_batch(data_dir, router.url, "submit", str(tmp_path / "many.npy"), "--model", XGB,
                                         "--window", "1h", "--metadata", "job=nightly")
        big = out.strip()
        code, out = await llmserve_batch(data_dir, router.url, "cancel", big)
        assert code == 0 and ("cancelling" in out or "cancelled" in out), out
        code, out = await llmserve_batch(data_dir, router.url, "wait", big, "--interval", "0.1")
        assert code == 1 and "cancelled" in out  # not completed: the command says so in its exit code
        code, out = await llmserve_batch(data_dir, router.url, "download", big, "--errors")
        assert code == 0 and "batch_cancelled" in out

        # what a user gets wrong, in words
        code, _ = await llmserve_batch(data_dir, router.url, "--key", "sk-wrong", "status", batch_id)
        assert code == 1 and "401" in capfd.readouterr().err
        code, _ = await llmserve_batch(data_dir, router.url, "status", "batch_nope")
        assert code == 1 and "404" in capfd.readouterr().err
        code, _ = await llmserve_batch(data_dir, router.url, "submit", str(tmp_path / "rows.npy"), "--model", XGB,
                                       "--endpoint", "/v1/chat/completions")
        assert code == 1 and "--model is for predict batches" in capfd.readouterr().err
        code, _ = await llmserve_batch(data_dir, "http://127.0.0.1:9", "list")
        assert code == 1 and "cannot reach the router" in capfd.readouterr().err
