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

from typing import Annotated, Any

import msgspec
import numpy as np
from litestar import Request, Response, post
from litestar.handlers import HTTPRouteHandler
from msgspec import Meta

from api.answer_headers import (
    MODEL_VARIANT_HEADER,
    MODEL_VERSION_HEADER,
    TRUNCATED_COUNT_HEADER,
    TRUNCATED_HEADER,
    answer_headers,
)
from api.auth import token_charge
from api.docs import KEY, documented
from api.errors import OpenAIError
from api.openai import inference_body
from runtime.errors import InputError, ModelKindError

__all__ = ["RerankBody", "RerankRequest", "RerankResponse", "routes"]

Req = Request[Any, Any, Any]


class RerankBody(msgspec.Struct, kw_only=True):
    """The body as the handler decodes it: ``documents`` and ``top_n`` are checked by the handler, whose
    errors name the item."""

    model: Annotated[str, Meta(description="A loaded cross-encoder (GET /v1/models).")]
    query: str
    documents: list[Any]
    top_n: int | None = None
    return_documents: Annotated[bool, Meta(description="Answer each document's text with its score.")] = False


class RerankDocument(msgspec.Struct):
    text: str


# The body the OpenAPI document publishes: RerankBody with the fields the handler checks itself
# narrowed to what those checks accept (tests/api/test_api_openapi.py holds the two together).
class RerankRequest(RerankBody, kw_only=True):
    """Cohere's rerank request; other fields Cohere's clients send, such as max_tokens_per_doc, are ignored."""

    documents: Annotated[
        list[str | RerankDocument],
        Meta(
            min_length=1,
            description="At most max_inputs. A pair longer than the model's maximum length is cut (X-Truncated-Inputs) "
            "or refused, by the server's truncate setting.",
        ),
    ]
    top_n: Annotated[
        Annotated[int, Meta(ge=1)] | None, Meta(description="Answer the best top_n only; null or absent: all.")
    ] = None


class RerankResult(msgspec.Struct, omit_defaults=True):
    index: Annotated[int, Meta(description="The document's index in the request.")]
    relevance_score: Annotated[float, Meta(description="The sigmoid of the model's logit for the pair (0 to 1).")]
    document: Annotated[RerankDocument | None, Meta(description="With return_documents only.")] = None


class RerankUsage(msgspec.Struct):
    total_tokens: int


class ApiVersion(msgspec.Struct):
    version: str


class BilledUnits(msgspec.Struct):
    search_units: int


class RerankTokens(msgspec.Struct):
    input_tokens: int
    output_tokens: int = 0


class RerankMeta(msgspec.Struct):
    """Cohere's ``meta``: a request is one search unit; the tokens are the model's."""

    api_version: ApiVersion
    billed_units: BilledUnits
    tokens: RerankTokens


class RerankResponse(msgspec.Struct):
    """The documents, best first (ties: lower index first), at most top_n."""

    id: Annotated[str, Meta(description="The request id (X-Request-ID).")]
    model: str
    results: list[RerankResult]
    usage: Annotated[RerankUsage, Meta(description="The model's tokens over all pairs.")]
    meta: RerankMeta


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


@post(
    ["/v1/rerank", "/v2/rerank"],
    opt={"scope": "infer", "audit_event": "inference"},
    status_code=200,
    security=KEY,
    operation_class=documented(
        RerankResponse,
        OpenAIError,
        "The documents ranked against the query.",
        (400, 404, 408, 413, 504),
        body=RerankRequest,
        examples={
            "rerank": (
                "Three documents, the best two with their texts",
                {
                    "model": "reranker",
                    "query": "How do I reset my password?",
                    "documents": [
                        "Open Settings > Account and choose Reset password.",
                        {"text": "Our offices are closed on public holidays."},
                        "Passwords must be at least 12 characters long.",
                    ],
                    "top_n": 2,
                    "return_documents": True,
                },
            )
        },
        description="Cohere's rerank API (/v2/rerank is where cohere.ClientV2(base_url=...) posts): a "
        "cross-encoder scores each (query, document) pair. The body may be gzip or deflate (Content-Encoding).",
        tag="Rerank",
        answer_headers=(MODEL_VERSION_HEADER, MODEL_VARIANT_HEADER, TRUNCATED_HEADER, TRUNCATED_COUNT_HEADER),
    ),
)
async def rerank(request: Req) -> Response[bytes]:
    server, ctx, req, model = await inference_body(request, RerankBody)
    if not model.is_reranker:
        raise ModelKindError(
            f"model: {req.model!r} is not a reranker (a cross-encoder exported as text-classification with "
            "one label); see GET /v1/models"
        )
    if req.top_n is not None and req.top_n < 1:
        raise InputError(f"top_n: must be at least 1, got {req.top_n}", field="top_n")
    documents = _documents(req.documents)
    scores, counts, truncated = await server.rerank(model, req.query, documents, token_charge(request))
    # best first; a stable sort keeps the lower index first among equal scores
    order = np.argsort(-scores, kind="stable")[: req.top_n or len(documents)]
    results = [
        RerankResult(
            index=int(i),
            relevance_score=float(scores[i]),
            document=RerankDocument(documents[i]) if req.return_documents else None,
        )
        for i in order
    ]
    total = int(sum(counts))
    ctx.details["inputs"] = str(len(documents))
    ctx.details["tokens"] = str(total)
    version = "2" if request.url.path.startswith("/v2/") else "1"
    meta = RerankMeta(ApiVersion(version), BilledUnits(search_units=1), RerankTokens(input_tokens=total))
    out = RerankResponse(
        id=ctx.request_id, model=model.name, results=results, usage=RerankUsage(total_tokens=total), meta=meta
    )
    return Response(msgspec.json.encode(out), media_type="application/json", headers=answer_headers(model, truncated))


routes: list[HTTPRouteHandler] = [rerank]
