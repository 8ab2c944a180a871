"""Batch jobs' part of the settings tree (``Settings.router.batches``, ``LLMSERVE_ROUTER__BATCHES__<FIELD>``);
kept apart so the tree's root module stays small."""

from __future__ import annotations

from pydantic import BaseModel, Field


class BatchesSettings(BaseModel):
    """The OpenAI Batch API (``/v1/files``, ``/v1/batches``; ``router.batches``): the input files' limits, how
    far a batch's concurrency may grow in the spare capacity, and how a batch is shared between routers."""

    max_file_bytes: int = Field(
        64 << 20, ge=1024, description="An uploaded file's size limit (bytes); a larger upload gets 413.")
    max_lines: int = Field(
        50_000, ge=1, description="Lines (requests) an input file may hold; more gets 413.")
    max_concurrency: int = Field(
        32, ge=1, le=4096, description="The most lines one batch has in flight at once; its window grows "
        "towards this while the batch band is admitted, and halves on each refusal (AIMD).")
    max_active: int = Field(
        4, ge=1, le=256, description="Batches this router runs at once; the others wait (status validating "
        "or in_progress) for a free runner on any router.")
    max_window_s: float = Field(
        7 * 86400.0, gt=0, description="The longest completion_window a batch may ask for.")
    lease_s: float = Field(
        30.0, gt=0, le=3600, description="A router renews its lease on the batches it runs every third of "
        "this; a batch whose lease lapsed (its router stopped) is resumed by the next router to scan.")
    scan_interval_s: float = Field(
        2.0, gt=0, le=3600, description="How often a router looks for batches to run (new, or orphaned).")
    progress_interval_s: float = Field(
        0.5, gt=0, le=60, description="How often a running batch's request_counts are written to the store "
        "(and a cancel is noticed).")
    min_pause_s: float = Field(
        0.5, ge=0, le=60, description="The shortest pause after a refusal that gave no Retry-After.")
    predict_chunk_rows: int = Field(
        256, ge=1, le=65536, description="A predict batch's rows scored in one call (its unit: recorded once, "
        "counted in the AIMD window); at most predict.max_request_rows. Fixed when a batch is made.")
