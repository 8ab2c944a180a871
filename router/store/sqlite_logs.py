"""The SQLite store's inference logs: one table per UTC day, so retention drops whole tables."""

from __future__ import annotations

import sqlite3

from router.store.base import InferenceLog
from router.store.sqlite_schema import LOG_COLUMNS, LOG_TABLE, ensure_log_table


def insert(db: sqlite3.Connection, logs: list[InferenceLog], known: set[str]) -> None:
    """Write each log into its day's table (created, or given any new column, first)."""
    by_day: dict[str, list[InferenceLog]] = {}
    for log in logs:
        by_day.setdefault(log.day, []).append(log)
    for day, rows in by_day.items():
        table = f"inference_logs_{day}"
        ensure_log_table(db, table, known)
        db.executemany(
            f"INSERT INTO {table} ({', '.join(LOG_COLUMNS)}) VALUES ({', '.join('?' * len(LOG_COLUMNS))})",
            [tuple(getattr(r, c) for c in LOG_COLUMNS) for r in rows],
        )


def query(db: sqlite3.Connection, day: str, model_name: str | None) -> list[InferenceLog]:
    table = f"inference_logs_{day}"
    exists = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone()
    if not exists:
        return []
    if model_name is None:
        cursor = db.execute(f"SELECT * FROM {table} ORDER BY timestamp")
    else:
        cursor = db.execute(f"SELECT * FROM {table} WHERE model_name = ? ORDER BY timestamp", (model_name,))
    names = [c[0] for c in cursor.description]
    return [InferenceLog(**dict(zip(names, row, strict=True))) for row in cursor.fetchall()]


def drop_before(db: sqlite3.Connection, day: str, known: set[str]) -> list[str]:
    """Drop the day tables older than ``day``; returns the days dropped."""
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()]
    dropped = []
    for name in names:
        match = LOG_TABLE.match(name)
        if match and match.group(1) < day:
            db.execute(f"DROP TABLE {name}")
            known.discard(name)
            dropped.append(match.group(1))
    return sorted(dropped)
