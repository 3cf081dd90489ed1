"""POST /v1/rerank on a fake cross-encoder: ordering, top_n, documents, limits, scopes, audit.

The real package (a tiny BERT cross-encoder, ORT) is scored against transformers in
tests/export/test_export_hf_tiny.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.serving import LoadedModel

from .conftest import MemoryAudit, WrappedSession, text_classifier, text_model

QUERY = "how do I get a refund"
DOCS = ["refunds take five days", "the weather is fine", "open an account online", "card payments"]


def reranker(tmp: Path, name: str = "rr") -> LoadedModel:
    return text_classifier(tmp, name, ["LABEL_0"])


def _expected(model: LoadedModel, query: str, docs: list[str]) -> np.ndarray:
    logits = model.embed_tokens(model.tokenize_pairs(query, docs, truncate=True))[:, 0].astype(np.float64)
    return 1 / (1 + np.exp(-logits))


def test_documents_come_back_best_first_with_their_scores(client_factory: Any, tmp_path: Path) -> None:
    model = reranker(tmp_path)
    c = client_factory([model])
    r = c.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    want = _expected(model, QUERY, DOCS)
    assert [x["index"] for x in body["results"]] == sorted(range(len(DOCS)), key=lambda i: (-want[i], i))
    np.testing.assert_allclose([x["relevance_score"] for x in body["results"]], np.sort(want)[::-1], atol=1e-6)
    assert all(0 < x["relevance_score"] < 1 for x in body["results"])
    assert "document" not in body["results"][0]
    assert body["model"] == "rr" and body["usage"]["total_tokens"] > 0


def test_pairs_are_scored_as_pairs_not_as_the_document_alone(tmp_path: Path) -> None:
    model = reranker(tmp_path)
    pair = model.tokenize_pairs(QUERY, DOCS[:1], truncate=True)[0]
    alone = model.tokenize(DOCS[:1], truncate=True)[0]
    assert len(pair) > len(alone) and set(pair.type_ids) == {0, 1}
    assert not np.allclose(_expected(model, QUERY, DOCS[:1]), _expected(model, "something else", DOCS[:1]))


def test_top_n_and_return_documents(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory([reranker(tmp_path)])
    docs: list[Any] = [DOCS[0], {"text": DOCS[1]}, DOCS[2]]
    full = c.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": docs}).json()["results"]
    r = c.post(
        "/v1/rerank", json={"model": "rr", "query": QUERY, "documents": docs, "top_n": 2, "return_documents": True}
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == c.get("/v2/models/rr").json()["versions"][-1]
    top = r.json()["results"]
    assert [x["index"] for x in top] == [x["index"] for x in full][:2]
    texts = [DOCS[0], DOCS[1], DOCS[2]]
    assert [x["document"]["text"] for x in top] == [texts[x["index"]] for x in top]
    over = c.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": docs, "top_n": 50}).json()
    assert len(over["results"]) == 3


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"documents": []}, "documents"),
        ({"documents": ["ok", 3]}, "documents[1]"),
        ({"documents": ["ok", {"body": "x"}]}, "documents[1]"),
        ({"top_n": 0}, "top_n"),
        ({"query": ["a"]}, "query"),
        ({"documents": "one string"}, "documents"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(
    client_factory: Any, tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    c = client_factory([reranker(tmp_path)])
    r = c.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": DOCS, **change})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.json()


def test_too_many_documents_is_a_400(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory([reranker(tmp_path)], max_inputs=3)
    r = c.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": DOCS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents"


def test_a_model_that_is_no_reranker_is_a_404(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory([reranker(tmp_path), text_model(tmp_path)])
    r = c.post("/v1/rerank", json={"model": "minilm", "query": QUERY, "documents": DOCS})
    assert r.status_code == 404 and "not a reranker" in r.text


def test_long_pairs_are_cut_and_named_or_refused(client_factory: Any, tmp_path: Path) -> None:
    long_doc = " ".join(["refund"] * 40)  # over MAX_LENGTH tokens with the query
    c = client_factory([reranker(tmp_path)])
    r = c.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": [DOCS[0], long_doc]})
    assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "1"
    strict = client_factory([reranker(tmp_path, "rr2")], truncate=False)
    r = strict.post("/v1/rerank", json={"model": "rr2", "query": QUERY, "documents": [DOCS[0], long_doc]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents[1]"


def test_scope_and_audit(client_factory: Any, tmp_path: Path, audit: MemoryAudit) -> None:
    from appliance.keys import KeyStore

    store = KeyStore(tmp_path / "state.db")
    try:
        _, other = store.create(["infer:minilm"])
        _, mine = store.create(["infer:rr"])
        c = client_factory([reranker(tmp_path)], keys=store)
        body = {"model": "rr", "query": QUERY, "documents": DOCS}
        assert c.post("/v1/rerank", json=body, headers={"Authorization": f"Bearer {other}"}).status_code == 403
        assert c.post("/v1/rerank", json=body, headers={"Authorization": f"Bearer {mine}"}).status_code == 200
    finally:
        store.close()
    done = [e for e in audit.events if e.event == "inference" and e.outcome == "success"]
    assert (
        done
        and done[-1].details["inputs"] == str(len(DOCS))
        and done[-1].model_name == "rr"
        and done[-1].action == "POST /v1/rerank"
    )
    assert QUERY not in repr(audit.events) and DOCS[0] not in repr(audit.events)  # no payloads in the log


class _NaNSession(WrappedSession):
    """A session whose logits are NaN (a broken package)."""

    def run(self, inputs: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
        return {k: np.full_like(v, np.nan) for k, v in self.inner.run(inputs, outputs).items()}


def test_a_nan_score_is_a_500_not_a_null_score(client_factory: Any, tmp_path: Path) -> None:
    model = reranker(tmp_path)
    c = client_factory([replace(model, session=_NaNSession(model.session))])
    r = c.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": DOCS})
    assert r.status_code == 500 and "results" not in r.json()


def test_cohere_v2_path_and_answer_shape(client_factory: Any, tmp_path: Path) -> None:
    """cohere.ClientV2(base_url=...) posts to /v2/rerank (LangChain's and LlamaIndex's CohereRerank
    use it) with fields this server ignores, and reads id / results / meta."""
    c = client_factory([reranker(tmp_path)])
    body = {"model": "rr", "query": QUERY, "documents": DOCS, "top_n": 2, "max_tokens_per_doc": 4096}
    r = c.post("/v2/rerank", json=body, headers={"X-Request-Id": "req-42"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["id"] == "req-42" and len(got["results"]) == 2
    assert got["meta"]["api_version"]["version"] == "2" and got["meta"]["billed_units"]["search_units"] == 1
    assert got["meta"]["tokens"]["input_tokens"] == got["usage"]["total_tokens"] > 0
    v1 = c.post("/v1/rerank", json=body).json()
    assert v1["meta"]["api_version"]["version"] == "1"
    assert [x["index"] for x in v1["results"]] == [x["index"] for x in got["results"]]


def test_v2_rerank_errors_have_the_shape_of_v1_not_kserve(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory([reranker(tmp_path)])
    for path in ("/v1/rerank", "/v2/rerank"):
        r = c.post(path, json={"model": "rr", "query": QUERY, "documents": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "documents", (path, r.text)


def test_equal_scores_keep_the_lower_index_first(client_factory: Any, tmp_path: Path) -> None:
    # "ties: lower index first": with more than 16 documents numpy's default sort is not stable
    c = client_factory([reranker(tmp_path)])
    docs = ["refunds take five days", "the weather is fine", "card payments"] * 10  # ten of each score
    r = c.post("/v1/rerank", json={"model": "rr", "query": "how do I get a refund", "documents": docs})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    by_index = {x["index"]: x["relevance_score"] for x in results}
    assert len(set(by_index.values())) == 3  # ties, or the test proves nothing
    assert [x["index"] for x in results] == sorted(range(len(docs)), key=lambda i: (-by_index[i], i))
