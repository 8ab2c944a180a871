"""Who is calling: API keys, their scopes, the models they may use and the priorities they may ask for.

A key is ``sk-ls-`` and 43 characters of ``secrets.token_urlsafe`` (256 bits):
high enough in entropy that an unsalted SHA-256 is safe to store and to look
up by (what LiteLLM stores too); the secret is shown once, when it is made.
Clients send it as OpenAI's do, ``Authorization: Bearer sk-...``, or as
``x-api-key``. The router keeps every key's record in memory (``KeyRing``),
loaded from the store at start and again whenever the store's change feed
says the keys changed, so a revocation reaches every router sharing a Redis
within milliseconds and authenticating costs no store read.

Scopes: ``admin`` (everything, keys included), ``deploy`` (control-plane
writes), ``read`` (control-plane and metrics reads), ``inference`` (the
OpenAI routes, ``/generate``, ``/predict``, ``/v2/.../infer``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from router.errors import InsufficientScope, InvalidApiKey
from router.store import ApiKeyRecord

SCOPES = ("admin", "deploy", "read", "inference")
KEY_PREFIX = "sk-ls-"
_MAX_KEY_CHARS = 256  # a real key is 49; anything much longer is not one (and is not hashed)


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def configured_admin(secret: str) -> ApiKeyRecord:
    """The admin key of LLMSERVE_ADMIN_KEY: accepted by every router it is set on, stored nowhere."""
    return ApiKeyRecord(key_id="key_configured_admin", name="admin (LLMSERVE_ADMIN_KEY)", key_hash=hash_key(secret),
                        hint=hint(secret), scopes=("admin",), owner="configuration")


def hint(secret: str) -> str:
    """What a listing shows of a key: its prefix and last four characters."""
    return f"{secret[:len(KEY_PREFIX)]}...{secret[-4:]}"


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries, None when it carries none; malformed credentials are a 401."""
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise InvalidApiKey("the Authorization header must be 'Bearer <API key>'")
        return _checked(credentials.strip())
    key = headers.get("x-api-key")
    if key is not None:
        return _checked(key.strip())
    return None


def _checked(key: str) -> str:
    if not key:
        raise InvalidApiKey("the API key is empty")
    if len(key) > _MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise InvalidApiKey("that is not an API key (llmserve keys are sk-ls- and 43 characters)")
    return key


@dataclass(frozen=True)
class Caller:
    """The authenticated caller (or, with authentication off, anyone)."""

    key_id: str | None  # None: authentication is off
    name: str
    scopes: frozenset[str]
    models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    priority: str = "standard"
    priorities: tuple[str, ...] = ("critical", "standard", "batch")

    @classmethod
    def of(cls, record: ApiKeyRecord) -> Caller:
        return cls(record.key_id, record.name, frozenset(record.scopes),
                   frozenset(record.models) if record.models is not None else None,
                   record.rpm, record.tpm, record.priority, record.priorities)

    @property
    def actor(self) -> str:
        """What the audit trail records: the key's id and name, never its secret."""
        return f"{self.name} ({self.key_id})" if self.key_id else self.name

    def may(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def require(self, scope: str) -> None:
        if not self.may(scope):
            held = ", ".join(sorted(self.scopes)) or "none"
            raise InsufficientScope(f"this API key ({self.name}) lacks the {scope!r} scope (it has: {held})",
                                    param=scope)

    def may_use(self, model: str) -> bool:
        """``model`` may be ``name:version`` (a pin): the name decides."""
        return self.models is None or model.partition(":")[0] in self.models


class KeyRing:
    """Every key's record by its hash, in memory; ``authenticate`` is a dictionary lookup."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._by_hash: dict[str, ApiKeyRecord] = {}
        self._static: dict[str, ApiKeyRecord] = {}  # LLMSERVE_ADMIN_KEY: configured, not stored

    def replace(self, records: Iterable[ApiKeyRecord]) -> None:
        self._by_hash = {**{r.key_hash: r for r in records}, **self._static}

    def add(self, record: ApiKeyRecord) -> None:
        """One key created or revoked here: in effect before the store's feed brings it back."""
        self._by_hash[record.key_hash] = record

    def __len__(self) -> int:
        return len(self._by_hash)

    def add_static(self, record: ApiKeyRecord) -> None:
        self._static[record.key_hash] = record
        self._by_hash[record.key_hash] = record

    def caller_by_id(self, key_id: str) -> Caller:
        """The caller of the key with ``key_id`` (work a key left to run later, such as a batch, runs as that
        key): InvalidApiKey once it is revoked, expired or gone."""
        record = next((r for r in self._by_hash.values() if r.key_id == key_id), None)
        if record is None:
            raise InvalidApiKey(f"API key {key_id} no longer exists")
        if record.revoked_at is not None:
            raise InvalidApiKey(f"API key {record.key_id} ({record.name}) was revoked")
        if record.expires_at is not None and record.expires_at <= self._clock():
            raise InvalidApiKey(f"API key {record.key_id} ({record.name}) expired")
        return Caller.of(record)

    def authenticate(self, secret: str | None) -> Caller:
        if secret is None:
            raise InvalidApiKey("no API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')")
        digest = hash_key(secret)
        record = self._by_hash.get(digest)
        # the lookup is by a hash of the secret, so its timing says nothing about any stored key's secret;
        # the comparison is the constant-time one all the same
        if record is None or not hmac.compare_digest(record.key_hash, digest):
            raise InvalidApiKey("unknown API key")
        if record.revoked_at is not None:
            raise InvalidApiKey(f"API key {record.key_id} ({record.name}) was revoked")
        if record.expires_at is not None and record.expires_at <= self._clock():
            raise InvalidApiKey(f"API key {record.key_id} ({record.name}) expired")
        return Caller.of(record)
