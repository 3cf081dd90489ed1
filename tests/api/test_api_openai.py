"""OpenAI-compatible /v1/embeddings and /v1/models."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import DIM, MAX_LENGTH, text_model

TEXTS = ["The quick brown fox.", "Inference on a small box", "?"]


def test_embeddings_float_match_the_model(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory()
    r = c.post("/v1/embeddings", json={"input": TEXTS, "model": "minilm"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    got = np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)
    ref = text_model(tmp_path, name="ref")
    expected, counts = ref.embed(TEXTS, truncate=True)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert got.shape == (3, DIM)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert body["usage"] == {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}


def test_single_string_and_base64(client_factory: Any) -> None:
    c = client_factory()
    plain = c.post("/v1/embeddings", json={"input": "hello", "model": "minilm"}).json()
    b64 = c.post("/v1/embeddings", json={"input": "hello", "model": "minilm", "encoding_format": "base64"}).json()
    assert len(plain["data"]) == 1
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.asarray(plain["data"][0]["embedding"], dtype=np.float32))


def test_batched_equals_unbatched(client_factory: Any) -> None:
    c = client_factory()
    together = c.post("/v1/embeddings", json={"input": TEXTS, "model": "minilm"}).json()
    alone = [c.post("/v1/embeddings", json={"input": t, "model": "minilm"}).json()["data"][0] for t in TEXTS]
    np.testing.assert_allclose(
        [d["embedding"] for d in together["data"]], [d["embedding"] for d in alone], rtol=1e-6, atol=1e-7
    )


def test_models_list(client_factory: Any) -> None:
    c = client_factory()
    body = c.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["minilm", "tabular"]
    assert all(m["object"] == "model" for m in body["data"])


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": [[1, 2, 3]], "model": "minilm"}, 400, "input[0]"),
        ({"input": [1, 2], "model": "minilm"}, 400, "input[0]"),
        ({"input": [], "model": "minilm"}, 400, "input"),
        ({"input": 5, "model": "minilm"}, 400, "input"),
        ({"input": "x", "model": "minilm", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "x", "model": "minilm", "dimensions": 4}, 400, "dimensions"),
        ({"input": "x"}, 400, "model"),
        ({"input": "x", "model": "nope"}, 404, None),
        ({"input": "x", "model": "tabular"}, 404, "model"),  # loaded, but not an embedding model
    ],
)
def test_errors_are_openai_shaped(client_factory: Any, body: dict[str, Any], status: int, param: str | None) -> None:
    c = client_factory()
    r = c.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
        assert param in err["message"]
    else:
        assert err["code"] == "model_not_found"


def test_truncation_setting(client_factory: Any) -> None:
    long = " ".join(["word"] * (MAX_LENGTH * 2))
    c = client_factory(truncate=True)
    r = c.post("/v1/embeddings", json={"input": ["short", long], "model": "minilm"})
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] <= 3 + MAX_LENGTH
    c = client_factory(truncate=False)
    r = c.post("/v1/embeddings", json={"input": ["short", long], "model": "minilm"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "input[1]"


def test_max_inputs(client_factory: Any) -> None:
    c = client_factory(max_inputs=2)
    r = c.post("/v1/embeddings", json={"input": TEXTS, "model": "minilm"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_invalid_json_is_400(client_factory: Any) -> None:
    c = client_factory()
    r = c.post("/v1/embeddings", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"input": [1, 2], "model": "minilm"},
            "input[0]: token arrays are not accepted; send text (LangChain's OpenAIEmbeddings: pass check_embedding_ctx_length=False)",
        ),
        (
            {"input": [[1, 2, 3]], "model": "minilm"},
            "input[0]: token arrays are not accepted; send text (LangChain's OpenAIEmbeddings: pass check_embedding_ctx_length=False)",
        ),
        ({"input": ["a", 5], "model": "minilm"}, "input[1]: must be a string"),  # a stray number, not token ids
        ({"input": "x", "model": "minilm", "dimensions": 0}, "dimensions: must be a whole number >= 1, got 0"),
        ({"input": "x", "model": "minilm", "dimensions": -1}, "dimensions: must be a whole number >= 1, got -1"),
        ({"input": "x", "model": "minilm", "dimensions": 100}, "cannot shorten them; omit dimensions"),
    ],
)
def test_the_handler_names_what_is_wrong_not_the_documented_schema(
    client_factory: Any, body: dict[str, Any], message: str
) -> None:
    """The route decodes its lenient body and explains; the OpenAPI document's narrower struct
    (api.openai.EmbeddingsRequest) is for readers only and would answer msgspec's terse text."""
    r = client_factory().post("/v1/embeddings", json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_the_answer_names_the_version_that_answered(client_factory: Any) -> None:
    """OpenAI's body names only the model: a client could not tell an answer from before a swap
    (repository load of a new version) from one after it, which KServe's model_version says."""
    c = client_factory()
    r = c.post("/v1/embeddings", json={"input": ["short", "x " * 1000], "model": "minilm"})
    assert r.status_code == 200
    version = c.get("/v2/models/minilm").json()["versions"][-1]
    assert r.headers["x-model-version"] == version
    assert r.headers["x-truncated-inputs"] == "1"  # beside it, as before
    assert c.post("/v1/embeddings", json={"input": "x", "model": "minilm"}).headers["x-model-version"] == version
    # and what of it answered: variants pass one gate but do not answer alike (an index must not mix them)
    assert r.headers["x-model-variant"] == "fake/onnx-fp32/fp32"  # the test model: backend/variant/precision
