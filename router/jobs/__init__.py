"""Async requests: jobs that run a predict or generate call in the background (``router.api.jobs`` is their
HTTP edge). ``models`` (the job and its view), ``store`` (where jobs live), ``runner`` (the batch band, the
concurrency bound, retention), ``callback`` (the allow-list and the delivery), ``errors`` (refusals with fields)."""
