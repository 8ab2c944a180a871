"""The control plane's HTTP API: ``/api/v1/models`` and ``/api/v1/deployments``."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmserve.settings import SamplingDefaults
from router.api.autoscaling import AutoscalingBody
from router.api.control_requests import actor_of, control_of, json_of
from router.control.canary_analysis import CanaryPolicy
from router.control.plane import ControlPlane
from router.control.strategies.base import RolloutPlan, StrategyType
from router.errors import ConflictError, InvalidRequest, ModelNotFound, VersionNotFound
from router.gateway.authorize import control_scope
from router.gateway.openapi import json_body
from router.gateway.protocol import validate
from router.store import ModelRecord
from router.store.base import DeploymentRecord

router = APIRouter(prefix="/api/v1", tags=["control"], dependencies=[Depends(control_scope)])

_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_VERSION = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class RegisterModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model_name: str = Field(pattern=_NAME)
    description: str = Field("", max_length=2000)
    framework: Literal["vllm", "onnx", "xgboost", "pytorch", "sklearn", "tensorflow"] = "vllm"
    owner: str = Field("", max_length=256)


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    replicas: int = Field(1, ge=1, le=16)
    gpu: int = Field(0, ge=0, le=8)


class EngineOverrides(BaseModel):
    """Engine settings this version runs with instead of the router's defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)
    max_model_len: int | None = Field(None, ge=16)
    kv_cache_gib: float | None = Field(None, gt=0)
    max_num_seqs: int | None = Field(None, ge=1)
    enable_prefix_caching: bool | None = None
    enforce_eager: bool | None = None
    speculation: Literal["none", "ngram", "draft"] | None = None
    # float32 where outputs must be the same with and without speculation (bf16 verification can flip near-ties)
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    cpu_threads: int | None = Field(None, ge=1, le=1024, description="cores the version's CPU engines bind")
    # what the version does when a request leaves things out (llmserve.generation)
    max_tokens_default: int | None = Field(None, ge=1)
    max_tokens_limit: int | None = Field(None, ge=1)
    sampling: dict[str, float | int] | None = Field(
        None, description="temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty")
    tool_call_parser: str | None = Field(None, pattern=r"^[a-z0-9_]+$", description="a vLLM parser, or none")

    @model_validator(mode="after")
    def _default_within_limit(self) -> "EngineOverrides":
        if self.max_tokens_default is not None and self.max_tokens_limit is not None \
                and self.max_tokens_default > self.max_tokens_limit:
            raise ValueError(f"max_tokens_default ({self.max_tokens_default}) is above max_tokens_limit "
                             f"({self.max_tokens_limit})")
        return self

    @field_validator("sampling")
    @classmethod
    def _known_sampling(cls, value: dict[str, float | int] | None) -> dict[str, float | int] | None:
        if value is not None:
            SamplingDefaults.model_validate(value)  # the names and ranges the settings accept
        return value


class Strategy(BaseModel):
    """How a new version earns its traffic: ``direct`` (its ``traffic_percent`` when ready),
    ``canary`` (stepped up while the analysis allows), ``blue_green`` (100% at once when ready,
    the old version kept ready for ``grace_s``) or ``rolling`` (the stable version's replicas
    replaced one at a time, traffic following the ready count, never below ``resources.replicas``
    ready)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["direct", "canary", "blue_green", "rolling", "shadow"] = "direct"
    steps: list[int] = Field(default_factory=lambda: [5, 25, 50, 100], min_length=1, max_length=20)
    bake_s: float = Field(60.0, ge=0)
    min_samples: int = Field(50, ge=20)
    max_samples: int = Field(2000, ge=20)
    max_step_s: float = Field(1800.0, gt=0, description="canary: an undecided step rolls back after this long")
    ttft_tolerance: float = Field(0.10, ge=0, le=5)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    error_margin: float = Field(0.01, ge=0, le=1)
    grace_s: float = Field(300.0, ge=0, description="blue_green: how long the old version stays ready")
    sample_percent: int = Field(10, ge=1, le=100, description="shadow: the share of requests replayed to it")

    def plan(self, traffic_percent: int) -> RolloutPlan:
        """The domain's plan; a canary policy whose numbers do not fit together raises ValueError."""
        canary = None
        if self.type == "canary":
            canary = CanaryPolicy(steps=tuple(self.steps), bake_s=self.bake_s, min_samples=self.min_samples,
                                  max_samples=self.max_samples, max_step_s=self.max_step_s,
                                  ttft_tolerance=self.ttft_tolerance,
                                  confidence=self.confidence, error_margin=self.error_margin)
        if self.type == "shadow" and traffic_percent:
            raise ValueError(f"a shadow answers no client: traffic_percent must be 0, not {traffic_percent}")
        return RolloutPlan(StrategyType(self.type), traffic_percent, canary, self.grace_s, self.sample_percent)


class BatchingOverrides(BaseModel):
    """Dynamic batching of a traditional model's version, instead of the router's defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)
    enabled: bool | None = None
    max_batch_size: int | None = Field(None, ge=1, le=1 << 20)
    max_wait_ms: float | None = Field(None, ge=0, le=10_000)
    adaptive: bool | None = None
    instances: int | None = Field(None, ge=1, le=64)
    max_queue_rows: int | None = Field(None, ge=1)
    default_deadline_ms: float | None = Field(None, gt=0)


class CreateDeployment(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model_name: str = Field(pattern=_NAME)
    version: str = Field(pattern=_VERSION)
    traffic_percent: int = Field(0, ge=0, le=100)
    resources: Resources = Field(default_factory=Resources)
    engine: EngineOverrides = Field(default_factory=EngineOverrides)
    strategy: Strategy = Field(default_factory=Strategy)
    batching: BatchingOverrides = Field(default_factory=BatchingOverrides)
    autoscaling: AutoscalingBody | None = Field(None, description="replicas follow the load within these bounds")


SPLIT_BODY = {"type": "object", "description": "version -> whole percentage; the active versions, summing to 100",
              "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100},
              "example": {"v1": 90, "v2": 10}}


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    to: str | None = Field(None, pattern=_VERSION)


def _deployment_json(record: DeploymentRecord) -> dict[str, Any]:
    data = record.to_dict()
    data["deployment_id"] = data.pop("id")
    return data


@router.post("/models", status_code=201, openapi_extra=json_body(RegisterModel))
async def register_model(request: Request) -> dict[str, Any]:
    body: RegisterModel = validate(RegisterModel, await json_of(request))
    record = ModelRecord(body.model_name, body.description, body.framework, body.owner)
    await control_of(request).register_model(record, actor_of(request))
    return record.__dict__ | {"model_name": record.name}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    control = control_of(request)
    return {"models": [m.__dict__ | {"model_name": m.name} for m in await control.store.list_models()]}


@router.get("/models/{model_name}")
async def get_model(model_name: str, request: Request) -> dict[str, Any]:
    control = control_of(request)
    model = await control.store.get_model(model_name)
    if model is None:
        raise ModelNotFound(f"model {model_name!r} is not registered", param="model_name")
    deployments = await control.store.list_deployments(model_name)
    return model.__dict__ | {"model_name": model.name, "versions": [d.version for d in deployments]}


@router.post("/deployments", status_code=202, openapi_extra=json_body(CreateDeployment))
async def create_deployment(request: Request) -> JSONResponse:
    body: CreateDeployment = validate(CreateDeployment, await json_of(request))
    try:
        plan = body.strategy.plan(body.traffic_percent)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="strategy") from None
    control = control_of(request)
    engine = body.engine.model_dump(exclude_none=True)
    batching = body.batching.model_dump(exclude_none=True)
    model = await control.require_model(body.model_name)
    if model.framework != "vllm":
        if body.strategy.type == "rolling":
            raise InvalidRequest("rolling replaces engine replicas; a traditional model's version loads in the "
                                 "router: use direct, canary or blue_green", param="strategy.type")
        if engine:
            raise InvalidRequest("engine settings apply to generative models; use batching", param="engine")
        engine = {"batching": batching} if batching else {}
    elif batching:
        raise InvalidRequest("batching applies to traditional models; vLLM batches continuously", param="batching")
    autoscaling = body.autoscaling.policy() if body.autoscaling is not None else None
    record = await control.deploy(body.model_name, body.version, body.resources.replicas, actor_of(request),
                                  plan, engine=engine, gpu=body.resources.gpu, autoscaling=autoscaling)
    return JSONResponse(_deployment_json(record), status_code=202)


@router.get("/deployments")
async def list_deployments(request: Request) -> dict[str, Any]:
    control = control_of(request)
    return {"deployments": [await describe(control, m.name) for m in await control.store.list_models()]}


@router.get("/deployments/{model_name}")
async def get_deployments(model_name: str, request: Request) -> dict[str, Any]:
    return await describe(control_of(request), model_name)


@router.get("/deployments/{model_name}/canary")
async def get_canary(model_name: str, request: Request) -> dict[str, Any]:
    control = control_of(request)
    await control.require_model(model_name)
    rollout = control.canaries.get(model_name)
    if rollout is None:
        raise VersionNotFound(f"model {model_name!r} has no canary rollout; deploy with "
                              '"strategy": {"type": "canary"}', param="model_name")
    return rollout.state.to_dict()


@router.post("/deployments/{model_name}/canary/{action}")
async def control_canary(model_name: str, action: str, request: Request) -> dict[str, Any]:
    """Manual control of a running canary: pause, resume, promote (the current step, now) or abort (= rollback)."""
    control = control_of(request)
    rollout = control.canaries.get(model_name)
    if rollout is None:
        raise VersionNotFound(f"model {model_name!r} has no canary rollout", param="model_name")
    actions = {"pause": rollout.pause, "resume": rollout.resume, "promote": rollout.promote_now,
               "abort": rollout.abort}
    if action not in actions:
        raise InvalidRequest(f"unknown canary action {action!r}; use pause, resume, promote or abort",
                             param="action")
    try:
        actions[action]()
    except ValueError as exc:
        raise ConflictError(str(exc)) from None
    return rollout.state.to_dict()


@router.put("/deployments/{model_name}/traffic", openapi_extra=json_body(SPLIT_BODY))
async def set_traffic(model_name: str, request: Request) -> dict[str, Any]:
    split = await json_of(request)
    if_match = request.headers.get("if-match")
    if if_match is not None and not if_match.strip('"').isdigit():
        raise InvalidRequest("If-Match must be the split's revision number, as GET /api/v1/deployments/{model} "
                             "returns it", param="If-Match")
    expected = int(if_match.strip('"')) if if_match is not None else None
    record = await control_of(request).set_traffic(model_name, split, actor_of(request), expected)
    return {"model_name": model_name, "split": record.split, "revision": record.revision}


@router.post("/deployments/{model_name}/rollback", openapi_extra=json_body(RollbackBody, required=False))
async def rollback(model_name: str, request: Request) -> dict[str, Any]:
    body: RollbackBody = validate(RollbackBody, await json_of(request))
    result = await control_of(request).rollback(model_name, body.to, actor_of(request))
    return {"model_name": model_name, "from": result.from_version, "to": result.to_version,
            "applied_in_ms": round(result.applied_in_ms, 3), "revision": result.revision}


@router.delete("/deployments/{model_name}/versions/{version}")
async def delete_version(model_name: str, version: str, request: Request) -> dict[str, Any]:
    record = await control_of(request).delete_version(model_name, version, actor_of(request))
    return {"deployment_id": record.id, "model_name": model_name, "version": version, "status": "draining"}


async def describe(control: ControlPlane, model_name: str) -> dict[str, Any]:
    """A model's versions (with this router's replicas of each), its split, canary and history."""
    await control.require_model(model_name)
    deployments = await control.store.list_deployments(model_name)
    traffic = await control.store.get_traffic(model_name)
    versions = []
    for record in deployments:
        served = control.versions.get((record.model_name, record.version))
        versions.append({
            **record.to_dict(),
            "traffic_percent": traffic.split.get(record.version, 0),
            "replica_states": [r.describe() for r in served.replicas] if served else [],
            "ready_replicas": len(served.ready_replicas) if served else 0,
        })
    history = await control.store.history(model_name)
    rollout = control.canaries.get(model_name)
    return {
        "canary": rollout.state.to_dict() if rollout else None,
        "model_name": model_name,
        "split": traffic.split,
        "revision": traffic.revision,
        "versions": versions,
        "history": [h.__dict__ for h in history],
    }
