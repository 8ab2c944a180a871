"""OpenAI's Files API, for the Batch API's input and output: ``POST /v1/files`` (multipart, purpose ``batch``,
JSONL; for predict bulk scoring also ``.npy`` and CSV rows),
``GET /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``.

An upload over ``batches.max_file_bytes`` or ``batches.max_lines`` is refused with 413 before it is kept.
The lines are checked when a batch runs, not here: a malformed line fails alone (in the batch's error file).
A file is visible to the API key that uploaded it (and its batch results to the batch's key) and to admin
keys; to anyone else it does not exist.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.requests import Request as StarletteRequest
from starlette.types import Message

from router.access.auth import Caller
from router.batches.errors import BatchesUnavailable, FileNotFound
from router.batches.files import FileRecord, FileStore
from router.batches.rows import count_rows
from router.errors import ConflictError, InvalidRequest, PayloadTooLarge
from router.gateway.authorize import scoped
from router.gateway.protocol import read_body
from router.state import RouterState

router = APIRouter(prefix="/v1", tags=["batches"])
Inference = Annotated[Caller, Depends(scoped("inference"))]
_MULTIPART_SLACK = 64 << 10  # the form's boundaries and headers around the file


def _state(request: Request) -> RouterState:
    state: RouterState = request.app.state.router
    return state


def files_of(state: RouterState) -> FileStore:
    if state.batches is None:
        raise BatchesUnavailable("the Batch API needs a store (SQLite or Redis) to keep batches in; this router "
                                 "runs without one")
    return state.batches.files


async def visible_file(files: FileStore, file_id: str, caller: Caller) -> FileRecord:
    record = await files.get(file_id)
    if record is None or not record.visible_to(caller.key_id, caller.may("admin")):
        raise FileNotFound(f"no file {file_id!r}: unknown, deleted, or uploaded with another API key",
                           param="file_id")
    return record


@router.post("/files")
async def upload_file(request: Request, caller: Inference) -> dict[str, Any]:
    """Keep a JSONL file of batch requests (multipart: ``file`` and ``purpose=batch``)."""
    state = _state(request)
    files, limits = files_of(state), state.settings.batches
    raw = await read_body(request.stream(), request.headers.get("content-length"),
                          limits.max_file_bytes + _MULTIPART_SLACK)
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await StarletteRequest(request.scope, receive).form(max_files=1, max_fields=8)
    except Exception as exc:  # python-multipart's errors, or a body that is not multipart at all
        raise InvalidRequest(f"send the file as multipart/form-data with fields file and purpose ({exc})") from None
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise InvalidRequest(f"purpose must be 'batch' (the only purpose this router keeps files for), got "
                                 f"{purpose!r}", param="purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("no file: send it in the multipart field 'file'", param="file")
        content = await upload.read()
        filename = upload.filename or "batch.jsonl"
    finally:
        await form.close()
    if len(content) > limits.max_file_bytes:
        raise PayloadTooLarge(f"the file is {len(content)} bytes; the limit is {limits.max_file_bytes} "
                              "(LLMSERVE_ROUTER__BATCHES__MAX_FILE_BYTES)", param="file")
    lines = count_rows(content)  # an .npy file's rows from its header; any other file's non-blank lines
    if lines > limits.max_lines:
        raise PayloadTooLarge(f"the file has {lines} lines; the limit is {limits.max_lines} "
                              "(LLMSERVE_ROUTER__BATCHES__MAX_LINES)", param="file")
    record = await files.save(content, filename, "batch", caller.key_id)
    return record.view()


@router.get("/files")
async def list_files(request: Request, caller: Inference, purpose: str | None = None) -> dict[str, Any]:
    records = await files_of(_state(request)).list()
    data = [r.view() for r in records
            if r.visible_to(caller.key_id, caller.may("admin")) and (purpose is None or r.purpose == purpose)]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/files/{file_id}")
async def get_file(file_id: str, request: Request, caller: Inference) -> dict[str, Any]:
    return (await visible_file(files_of(_state(request)), file_id, caller)).view()


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, request: Request, caller: Inference) -> Response:
    files = files_of(_state(request))
    record = await visible_file(files, file_id, caller)
    content = await files.content(record.id)
    if content is None:
        raise FileNotFound(f"file {file_id!r} was deleted", param="file_id")
    return Response(content, media_type="application/jsonl",
                    headers={"content-disposition": f'attachment; filename="{record.filename}"'})


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, request: Request, caller: Inference) -> dict[str, Any]:
    state = _state(request)
    files = files_of(state)
    record = await visible_file(files, file_id, caller)
    assert state.batches is not None
    using = [b.id for b in await state.batches.store.list_batches()
             if b.unfinished and b.detail.get("input_file_id") == record.id]
    if using:
        raise ConflictError(f"file {record.id} is the input of unfinished batch {using[0]}; cancel the batch (or "
                            "let it finish) first", param="file_id")
    await files.delete(record.id)
    return {"id": record.id, "object": "file", "deleted": True}
