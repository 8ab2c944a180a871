"""Quantized versions: a tiny random Llama quantized to W8A8, and every refusal before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmserve.cli import main
from llmserve.errors import PrepareError
from llmserve.models.quantize import dequantize, quantize_per_channel, quantize_version
from llmserve.models.repository import Manifest, ModelRepository

NAME = "tiny-llama"


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden size 64) saved as a Hugging Face folder, as ``prepare`` takes it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("tiny-llama-src")
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture
def repository(tmp_path: Path, tiny_source: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "models")
    repo.prepare(NAME, "v1", source=tiny_source)
    return repo


def test_round_to_nearest_is_within_half_a_step_per_channel() -> None:
    import torch

    torch.manual_seed(1)
    weight = torch.randn(16, 32) * torch.logspace(-3, 1, 16).unsqueeze(1)  # rows of very different ranges
    weight[3] = 0.0  # an all-zero row must not divide by zero
    q = quantize_per_channel(weight)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (16, 1)
    assert int(q.weight.abs().max()) == 127  # every nonzero row uses the full range
    error = (dequantize(q) - weight).abs()
    assert bool((error <= q.scale / 2 + 1e-6 * q.scale).all())
    assert float(error[3].max()) == 0.0
    # the scales follow each row's range: a single scale for the matrix would lose the small rows
    relative = (error.amax(1) / weight.abs().amax(1).clamp_min(1e-12))
    assert float(relative.max()) <= 0.5 / 127 + 1e-6


def test_a_quantized_version_dequantizes_to_its_source_and_names_its_scheme(repository: ModelRepository) -> None:
    import torch
    from safetensors.torch import load_file

    result = quantize_version(repository, NAME, "v1", "v1-int8")
    source = load_file(str(repository.version_dir(NAME, "v1") / "model.safetensors"))
    quantized = load_file(str(result.folder / "model.safetensors"))
    linear = [k for k in source if ".layers." in k and k.endswith("_proj.weight")]
    assert len(linear) == 2 * 7  # q k v o gate up down, per layer
    for key in linear:
        weight, scale = quantized[key], quantized[key.removesuffix(".weight") + ".weight_scale"]
        assert weight.dtype == torch.int8 and scale.shape == (weight.shape[0], 1)
        error = (weight.float() * scale - source[key].float()).abs()
        assert bool((error <= scale / 2 * (1 + 1e-5)).all()), key
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.0.input_layernorm.weight"):
        assert torch.equal(quantized[key], source[key])  # the ends and the norms stay as they were

    config = json.loads((result.folder / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "int-quantized"
    group = q["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["dynamic"] is True
    assert q["ignore"] == ["lm_head"]
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    parsed = QuantizationConfig.model_validate(q)  # the schema vLLM reads it with
    preset = preset_name_to_scheme("W8A8", ["Linear"])
    assert parsed.config_groups["group_0"].weights.strategy == preset.weights.strategy
    assert parsed.config_groups["group_0"].input_activations.strategy == preset.input_activations.strategy

    manifest = Manifest.read(result.folder)
    source_manifest = repository.get(NAME, "v1")
    assert manifest.version == "v1-int8" and manifest.dtype == "int8"
    assert manifest.extra["quantization"]["scheme"] == "W8A8"  # type: ignore[index]
    assert manifest.extra["quantization"]["source_weights_sha256"] == source_manifest.weights_sha256  # type: ignore[index]
    assert repository.verify(NAME, "v1-int8") == manifest  # its own checksums hold
    assert sorted(repository.list_versions(NAME)) == ["v1", "v1-int8"]
    assert not [p for p in result.folder.parent.iterdir() if p.name.startswith(".tmp-")]


def test_bad_requests_are_refused_before_any_work(repository: ModelRepository, tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="no model 'nope'"):
        quantize_version(repository, "nope", "v1", "v1-int8")
    with pytest.raises(PrepareError, match=r"no version 'v9' of tiny-llama \(prepared versions: v1\)"):
        quantize_version(repository, NAME, "v9", "v1-int8")
    with pytest.raises(PrepareError, match="unknown quantization scheme"):
        quantize_version(repository, NAME, "v1", "v1-int8", scheme="w2a2")
    with pytest.raises(PrepareError, match="label of its own"):
        quantize_version(repository, NAME, "v1", "v1")
    loose = repository.version_dir(NAME, "loose")  # a folder that was never prepared: no manifest
    loose.mkdir()
    (loose / "config.json").write_text("{}")
    with pytest.raises(PrepareError, match="not a prepared model version"):
        quantize_version(repository, NAME, "loose", "loose-int8")
    first = quantize_version(repository, NAME, "v1", "v1-int8")
    with pytest.raises(PrepareError, match="already exists; choose another --version or pass --force"):
        quantize_version(repository, NAME, "v1", "v1-int8")
    with pytest.raises(PrepareError, match="already quantized"):
        quantize_version(repository, NAME, "v1-int8", "v1-int8-again")
    again = quantize_version(repository, NAME, "v1", "v1-int8", force=True)
    assert again.manifest.weights_sha256 == first.manifest.weights_sha256  # the same weights, written anew
    assert not (repository.root / NAME / "v1-int8-again").exists()


def test_the_command_line_quantizes_and_refuses_in_one_line(repository: ModelRepository, capsys) -> None:
    models = str(repository.root)
    assert main(["--models-dir", models, "quantize", "--name", NAME, "--version", "v1-int8"]) == 0
    assert "tiny-llama/v1-int8 quantized (W8A8) from v1" in capsys.readouterr().out
    assert main(["--models-dir", models, "quantize", "--name", NAME, "--version", "v1-int8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
    assert main(["--models-dir", models, "quantize", "--name", NAME, "--from", "v7", "--version", "x"]) == 1
    assert "no version 'v7'" in capsys.readouterr().err
