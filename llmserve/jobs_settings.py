"""Async requests' part of the settings tree (``Settings.router.jobs``, ``LLMSERVE_ROUTER__JOBS__<FIELD>``);
kept apart so the tree's root module stays small."""

from __future__ import annotations

from pydantic import BaseModel, Field

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class JobsSettings(BaseModel):
    """Async requests (``Prefer: respond-async`` on ``/predict`` and ``/generate``; ``router.jobs``): how many
    run at once, how long their results are kept, and where their callbacks may go."""

    retention_s: float = Field(
        3600.0, gt=0, description="A finished job's result is kept this long; then the sweep drops it (the job "
        "answers status expired for as long again, then 404).")
    sweep_interval_s: float = Field(
        30.0, gt=0, le=3600, description="How often expired results are dropped and jobs orphaned by a stopped "
        "router are failed.")
    lease_s: float = Field(
        30.0, gt=0, le=3600, description="A router renews its lease on the jobs it runs every third of this; "
        "a job whose lease lapsed (its router stopped) is failed by the next sweep of any router on the store.")
    max_concurrent: int = Field(
        4, ge=1, le=1024, description="Jobs running at once on this router; the rest wait, status queued. They "
        "run in the batch priority band, so they never take room from online requests.")
    max_pending: int = Field(
        1000, ge=1, description="Jobs queued or running on this router; one more is refused with 429.")
    patience_s: float = Field(
        600.0, ge=0, description="How long a job keeps retrying while admission refuses it (a saturated version "
        "sheds the batch band; a full predict queue) before it fails with that refusal.")
    callback_hosts: list[str] = Field(
        default_factory=lambda: list(LOOPBACK_HOSTS), description="Hosts a job's callback_url may name "
        "(exactly, case-insensitive); anything else is refused at submission with 400. Default: loopback only.")
    callback_timeout_s: float = Field(5.0, gt=0, le=300, description="One callback POST's time limit.")
    callback_attempts: int = Field(3, ge=1, le=20, description="Tries of a callback that fails (network, 5xx).")
    callback_backoff_s: float = Field(0.5, ge=0, le=60, description="Wait before the second try; doubles after.")
