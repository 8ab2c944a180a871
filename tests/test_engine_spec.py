"""EngineSpec to a vLLM command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmserve.replicas.hardware import Hardware
from llmserve.replicas.spec import DraftModelSpeculation, EngineSpec, NgramSpeculation
from llmserve.settings import EngineSettings
from router.api.control import EngineOverrides


def arg_after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


AVX512_BF16 = Hardware("Intel Xeon", frozenset({"avx2", "avx512f", "avx512_bf16"}), (0, 1), memory_gib=16)


def test_defaults_become_a_vllm_command_line() -> None:
    spec = EngineSpec.from_settings(Path("/m/v1"), "chat", "v1", EngineSettings(), hardware=AVX512_BF16)
    argv = spec.command("127.0.0.1", 8100, python="py")
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert arg_after(argv, "--model") == "/m/v1"
    names = argv[argv.index("--served-model-name") + 1: argv.index("--host")]
    assert names == ["chat:v1", "chat"]  # the first is what responses carry
    assert arg_after(argv, "--host") == "127.0.0.1" and arg_after(argv, "--port") == "8100"
    assert arg_after(argv, "--dtype") == "bfloat16"
    assert "--enable-prefix-caching" in argv and "--enforce-eager" in argv  # eager on CPU (see tuning)
    assert "--speculative-config" not in argv
    env = spec.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["HF_HUB_OFFLINE"] == "1"


def test_knobs_reach_the_command_line() -> None:
    settings = EngineSettings(max_model_len=1024, kv_cache_gib=2.5, max_num_seqs=8,
                              enable_prefix_caching=False, enforce_eager=True)
    spec = EngineSpec.from_settings(Path("/m"), "chat", "v2", settings, speculation=NgramSpeculation(5, 1, 3))
    argv = spec.command("127.0.0.1", 9000)
    assert arg_after(argv, "--max-model-len") == "1024"
    assert arg_after(argv, "--max-num-seqs") == "8"
    assert "--no-enable-prefix-caching" in argv and "--enforce-eager" in argv
    assert json.loads(arg_after(argv, "--speculative-config")) == {
        "method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    assert spec.environment()["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_draft_model_speculation() -> None:
    spec = EngineSpec(Path("/m"), "chat", "v1", speculation=DraftModelSpeculation(Path("/draft"), 3))
    config = json.loads(arg_after(spec.command("127.0.0.1", 1), "--speculative-config"))
    assert config == {"model": "/draft", "num_speculative_tokens": 3}


def test_a_deployments_engine_overrides_reach_the_command_line() -> None:
    overrides = EngineOverrides.model_validate({"dtype": "float32", "max_num_seqs": 4}).model_dump(exclude_none=True)
    engine = EngineSettings().with_overrides(overrides)
    argv = EngineSpec.from_settings(Path("/m/v1"), "m", "v1", engine).command("127.0.0.1", 9000)
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert argv[argv.index("--max-num-seqs") + 1] == "4"
    for bad in ({"dtype": "int8"}, {"dtype": 32}, {"temperature": 0.5}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            EngineOverrides.model_validate(bad)


def test_generation_defaults_reach_the_engine_as_its_generation_config() -> None:
    argv = EngineSpec.from_settings(Path("/m"), "chat", "v1", EngineSettings()).command("127.0.0.1", 1)
    assert json.loads(arg_after(argv, "--override-generation-config")) == {
        "max_new_tokens": 512, "temperature": 0.0, "repetition_penalty": 1.05}
    assert "--enable-auto-tool-choice" in argv and arg_after(argv, "--tool-call-parser") == "hermes"
    quiet = EngineSettings(tool_call_parser="none", max_tokens_default=64, sampling={"temperature": 0.7})
    argv = EngineSpec.from_settings(Path("/m"), "chat", "v1", quiet).command("127.0.0.1", 1)
    assert "--enable-auto-tool-choice" not in argv and "--tool-call-parser" not in argv
    assert json.loads(arg_after(argv, "--override-generation-config")) == {
        "max_new_tokens": 64, "temperature": 0.7, "repetition_penalty": 1.05}


def test_a_versions_generation_overrides_merge_and_are_checked_together() -> None:
    overrides = EngineOverrides.model_validate({
        "sampling": {"temperature": 0.8}, "max_tokens_default": 100, "max_tokens_limit": 200,
        "tool_call_parser": "none"}).model_dump(exclude_none=True)
    engine = EngineSettings().with_overrides(overrides)
    assert engine.sampling.temperature == 0.8 and engine.sampling.repetition_penalty == 1.05  # field by field
    assert engine.tool_call_parser is None and engine.max_tokens_limit == 200
    with pytest.raises(ValueError, match="max_tokens_default"):
        EngineSettings().with_overrides({"max_tokens_default": 300, "max_tokens_limit": 200})
    with pytest.raises(ValueError, match="max_tokens_default"):
        EngineSettings(max_model_len=256, max_tokens_default=512)
    for bad in ({"sampling": {"temperature": 3}}, {"sampling": {"beam_width": 2}}, {"tool_call_parser": "Bad Parser"},
                {"max_tokens_default": 0}):
        with pytest.raises(ValidationError):
            EngineOverrides.model_validate(bad)
