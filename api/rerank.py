"""``POST /v1/rerank`` and ``/v2/rerank``: a cross-encoder scores documents against a query (Cohere's API).

The request is ``{"model", "query", "documents": [str | {"text": str}],
"top_n"?, "return_documents"?}`` (other fields Cohere's clients send, such as
``max_tokens_per_doc``, are ignored); the answer lists ``{"index",
"relevance_score", "document"?: {"text"}}`` best first (ties: lower index
first), at most ``top_n`` of them, with ``id``, ``meta`` (Cohere's) and
``usage.total_tokens`` (Jina's).  ``/v2/rerank`` is where Cohere's v2 client
(``cohere.ClientV2(base_url=...)``, which LangChain's and LlamaIndex's
``CohereRerank`` use) posts.  The score is the sigmoid of the model's single
logit for the pair, sentence-transformers' default for a one-label
``CrossEncoder`` (a model whose config sets another activation ranks the same).  The model is a package exported with
``--task text-classification`` from a cross-encoder folder (one label); pairs
are tokenized as the model was trained (``[CLS] query [SEP] document [SEP]``)
and the longer part is cut first past its maximum length (the pairs cut are
listed in ``X-Truncated-Inputs``).  Pairs are batched with the model's other
requests by token count.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
from litestar import Request, Response, post
from litestar.handlers import HTTPRouteHandler

from api.openai import TRUNCATED_HEADER, inference_body
from runtime.errors import InputError, ModelNotFoundError

__all__ = ["RerankRequest", "routes"]

Req = Request[Any, Any, Any]


class RerankRequest(msgspec.Struct, kw_only=True):
    model: str
    query: str
    documents: list[Any]
    top_n: int | None = None
    return_documents: bool = False


class _Document(msgspec.Struct):
    text: str


class _Result(msgspec.Struct, omit_defaults=True):
    index: int
    relevance_score: float
    document: _Document | None = None


class _Usage(msgspec.Struct):
    total_tokens: int


class _Version(msgspec.Struct):
    version: str


class _BilledUnits(msgspec.Struct):
    search_units: int


class _Tokens(msgspec.Struct):
    input_tokens: int
    output_tokens: int = 0


class _Meta(msgspec.Struct):
    """Cohere's ``meta``: a request is one search unit; the tokens are the model's."""

    api_version: _Version
    billed_units: _BilledUnits
    tokens: _Tokens


class _RerankResponse(msgspec.Struct):
    id: str
    model: str
    results: list[_Result]
    usage: _Usage
    meta: _Meta


def _documents(value: list[Any]) -> list[str]:
    if not value:
        raise InputError("documents: must not be empty", field="documents")
    texts: list[str] = []
    for i, item in enumerate(value):
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise InputError(f'documents[{i}]: must be a string or {{"text": string}}', field=f"documents[{i}]")
    return texts


@post(["/v1/rerank", "/v2/rerank"], opt={"scope": "infer"}, status_code=200)
async def rerank(request: Req) -> Response[bytes]:
    server, ctx, req, model = await inference_body(request, RerankRequest)
    if not model.is_reranker:
        raise ModelNotFoundError(
            f"model: {req.model!r} is not a reranker (a cross-encoder exported as text-classification with "
            "one label); see GET /v1/models"
        )
    if req.top_n is not None and req.top_n < 1:
        raise InputError(f"top_n: must be at least 1, got {req.top_n}", field="top_n")
    documents = _documents(req.documents)
    scores, counts, truncated = await server.rerank(model, req.query, documents)
    # best first; a stable sort keeps the lower index first among equal scores
    order = np.argsort(-scores, kind="stable")[: req.top_n or len(documents)]
    results = [
        _Result(
            index=int(i),
            relevance_score=float(scores[i]),
            document=_Document(documents[i]) if req.return_documents else None,
        )
        for i in order
    ]
    total = int(sum(counts))
    ctx.details["inputs"] = str(len(documents))
    ctx.details["tokens"] = str(total)
    version = "2" if request.url.path.startswith("/v2/") else "1"
    meta = _Meta(_Version(version), _BilledUnits(search_units=1), _Tokens(input_tokens=total))
    out = _RerankResponse(
        id=ctx.request_id, model=model.name, results=results, usage=_Usage(total_tokens=total), meta=meta
    )
    headers = {TRUNCATED_HEADER: ",".join(map(str, truncated))} if truncated else None
    return Response(msgspec.json.encode(out), media_type="application/json", headers=headers)


routes: list[HTTPRouteHandler] = [rerank]
