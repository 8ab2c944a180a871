"""SQLite backend: one file in the data dir, WAL, versioned migrations.

Calls run in a worker thread (the event loop never blocks on the disk) on
one connection guarded by a lock; every write is one transaction.
Inference logs live in one table per UTC day (``inference_logs_YYYYMMDD``),
so retention drops whole tables instead of deleting rows; async jobs in
``jobs`` (``sqlite_jobs``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from router.store import sqlite_logs
from router.store.base import (
    KEYS_CHANGED,
    LIVE_STATUSES,
    RESYNC,
    TERMINAL_STATUSES,
    ApiKeyRecord,
    Conflict,
    DeploymentRecord,
    DeploymentStatus,
    HistoryEntry,
    InferenceLog,
    ModelRecord,
    NotFound,
    TrafficRecord,
    Unavailable,
)
from router.store.sqlite_batches import SQLiteBatches
from router.store.sqlite_jobs import SQLiteJobs
from router.store.sqlite_schema import DAY, MIGRATIONS, connect_read_only

T = TypeVar("T")
logger = logging.getLogger(__name__)

_REOPEN_AFTER = frozenset({sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN})
_DEPLOYMENT_COLUMNS = ("id, model_name, version, status, model_dir, replicas, gpu, reason, created_at, updated_at, "
                       "engine, operation, driver, lease_until, autoscaling")


class SQLiteStore(SQLiteJobs, SQLiteBatches):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.read_only = False
        self._db = self._open()
        self._listeners: list[asyncio.Queue[str]] = []
        self._log_tables: set[str] = set()  # day tables known to have every column

    # -- plumbing -------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        """Read-write when the disk allows; on a read-only disk an existing store opens read-only, so the
        router comes up serving its last configuration and refuses changes (503) until the disk is back."""
        if os.access(self.path.parent, os.W_OK) or not self.path.exists():
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            self._migrate(db)
            self.read_only = False
            return db
        # read-only WAL: SQLite reads the -wal and -shm files a killed router left, creating none
        db = connect_read_only(self.path)
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version != len(MIGRATIONS):
            db.close()
            raise Unavailable(f"the SQLite store at {self.path} is on a read-only disk at schema {version}; this "
                              f"llmserve needs schema {len(MIGRATIONS)} and cannot upgrade it there")
        logger.warning("the SQLite store at %s is on a read-only disk: serving its configuration, refusing "
                       "changes until the disk is writable", self.path)
        self.read_only = True
        return db

    def _writable(self) -> None:
        """Before a write on a store opened read-only: reopen read-write if the disk is back, else refuse."""
        if not self.read_only:
            return
        if not os.access(self.path.parent, os.W_OK):
            raise Unavailable(f"the SQLite store at {self.path} is on a read-only disk; nothing was changed "
                              f"(make {self.path.parent} writable: the router picks it up on the next change)")
        # closed first: beside the read-only connection, the new one's writes kept failing (chaos
        # sqlite_read_only); a reopen that fails leaves a read-only one serving reads
        self._db.close()
        try:
            self._db = self._open()
        except sqlite3.Error:
            self._db, self.read_only = connect_read_only(self.path), True
            raise

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Called before the store is shared, or under its lock (a reopen)."""
        current = int(db.execute("PRAGMA user_version").fetchone()[0])
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            db.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return fn(self._db)

        try:
            return await asyncio.to_thread(locked)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in _REOPEN_AFTER:
                # The connection may be stuck read-only (opened while the disk was) or on a file handle
                # the disk lost: the next write reopens it once the disk is writable.
                self.read_only = True
            # A full disk, a read-only one, an I/O error, a lock held past busy_timeout: the disk's
            # trouble, not the request's. IntegrityError (a caller's conflict) is mapped by each method.
            raise Unavailable(f"the SQLite store at {self.path} cannot be used: {exc} "
                              f"(check the disk under {self.path.parent}); nothing was changed") from exc

    async def _write(self, fn: Callable[[sqlite3.Connection], T], changed: str | None = None) -> T:
        def transaction(db: sqlite3.Connection) -> T:
            self._writable()
            db = self._db  # reopened read-write, maybe
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # a COMMIT that failed (disk full) leaves the transaction open
                    db.execute("ROLLBACK")
                raise
            return result

        result = await self._run(transaction)
        if changed is not None:
            self._notify(changed)
        return result

    def _notify(self, model_name: str) -> None:
        for queue in self._listeners:
            queue.put_nowait(model_name)

    async def close(self) -> None:
        await self._run(lambda db: db.close())

    async def changes(self) -> AsyncIterator[str]:
        """Changes made through this store object (one process owns a SQLite file)."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._listeners.append(queue)
        try:
            yield RESYNC
            while True:
                yield await queue.get()
        finally:
            self._listeners.remove(queue)

    # -- models ---------------------------------------------------------------

    async def create_model(self, model: ModelRecord) -> None:
        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO models VALUES (?, ?, ?, ?, ?)",
                    (model.name, model.description, model.framework, model.owner, model.created_at),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"model {model.name!r} already exists") from None

        await self._write(insert, changed=model.name)

    async def get_model(self, name: str) -> ModelRecord | None:
        row = await self._run(lambda db: db.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone())
        return ModelRecord(*row) if row else None

    async def list_models(self) -> list[ModelRecord]:
        rows = await self._run(lambda db: db.execute("SELECT * FROM models ORDER BY name").fetchall())
        return [ModelRecord(*row) for row in rows]

    # -- deployments ----------------------------------------------------------

    async def create_deployment(self, deployment: DeploymentRecord) -> None:
        live = tuple(s.value for s in LIVE_STATUSES)

        def insert(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM models WHERE name = ?", (deployment.model_name,)).fetchone() is None:
                raise NotFound(f"model {deployment.model_name!r} is not registered")
            clash = db.execute(
                f"SELECT id, status FROM deployments WHERE model_name = ? AND version = ? "
                f"AND status IN ({','.join('?' * len(live))})",
                (deployment.model_name, deployment.version, *live),
            ).fetchone()
            if clash:
                raise Conflict(
                    f"version {deployment.version!r} of {deployment.model_name!r} is already deployed "
                    f"(deployment {clash[0]}, {clash[1]}); choose a new version label"
                )
            d = deployment
            db.execute(
                "INSERT INTO deployments (id, model_name, version, status, model_dir, replicas, gpu, reason, "
                "created_at, updated_at, engine, operation, driver, lease_until, autoscaling) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (d.id, d.model_name, d.version, d.status.value, d.model_dir, d.replicas, d.gpu, d.reason,
                 d.created_at, d.updated_at, json.dumps(d.engine), d.operation, d.driver, d.lease_until,
                 json.dumps(d.autoscaling)),
            )

        await self._write(insert, changed=deployment.model_name)

    async def update_deployment(self, deployment_id: str, status: DeploymentStatus, reason: str | None = None) -> None:
        def update(db: sqlite3.Connection) -> str:
            row = db.execute("SELECT model_name FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
            if row is None:
                raise NotFound(f"deployment {deployment_id!r} does not exist", "deployment")
            db.execute(
                "UPDATE deployments SET status = ?, reason = COALESCE(?, reason), updated_at = ? WHERE id = ?",
                (status.value, reason, time.time(), deployment_id),
            )
            if status in TERMINAL_STATUSES:
                db.execute("UPDATE deployments SET operation = '', driver = '', lease_until = 0 WHERE id = ?",
                           (deployment_id,))
            return str(row[0])

        self._notify(await self._write(update))

    async def set_driver(
        self, deployment_id: str, operation: str, driver: str, lease_until: float,
        expected: tuple[str, float] | None = None,
    ) -> bool:
        def update(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT model_name, driver, lease_until FROM deployments WHERE id = ?",
                             (deployment_id,)).fetchone()
            if row is None:
                raise NotFound(f"deployment {deployment_id!r} does not exist", "deployment")
            if expected is not None and (row[1], row[2]) != expected:
                return None
            db.execute("UPDATE deployments SET operation = ?, driver = ?, lease_until = ? WHERE id = ?",
                       (operation, driver, lease_until, deployment_id))
            return str(row[0])

        changed = await self._write(update)
        return changed is not None

    async def set_scaling(self, deployment_id: str, replicas: int | None = None,
                          autoscaling: dict[str, Any] | None = None) -> None:
        def update(db: sqlite3.Connection) -> str:
            row = db.execute("SELECT model_name FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
            if row is None:
                raise NotFound(f"deployment {deployment_id!r} does not exist", "deployment")
            if replicas is not None:
                db.execute("UPDATE deployments SET replicas = ? WHERE id = ?", (replicas, deployment_id))
            if autoscaling is not None:
                db.execute("UPDATE deployments SET autoscaling = ? WHERE id = ?",
                           (json.dumps(autoscaling), deployment_id))
            return str(row[0])

        self._notify(await self._write(update))

    async def claim_lease(self, name: str, holder: str, until: float, now: float) -> bool:
        def claim(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT holder, until FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != holder and row[1] >= now:
                return False
            db.execute("INSERT OR REPLACE INTO leases (name, holder, until) VALUES (?, ?, ?)", (name, holder, until))
            return True

        return await self._write(claim)

    async def list_deployments(self, model_name: str | None = None) -> list[DeploymentRecord]:
        def query(db: sqlite3.Connection) -> list[Any]:
            if model_name is None:
                return db.execute(f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments ORDER BY created_at").fetchall()
            return db.execute(
                f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments WHERE model_name = ? ORDER BY created_at",
                (model_name,),
            ).fetchall()

        rows = await self._run(query)
        return [
            DeploymentRecord(id=r[0], model_name=r[1], version=r[2], status=DeploymentStatus(r[3]), model_dir=r[4],
                             replicas=r[5], gpu=r[6], reason=r[7], created_at=r[8], updated_at=r[9],
                             engine=json.loads(r[10]), operation=r[11], driver=r[12], lease_until=r[13],
                             autoscaling=json.loads(r[14]))
            for r in rows
        ]

    # -- traffic and history --------------------------------------------------

    async def get_traffic(self, model_name: str) -> TrafficRecord:
        row = await self._run(lambda db: db.execute(
            "SELECT split, revision, updated_at, updated_by FROM traffic WHERE model_name = ?", (model_name,)
        ).fetchone())
        if row is None:
            return TrafficRecord(model_name, {})
        return TrafficRecord(model_name, json.loads(row[0]), row[1], row[2], row[3])

    async def set_traffic(
        self, model_name: str, split: dict[str, int], expected_revision: int, entry: HistoryEntry
    ) -> TrafficRecord:
        def cas(db: sqlite3.Connection) -> TrafficRecord:
            row = db.execute("SELECT revision FROM traffic WHERE model_name = ?", (model_name,)).fetchone()
            current = row[0] if row else 0
            if current != expected_revision:
                raise Conflict(
                    f"the traffic of {model_name!r} changed meanwhile (revision {current}, "
                    f"expected {expected_revision}); read it again and retry"
                )
            record = TrafficRecord(model_name, dict(split), current + 1, entry.at, entry.actor)
            db.execute(
                "INSERT INTO traffic VALUES (?, ?, ?, ?, ?) ON CONFLICT(model_name) DO UPDATE SET "
                "split = excluded.split, revision = excluded.revision, updated_at = excluded.updated_at, "
                "updated_by = excluded.updated_by",
                (model_name, json.dumps(record.split), record.revision, record.updated_at, record.updated_by),
            )
            _insert_history(db, entry)
            return record

        return await self._write(cas, changed=model_name)

    async def append_history(self, entry: HistoryEntry) -> None:
        await self._write(lambda db: _insert_history(db, entry), changed=entry.model_name)

    async def history(self, model_name: str, limit: int = 100) -> list[HistoryEntry]:
        rows = await self._run(lambda db: db.execute(
            "SELECT model_name, action, actor, detail, at FROM history WHERE model_name = ? "
            "ORDER BY id DESC LIMIT ?", (model_name, limit)
        ).fetchall())
        return [HistoryEntry(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in reversed(rows)]

    # -- API keys -------------------------------------------------------------

    async def create_key(self, key: ApiKeyRecord) -> None:
        def insert(db: sqlite3.Connection) -> None:
            live = db.execute("SELECT key_id FROM api_keys WHERE name = ? AND revoked_at IS NULL",
                              (key.name,)).fetchone()
            if live:
                raise Conflict(f"an API key named {key.name!r} exists ({live[0]}); revoke it or choose another name")
            try:
                db.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?)",
                           (key.key_id, key.name, key.key_hash, key.revoked_at, json.dumps(key.to_dict())))
            except sqlite3.IntegrityError:
                raise Conflict(f"API key {key.key_id!r} exists") from None

        await self._write(insert, changed=KEYS_CHANGED)

    async def list_keys(self) -> list[ApiKeyRecord]:
        rows = await self._run(lambda db: db.execute("SELECT data FROM api_keys ORDER BY rowid").fetchall())
        return [ApiKeyRecord.from_dict(json.loads(r[0])) for r in rows]

    async def revoke_key(self, key_id: str, at: float) -> ApiKeyRecord:
        def revoke(db: sqlite3.Connection) -> ApiKeyRecord:
            row = db.execute("SELECT data FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"API key {key_id!r} does not exist", "key")
            record = ApiKeyRecord.from_dict(json.loads(row[0]))
            if record.revoked_at is None:
                record = ApiKeyRecord.from_dict({**record.to_dict(), "revoked_at": at})
                db.execute("UPDATE api_keys SET revoked_at = ?, data = ? WHERE key_id = ?",
                           (at, json.dumps(record.to_dict()), key_id))
            return record

        return await self._write(revoke, changed=KEYS_CHANGED)

    # -- inference logs -------------------------------------------------------

    async def write_inference_logs(self, logs: list[InferenceLog]) -> None:
        if logs:
            await self._write(lambda db: sqlite_logs.insert(db, logs, self._log_tables))

    async def inference_logs(self, day: str, model_name: str | None = None) -> list[InferenceLog]:
        if not DAY.match(day):
            raise ValueError(f"day must be YYYYMMDD, got {day!r}")
        return await self._run(lambda db: sqlite_logs.query(db, day, model_name))

    async def drop_inference_logs_before(self, day: str) -> list[str]:
        return await self._write(lambda db: sqlite_logs.drop_before(db, day, self._log_tables))


def _insert_history(db: sqlite3.Connection, entry: HistoryEntry) -> None:
    db.execute(
        "INSERT INTO history (model_name, at, actor, action, detail) VALUES (?, ?, ?, ?, ?)",
        (entry.model_name, entry.at, entry.actor, entry.action, json.dumps(entry.detail)),
    )
