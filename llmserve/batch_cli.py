"""``llmserve batch submit|status|list|wait|cancel|download``: the Batch API of a running router, from the
command line.

    llmserve batch submit requests.jsonl                       # chat lines (endpoint /v1/chat/completions)
    llmserve batch submit rows.npy --model fraud-xgboost       # predict bulk scoring of a model's rows
    llmserve batch wait batch_3f...                            # a progress bar until it ends
    llmserve batch download batch_3f... -o predictions.jsonl   # its output file (--errors: its error file)

The router is ``--url``, else ``LLMSERVE_URL``, else http://127.0.0.1:8000; the key is ``--key``, else
``LLMSERVE_API_KEY``, else ``LLMSERVE_ADMIN_KEY``, else the ``admin-key`` file ``llmserve up`` wrote in the
data dir (as ``llmserve keys`` finds it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

from llmserve.keys_cli import admin_key

FINAL = ("completed", "failed", "expired", "cancelled")
CHAT = "/v1/chat/completions"


def add_parser(sub: Any) -> None:
    batch = sub.add_parser("batch", help="submit, follow, cancel and download batch jobs of a running router")
    batch.add_argument("--url", help="the router (default: LLMSERVE_URL or http://127.0.0.1:8000)")
    batch.add_argument("--key", help="an API key (default: LLMSERVE_API_KEY, LLMSERVE_ADMIN_KEY or the data dir's "
                       "admin-key)")
    actions = batch.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="upload a file and start a batch over it; prints the batch's id")
    submit.add_argument("file", type=Path, help="JSONL of OpenAI batch lines, or rows (JSONL, .npy, CSV) for --model")
    submit.add_argument("--endpoint", help=f"{CHAT} (default), /v1/completions, or /api/v1/models/<m>/predict")
    submit.add_argument("--model", help="a predict model: score the file's rows (endpoint /api/v1/models/<m>/predict)")
    submit.add_argument("--window", default="24h", help="completion_window: Nh, Nm or Ns (default 24h)")
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--wait", action="store_true", help="then wait for it, with a progress bar")
    status = actions.add_parser("status", help="a batch's status and request_counts")
    status.add_argument("batch_id")
    status.add_argument("--json", action="store_true", help="the whole batch object")
    listing = actions.add_parser("list", help="your batches, newest first")
    listing.add_argument("--limit", type=int, default=20)
    wait = actions.add_parser("wait", help="follow a batch with a progress bar until it ends")
    wait.add_argument("batch_id")
    wait.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    wait.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    cancel = actions.add_parser("cancel", help="cancel a batch (what finished is kept)")
    cancel.add_argument("batch_id")
    download = actions.add_parser("download", help="a batch's output file (or --errors: its error file)")
    download.add_argument("batch_id")
    download.add_argument("-o", "--output", type=Path, help="write here (default: standard output)")
    download.add_argument("--errors", action="store_true", help="the error file instead")
    batch.set_defaults(func=lambda args, settings: run(args, settings.data_dir))


class CommandError(Exception):
    """What the command says on standard error before it exits 1."""


def endpoint_of(args: argparse.Namespace) -> str:
    if args.model:
        predict = f"/api/v1/models/{args.model}/predict"
        if args.endpoint not in (None, predict):
            raise CommandError(f"--model is for predict batches (endpoint {predict}); a {args.endpoint} line names "
                               "its model in its body")
        return predict
    return str(args.endpoint or CHAT)


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise CommandError(f"{response.status_code}: {message}")
    return response.json()


def _counts(batch: dict[str, Any]) -> str:
    counts = batch.get("request_counts") or {}
    return f"{counts.get('completed', 0)} completed, {counts.get('failed', 0)} failed of {counts.get('total', 0)}"


def _line(batch: dict[str, Any]) -> str:
    return f"{batch['id']}  {batch['status']:<11} {_counts(batch)}  {batch['endpoint']}"


def follow(client: httpx.Client, batch_id: str, interval_s: float, timeout_s: float | None, out: IO[str]
           ) -> dict[str, Any]:
    """Poll the batch until it ends, drawing a progress bar of its finished requests (rows, for predict)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(file=out), transient=False) as progress:
        task = progress.add_task(batch_id, total=None)
        while True:
            batch = _check(client.get(f"/v1/batches/{batch_id}"))
            counts = batch.get("request_counts") or {}
            progress.update(task, total=counts.get("total") or None,
                            completed=counts.get("completed", 0) + counts.get("failed", 0),
                            description=f"{batch_id} {batch['status']}")
            if batch["status"] in FINAL:
                return dict(batch)
            if deadline is not None and time.monotonic() > deadline:
                raise CommandError(f"batch {batch_id} is still {batch['status']} after {timeout_s:g}s")
            time.sleep(interval_s)


def _submit(client: httpx.Client, args: argparse.Namespace, out: IO[str]) -> int:
    endpoint = endpoint_of(args)
    metadata = dict(item.split("=", 1) for item in args.metadata if "=" in item) or None
    with args.file.open("rb") as handle:
        upload = _check(client.post("/v1/files", data={"purpose": "batch"}, files={"file": (args.file.name, handle)}))
    batch = _check(client.post("/v1/batches", json={"input_file_id": upload["id"], "endpoint": endpoint,
                                                    "completion_window": args.window, "metadata": metadata}))
    print(batch["id"], file=out)
    if args.wait:
        return _ended(follow(client, batch["id"], 1.0, None, out), out)
    return 0


def _ended(batch: dict[str, Any], out: IO[str]) -> int:
    print(_line(batch), file=out)
    return 0 if batch["status"] == "completed" else 1


def _download(client: httpx.Client, args: argparse.Namespace, out: IO[str]) -> int:
    batch = _check(client.get(f"/v1/batches/{args.batch_id}"))
    file_id = batch["error_file_id" if args.errors else "output_file_id"]
    if file_id is None:
        what = "error" if args.errors else "output"
        raise CommandError(f"batch {args.batch_id} ({batch['status']}) has no {what} file"
                           + ("" if batch["status"] in FINAL else " yet: it is written when the batch ends"))
    response = client.get(f"/v1/files/{file_id}/content")
    if response.status_code >= 400:
        _check(response)
    if args.output is None:
        out.write(response.text)
    else:
        args.output.write_bytes(response.content)
        print(f"wrote {len(response.content)} bytes to {args.output}", file=out)
    return 0


def run(args: argparse.Namespace, data_dir: Path, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    url = (args.url or os.environ.get("LLMSERVE_URL") or "http://127.0.0.1:8000").rstrip("/")
    key = admin_key(args, data_dir)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
            if args.action == "submit":
                return _submit(client, args, out)
            if args.action == "status":
                batch = _check(client.get(f"/v1/batches/{args.batch_id}"))
                print(json.dumps(batch, indent=2) if args.json else _line(batch), file=out)
            elif args.action == "list":
                for batch in _check(client.get("/v1/batches", params={"limit": args.limit}))["data"]:
                    print(_line(batch), file=out)
            elif args.action == "wait":
                return _ended(follow(client, args.batch_id, args.interval, args.timeout, out), out)
            elif args.action == "cancel":
                print(_line(_check(client.post(f"/v1/batches/{args.batch_id}/cancel"))), file=out)
            else:
                return _download(client, args, out)
    except httpx.HTTPError as exc:
        print(f"llmserve batch: cannot reach the router at {url}: {exc}", file=sys.stderr)
        return 1
    except (CommandError, OSError) as exc:
        print(f"llmserve batch: {exc}", file=sys.stderr)
        return 1
    return 0
