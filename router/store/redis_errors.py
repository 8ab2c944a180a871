"""Redis down or unreachable, as the store's ``Unavailable`` (for ``RedisStore`` and its job methods)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.store.base import Unavailable

P = ParamSpec("P")
T = TypeVar("T")
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def reachable(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Redis down or unreachable becomes the store's ``Unavailable``, whatever the call."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except UNREACHABLE as exc:
            raise Unavailable(f"Redis cannot be reached ({type(exc).__name__}: {exc}); nothing was changed, "
                              "retry when it is back") from exc

    return call
