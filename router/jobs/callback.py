"""A job's callback: which URLs are allowed (checked at submission), and the POST of its final status.

Only hosts on the allow-list (``jobs.callback_hosts``, loopback by default) may be called: a callback
is the router making a request on a client's behalf, and an open one would let any client make the
router reach anything it can reach (the cloud metadata address, internal services). The host is
compared as written, never resolved, and redirects are not followed (a redirect could leave the list).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from llmserve.jobs_settings import JobsSettings
from router.jobs.errors import CallbackNotAllowed

logger = logging.getLogger(__name__)


def _canonical(host: str) -> str:
    host = host.strip().strip("[]").lower()
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host.rstrip(".")


def check_callback_url(url: object, allowed_hosts: Sequence[str]) -> str:
    """``url`` when it is an http(s) URL whose host is on the allow-list; else CallbackNotAllowed."""
    allowed = tuple(allowed_hosts)
    if not isinstance(url, str) or not url:
        raise CallbackNotAllowed(str(url), "it must be an http:// or https:// URL (a string)", allowed)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a malformed port raises here
    except ValueError as exc:
        raise CallbackNotAllowed(url, f"it is not a valid URL ({exc})", allowed) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackNotAllowed(url, "it must be an http:// or https:// URL with a host", allowed)
    if parts.username is not None or parts.password is not None:
        raise CallbackNotAllowed(url, "it must not carry credentials", allowed)
    if _canonical(parts.hostname) not in {_canonical(h) for h in allowed}:
        raise CallbackNotAllowed(url, f"host {parts.hostname!r} is not on the allow-list", allowed)
    return url


class CallbackSender:
    """POSTs a JSON body to a callback URL: ``attempts`` tries, each within ``timeout_s``, waiting
    ``backoff_s`` (doubling) between them; a network error, a 5xx or a 429 is tried again, any other
    answer is final. Returns whether the receiver took it (a 2xx)."""

    def __init__(self, settings: JobsSettings) -> None:
        self._attempts = settings.callback_attempts
        self._backoff_s = settings.callback_backoff_s
        # trust_env off: no proxy from the environment sees (or forwards) a callback meant for loopback
        self._client = httpx.AsyncClient(timeout=settings.callback_timeout_s, follow_redirects=False,
                                         trust_env=False)

    async def send(self, url: str, body: dict[str, Any], job_id: str) -> bool:
        delay = self._backoff_s
        for attempt in range(1, self._attempts + 1):
            try:
                response = await self._client.post(url, json=body, headers={"x-llmserve-job": job_id})
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= response.status_code < 300:
                    return True
                why = f"it answered {response.status_code}"
                if response.status_code < 500 and response.status_code != 429:
                    logger.warning("callback of job %s to %s refused: %s", job_id, url, why)
                    return False
            if attempt < self._attempts:
                logger.info("callback of job %s to %s failed (%s); try %d of %d in %.1fs", job_id, url, why,
                            attempt + 1, self._attempts, delay)
                await asyncio.sleep(delay)
                delay *= 2
            else:
                logger.warning("callback of job %s to %s failed %d times; last: %s", job_id, url, attempt, why)
        return False

    async def aclose(self) -> None:
        await self._client.aclose()
