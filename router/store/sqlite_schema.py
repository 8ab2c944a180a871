"""The SQLite store's schema: its migrations, and the columns of a day's inference-log table."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

# Append only: each entry upgrades the schema by one version.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE models (
        name TEXT PRIMARY KEY, description TEXT NOT NULL, framework TEXT NOT NULL,
        owner TEXT NOT NULL, created_at REAL NOT NULL
    );
    CREATE TABLE deployments (
        id TEXT PRIMARY KEY, model_name TEXT NOT NULL REFERENCES models(name), version TEXT NOT NULL,
        status TEXT NOT NULL, model_dir TEXT NOT NULL, replicas INTEGER NOT NULL, gpu INTEGER NOT NULL,
        reason TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL
    );
    CREATE INDEX deployments_by_model ON deployments(model_name, version);
    CREATE TABLE traffic (
        model_name TEXT PRIMARY KEY, split TEXT NOT NULL, revision INTEGER NOT NULL,
        updated_at REAL NOT NULL, updated_by TEXT NOT NULL
    );
    CREATE TABLE history (
        id INTEGER PRIMARY KEY AUTOINCREMENT, model_name TEXT NOT NULL, at REAL NOT NULL,
        actor TEXT NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL
    );
    CREATE INDEX history_by_model ON history(model_name, id);
    """,
    # 2: per-version engine settings (a canary may differ from stable in more than its weights)
    """
    ALTER TABLE deployments ADD COLUMN engine TEXT NOT NULL DEFAULT '{}';
    """,
    # 3: the operation in progress on a deployment and the lease of the router driving it
    """
    ALTER TABLE deployments ADD COLUMN operation TEXT NOT NULL DEFAULT '';
    ALTER TABLE deployments ADD COLUMN driver TEXT NOT NULL DEFAULT '';
    ALTER TABLE deployments ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
    """,
    # 4: API keys (the record as JSON; its hash and name as columns to look up by)
    """
    CREATE TABLE api_keys (
        key_id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE, revoked_at REAL,
        data TEXT NOT NULL
    );
    CREATE INDEX api_keys_by_name ON api_keys(name);
    """,
    # 5: a deployment's autoscaling policy; named leases (one autoscaler acts for a version at a time)
    """
    ALTER TABLE deployments ADD COLUMN autoscaling TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, until REAL NOT NULL);
    """,
    # 6: async jobs (what the sweeps select by as columns; the rest of the record as JSON)
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY, status TEXT NOT NULL, runner TEXT NOT NULL, lease_until REAL NOT NULL,
        finished_at REAL, data TEXT NOT NULL
    );
    CREATE INDEX jobs_by_status ON jobs(status, lease_until);
    CREATE INDEX jobs_by_finish ON jobs(finished_at);
    """,
    # 7: batches (the OpenAI Batch API) and what each of their lines gave (one row a line, recorded once)
    """
    CREATE TABLE batches (id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at REAL NOT NULL, data TEXT NOT NULL);
    CREATE INDEX batches_by_creation ON batches(created_at);
    CREATE TABLE batch_lines (
        batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, status_code INTEGER NOT NULL,
        body TEXT NOT NULL, PRIMARY KEY (batch_id, line)
    );
    """,
)

LOG_COLUMNS = {"request_id": "TEXT", "model_name": "TEXT", "version": "TEXT", "replica": "TEXT",
                "user_bucket": "INTEGER", "ttft_ms": "REAL", "latency_ms": "REAL", "output_tokens": "INTEGER",
                "status_code": "INTEGER", "timestamp": "REAL", "route": "TEXT NOT NULL DEFAULT ''",
                "reason": "TEXT"}
LOG_TABLE = re.compile(r"^inference_logs_(\d{8})$")
DAY = re.compile(r"^\d{8}$")


def connect_read_only(path: Path) -> sqlite3.Connection:
    """Read-only, WAL included: SQLite reads the -wal and -shm files a killed router left, creating none."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)


def ensure_log_table(db: sqlite3.Connection, table: str, known: set[str]) -> None:
    """Create a day's table; one written by an older llmserve gains the columns it lacks. ``known``: the
    tables already checked (and it gains ``table``)."""
    if table in known:
        return
    db.execute(f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(f'{c} {t}' for c, t in LOG_COLUMNS.items())})")
    present = {row[1] for row in db.execute(f"PRAGMA table_info({table})").fetchall()}
    for column, kind in LOG_COLUMNS.items():
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    known.add(table)
