"""What each request asks for: prompts, output lengths, users and priorities.

Length distributions are written ``fixed:N``, ``uniform:LO:HI``,
``normal:MEAN:STD`` or ``hist:V=W,V=W`` (values with relative weights).
Prompts come from a synthetic generator (a given input length in words, close
to tokens for this vocabulary), the bundled set of real chat prompts, or a
JSONL file whose lines hold ``prompt`` or ``messages`` and optionally
``max_tokens``, ``user`` and ``priority``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

_VOCABULARY = ("time", "people", "water", "light", "story", "river", "music", "city", "garden", "window",
               "morning", "number", "system", "market", "planet", "signal", "paper", "forest", "engine", "voice")


@dataclass(frozen=True)
class LengthDistribution:
    kind: str
    params: tuple[float, ...]
    weights: tuple[float, ...] = ()

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = self.params[0]
        elif self.kind == "uniform":
            value = rng.uniform(self.params[0], self.params[1])
        elif self.kind == "normal":
            value = rng.gauss(self.params[0], self.params[1])
        else:
            value = rng.choices(self.params, weights=self.weights)[0]
        return max(1, int(round(value)))


def parse_length(spec: str) -> LengthDistribution:
    """Parse a length distribution; ValueError with the expected forms otherwise."""
    kind, _, rest = spec.partition(":")
    expected = "expected fixed:N, uniform:LO:HI, normal:MEAN:STD or hist:V=W,V=W"
    try:
        if kind == "fixed":
            (n,) = (float(x) for x in rest.split(":"))
            return LengthDistribution("fixed", (n,))
        if kind == "uniform":
            lo, hi = (float(x) for x in rest.split(":"))
            if lo > hi:
                raise ValueError
            return LengthDistribution("uniform", (lo, hi))
        if kind == "normal":
            mean, std = (float(x) for x in rest.split(":"))
            return LengthDistribution("normal", (mean, std))
        if kind == "hist":
            pairs = [item.split("=") for item in rest.split(",")]
            values = tuple(float(v) for v, _ in pairs)
            weights = tuple(float(w) for _, w in pairs)
            if any(w < 0 for w in weights) or not any(weights):
                raise ValueError
            return LengthDistribution("hist", values, weights)
    except ValueError:
        pass
    raise ValueError(f"bad length distribution {spec!r}: {expected}")


@dataclass(frozen=True)
class RequestSpec:
    messages: list[dict[str, Any]] | None
    prompt: str | None
    max_tokens: int
    user: str | None
    priority: str | None


def bundled_prompts() -> list[dict[str, Any]]:
    text = resources.files("loadtest").joinpath("data/chat_prompts.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_prompt_file(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL prompt file; ValueError naming the line that is wrong."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read prompt file {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{number}: not valid JSON") from None
        usable = isinstance(row, dict) and (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list))
        if not usable:
            raise ValueError(f"{path}:{number}: each line needs 'prompt' (a string) or 'messages' (a list)")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts in the file")
    return rows


class Workload:
    def __init__(
        self,
        source: str = "bundled",
        input_length: LengthDistribution | None = None,
        output_length: LengthDistribution | None = None,
        users: int = 0,
        priorities: list[str] | None = None,
        seed: int = 0,
        prompt_file: Path | None = None,
    ) -> None:
        self._rng = random.Random(seed)
        self._source = source
        if prompt_file is not None:
            self._rows = load_prompt_file(prompt_file)
        else:
            self._rows = bundled_prompts() if source == "bundled" else []
        self._input = input_length or LengthDistribution("fixed", (32,))
        self._output = output_length or LengthDistribution("fixed", (64,))
        self._users = users
        self._priorities = priorities or []

    def next(self) -> RequestSpec:
        rng = self._rng
        max_tokens = self._output.sample(rng)
        user = f"user-{rng.randrange(self._users)}" if self._users else None
        priority = rng.choice(self._priorities) if self._priorities else None
        if self._rows:
            row = rng.choice(self._rows)
            return RequestSpec(row.get("messages"), row.get("prompt"), int(row.get("max_tokens", max_tokens)),
                               row.get("user", user), row.get("priority", priority))
        words = self._input.sample(rng)
        text = " ".join(rng.choice(_VOCABULARY) for _ in range(words))
        return RequestSpec([{"role": "user", "content": text}], None, max_tokens, user, priority)
