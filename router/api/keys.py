"""API keys: create (the secret is in that one answer only), list (never a secret), revoke. Admin only."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmserve.settings import PRIORITIES, Priority
from router.access.auth import SCOPES, hash_key, hint, new_secret
from router.errors import InvalidRequest, RouteNotFound
from router.gateway.authorize import scoped
from router.gateway.openapi import json_body
from router.gateway.protocol import parse_json_object, read_body, validate
from router.state import RouterState
from router.store import ApiKeyRecord, Store

router = APIRouter(prefix="/api/v1/keys", tags=["keys"], dependencies=[Depends(scoped("admin"))])

Scope = Literal["admin", "deploy", "read", "inference"]


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._@-]*$")
    owner: str = Field("", max_length=200)
    scopes: list[Scope] = Field(default_factory=lambda: list[Scope](["inference"]), min_length=1)
    models: list[str] | None = Field(None, description="the models it may use; absent: all")
    rpm: int | None = Field(None, ge=1, le=10_000_000, description="requests per minute; absent: unlimited")
    tpm: int | None = Field(None, ge=1, le=10_000_000_000, description="tokens per minute; absent: unlimited")
    priority: Priority = "standard"
    priorities: list[Priority] = Field(default_factory=lambda: list(PRIORITIES), min_length=1)
    expires_at: float | None = Field(None, description="Unix time after which the key is refused")

    @field_validator("priorities")
    @classmethod
    def _unique(cls, value: list[Priority]) -> list[Priority]:
        return list(dict.fromkeys(value))


def _store(request: Request) -> Store:
    state: RouterState = request.app.state.router
    if state.control is None:
        raise RouteNotFound("this router runs without a store, so it holds no API keys; "
                            "start it with `llmserve up`")
    return state.control.store


def _public(record: ApiKeyRecord) -> dict[str, Any]:
    data = record.to_dict()
    del data["key_hash"]  # a hash of a 256-bit secret is safe, but nobody needs it
    return data


@router.post("", status_code=201, openapi_extra=json_body(CreateKey))
async def create_key(request: Request) -> dict[str, Any]:
    limit = request.app.state.router.settings.max_body_bytes
    body = validate(CreateKey, parse_json_object(await read_body(
        request.stream(), request.headers.get("content-length"), limit)))
    if body.priority not in body.priorities:
        raise InvalidRequest(f"priority {body.priority!r} must be one of the key's priorities "
                             f"({', '.join(body.priorities)})", param="priority")
    if body.expires_at is not None and body.expires_at <= time.time():
        raise InvalidRequest("expires_at is in the past", param="expires_at")
    secret = new_secret()
    record = ApiKeyRecord(
        key_id=f"key_{uuid.uuid4().hex[:16]}", name=body.name, key_hash=hash_key(secret), hint=hint(secret),
        scopes=tuple(s for s in SCOPES if s in body.scopes), owner=body.owner,
        models=tuple(body.models) if body.models is not None else None, rpm=body.rpm, tpm=body.tpm,
        priority=body.priority, priorities=tuple(body.priorities), expires_at=body.expires_at)
    await _store(request).create_key(record)
    request.app.state.router.keys.add(record)  # usable here at once; other routers hear of it on the feed
    return {**_public(record), "key": secret}


@router.get("")
async def list_keys(request: Request) -> dict[str, Any]:
    return {"keys": [_public(k) for k in await _store(request).list_keys()]}


@router.delete("/{key_id}")
async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
    record = await _store(request).revoke_key(key_id, time.time())
    request.app.state.router.keys.add(record)  # refused here at once
    return _public(record)
