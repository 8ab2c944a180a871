"""Endpoint choice within one version."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from llmserve.replicas.backend import Endpoint


class LeastOutstanding:
    """Pick the ready replica with the fewest requests in flight from this router.

    Ties go round-robin, so an idle pool spreads requests instead of piling
    them on the first replica.
    """

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, replicas: Iterable[Endpoint], exclude: set[Endpoint] | None = None) -> Endpoint | None:
        candidates = [r for r in replicas if r.routable and (not exclude or r not in exclude)]
        if not candidates:
            return None
        fewest = min(r.outstanding for r in candidates)
        tied = [r for r in candidates if r.outstanding == fewest]
        return tied[next(self._counter) % len(tied)]
