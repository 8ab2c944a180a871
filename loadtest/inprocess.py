"""A router app served by uvicorn in this event loop, on a loopback port: for the tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from llmserve.replicas.backend import ReplicaBackend


@contextlib.asynccontextmanager
async def serve_router(app: FastAPI, port: int, backend: ReplicaBackend, wait_replicas: bool = True
                       ) -> AsyncIterator[str]:
    """Start ``app`` on 127.0.0.1:``port`` (and wait for the backend's replicas); yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           lifespan="on"))
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
