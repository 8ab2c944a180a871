"""Model repository: preparation, idempotency, checksums and clear errors for bad sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from llmserve import cli
from llmserve.errors import PrepareError
from llmserve.models.repository import ModelRepository, bundled_gguf


def make_hf_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32", "max_position_embeddings": 128}
    ))
    (folder / "tokenizer_config.json").write_text("{}")
    save_file({"w": np.ones((4, 8), dtype=np.float32), "b": np.zeros(8, dtype=np.float32)},
              str(folder / "model.safetensors"))
    return folder


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def test_prepare_from_a_hf_folder_writes_a_manifest(tmp_path: Path) -> None:
    source = make_hf_folder(tmp_path / "src")
    repo = ModelRepository(tmp_path / "models")
    result = repo.prepare("tiny", "v1", source=source)
    assert result.created
    assert result.folder == tmp_path / "models" / "tiny" / "v1"
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["parameter_count"] == 40
    assert manifest["dtype"] == "float32"
    assert manifest["architecture"] == "LlamaForCausalLM"
    assert set(manifest["weights_sha256"]) == {"model.safetensors"}
    assert len(manifest["source_sha256"]) == 64 and manifest["created_at"]
    assert repo.list_versions("tiny") == ["v1"]


def test_second_prepare_verifies_and_does_nothing(tmp_path: Path) -> None:
    source = make_hf_folder(tmp_path / "src")
    repo = ModelRepository(tmp_path / "models")
    first = repo.prepare("tiny", "v1", source=source)
    mtime = (first.folder / "model.safetensors").stat().st_mtime_ns
    second = repo.prepare("tiny", "v1", source=source)
    assert not second.created
    assert second.manifest == first.manifest
    assert (first.folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_corrupted_weights_are_detected(tmp_path: Path) -> None:
    source = make_hf_folder(tmp_path / "src")
    repo = ModelRepository(tmp_path / "models")
    result = repo.prepare("tiny", "v1", source=source)
    weights = result.folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"oops")
    with pytest.raises(PrepareError, match="checksum mismatch") as info:
        repo.prepare("tiny", "v1", source=source)
    assert info.value.path == weights
    assert repo.prepare("tiny", "v1", source=source, force=True).created
    assert not leftovers(tmp_path / "models")


def test_a_different_source_for_an_existing_version_is_refused(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "models")
    repo.prepare("tiny", "v1", source=make_hf_folder(tmp_path / "a"))
    other = make_hf_folder(tmp_path / "b")
    (other / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    with pytest.raises(PrepareError, match="different source"):
        repo.prepare("tiny", "v1", source=other)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.gguf", "no such file or folder"),
        (lambda d: (d / "x.gguf").write_bytes(b"PK\x03\x04 not gguf") and d / "x.gguf", "not a GGUF file"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "config.json"),
        (lambda d: make_hf_folder(d / "noweights") and (d / "noweights" / "model.safetensors").unlink()
         or d / "noweights", "no \\*.safetensors"),
    ],
)
def test_bad_sources_name_the_file_and_leave_nothing(tmp_path: Path, make, message: str) -> None:
    source = make(tmp_path)
    repo = ModelRepository(tmp_path / "models")
    with pytest.raises(PrepareError, match=message) as info:
        repo.prepare("tiny", "v1", source=source)
    assert str(info.value).count("\n") == 0
    assert str(source.name) in str(info.value.path) or source == info.value.path
    assert not (tmp_path / "models" / "tiny" / "v1").exists()
    assert not leftovers(tmp_path)


def test_truncated_gguf_is_a_one_line_error_and_no_version(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with bundled_gguf().open("rb") as fh:
        truncated.write_bytes(fh.read(300_000))
    repo = ModelRepository(tmp_path / "models")
    with pytest.raises(PrepareError, match="could not read the GGUF model") as info:
        repo.prepare("tiny", "v1", source=truncated)
    assert info.value.path == truncated
    assert "\n" not in str(info.value)
    assert not (tmp_path / "models" / "tiny" / "v1").exists()
    assert not leftovers(tmp_path)


def test_cli_prints_one_line_and_exits_1_for_a_missing_source(tmp_path: Path, capsys) -> None:
    code = cli.main(["--data-dir", str(tmp_path), "prepare", "--source", str(tmp_path / "nope.gguf")])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0
    assert "nope.gguf" in err and "expected a .gguf file" in err
