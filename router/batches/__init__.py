"""Batch jobs: the OpenAI Batch API (``/v1/files``, ``/v1/batches``) run in the batch priority band."""
