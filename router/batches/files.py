"""Uploaded files and batch results, in the data dir: ``<dir>/<id>.data`` (the bytes) and ``<id>.json``
(who made it, its name and purpose). Each is written to a temporary name and moved into place, the
metadata last, so a file that exists is whole; a router restart finds them all again. Several routers
share them only through a shared data dir (the store holds the batches, not the bytes).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PURPOSES = ("batch", "batch_output")


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class FileRecord:
    id: str
    bytes: int
    created_at: float
    filename: str
    purpose: str
    owner: str | None = None

    def visible_to(self, key_id: str | None, admin: bool) -> bool:
        return admin or self.owner == key_id

    def view(self) -> dict[str, Any]:
        """The file as OpenAI's ``FileObject``."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": int(self.created_at),
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


def _write(path: Path, content: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    temporary.write_bytes(content)
    os.replace(temporary, path)


class FileStore:
    """Files in one folder; the blocking file work runs in a thread."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _paths(self, file_id: str) -> tuple[Path, Path]:
        if not file_id.startswith("file-") or "/" in file_id or "\\" in file_id or ".." in file_id:
            raise KeyError(file_id)
        return self.folder / f"{file_id}.data", self.folder / f"{file_id}.json"

    def _save(self, record: FileRecord, content: bytes) -> None:
        data, meta = self._paths(record.id)
        self.folder.mkdir(parents=True, exist_ok=True)
        _write(data, content)
        _write(meta, json.dumps(asdict(record)).encode())

    async def save(self, content: bytes, filename: str, purpose: str, owner: str | None,
                   file_id: str | None = None, created_at: float | None = None) -> FileRecord:
        """Keep ``content``; ``file_id``: a given id (a batch's result, rewritten whole by a resumed batch)."""
        record = FileRecord(file_id or new_file_id(), len(content), created_at or time.time(), filename, purpose,
                            owner)
        await asyncio.to_thread(self._save, record, content)
        return record

    def _get(self, file_id: str) -> FileRecord | None:
        try:
            _, meta = self._paths(file_id)
            return FileRecord(**json.loads(meta.read_bytes()))
        except (KeyError, FileNotFoundError):
            return None

    async def get(self, file_id: str) -> FileRecord | None:
        return await asyncio.to_thread(self._get, file_id)

    async def content(self, file_id: str) -> bytes | None:
        def read() -> bytes | None:
            try:
                return self._paths(file_id)[0].read_bytes()
            except (KeyError, FileNotFoundError):
                return None

        return await asyncio.to_thread(read)

    async def delete(self, file_id: str) -> bool:
        def remove() -> bool:
            data, meta = self._paths(file_id)
            existed = meta.exists()
            meta.unlink(missing_ok=True)  # the metadata first: a half-deleted file no longer exists
            data.unlink(missing_ok=True)
            return existed

        return await asyncio.to_thread(remove)

    async def list(self) -> list[FileRecord]:
        """Every file, newest first."""
        def read_all() -> list[FileRecord]:
            found = [self._get(path.stem) for path in self.folder.glob("file-*.json")] if self.folder.exists() else []
            return sorted((r for r in found if r is not None), key=lambda r: (r.created_at, r.id), reverse=True)

        return await asyncio.to_thread(read_all)
