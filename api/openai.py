"""OpenAI-compatible routes: ``POST /v1/embeddings`` and ``GET /v1/models``.

``input`` is a string or a list of strings (token arrays are refused: the server
tokenizes with the model's own tokenizer); ``encoding_format`` is ``float`` or
``base64`` (little-endian float32, as OpenAI sends it); ``dimensions`` is refused
unless it equals the model's.  ``usage.prompt_tokens`` counts the model's tokens; texts cut
to the model's maximum length are listed by index in the ``X-Truncated-Inputs`` header.
"""

from __future__ import annotations

import base64
import datetime as dt
from typing import Annotated, Any, Literal, Protocol, TypeVar

import msgspec
import numpy as np
from litestar import Request, Response, get, post
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
from api.codec import field_of, json_depth, not_json, not_utf8
from api.docs import KEY, documented
from api.envelope import RequestContext, context_of
from api.errors import OpenAIError
from api.kserve import embedding_dim
from api.schemas import ModelCard, ModelList
from api.server import INLINE_BODY_BYTES, Server, off_loop_if_large
from runtime.errors import ForbiddenError, InputError, ModelKindError, shown
from runtime.serving import LoadedModel

__all__ = [
    "MODEL_VERSION_HEADER",
    "TRUNCATED_HEADER",
    "EmbeddingsBody",
    "EmbeddingsRequest",
    "EmbeddingsResponse",
    "inference_body",
    "routes",
]

Req = Request[Any, Any, Any]
T = TypeVar("T")


OPENAI = "OpenAI"


class EmbeddingsBody(msgspec.Struct, kw_only=True):
    """The body as the handler decodes it: ``input`` is checked by ``_texts``, whose errors name the item."""

    input: Any
    model: Annotated[str, Meta(description="A loaded embedding model (GET /v1/models).")]
    encoding_format: Annotated[
        Literal["float", "base64"], Meta(description="base64: little-endian float32, as OpenAI sends it.")
    ] = "float"
    dimensions: int | None = None
    user: Annotated[str | None, Meta(description="Accepted and ignored.")] = None


# The body the OpenAPI document publishes: EmbeddingsBody with the fields the handler checks itself
# narrowed to what those checks accept (tests/api/test_api_openapi.py holds the two together).
class EmbeddingsRequest(EmbeddingsBody, kw_only=True):
    """OpenAI's embeddings request; other fields are ignored."""

    input: Annotated[
        str | Annotated[list[str], Meta(min_length=1)],
        Meta(
            description="A text or a list of texts (at most max_inputs); token arrays are refused. A text longer "
            "than the model's maximum length is cut (X-Truncated-Inputs) or refused, by the server's truncate setting."
        ),
    ]
    dimensions: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        Meta(description="The model's own dimension (it cannot shorten its embeddings), or null."),
    ] = None


class Embedding(msgspec.Struct):
    index: int
    embedding: Annotated[
        list[float] | str, Meta(description="The vector, or with encoding_format base64 its float32 bytes in base64.")
    ]
    object: Literal["embedding"] = "embedding"


class EmbeddingsUsage(msgspec.Struct):
    """The model's tokens (special tokens included; of a cut text, those the model saw)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(msgspec.Struct):
    """OpenAI's embeddings answer, one embedding per text in input order."""

    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage
    object: Literal["list"] = "list"


#: token ids are the client's tokenizer's, not the model's; LangChain's OpenAIEmbeddings sends them
#: unless told not to, so the message names its switch
IDS_NOT_TEXT = (
    "token arrays are not accepted; send text (LangChain's OpenAIEmbeddings: pass check_embedding_ctx_length=False)"
)


def _created(model: LoadedModel) -> int:
    """The package's creation time as Unix seconds (OpenAI's ``created``); 0 if unreadable."""
    try:
        return int(dt.datetime.fromisoformat(model.manifest.provenance.created_at).timestamp())
    except ValueError:
        return 0


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise InputError("input: must be a string or a list of strings", field="input")
    if not value:
        raise InputError("input: must not be empty", field="input")
    # token ids: a list of ints (one text's ids), or a list of lists; an int among strings is a stray number
    ids = all(isinstance(item, int) for item in value) or isinstance(value[0], list)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            what = IDS_NOT_TEXT if ids and isinstance(item, list | int) else "must be a string"
            raise InputError(f"input[{i}]: {what}", field=f"input[{i}]")
    return list(value)


def _check_dimensions(wanted: int | None, dim: int, model: str) -> None:
    if wanted is not None and wanted < 1:  # "cannot shorten them" answered 0 and -1 too
        raise InputError(f"dimensions: must be a whole number >= 1, got {wanted}; or omit it", field="dimensions")
    if wanted is not None and dim > 0 and wanted != dim:
        raise InputError(
            f"dimensions: model {model!r} gives {dim} dimensions and cannot shorten them; omit dimensions",
            field="dimensions",
        )


def decode_json(body: bytes, kind: type[T], max_depth: int) -> T:
    """``body`` as ``kind``, nested at most ``max_depth`` deep (the depth scan of a 16 MB body takes
    as long as its decode: both go to a worker thread together)."""
    depth = json_depth(body, limit=max_depth)
    if depth > max_depth:
        raise InputError(f"body: JSON nesting depth {depth} is over the limit", field="body")
    return msgspec.json.decode(body, type=kind)


async def decode_body(request: Req, server: Server, kind: type[T]) -> T:
    """The request's JSON body as ``kind``; any problem is a 400 naming the field."""
    body = await server.read_body(request)
    try:
        return await off_loop_if_large(
            len(body), INLINE_BODY_BYTES, decode_json, body, kind, server.config.max_json_depth
        )
    except msgspec.ValidationError as exc:
        field = field_of(str(exc))
        raise InputError(f"{field}: {exc}", field=field) from None
    except UnicodeDecodeError as exc:
        raise not_utf8(exc) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise not_json(exc, body) from None


def model_named(request: Req, server: Server, name: str) -> LoadedModel:
    """The loaded model a body names, once the key may use it (else 403, whether it is loaded or not)."""
    ctx = context_of(request.scope)
    ctx.ask_model(name)
    principal = ctx.principal
    # the scope first: a key for one model learns nothing about the others (not even which are loaded)
    if principal is not None and principal.key_id != "anonymous" and not principal.allows("infer", name):
        raise ForbiddenError(f"key {principal.key_id} lacks the scope infer on model {shown(name)}")
    model = server.registry.get(name)
    ctx.set_model(model)
    return model


class _NamesModel(Protocol):
    model: str


B = TypeVar("B", bound=_NamesModel)


async def inference_body(request: Req, kind: type[B]) -> tuple[Server, RequestContext, B, LoadedModel]:
    """An inference route's start: its body decoded as ``kind`` and the model it names, which
    the key may use (recorded as an ``inference``: the route's ``audit_event``, set by the guard)."""
    server: Server = request.app.state["server"]
    ctx = context_of(request.scope)
    req = await decode_body(request, server, kind)
    return server, ctx, req, model_named(request, server, req.model)


@post(
    "/v1/embeddings",
    opt={"scope": "infer", "audit_event": "inference"},
    status_code=200,
    security=KEY,
    operation_class=documented(
        EmbeddingsResponse,
        OpenAIError,
        "The embeddings.",
        (400, 404, 408, 413, 504),
        body=EmbeddingsRequest,
        examples={
            "texts": (
                "Two texts",
                {"model": "minilm", "input": ["The patient was discharged.", "Der Bericht ist fertig."]},
            ),
            "base64": ("One text, base64 float32", {"model": "minilm", "input": "hello", "encoding_format": "base64"}),
        },
        description="OpenAI's embeddings API (the openai client with base_url=http://<host>/v1 works). "
        "The body may be gzip or deflate (Content-Encoding).",
        tag=OPENAI,
        answer_headers=(MODEL_VERSION_HEADER, MODEL_VARIANT_HEADER, TRUNCATED_HEADER, TRUNCATED_COUNT_HEADER),
    ),
)
async def embeddings(request: Req) -> Response[bytes]:
    server, ctx, req, model = await inference_body(request, EmbeddingsBody)
    if not model.is_embedding:
        raise ModelKindError(f"model: {req.model!r} is not an embedding model; see GET /v1/models")
    texts = _texts(req.input)
    _check_dimensions(req.dimensions, embedding_dim(model), model.name)
    vectors, counts, truncated = await server.embed_texts(model, texts, charge=token_charge(request))
    _check_dimensions(req.dimensions, int(vectors.shape[1]), model.name)
    data: list[Embedding] = []
    for i, vec in enumerate(vectors):
        if req.encoding_format == "base64":
            emb: list[float] | str = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
        else:
            emb = np.asarray(vec, dtype=np.float32).tolist()
        data.append(Embedding(index=i, embedding=emb))
    total = int(sum(counts))
    ctx.details["inputs"] = str(len(texts))
    ctx.details["tokens"] = str(total)
    out = EmbeddingsResponse(
        data=data, model=model.name, usage=EmbeddingsUsage(prompt_tokens=total, total_tokens=total)
    )
    return Response(msgspec.json.encode(out), media_type="application/json", headers=answer_headers(model, truncated))


@get(
    "/v1/models",
    opt={"scope": "infer"},
    security=KEY,
    operation_class=documented(ModelList, OpenAIError, "The loaded models the key may use.", tag=OPENAI),
)
async def list_models(request: Req) -> Response[bytes]:
    server: Server = request.app.state["server"]
    # a key narrowed to some models sees only those: the names of the others are not its business
    principal = context_of(request.scope).principal
    data = [
        {"id": m.name, "object": "model", "created": _created(m), "owned_by": "inferbox"}
        for m in server.registry.loaded()
        if principal is None or principal.allows("infer", m.name)
    ]
    return Response(msgspec.json.encode({"object": "list", "data": data}), media_type="application/json")


@get(
    "/v1/models/{name:str}",
    opt={"scope": "infer"},
    security=KEY,
    operation_class=documented(
        ModelCard, OpenAIError, "One loaded model the key may use (OpenAI's retrieve).", (403, 404), tag=OPENAI
    ),
)
async def retrieve_model(request: Req, name: str) -> Response[bytes]:
    server: Server = request.app.state["server"]
    loaded = model_named(request, server, name)  # 403 for a model the key may not use, loaded or not
    card = {"id": loaded.name, "object": "model", "created": _created(loaded), "owned_by": "inferbox"}
    return Response(msgspec.json.encode(card), media_type="application/json")


routes: list[HTTPRouteHandler] = [embeddings, list_models, retrieve_model]
