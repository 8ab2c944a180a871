"""Distillation: refusals before any work, the layer choice, and a tiny real run that resumes."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from fallback.distill import DistillConfig, DistillError, check, kept_layers, run
from llmserve.cli import main
from llmserve.models.repository import Manifest, ModelRepository
from llmserve.settings import Settings


@pytest.fixture(scope="session")
def teacher() -> Path:
    """The bundled model, prepared in the shared repository (converted once per machine)."""
    settings = Settings()
    return ModelRepository(settings.model_repository).prepare(settings.model.name, "v1").folder


def config(tmp_path: Path, teacher: Path, **overrides: object) -> DistillConfig:
    base = DistillConfig(teacher_dir=teacher, output_dir=tmp_path / "models" / "student" / "v1",
                         work_dir=tmp_path / "work", name="student", version="v1", layers=4, steps=2,
                         batch_size=2, max_new_tokens=8, prompts=6, checkpoint_every=1, holdout_fraction=0.34,
                         samples_per_prompt=2)
    return replace(base, **overrides)


def test_kept_layers_keep_the_ends_or_are_evenly_spaced() -> None:
    assert kept_layers(30, 6) == [0, 1, 2, 27, 28, 29]
    assert kept_layers(30, 5) == [0, 1, 27, 28, 29]
    assert kept_layers(30, 6, "even") == [0, 6, 12, 17, 23, 29]
    assert kept_layers(30, 2, "even") == [0, 29] == kept_layers(30, 2)
    assert kept_layers(4, 10) == [0, 1, 2, 3] == kept_layers(4, 10, "even")


def test_bad_distillations_are_refused_in_one_line_before_any_work(tmp_path: Path, capsys) -> None:
    missing = DistillConfig(teacher_dir=tmp_path / "nope", output_dir=tmp_path / "out" / "v1",
                            work_dir=tmp_path / "w", name="s", version="v1")
    with pytest.raises(DistillError, match="not a prepared Hugging Face model folder"):
        check(missing)
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    (teacher_dir / "config.json").write_text("{}")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DistillError, match="not a writable folder"):
        check(replace(missing, teacher_dir=teacher_dir, output_dir=blocker / "student" / "v1"))
    (tmp_path / "exists" / "v1").mkdir(parents=True)
    with pytest.raises(DistillError, match="samples per prompt"):
        check(replace(missing, teacher_dir=teacher_dir, samples_per_prompt=-1))
    with pytest.raises(DistillError, match="already exists"):
        check(replace(missing, teacher_dir=teacher_dir, output_dir=tmp_path / "exists" / "v1"))
    code = main(["--data-dir", str(tmp_path / "data"), "distill", "--teacher", str(tmp_path / "nope"), "--tiny"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a prepared Hugging Face model folder" in err[0]
    assert not (tmp_path / "data" / "distill").exists()  # nothing was started


def test_a_tiny_distillation_writes_a_servable_version_and_resumes(tmp_path: Path, teacher: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    first = config(tmp_path, teacher)
    report = run(first)
    folder = first.output_dir
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    manifest = Manifest.read(folder)
    assert manifest.extra["distillation"]["layers_kept"] == [0, 1, 28, 29]
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 4
    assert report["held_out"]["teacher"]["next_token_agreement"] == 1.0
    student = report["held_out"]["student"]
    assert 0 <= student["next_token_agreement"] <= 1 and student["perplexity"] > 0
    assert len(report["answers"]) == 3 and all(a["teacher"] for a in report["answers"])
    assert (first.work_dir / "checkpoint.pt").exists()
    # Each training prompt gives the greedy answer and the sampled ones; held-out prompts give none.
    assert report["data"]["train_examples"] == 4 * (1 + first.samples_per_prompt)
    sampled = [json.loads(line) for line in (first.work_dir / "teacher_samples.jsonl").read_text().splitlines()]
    assert len(sampled) == 4 and all(len(row["answers"]) == first.samples_per_prompt for row in sampled)
    # A longer run with the same training inputs picks up at step 2 instead of starting over.
    caplog.set_level(logging.INFO, logger="fallback.distill")
    longer = replace(first, steps=3, version="v2", output_dir=tmp_path / "models" / "student" / "v2")
    again = run(longer)
    assert "resuming from step 2 of 3" in caplog.text
    assert [row[0] for row in again["training"]["last_losses"]] == [1, 2, 3]
