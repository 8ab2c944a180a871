"""What a batch's endpoint makes of its input file: the units the runner runs (``Line``s), how many requests
(``request_counts``) a recorded unit stands for, and the output and error files. One kind a family of
endpoints, chosen by the batch's ``endpoint``:

- ``ChatKind`` (``/v1/chat/completions``, ``/v1/completions``): a unit is one request line of OpenAI's
  batch JSONL, counted as one request (``router.batches.models``, ``router.batches.output``).
- ``PredictKind`` (``/api/v1/models/{m}/predict``): a unit is a chunk of rows scored in one predict call;
  ``request_counts`` count rows (``router.batches.rows``).

The runner (``router.batches.runner``) is the same for both: claim, lease, the AIMD window, each unit
recorded once, finalize.
"""

from __future__ import annotations

from typing import Protocol

from router.batches import output, rows
from router.batches.models import Batch, Line, parse_lines
from router.store.base import BatchLineRecord


class BatchKind(Protocol):
    def lines(self, content: bytes, batch: Batch) -> list[Line]:
        """Every unit of the input file, good or bad; raises ``rows.InputFileError`` for a file that cannot
        be read at all (the batch fails)."""
        ...

    def total(self, lines: list[Line]) -> int:
        """``request_counts.total``."""
        ...

    def counts(self, record: BatchLineRecord) -> tuple[int, int]:
        """(completed, failed) requests of one recorded unit."""
        ...

    def render(self, batch_id: str, records: list[BatchLineRecord], lines: list[Line],
               final: str) -> tuple[bytes, bytes]:
        """(output file, error file) of a batch ending ``final``."""
        ...


class ChatKind:
    """OpenAI's batch lines: one request each."""

    def lines(self, content: bytes, batch: Batch) -> list[Line]:
        return parse_lines(content, batch.endpoint)

    def total(self, lines: list[Line]) -> int:
        return len(lines)

    def counts(self, record: BatchLineRecord) -> tuple[int, int]:
        ok = output.succeeded(record)
        return int(ok), int(not ok)

    def render(self, batch_id: str, records: list[BatchLineRecord], lines: list[Line],
               final: str) -> tuple[bytes, bytes]:
        return output.render(batch_id, records, lines, final)


class PredictKind:
    """Rows of a predict model, scored a chunk at a time."""

    def lines(self, content: bytes, batch: Batch) -> list[Line]:
        return rows.chunks(rows.read_rows(content), batch.chunk_rows or rows.DEFAULT_CHUNK_ROWS)

    def total(self, lines: list[Line]) -> int:
        return sum(rows.rows_in(line) for line in lines)

    def counts(self, record: BatchLineRecord) -> tuple[int, int]:
        return rows.counts(record)

    def render(self, batch_id: str, records: list[BatchLineRecord], lines: list[Line],
               final: str) -> tuple[bytes, bytes]:
        return rows.render(records, lines, final)


def kind_of(batch: Batch) -> BatchKind:
    return PredictKind() if rows.predict_model(batch.endpoint) is not None else ChatKind()
