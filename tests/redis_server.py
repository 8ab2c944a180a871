"""A real redis-server on a loopback port for the tests (Debian's package; .ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from loadtest.redis_server import RedisServer


@contextmanager
def redis_server() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run should have installed it")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="redis-") as data:
        server = RedisServer(Path(data), durable=False)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()
