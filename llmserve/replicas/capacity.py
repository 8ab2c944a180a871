"""How many replicas of one engine this machine can run, so a policy that asks for more is refused.

A replica needs memory (its KV cache, its weights, about a GiB of runtime) and
compute: vLLM's CPU engine pins its threads to a core, and two engines on one
core each run at half speed, so one replica a core is the most worth running.
A substitute program (the simulated engine) says its own footprint with
``footprint_gib`` and ``replicas_per_core``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmserve.replicas.spec import EngineSpec

_RUNTIME_GIB = 1.0  # the Python process, vLLM's imports, the compile cache
_USABLE_MEMORY = 0.85  # of the machine's memory, the rest left to the router and the system


@dataclass(frozen=True)
class Capacity:
    replicas: int
    reason: str  # what bounds it, in words for an error message


def weights_gib(model_dir: Path) -> float:
    """The model folder's size on disk: what its weights take in memory, about."""
    if not model_dir.is_dir():
        return 0.0
    return sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()) / (1 << 30)


def machine_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)


def capacity(spec: EngineSpec, program: object, cores: int | None = None,
             memory_gib: float | None = None) -> Capacity:
    cores = cores or len(os.sched_getaffinity(0))
    memory_gib = machine_memory_gib() if memory_gib is None else memory_gib
    need = getattr(program, "footprint_gib", None)
    if need is None:
        need = spec.kv_cache_gib + weights_gib(Path(spec.model_dir)) + _RUNTIME_GIB
    per_core = int(getattr(program, "replicas_per_core", 1))
    by_memory = int(memory_gib * _USABLE_MEMORY // max(need, 0.01))
    by_cores = cores * per_core
    if by_memory < by_cores:
        return Capacity(by_memory, f"{memory_gib:.0f} GiB of memory at {need:.1f} GiB a replica")
    return Capacity(by_cores, f"{cores} cores at {per_core} replica(s) a core")
