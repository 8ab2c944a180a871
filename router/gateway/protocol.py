"""Request bodies the router validates before anything reaches an engine.

Only the fields the router must understand are declared; every other field
(vLLM's sampling extensions, tools, response_format, ...) is kept and passed
through untouched. Types are strict: ``"max_tokens": "5"`` is an error, as it
is for OpenAI.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router.errors import InvalidRequest, PayloadTooLarge, validation_error

if TYPE_CHECKING:
    from router.traffic.catalog import ServedVersion

_STRICT_PASSTHROUGH = ConfigDict(extra="allow", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT_PASSTHROUGH
    include_usage: bool | None = None


class ChatMessage(BaseModel):
    model_config = _STRICT_PASSTHROUGH
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class _SamplingFields(BaseModel):
    model_config = _STRICT_PASSTHROUGH
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=16)
    user: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "_SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]

    @model_validator(mode="after")
    def _prompt_not_empty(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self

    def output_limit(self) -> int | None:
        return self.max_tokens


class GenerateParams(BaseModel):
    """``params`` of the design's generate API; unknown sampling fields pass through to vLLM."""

    model_config = _STRICT_PASSTHROUGH
    version: str | None = Field(None, min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    raw: bool = Field(False, description="Send the prompt as plain text instead of as a chat user turn.")
    async_: bool | None = Field(None, alias="async", description="Answer 202 with an async job (router.api.jobs).")
    callback_url: str | None = Field(None, description="An async job's callback (on the allow-list).")

    ROUTER_FIELDS: ClassVar[frozenset[str]] = frozenset({"version", "raw", "async_", "callback_url"})  # not for vLLM


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Output tokens; unset: the version's default.")
    stream: bool = False
    user: str | None = Field(None, max_length=256)
    params: GenerateParams = Field(default_factory=GenerateParams)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object."""
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest(
            f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json"
        )
    return data


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def check_output_limit(requested: int | None, served: ServedVersion, param: str = "max_tokens") -> None:
    """A request may ask for at most its version's output limit; none asked: the version's default."""
    if requested is None:
        return
    if requested >= served.max_model_len:
        raise InvalidRequest(
            f"{param}={requested} is too large: this model's context is {served.max_model_len} tokens, "
            f"shared by the prompt and the output; ask for fewer than {served.max_model_len}",
            param=param,
            code="context_length_exceeded",
        )
    limit = served.output_limit
    if requested > limit:
        raise InvalidRequest(
            f"{param}={requested} is too large: {served.versioned_name} gives at most {limit} output tokens "
            f"a request (its max_tokens_limit); ask for at most {limit}, or leave {param} out for the default "
            f"of {served.generation.max_tokens}",
            param=param,
            code="max_tokens_too_large",
        )


_TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")


def drop_tools(payload: dict[str, Any]) -> int:
    """Take tool definitions out of a chat request for a model that cannot call tools; returns
    how many were dropped. The request is still useful without them: the model answers in text."""
    tools = payload.get("tools")
    functions = payload.get("functions")
    dropped = (len(tools) if isinstance(tools, list) else 0) + (len(functions) if isinstance(functions, list) else 0)
    for name in _TOOL_FIELDS:
        payload.pop(name, None)
    return dropped


async def read_body(receive_stream: Any, content_length: str | None, limit: int) -> bytes:
    """Read a request body, refusing it with 413 as soon as it passes ``limit`` bytes."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise InvalidRequest("the Content-Length header is not a number") from None
        if declared > limit:
            raise PayloadTooLarge(
                f"the request body is {declared} bytes; the limit is {limit} bytes "
                "(LLMSERVE_ROUTER__MAX_BODY_BYTES)"
            )
    chunks: list[bytes] = []
    size = 0
    async for chunk in receive_stream:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"the request body is over the limit of {limit} bytes (LLMSERVE_ROUTER__MAX_BODY_BYTES)"
            )
        chunks.append(chunk)
    return b"".join(chunks)
