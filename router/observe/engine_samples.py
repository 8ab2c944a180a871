"""Which of vLLM's own metrics the router reads, and how to read them off a ``/metrics`` page.

A leaf (prometheus-client's parser only): the scraper uses it, and so do the
tools that measure engines directly (``fallback.speed``).
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

# vLLM sample name -> (router metric name, help)
ENGINE_SAMPLES: dict[str, tuple[str, str]] = {
    "vllm:num_requests_running": ("llmserve_engine_requests_running", "Sequences the engine is running"),
    "vllm:num_requests_waiting": ("llmserve_engine_requests_waiting", "Requests queued in the engine"),
    "vllm:kv_cache_usage_perc": ("llmserve_engine_kv_cache_usage_ratio", "Fraction of the paged KV cache in use"),
    "vllm:num_preemptions_total": ("llmserve_engine_preemptions", "Sequences preempted (cumulative)"),
    "vllm:prefix_cache_queries_total": ("llmserve_engine_prefix_cache_queries", "Prefix-cache lookups (tokens)"),
    "vllm:prefix_cache_hits_total": ("llmserve_engine_prefix_cache_hits", "Prefix-cache hits (tokens)"),
    "vllm:spec_decode_num_draft_tokens_total": ("llmserve_engine_spec_draft_tokens", "Draft tokens proposed"),
    "vllm:spec_decode_num_accepted_tokens_total": ("llmserve_engine_spec_accepted_tokens", "Draft tokens accepted"),
}


def parse_engine_metrics(text: str) -> dict[str, float]:
    """Sum each wanted vLLM sample over its labels (one engine per replica)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ENGINE_SAMPLES:
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values
