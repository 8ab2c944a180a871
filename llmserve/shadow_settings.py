"""Shadow traffic's part of the settings tree (``Settings.router.shadow``, ``LLMSERVE_ROUTER__SHADOW__<FIELD>``);
kept apart so the tree's root module stays small."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ShadowSettings(BaseModel):
    """Replays of sampled requests to a model's shadow version (``router.traffic.shadow``): how many may wait,
    how many run at once, and how much of the comparison the report keeps."""

    queue_size: int = Field(
        256, ge=1, le=1_000_000, description="Replays waiting for a worker; one more is dropped and counted "
        "(dropped_queue_full): the request path never waits for shadowing.")
    workers: int = Field(
        2, ge=1, le=64, description="Replays running at once on this router, each in the batch priority band.")
    max_pairs: int = Field(
        5000, ge=10, le=1_000_000, description="The latest compared requests a shadow's report summarises.")
