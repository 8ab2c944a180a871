"""Warming the compile cache of a version ahead of serving (``llmserve prepare``).

A compiled engine (no ``--enforce-eager``) spends minutes in torch.compile on its first start on
a machine (about 3.5 min for SmolLM2-135M on a 2-core EPYC) and reuses vLLM's cache
(``~/.cache/vllm/torch_compile_cache``) after that. Starting the engine once here, exactly as the
router will start it, moves that wait from the first ``llmserve up`` to ``llmserve prepare``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from llmserve.replicas.local import LocalBackend
from llmserve.replicas.spec import EngineSpec
from llmserve.settings import EngineSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmUp:
    compiled: bool
    start_s: float  # first start on this machine: includes compiling; later starts reuse the cache
    second_start_s: float | None = None


async def warm(spec: EngineSpec, engine: EngineSettings, logs_dir: Path, check_reuse: bool = False) -> WarmUp:
    """Start ``spec`` once (twice with ``check_reuse``, to measure a start that hits the cache) and stop it."""
    if spec.enforce_eager:
        return WarmUp(compiled=False, start_s=0.0)
    timings = []
    for _ in range(2 if check_reuse else 1):
        backend = LocalBackend(engine.model_copy(update={"ready_timeout_s": max(engine.ready_timeout_s, 1200)}),
                               logs_dir)
        began = time.monotonic()
        replica_set = await backend.start(spec, 1)
        try:
            await backend.wait_ready(replica_set.endpoints)
            timings.append(time.monotonic() - began)
        finally:
            await backend.retire(replica_set, drain=False)
            await backend.close()
    return WarmUp(True, round(timings[0], 1), round(timings[1], 1) if len(timings) > 1 else None)


def warm_sync(spec: EngineSpec, engine: EngineSettings, logs_dir: Path, check_reuse: bool = False) -> WarmUp:
    return asyncio.run(warm(spec, engine, logs_dir, check_reuse))
