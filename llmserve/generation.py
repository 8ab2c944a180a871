"""What a model version does when a request leaves things out: output length, sampling, tools.

Chat frontends send no ``max_tokens`` and no temperature on their background
calls (titles, tags, follow-ups) and send their tools on every chat. vLLM's
answers to those are "generate until the context is full", temperature 1.0
and "400 unless the engine was started with a tool-call parser". A version's
``GenerationDefaults`` replace them:

- ``max_tokens`` and the sampling defaults go to the engine as its generation
  config (``--override-generation-config``), so the engine applies them to any
  request that sets none: the engine knows the prompt's length and lowers
  ``max_tokens`` to what the context still holds, where a router that filled in
  the field could only make a long prompt fail;
- ``max_tokens_limit`` is checked by the router: asking for more is a 400;
- ``tool_call_parser`` turns on vLLM's tool calling with that parser; without
  one the router drops a request's tools and the model answers in text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmserve.settings import EngineSettings


@dataclass(frozen=True)
class GenerationDefaults:
    max_tokens: int = 512
    max_tokens_limit: int | None = None  # None: the context length
    sampling: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"the default max_tokens must be at least 1, got {self.max_tokens}")
        if self.max_tokens_limit is not None and self.max_tokens > self.max_tokens_limit:
            raise ValueError(f"the default max_tokens ({self.max_tokens}) is above the limit "
                             f"({self.max_tokens_limit}); lower it or raise max_tokens_limit")
        object.__setattr__(self, "sampling", MappingProxyType(dict(self.sampling)))

    @classmethod
    def from_settings(cls, engine: EngineSettings) -> GenerationDefaults:
        return cls(
            max_tokens=engine.max_tokens_default,
            max_tokens_limit=engine.max_tokens_limit,
            sampling=engine.sampling.model_dump(exclude_none=True),
            tool_call_parser=engine.tool_call_parser,
        )

    @property
    def can_call_tools(self) -> bool:
        return self.tool_call_parser is not None

    def output_limit(self, max_model_len: int) -> int:
        """The most output tokens a request may ask for."""
        limit = max_model_len - 1
        return limit if self.max_tokens_limit is None else min(limit, self.max_tokens_limit)

    def engine_generation_config(self) -> dict[str, float | int]:
        """vLLM's generation config overrides (Hugging Face names: ``max_new_tokens`` is ``max_tokens``)."""
        return {"max_new_tokens": self.max_tokens, **self.sampling}

    def vllm_args(self) -> list[str]:
        args = ["--override-generation-config", json.dumps(self.engine_generation_config(), sort_keys=True)]
        if self.tool_call_parser is not None:
            args += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
        return args

    def describe(self, max_model_len: int) -> dict[str, object]:
        """What ``/v1/models`` tells clients about this version."""
        return {"max_tokens_default": self.max_tokens, "max_tokens_limit": self.output_limit(max_model_len),
                "sampling_defaults": dict(self.sampling), "tool_calling": self.can_call_tools}
