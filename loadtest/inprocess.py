"""A router app served by uvicorn in this event loop, on a loopback port: for the tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from llmserve.replicas.backend import ReplicaBackend
from llmserve.server import uvicorn_config
from llmserve.settings import RouterSettings


@contextlib.asynccontextmanager
async def serve_router(app: FastAPI, port: int, backend: ReplicaBackend, wait_replicas: bool = True,
                       router: RouterSettings | None = None) -> AsyncIterator[str]:
    """Start ``app`` on 127.0.0.1:``port`` (and wait for the backend's replicas); yields the base URL.
    ``router``: the settings whose connection limits uvicorn applies, as ``llmserve up`` does."""
    settings = (router or RouterSettings()).model_copy(update={"host": "127.0.0.1", "port": port})
    server = uvicorn.Server(uvicorn_config(app, settings, lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # the server failed to start (port taken, lifespan error): raise its error
                raise RuntimeError(f"the router on port {port} exited before it started")
            await asyncio.sleep(0.02)
        if wait_replicas:
            await backend.wait_ready(backend.endpoints())
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)
