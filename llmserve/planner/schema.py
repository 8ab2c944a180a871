"""What the planner reads: the GPU types on offer and the models to place on them (the YAML file's schema).

Every model is strict (``extra="forbid"``): a misspelt field in a hand-written YAML file is an error that
names it, not a silently ignored default. Sizes are GiB (2**30 bytes) throughout, as ``nvidia-smi`` reports
memory (an "80GB" A100 reports 81920 MiB = 80 GiB, of which the driver keeps a little): a GPU type's
``memory_gib`` is what *the models* may use, set by the operator.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"


class GpuType(BaseModel):
    """One kind of GPU, and how models share it.

    The service-time coefficients live here because they describe the GPU's speed, not the model: the
    same 7B model takes longer per request on an L4 than on an A100 (see ``cost.py`` for the model).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="How models refer to it (gpu_type: a100-80gb).")
    product: str = Field(min_length=1, description="The node label value nvidia.com/gpu.product has for it, "
                         "e.g. NVIDIA-A100-SXM4-80GB (what the GPU Operator's feature discovery sets).")
    memory_gib: float = Field(gt=0, description="Device memory the models may use, GiB.")
    compute_budget: float = Field(0.9, gt=0, le=1, description="The most of one GPU's compute the models on "
                                  "it may keep busy together; the rest is queueing headroom so that "
                                  "co-located models still meet their SLAs under bursts.")
    process_overhead_gib: float = Field(1.0, ge=0, description="Memory each model process costs besides its "
                                        "weights and KV cache: CUDA context, allocator slack, activations.")
    sharing: Literal["mps", "time-slicing"] = Field(
        "mps", description="How co-located processes share the GPU: mps (concurrent, with per-process "
        "thread and memory limits the plan sets) or time-slicing (no per-process limits).")
    service_ms_base: float = Field(0.5, ge=0, description="Cost model: fixed GPU time per request, ms.")
    service_ms_per_gib: float = Field(6.0, ge=0, description="Cost model: GPU time per request per GiB of "
                                      "weights, ms (a request reads the weights once per batch step).")


class ModelSpec(BaseModel):
    """One model to place, with the traffic it must serve and the latency it must keep."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    weights_gib: float = Field(gt=0, description="Size of the weights on the GPU, GiB (after quantization).")
    qps: float = Field(ge=0, description="Expected requests per second.")
    latency_sla_ms: float = Field(gt=0, description="The mean request latency it must keep, ms.")
    kv_cache_gib: float = Field(0.0, ge=0, description="KV cache (or activation) memory it needs at its "
                                "traffic, GiB; 0 for encoders.")
    gpu_type: str | None = Field(None, description="Pin it to one GPU type; default: the file's default.")
    tensor_parallel: int = Field(1, ge=1, le=16, description="GPUs it spans; above 1 it takes whole GPUs.")
    service_time_ms: float | None = Field(None, gt=0, description="Measured GPU time per request on a whole "
                                          "GPU, ms; overrides the cost model's estimate from weights_gib.")
    compute_share: float | None = Field(None, ge=0, le=16, description="Measured fraction of one GPU it keeps "
                                        "busy at its qps; overrides qps x service time.")


A100_80GB = GpuType(name="a100-80gb", product="NVIDIA-A100-SXM4-80GB", memory_gib=80)


class Fleet(BaseModel):
    """The whole input: GPU types (default: one, ``A100_80GB``) and models. ``default_gpu_type``: where a
    model without ``gpu_type`` goes (default: the first GPU type listed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_types: list[GpuType] = Field(default_factory=lambda: [A100_80GB], min_length=1)
    default_gpu_type: str | None = None
    models: list[ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_resolve(self) -> Fleet:
        types = [g.name for g in self.gpu_types]
        if len(set(types)) != len(types):
            raise ValueError(f"gpu_types: the name {_first_duplicate(types)!r} is used twice; rename one")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: the name {_first_duplicate(names)!r} is used twice; rename one (replicas "
                             "of a model need distinct names)")
        if self.default_gpu_type is not None and self.default_gpu_type not in types:
            raise ValueError(f"default_gpu_type: {self.default_gpu_type!r} is not one of gpu_types "
                             f"({', '.join(types)}); use one of those or add it under gpu_types")
        for i, m in enumerate(self.models):
            if m.gpu_type is not None and m.gpu_type not in types:
                raise ValueError(f"models[{i}] ({m.name}).gpu_type: {m.gpu_type!r} is not one of gpu_types "
                                 f"({', '.join(types)}); use one of those or add it under gpu_types")
        return self

    def gpu_for(self, model: ModelSpec) -> GpuType:
        """The GPU type a model is placed on."""
        wanted = model.gpu_type or self.default_gpu_type or self.gpu_types[0].name
        return next(g for g in self.gpu_types if g.name == wanted)


def _first_duplicate(names: list[str]) -> str:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return ""
