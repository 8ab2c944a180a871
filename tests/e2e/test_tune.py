"""`llmserve tune` on this machine, in its tiny configuration: real engines, a report, a manifest record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmserve.replicas.hardware import Hardware
from llmserve.replicas.spec import EngineSpec
from llmserve.settings import EngineSettings, Settings
from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.engine


def test_tune_measures_candidates_and_the_winner_drives_the_next_spec(tmp_path: Path) -> None:
    source = Settings().model_repository / MODEL / "v1"
    models = tmp_path / "models"
    base = [sys.executable, "-m", "llmserve.cli", "--data-dir", str(tmp_path), "--models-dir", str(models)]
    subprocess.run([*base, "prepare", "--source", str(source), "--no-warm"], check=True, capture_output=True,
                   timeout=300)
    out = tmp_path / "report"
    done = subprocess.run([*base, "tune", "--tiny", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "| settings |" in done.stdout and "(winner)" in done.stdout
    result = json.loads((out / "result.json").read_text())
    assert [r["candidate"] for r in result["candidates"]][0] == "fp32, eager, 1 core"
    for row in result["candidates"]:
        assert row["start_s"] > 0 and all(lv["failed"] == 0 for lv in row["levels"].values())
        assert all(lv["output_tokens_per_s"] > 0 for lv in row["levels"].values())
    folder = models / MODEL / "v1"
    tuning = json.loads((folder / "manifest.json").read_text())["extra"]["engine_tuning"]
    assert tuning["fingerprint"] == Hardware.detect().fingerprint() and tuning["settings"]["enforce_eager"] is True
    spec = EngineSpec.from_settings(folder, MODEL, "v1", EngineSettings())
    assert spec.choices["enforce_eager"]["source"] == "tuned" and spec.enforce_eager


def test_tune_names_a_version_that_is_not_prepared(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "llmserve.cli", "--models-dir", str(tmp_path), "tune", "--tiny",
                           "--version", "v9"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "v9" in done.stderr and "not a prepared model version" in done.stderr
