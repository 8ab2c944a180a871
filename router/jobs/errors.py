"""Why an async job is refused at submission; ``router.errors.as_api_error`` maps each to its HTTP answer."""

from __future__ import annotations


class CallbackNotAllowed(Exception):
    """A ``callback_url`` that is malformed or names a host outside the allow-list (400)."""

    def __init__(self, url: str, reason: str, allowed: tuple[str, ...]) -> None:
        self.url, self.reason, self.allowed = url, reason, allowed
        super().__init__(
            f"callback_url {url!r} is not allowed: {reason}; allowed hosts: {', '.join(allowed) or 'none'} "
            "(add a host to LLMSERVE_ROUTER__JOBS__CALLBACK_HOSTS, a JSON list, to allow it)")


class TooManyJobs(Exception):
    """This router holds as many queued and running jobs as it may (429 with Retry-After)."""

    def __init__(self, pending: int, limit: int, retry_after_s: int) -> None:
        self.pending, self.limit, self.retry_after_s = pending, limit, retry_after_s
        super().__init__(f"{pending} async jobs are queued or running on this router, its limit "
                         f"(LLMSERVE_ROUTER__JOBS__MAX_PENDING={limit}); retry in {retry_after_s}s")
