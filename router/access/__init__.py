"""Who may call and how much: API keys and their scopes (``auth``), per-key limits (``ratelimit``).

The gateway's pipeline applies them to every request; the router's state holds them.
"""
