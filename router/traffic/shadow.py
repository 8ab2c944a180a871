"""Shadow traffic: replay a sample of the answered requests to a shadow version, in the background.

A shadow version is active with no share of the split: no client is ever answered by it. For a
sampled request (``sample_percent`` of a model's requests, drawn per request) the handler keeps a
copy of the body and taps the primary's answer (``RequestRecord.tap``); once the client's answer is
complete (the record's finish hook) a ``Replay`` goes into a bounded queue, ``put_nowait``: the
request's path never waits for shadowing. When the queue is full the replay is dropped and counted.

The workers (``workers`` of them, ``start``/``close`` by the app's lifespan; the sizes come from
``llmserve.shadow_settings.ShadowSettings``), per replay:
1. find the shadow version in the catalog (gone or not ready: counted ``unavailable``);
2. admit it in the batch band (``Admission.admit(..., "batch")``): a saturated shadow refuses it,
   counted ``shed``; nothing waits for room;
3. send it through the relay as the client's request was sent (same body, stream or not), timing
   TTFT and TPOT as the request record does, and read the answer's text;
4. add the pair (primary, shadow) to the version's ``ShadowReport``.

Replays build no ``RequestRecord``: they are not in the metrics, the SLO samples or the inference
log of any version, and never pass the key's rate limits or quotas (``InferenceCall.limit``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from router.errors import APIError
from router.predict.errors import Overloaded
from router.relay.relay import sse_data
from router.relay.sse import has_text
from router.traffic.shadow_report import Outcome, Pair, ShadowReport

if TYPE_CHECKING:
    from router.admission.shedding import Admission
    from router.observe.request_record import RequestRecord
    from router.relay.relay import Relay
    from router.traffic.catalog import Catalog

logger = logging.getLogger(__name__)


@dataclass
class ShadowTarget:
    """A model's shadow version and its report."""

    model_name: str
    version: str
    sample_percent: int
    report: ShadowReport


@dataclass
class Replay:
    """One sampled request, waiting to be replayed once its primary answer is complete."""

    target: ShadowTarget
    request_id: str
    path: str
    payload: dict[str, Any]
    stream: bool
    user: str | None
    tap: list[bytes] = field(default_factory=list)  # the primary's answer: a body, or a stream's event data
    primary: Outcome | None = None
    primary_version: str = ""
    inputs: dict[str, Any] | None = None  # a prediction's input columns (arrays), replayed as they are
    outputs: dict[str, Any] | None = None  # the primary's output columns
    predict_ms: float = 0.0  # how long the primary's prediction took (its checks and batcher)


def answer_text(data: list[bytes]) -> str:
    """The output text of an OpenAI answer: a whole body, or a stream's event data (chat or completions)."""
    parts: list[str] = []
    for item in data:
        if item == b"[DONE]":
            continue
        try:
            body = json.loads(item)
        except ValueError:
            continue
        for choice in (body.get("choices") or [])[:1] if isinstance(body, dict) else []:
            piece = (choice.get("delta") or choice.get("message") or {}).get("content") \
                if "text" not in choice else choice.get("text")
            if isinstance(piece, str):
                parts.append(piece)
    return "".join(parts)


def greedy(payload: dict[str, Any]) -> bool:
    """Temperature 0 asked for: the only answers that must match exactly."""
    temperature = payload.get("temperature")
    return isinstance(temperature, int | float) and temperature == 0


def labels_and_scores(outputs: dict[str, Any]) -> tuple[list[Any], list[float]]:
    """A prediction's labels and one score a row: the positive class's probability of a binary classifier,
    the top probability of a multi-class one, a regressor's ``score``."""
    labels = outputs["label"].tolist() if "label" in outputs else []
    if "probabilities" in outputs:
        probabilities = outputs["probabilities"]
        column = probabilities[:, 1] if probabilities.shape[1] == 2 else probabilities.max(axis=1)
        return labels, [float(v) for v in column]
    if "score" in outputs:
        return labels, [float(v) for v in outputs["score"].reshape(-1)]
    return labels, []


def primary_outcome(record: RequestRecord, text: str) -> Outcome:
    since = record.admitted_at if record.admitted_at is not None else record.started
    ttft = None if record.first_token_at is None else (record.first_token_at - since) * 1000
    return Outcome(ok=record.status_code == 200 and record.reason is None,
                   latency_ms=(time.perf_counter() - since) * 1000, ttft_ms=ttft, tpot_ms=record.tpot_ms,
                   text=text, output_tokens=record.output_tokens, error=record.reason)


class Shadows:
    """The shadow version of each model (at most one), and the replay of sampled requests to it."""

    def __init__(self, queue_size: int = 256, workers: int = 2, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time, max_pairs: int = 5000) -> None:
        self._targets: dict[str, ShadowTarget] = {}
        self._queue: asyncio.Queue[Replay] = asyncio.Queue(maxsize=queue_size)
        self._workers = workers
        self._rng = rng or random.Random()
        self.clock = clock
        self._max_pairs = max_pairs
        self._tasks: list[asyncio.Task[None]] = []
        self._relay: Relay | None = None
        self._admission: Admission | None = None
        self._catalog: Catalog | None = None

    # -- the registry -----------------------------------------------------------

    def add(self, model_name: str, version: str, sample_percent: int, predict: bool = False) -> ShadowTarget:
        report = ShadowReport(model_name, version, sample_percent, predict=predict, clock=self.clock,
                              max_pairs=self._max_pairs)
        target = self._targets[model_name] = ShadowTarget(model_name, version, sample_percent, report)
        return target

    def get(self, model_name: str) -> ShadowTarget | None:
        return self._targets.get(model_name)

    def remove(self, model_name: str) -> ShadowTarget | None:
        return self._targets.pop(model_name, None)

    def targets(self) -> list[ShadowTarget]:
        return list(self._targets.values())

    def is_shadow(self, model_name: str, version: str) -> bool:
        target = self._targets.get(model_name)
        return target is not None and target.version == version

    # -- the request path: O(1), never waits ------------------------------------------

    def sample(self, record: RequestRecord, path: str, payload: dict[str, Any], stream: bool) -> Replay | None:
        """A replay of this request when the model has a shadow and the draw picks it: the primary's answer
        is tapped from here on and the replay queued when the request finishes; else None."""
        target = self._targets.get(record.model)
        if target is None or record.version == target.version or not self._tasks \
                or self._rng.random() * 100 >= target.sample_percent:
            return None
        target.report.count("sampled")
        replay = Replay(target, record.request_id, path, dict(payload), stream, record.user,
                        primary_version=record.version)
        record.tap = replay.tap
        record.on_finish.append(lambda finished: self._finished(replay, finished))
        return replay

    def sample_predict(self, record: RequestRecord, inputs: dict[str, Any], outputs: dict[str, Any],
                       latency_ms: float) -> None:
        """A prediction answered (``predict``): replayed to the model's shadow when the draw picks it, queued
        when its record finishes (the arrays are kept by reference, read only by the worker)."""
        target = self._targets.get(record.model)
        if target is None or record.version == target.version or not self._tasks \
                or self._rng.random() * 100 >= target.sample_percent:
            return
        target.report.count("sampled")
        replay = Replay(target, record.request_id, "predict", {}, False, record.user,
                        primary_version=record.version, inputs=inputs, outputs=outputs, predict_ms=latency_ms)
        record.on_finish.append(lambda finished: self._finished(replay, finished))

    def _finished(self, replay: Replay, record: RequestRecord) -> None:
        if record.status_code == 499:  # the client went away: nothing whole to compare
            return
        replay.primary = primary_outcome(record, "")  # the text is parsed off the request path, by a worker
        try:
            self._queue.put_nowait(replay)
        except asyncio.QueueFull:
            replay.target.report.count("dropped_queue_full")

    # -- the workers ------------------------------------------------------------

    def start(self, relay: Relay, admission: Admission | None, catalog: Catalog) -> None:
        self._relay, self._admission, self._catalog = relay, admission, catalog
        self._tasks = [asyncio.create_task(self._work(), name=f"shadow replay {n}") for n in range(self._workers)]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def drain(self) -> None:
        """Wait until every queued replay is done (tests, benchmarks)."""
        await self._queue.join()

    async def _work(self) -> None:
        while True:
            replay = await self._queue.get()
            try:
                await self._replay(replay)
            except Exception:  # one replay's failure must not stop the replays
                logger.exception("shadow replay of request %s failed", replay.request_id,
                                 extra={"request_id": replay.request_id})
            finally:
                self._queue.task_done()

    async def _replay(self, replay: Replay) -> None:
        assert self._relay is not None and self._catalog is not None and replay.primary is not None
        target, report = replay.target, replay.target.report
        # 1. the shadow version, as this router serves it
        model = self._catalog.find(target.model_name)
        served = model.versions.get(target.version) if model is not None else None
        if served is None or not served.can_answer or self._targets.get(target.model_name) is not target:
            report.count("unavailable")
            return
        if replay.inputs is not None:  # a prediction: the batcher's batch band is its admission
            await self._predict(served, replay)
            return
        # 2. the batch band: a saturated shadow refuses it
        if self._admission is not None:
            try:
                await self._admission.admit(served, "batch", replay.user)
            except APIError:
                report.count("shed")
                return
        # 3. the same request, to the shadow
        payload = {**replay.payload, "model": served.versioned_name}
        shadow = await self._send(served, replay, payload)
        primary = replay.primary
        primary = Outcome(primary.ok, primary.latency_ms, primary.ttft_ms, primary.tpot_ms, answer_text(replay.tap),
                          primary.output_tokens, error=primary.error)
        # 4. the pair
        report.add(Pair(replay.request_id, replay.primary_version, primary, shadow, greedy(replay.payload)))

    async def _predict(self, served: Any, replay: Replay) -> None:
        assert replay.inputs is not None and replay.outputs is not None and replay.primary is not None
        report = replay.target.report
        started = time.perf_counter()
        try:
            outputs = await served.predictor.batcher.submit(replay.inputs, "batch", None)
        except Overloaded:  # the batcher refuses batch work it has no room or time for
            report.count("shed")
            return
        except Exception as exc:  # the shadow's own failure: counted in its error rate
            logger.warning("shadow prediction of request %s failed: %r", replay.request_id, exc,
                           extra={"request_id": replay.request_id})
            shadow = Outcome(False, (time.perf_counter() - started) * 1000, error=type(exc).__name__)
        else:
            labels, scores = labels_and_scores(outputs)
            shadow = Outcome(True, (time.perf_counter() - started) * 1000, labels=labels, scores=scores)
        labels, scores = labels_and_scores(replay.outputs)
        primary = Outcome(replay.primary.ok, replay.predict_ms, labels=labels, scores=scores,
                          error=replay.primary.error)
        report.add(Pair(replay.request_id, replay.primary_version, primary, shadow))

    async def _send(self, served: Any, replay: Replay, payload: dict[str, Any]) -> Outcome:
        assert self._relay is not None
        started = time.perf_counter()
        first: float | None = None
        last: float | None = None
        text_chunks, data, output_tokens = 0, [], None
        try:
            upstream = await self._relay.open(served, replay.path, payload, f"{replay.request_id}-shadow",
                                              self._relay.deadline(), stream=replay.stream)
        except APIError as exc:
            return Outcome(False, (time.perf_counter() - started) * 1000, error=exc.code)
        try:
            if upstream.status_code != 200:
                await upstream.read()
                return Outcome(False, (time.perf_counter() - started) * 1000, error=f"status {upstream.status_code}")
            if replay.stream:
                async for item in sse_data(upstream):
                    data.append(item)
                    if has_text(item):
                        last = time.perf_counter()
                        first = first or last
                        text_chunks += 1
            else:
                data.append(await upstream.read())
        except Exception as exc:  # the shadow broke mid-answer: its error, never the client's
            return Outcome(False, (time.perf_counter() - started) * 1000, error=type(exc).__name__)
        finally:
            await upstream.aclose()
        for item in data:  # the usage, when the engine reported it
            if b'"usage"' in item:
                usage = (json.loads(item).get("usage") or {}) if item != b"[DONE]" else {}
                output_tokens = usage.get("completion_tokens", output_tokens)
        tpot = (last - first) * 1000 / (text_chunks - 1) if first is not None and last is not None \
            and text_chunks > 1 else None
        return Outcome(True, (time.perf_counter() - started) * 1000,
                       ttft_ms=None if first is None else (first - started) * 1000, tpot_ms=tpot,
                       text=answer_text(data), output_tokens=output_tokens or text_chunks or None)
