"""What this machine has for engines: CPU features, cores, NUMA nodes, memory and GPUs.

Read once at start from ``/proc`` and ``/sys`` (and ``nvidia-smi`` where it exists), never by
importing torch: the router stays light. The engine settings chosen from it live in
``llmserve.replicas.tuning``; this module only observes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The CPU features the choice of dtype depends on (bf16 in hardware or emulated).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni")


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: tuple[int, int]
    memory_gib: float


@dataclass(frozen=True)
class Hardware:
    """A snapshot of the machine; tests build one by hand."""

    cpu_model: str
    cpu_features: frozenset[str]
    cpus: tuple[int, ...]  # the cores this process may run on (its affinity)
    numa_nodes: int = 1
    memory_gib: float = 0.0  # available (MemAvailable), not installed
    gpus: tuple[Gpu, ...] = field(default_factory=tuple)

    @property
    def cores(self) -> int:
        return len(self.cpus)

    @property
    def bf16_in_hardware(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.cpu_features)

    def fingerprint(self) -> str:
        """What a tuning result is valid for: the same CPU model, features and core count (and GPUs)."""
        gpus = ",".join(f"{g.name}:{g.compute_capability[0]}.{g.compute_capability[1]}" for g in self.gpus)
        return f"{self.cpu_model}|{'+'.join(sorted(self.cpu_features))}|{self.cores} cores|{gpus or 'no gpu'}"

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_features"] = sorted(self.cpu_features)
        data["cores"] = self.cores
        data["gpus"] = [{**asdict(g), "compute_capability": "%d.%d" % g.compute_capability} for g in self.gpus]
        return data

    @classmethod
    def detect(cls, proc: Path = Path("/proc"), sys_root: Path = Path("/sys")) -> "Hardware":
        model, flags = _cpuinfo(proc / "cpuinfo")
        return cls(
            cpu_model=model,
            cpu_features=frozenset(f for f in CPU_FEATURES if f in flags),
            cpus=tuple(sorted(os.sched_getaffinity(0))),
            numa_nodes=_numa_nodes(sys_root / "devices" / "system" / "node"),
            memory_gib=_available_gib(proc / "meminfo"),
            gpus=_nvidia_gpus(),
        )


def _cpuinfo(path: Path) -> tuple[str, set[str]]:
    model, flags = "unknown CPU", set[str]()
    try:
        text = path.read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def _numa_nodes(path: Path) -> int:
    try:
        return max(1, sum(1 for p in path.iterdir() if p.name.startswith("node") and p.name[4:].isdigit()))
    except OSError:
        return 1


def _available_gib(path: Path) -> float:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _nvidia_gpus() -> tuple[Gpu, ...]:
    """GPUs as the NVIDIA driver reports them; none without ``nvidia-smi`` (a CPU machine)."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(gpu for line in out.splitlines() if (gpu := parse_gpu_line(line)) is not None)


def parse_gpu_line(line: str) -> Gpu | None:
    """One ``nvidia-smi --query-gpu=name,compute_cap,memory.total`` CSV line (MiB), or None if unreadable."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        return None
    try:
        major, minor = (int(x) for x in parts[1].split("."))
        return Gpu(parts[0], (major, minor), round(float(parts[2]) / 1024, 1))
    except ValueError:
        return None
