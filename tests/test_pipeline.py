"""The request pipeline's steps, without HTTP: what a handler gets from ``InferenceCall``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from llmserve.replicas.backend import Endpoint, EndpointState
from llmserve.settings import RouterSettings
from router.access.auth import Caller
from router.errors import NoReplicaReady
from router.gateway.pipeline import InferenceCall
from router.traffic.catalog import Catalog, ServedVersion
from router.traffic.shadow import Shadows


def call_for(catalog: Catalog, settings: RouterSettings, headers: dict[str, str] | None = None) -> InferenceCall:
    state: Any = SimpleNamespace(catalog=catalog, settings=settings, relay=SimpleNamespace(deadline=lambda: 0.0),
                                 log_sink=lambda _log: None, metrics=None, samples=None, admission=None,
                                 shadows=Shadows())
    request: Any = SimpleNamespace(state=SimpleNamespace(request_id="req-1"), headers=headers or {})
    call = InferenceCall(request, state, "test")
    call.caller = Caller("key_1", "test", frozenset({"inference"}))
    return call


def test_a_version_not_started_here_yet_answers_with_the_configured_retry_after() -> None:
    catalog = Catalog()
    v1 = ServedVersion("chat", "v1", 2048, replicas=[Endpoint("chat:v1/0", "chat", "v1", state=EndpointState.READY)])
    catalog.add_version(v1)
    catalog.set_split("chat", {"v2": 100})  # the store's split names a version this router has not launched
    call = call_for(catalog, RouterSettings(retry_after_s=7))
    with pytest.raises(NoReplicaReady) as refused:
        call.resolve("chat")
    assert refused.value.headers["Retry-After"] == "7" and refused.value.retry_after_s == 7


def test_resolve_records_the_user_and_the_version_it_chose() -> None:
    catalog = Catalog()
    catalog.add_version(ServedVersion("chat", "v1", 2048,
                                      replicas=[Endpoint("chat:v1/0", "chat", "v1", state=EndpointState.READY)]))
    call = call_for(catalog, RouterSettings(), headers={"x-user-id": "alice"})
    assert call.identify() == "alice"
    served = call.resolve("chat")
    assert served.version == "v1" and (call.record.model, call.record.version, call.record.user) == (
        "chat", "v1", "alice")
