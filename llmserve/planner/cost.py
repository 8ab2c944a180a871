"""What one model needs from a GPU: memory, compute share, and the load its GPU may carry for its SLA.

This is a *model* of the GPU, not a measurement, and it says so everywhere it is shown:

* **Memory** per model process = weights + KV cache + the GPU type's per-process overhead (CUDA context,
  allocator slack). With ``tensor_parallel: N`` the weights and KV cache are split evenly over N whole
  GPUs and each shard pays the overhead.
* **Service time** S: GPU time one request costs on a whole GPU, ``service_ms_base + service_ms_per_gib x
  weights_gib`` for the GPU type. The reasoning: LLM decoding is memory-bandwidth bound, each step reads all
  the weights, so per-request GPU time grows with their size; the coefficients fold in batching and output
  length and are guesses. Override with a measured ``service_time_ms`` (or ``compute_share``) per model.
* **Compute share** = qps x S (the fraction of a GPU's time the model keeps busy), or ``compute_share``.
* **Latency** follows the processor-sharing queue (M/G/1-PS): a GPU with total load rho serves a request
  of size S in S / (1 - rho) on average, whatever the mix of sizes. A model therefore meets a mean latency
  SLA L wherever it sits as long as its GPU's load stays at or below ``1 - S / L``: its *load cap*. The
  planner keeps every GPU at or below ``min(compute_budget, caps of its models)``; the budget is headroom
  for bursts the mean does not see. A model whose own share exceeds its cap misses its SLA even alone.
* With ``tensor_parallel: N`` the model is assumed to scale perfectly: S / N per GPU and share / N on
  each of its N GPUs (optimistic; real tensor parallelism loses some to communication).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmserve.planner.errors import PlanInputError
from llmserve.planner.packing import Item, mib_down, mib_up, units_down, units_up
from llmserve.planner.schema import GpuType, ModelSpec

MAX_TENSOR_PARALLEL = 16


@dataclass(frozen=True)
class Demand:
    """What one model needs, per GPU it occupies. ``index``: its position in the input, for messages."""

    model: ModelSpec
    gpu: GpuType
    index: int
    memory_gib: float
    service_time_ms: float
    share: float
    load_cap: float

    @property
    def label(self) -> str:
        return f"models[{self.index}] ({self.model.name})"

    @property
    def dedicated(self) -> bool:
        """Tensor parallel models take whole GPUs: nothing is co-located with them."""
        return self.model.tensor_parallel > 1

    def item(self) -> Item:
        return Item(self.model.name, mib_up(self.memory_gib), units_up(self.share), units_down(self.load_cap))

    def latency_ms(self, gpu_load: float) -> float:
        """Mean latency the cost model predicts on a GPU carrying ``gpu_load`` in total."""
        return math.inf if gpu_load >= 1 else self.service_time_ms / (1 - gpu_load)


def estimated_service_ms(model: ModelSpec, gpu: GpuType) -> float:
    """Per-request GPU time on one whole GPU: measured when given, else the cost model's estimate."""
    if model.service_time_ms is not None:
        return model.service_time_ms
    return gpu.service_ms_base + gpu.service_ms_per_gib * model.weights_gib


def memory_per_gpu(model: ModelSpec, gpu: GpuType, tensor_parallel: int) -> float:
    return (model.weights_gib + model.kv_cache_gib) / tensor_parallel + gpu.process_overhead_gib


def demand_for(model: ModelSpec, gpu: GpuType, index: int) -> Demand:
    """The model's demand on ``gpu``, or PlanInputError when it cannot be placed there at all: too big for
    one GPU (with its tensor parallelism), or an SLA it cannot keep even alone."""
    label = f"models[{index}] ({model.name})"
    tp = model.tensor_parallel
    memory = memory_per_gpu(model, gpu, tp)
    if mib_up(memory) > mib_down(gpu.memory_gib):
        raise PlanInputError(f"{label}.weights_gib", _too_big(model, gpu, memory), _tp_fix(model, gpu))
    whole = estimated_service_ms(model, gpu)
    service = whole / tp
    total_share = model.compute_share if model.compute_share is not None else model.qps * whole / 1000
    share = total_share / tp
    cap = min(gpu.compute_budget, 1 - service / model.latency_sla_ms)
    if service >= model.latency_sla_ms:
        raise PlanInputError(
            f"{label}.latency_sla_ms",
            f"one request takes {service:.1f} ms of GPU time on {gpu.name} ({_service_source(model, gpu)}), "
            f"so a latency_sla_ms of {model.latency_sla_ms:g} cannot be met even on an idle GPU",
            "raise latency_sla_ms well above that, set a measured service_time_ms, or add tensor_parallel")
    if units_up(share) > units_down(cap):
        raise PlanInputError(
            f"{label}.qps",
            f"at qps {model.qps:g} it keeps {share:.2f} of a GPU busy{' (per GPU)' if tp > 1 else ''}, but it "
            f"meets latency_sla_ms {model.latency_sla_ms:g} only while its GPU's load stays below {cap:.2f} "
            f"(compute_budget {gpu.compute_budget:g}, 1 - service {service:.1f} ms / SLA)",
            "split its traffic over several entries (replicas with part of the qps each), raise "
            "latency_sla_ms, or set tensor_parallel")
    return Demand(model, gpu, index, memory, service, share, cap)


def _too_big(model: ModelSpec, gpu: GpuType, memory: float) -> str:
    per = f" per GPU with tensor_parallel {model.tensor_parallel}" if model.tensor_parallel > 1 else ""
    return (f"needs {memory:.1f} GiB{per} (weights {model.weights_gib:g} + kv_cache {model.kv_cache_gib:g}"
            f"{f' over {model.tensor_parallel} GPUs' if model.tensor_parallel > 1 else ''} + overhead "
            f"{gpu.process_overhead_gib:g}) but one {gpu.name} GPU has {gpu.memory_gib:g} GiB")


def _tp_fix(model: ModelSpec, gpu: GpuType) -> str:
    for n in range(model.tensor_parallel + 1, MAX_TENSOR_PARALLEL + 1):
        if mib_up(memory_per_gpu(model, gpu, n)) <= mib_down(gpu.memory_gib):
            return f"set tensor_parallel: {n} (the fewest GPUs it fits on), quantize it, or lower kv_cache_gib"
    return f"it fits on no number of {gpu.name} GPUs up to {MAX_TENSOR_PARALLEL}; use a larger GPU type"


def _service_source(model: ModelSpec, gpu: GpuType) -> str:
    if model.service_time_ms is not None:
        return "its service_time_ms"
    return (f"cost model: {gpu.service_ms_base:g} + {gpu.service_ms_per_gib:g} ms/GiB x {model.weights_gib:g} GiB"
            + (f", / tensor_parallel {model.tensor_parallel}" if model.tensor_parallel > 1 else ""))
