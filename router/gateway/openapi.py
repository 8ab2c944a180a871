"""Request bodies in the OpenAPI schema, for routes that read their body themselves.

The inference and control routes read the raw body (bounded, so an oversized
one is a 413 before any parsing) and validate it with the route's pydantic
model, so FastAPI cannot see the body's shape. ``json_body`` puts that shape in
the route's ``openapi_extra``: clients, ``/docs`` and the API fuzzer see what
the route really accepts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def _inline(node: Any, defs: dict[str, Any], depth: int = 0) -> Any:
    """Replace ``{"$ref": "#/$defs/X"}`` with X itself: the schema then stands alone inside the document."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/") and depth < 16:
            return _inline(defs[ref.removeprefix("#/$defs/")], defs, depth + 1)
        return {k: _inline(v, defs, depth) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs, depth) for v in node]
    return node


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    inlined: dict[str, Any] = _inline(schema, schema.get("$defs", {}))
    return inlined


def json_body(schema: type[BaseModel] | dict[str, Any], required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body has this shape (a model, or a JSON schema)."""
    body = schema_of(schema) if isinstance(schema, type) else schema
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": body}}}}
