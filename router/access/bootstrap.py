"""The first admin key of a fresh data dir, as Jupyter makes its token: generated, stored as a hash, and
written to a file only its user can read, so the one who started the stack can use it."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from router.access.auth import hash_key, hint, new_secret
from router.store import ApiKeyRecord, Store

ADMIN_KEY_FILE = "admin-key"


async def first_admin_key(store: Store, data_dir: Path) -> str | None:
    """A new admin key when the store has no live one (returned, and written to ``data_dir/admin-key``
    with mode 0600); None when it has one."""
    now = time.time()
    if any("admin" in k.scopes and k.revoked_at is None and (k.expires_at is None or k.expires_at > now)
           for k in await store.list_keys()):
        return None
    secret = new_secret()
    path = data_dir / ADMIN_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # a new file created 0600 in one call, then put in place: never readable by others, not for a moment,
    # whatever mode an older file had
    partial = path.with_name(f".{ADMIN_KEY_FILE}.{uuid.uuid4().hex[:8]}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    os.replace(partial, path)
    await store.create_key(ApiKeyRecord(
        key_id=f"key_{uuid.uuid4().hex[:16]}", name=f"admin-{time.strftime('%Y%m%d-%H%M%S')}",
        key_hash=hash_key(secret), hint=hint(secret), scopes=("admin",), owner="llmserve up"))
    return secret
