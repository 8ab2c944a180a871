"""The Batch API's client errors: ``APIError``s with their status, so ``router.errors`` answers them."""

from __future__ import annotations

from router.errors import APIError


class FileNotFound(APIError):
    """No such file, or one made with another API key (which is the same thing to the caller)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "file_not_found"


class BatchNotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "batch_not_found"


class BatchesUnavailable(APIError):
    """A router without a store has nowhere durable to keep batches."""

    status_code = 501
    error_type = "invalid_request_error"
    code = "batches_unavailable"


class BatchNotCancellable(APIError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "batch_not_cancellable"
