"""Predict model versions in the router process: load, validate, predict, retire.

``PredictorHost`` loads a version as a ``Predictor`` (no replicas: it runs
here; the control plane serves it as a version like any other), so deploy, split, canary and rollback work the
same for traditional models as for engines. Loading runs in a thread:
requests to the versions already served never wait on it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmserve.models.predict_manifest import ManifestError, PredictManifest
from router.predict.batcher import BatchingConfig, BatchObserver, DynamicBatcher
from router.predict.errors import InvalidInput
from router.predict.runtimes import load_runtime

logger = logging.getLogger(__name__)


@dataclass
class Predictor:
    manifest: PredictManifest
    batcher: DynamicBatcher

    def check(self, inputs: dict[str, np.ndarray]) -> int:
        """Validate a request's tensors against the schema; returns its row count."""
        rows: int | None = None
        for spec in self.manifest.inputs:
            if spec.name not in inputs:
                raise InvalidInput(f"input {spec.name!r} is missing; this model takes "
                                   f"{[t.name for t in self.manifest.inputs]}", spec.name)
            value = inputs[spec.name]
            if value.dtype != spec.dtype:
                raise InvalidInput(f"input {spec.name!r} must be {spec.datatype}, got "
                                   f"{value.dtype.name}", spec.name)
            expected = list(spec.shape)
            if value.ndim != len(expected) or any(e not in (-1, got) for e, got in zip(expected, value.shape,
                                                                                       strict=True)):
                raise InvalidInput(f"input {spec.name!r} expects shape {expected} (-1: any), got "
                                   f"{list(value.shape)}", spec.name)
            if rows is not None and value.shape[0] != rows:
                raise InvalidInput("every input needs the same number of rows", spec.name)
            rows = value.shape[0]
            if not self.manifest.allow_nan and value.dtype.kind == "f":
                finite = np.isfinite(value).reshape(len(value), -1).all(axis=1)
                if not finite.all():
                    bad = int(np.argmin(finite))
                    raise InvalidInput(f"input {spec.name!r} row {bad} holds NaN or infinity; this model "
                                       "refuses them (manifest allow_nan: false)", spec.name)
        unknown = set(inputs) - {t.name for t in self.manifest.inputs}
        if unknown:
            raise InvalidInput(f"unknown inputs {sorted(unknown)}; this model takes "
                               f"{[t.name for t in self.manifest.inputs]}", sorted(unknown)[0])
        if not rows:
            raise InvalidInput("the request has no rows", self.manifest.inputs[0].name)
        return rows


def batching_config(base: BatchingConfig, overrides: dict[str, Any]) -> BatchingConfig:
    return BatchingConfig(**{**base.__dict__, **overrides})


class PredictorHost:
    """Where the control plane puts traditional model versions: a Predictor each, in this process."""

    def __init__(self, batching: BatchingConfig, observer_for: Any = None) -> None:
        self._batching = batching
        self._observer_for = observer_for  # (model, version) -> BatchObserver | None

    async def load(self, model_name: str, version: str, model_dir: Path,
                   overrides: dict[str, Any] | None = None) -> Predictor:
        """Load the model (in a thread) and start its batcher; raises ManifestError for a bad folder."""
        manifest = await asyncio.to_thread(PredictManifest.read, model_dir)
        runtime = await asyncio.to_thread(load_runtime, model_dir, manifest)
        config = batching_config(self._batching, dict((overrides or {}).get("batching") or {}))
        observer: BatchObserver | None = self._observer_for(model_name, version) if self._observer_for else None
        predictor = Predictor(manifest, DynamicBatcher(runtime, config, observer))
        # A first prediction proves the file runs, before any traffic.
        sample = {t.name: np.zeros([1 if d == -1 else d for d in t.shape], dtype=t.dtype) for t in manifest.inputs}
        try:
            await predictor.batcher.submit(sample)
        except Exception as exc:  # whatever the runtime raises: the version cannot serve
            await predictor.batcher.close(0)
            raise ManifestError(f"{model_name}:{version} failed its first prediction: {exc}") from None
        logger.info("predict model %s:%s loaded (%s, %s)", model_name, version, manifest.framework, manifest.file)
        return predictor

    async def retire(self, predictor: Predictor, drain: bool = True) -> None:
        await predictor.batcher.close(drain_timeout_s=30.0 if drain else 0.0)
