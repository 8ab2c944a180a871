"""`llmserve up` also serves the example traditional models: the README's first predict call works."""

from __future__ import annotations

import pytest

from llmserve.models.examples import EXAMPLES, fraud_dataset
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.engine


def test_the_readmes_first_predict_call_works_out_of_the_box(stack: Stack) -> None:
    rows = fraud_dataset().x_test[:2].tolist()
    for name in EXAMPLES:
        response = stack.http.post(f"{stack.url}/api/v1/models/{name}/predict", timeout=30,
                              json={"inputs": [{"features": r} for r in rows]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["version"] == "v1" and len(body["predictions"]) == 2
        assert all(0 <= p["score"] <= 1 for p in body["predictions"])
    meta = stack.http.get(f"{stack.url}/v2/models/fraud-onnx", timeout=10).json()
    assert meta["platform"] == "onnx"
    # the LLM and the traditional models share one gateway, and the LLM list stays the LLMs'
    assert [m["id"] for m in stack.http.get(f"{stack.url}/v1/models", timeout=10).json()["data"]
            if ":" not in m["id"]] == ["smollm2-135m-instruct"]
