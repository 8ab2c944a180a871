"""The SQLite store's batches: a mixin of ``SQLiteStore`` whose methods run in its transactions.

One row a batch (its status and creation time as columns, the rest as JSON) and one row a finished line,
keyed by (batch, line number): ``INSERT OR IGNORE`` keeps the first record of a line, so a line written
twice (a resumed batch) is recorded once. ``change_batch`` reads and writes in one ``BEGIN IMMEDIATE``
transaction: of two routers claiming a batch, one wins.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Collection
from typing import Any, Protocol, TypeVar

from router.store.base import BatchLineRecord, BatchRecord, Conflict

T = TypeVar("T")


class _Transactions(Protocol):
    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    async def _write(self, fn: Callable[[sqlite3.Connection], T], changed: str | None = None) -> T: ...


def _row(batch: BatchRecord) -> tuple[Any, ...]:
    data = {k: v for k, v in batch.to_dict().items() if k not in ("id", "status", "created_at")}
    return batch.id, batch.status, batch.created_at, json.dumps(data)


def _record(row: tuple[Any, ...]) -> BatchRecord:
    return BatchRecord(id=row[0], status=row[1], created_at=row[2], **json.loads(row[3]))


def _select(db: sqlite3.Connection, where: str = "", args: tuple[Any, ...] = ()) -> list[BatchRecord]:
    rows = db.execute(f"SELECT id, status, created_at, data FROM batches {where}", args).fetchall()
    return [_record(r) for r in rows]


class SQLiteBatches:
    """The ``Store`` batch methods of ``SQLiteStore``."""

    async def add_batch(self: _Transactions, batch: BatchRecord) -> None:
        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute("INSERT INTO batches VALUES (?, ?, ?, ?)", _row(batch))
            except sqlite3.IntegrityError:
                raise Conflict(f"batch {batch.id!r} exists") from None

        await self._write(insert)

    async def get_batch(self: _Transactions, batch_id: str) -> BatchRecord | None:
        found = await self._run(lambda db: _select(db, "WHERE id = ?", (batch_id,)))
        return found[0] if found else None

    async def list_batches(self: _Transactions) -> list[BatchRecord]:
        return await self._run(lambda db: _select(db, "ORDER BY created_at DESC, id DESC"))

    async def change_batch(self: _Transactions, batch_id: str,
                           change: Callable[[BatchRecord], BatchRecord | None]) -> BatchRecord | None:
        def apply(db: sqlite3.Connection) -> BatchRecord | None:
            found = _select(db, "WHERE id = ?", (batch_id,))
            new = change(found[0]) if found else None
            if new is not None:
                db.execute("UPDATE batches SET status = ?, created_at = ?, data = ? WHERE id = ?",
                           (*_row(new)[1:], batch_id))
            return new

        return await self._write(apply)

    async def add_batch_lines(self: _Transactions, batch_id: str, lines: Collection[BatchLineRecord]) -> int:
        def insert(db: sqlite3.Connection) -> int:
            added = 0
            for line in lines:
                added += db.execute("INSERT OR IGNORE INTO batch_lines VALUES (?, ?, ?, ?, ?)",
                                    (batch_id, line.line, line.custom_id, line.status_code,
                                     json.dumps(line.body))).rowcount
            return added

        return await self._write(insert) if lines else 0

    async def batch_lines(self: _Transactions, batch_id: str) -> list[BatchLineRecord]:
        rows = await self._run(lambda db: db.execute(
            "SELECT line, custom_id, status_code, body FROM batch_lines WHERE batch_id = ? ORDER BY line",
            (batch_id,)).fetchall())
        return [BatchLineRecord(r[0], r[1], r[2], json.loads(r[3])) for r in rows]
