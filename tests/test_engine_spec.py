"""EngineSpec to a vLLM command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmserve.engine_spec import DraftModelSpeculation, EngineSpec, NgramSpeculation
from llmserve.settings import EngineSettings
from router.control_api import EngineOverrides


def arg_after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_defaults_become_a_vllm_command_line() -> None:
    spec = EngineSpec.from_settings(Path("/m/v1"), "chat", "v1", EngineSettings())
    argv = spec.command("127.0.0.1", 8100, python="py")
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert arg_after(argv, "--model") == "/m/v1"
    names = argv[argv.index("--served-model-name") + 1: argv.index("--host")]
    assert names == ["chat:v1", "chat"]  # the first is what responses carry
    assert arg_after(argv, "--host") == "127.0.0.1" and arg_after(argv, "--port") == "8100"
    assert arg_after(argv, "--dtype") == "bfloat16"
    assert "--enable-prefix-caching" in argv and "--enforce-eager" in argv
    assert "--speculative-config" not in argv
    env = spec.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["HF_HUB_OFFLINE"] == "1"


def test_knobs_reach_the_command_line() -> None:
    settings = EngineSettings(max_model_len=1024, kv_cache_gib=2.5, max_num_seqs=8,
                              enable_prefix_caching=False, enforce_eager=False)
    spec = EngineSpec.from_settings(Path("/m"), "chat", "v2", settings, speculation=NgramSpeculation(5, 1, 3))
    argv = spec.command("127.0.0.1", 9000)
    assert arg_after(argv, "--max-model-len") == "1024"
    assert arg_after(argv, "--max-num-seqs") == "8"
    assert "--no-enable-prefix-caching" in argv and "--enforce-eager" not in argv
    assert json.loads(arg_after(argv, "--speculative-config")) == {
        "method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    assert spec.environment()["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_draft_model_speculation() -> None:
    spec = EngineSpec(Path("/m"), "chat", "v1", speculation=DraftModelSpeculation(Path("/draft"), 3))
    config = json.loads(arg_after(spec.command("127.0.0.1", 1), "--speculative-config"))
    assert config == {"model": "/draft", "num_speculative_tokens": 3}


def test_a_deployments_engine_overrides_reach_the_command_line() -> None:
    overrides = EngineOverrides.model_validate({"dtype": "float32", "max_num_seqs": 4}).model_dump(exclude_none=True)
    engine = EngineSettings().model_copy(update=overrides)
    argv = EngineSpec.from_settings(Path("/m/v1"), "m", "v1", engine).command("127.0.0.1", 9000)
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert argv[argv.index("--max-num-seqs") + 1] == "4"
    for bad in ({"dtype": "int8"}, {"dtype": 32}, {"temperature": 0.5}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            EngineOverrides.model_validate(bad)
