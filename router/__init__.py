"""The router: API gateway, traffic routing and the control plane in one FastAPI app."""

from router.app import create_app

__all__ = ["create_app"]
