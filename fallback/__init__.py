"""Distilled fallback models: small students of the served model that the
router sheds load to, and that serve as draft models for speculative decoding.

Not built yet: the distillation pipeline lands with its own issue. The package
exists so the layout (llmserve/, router/, fallback/, loadtest/) is stable.
"""
