"""Distilled fallback models: small students of the served model that the router sheds load to,
and that serve as draft models for speculative decoding (``fallback.distill``); and small
traditional models that mimic a larger one (``fallback.tabular``)."""
