"""``llmserve keys create|list|revoke``: the keys API of a running router, from the command line.

The admin key comes from ``--key``, else ``LLMSERVE_API_KEY``, else ``LLMSERVE_ADMIN_KEY``, else the
``admin-key`` file ``llmserve up`` wrote in the data dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

ADMIN_KEY_FILE = "admin-key"  # router.access.bootstrap writes it; llmserve does not import the router here


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke API keys of a running router")
    keys.add_argument("--url", default="http://127.0.0.1:8000", help="the router (default http://127.0.0.1:8000)")
    keys.add_argument("--key", help="an admin key (default: LLMSERVE_API_KEY, LLMSERVE_ADMIN_KEY or <data-dir>/"
                      f"{ADMIN_KEY_FILE})")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; its secret is printed once")
    create.add_argument("name")
    create.add_argument("--scopes", default="inference", help="comma-separated: admin, deploy, read, inference")
    create.add_argument("--models", help="comma-separated models it may use (default: all)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--priority", help="its requests' default priority: critical, standard or batch")
    create.add_argument("--priorities", help="comma-separated priorities X-Priority may ask for")
    create.add_argument("--expires-at", type=float, help="Unix time after which it is refused")
    create.add_argument("--owner", default="")
    actions.add_parser("list", help="every key, without secrets")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    keys.set_defaults(func=lambda args, settings: run(args, settings.data_dir))


def admin_key(args: argparse.Namespace, data_dir: Path) -> str | None:
    if args.key:
        return str(args.key)
    for variable in ("LLMSERVE_API_KEY", "LLMSERVE_ADMIN_KEY"):
        if os.environ.get(variable):
            return os.environ[variable]
    path = data_dir / ADMIN_KEY_FILE
    return path.read_text().strip() if path.exists() else None


def run(args: argparse.Namespace, data_dir: Path) -> int:
    key = admin_key(args, data_dir)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    url = f"{args.url.rstrip('/')}/api/v1/keys"
    try:
        with httpx.Client(timeout=30, headers=headers) as client:
            if args.action == "create":
                body: dict[str, Any] = {"name": args.name, "owner": args.owner,
                                        "scopes": [s for s in args.scopes.split(",") if s]}
                for field in ("rpm", "tpm", "priority", "expires_at"):
                    if getattr(args, field) is not None:
                        body[field] = getattr(args, field)
                for field in ("models", "priorities"):
                    if getattr(args, field):
                        body[field] = [v for v in getattr(args, field).split(",") if v]
                response = client.post(url, json=body)
            elif args.action == "list":
                response = client.get(url)
            else:
                response = client.delete(f"{url}/{args.key_id}")
    except httpx.HTTPError as exc:
        print(f"llmserve keys: cannot reach the router at {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code >= 400:
        print(f"llmserve keys: {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    print(json.dumps(response.json(), indent=2))
    return 0
