"""KServe v2 / Open Inference Protocol routes, with the binary tensor data, classification and repository extensions.

Health is open; server and model metadata and inference need an ``infer`` scope
(``infer:<model>`` for one model); the repository extension needs ``models:admin``.
A text model is presented as one BYTES input ``text`` (shape ``[-1]``) and its
embedding output (FP32 ``[-1, D]``): send strings, get vectors.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
import numpy as np
from litestar import Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler

from api.answer_headers import (
    MODEL_VARIANT_HEADER,
    MODEL_VERSION_HEADER,
    TRUNCATED_COUNT_HEADER,
    TRUNCATED_HEADER,
    model_headers,
    truncation_headers,
)
from api.auth import token_charge
from api.classification import classify
from api.codec import (
    InferenceResponse,
    InferRequest,
    datatype_of,
    decode_infer_request,
    encode_infer_response,
    field_of,
    not_json,
    not_utf8,
)
from api.docs import KEY, documented
from api.envelope import context_of
from api.errors import KServeError
from api.schemas import (
    INFER_DESCRIPTION,
    INFER_EXAMPLES,
    Empty,
    InferenceRequest,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    RepositoryEntry,
    RepositoryModelRequest,
    ServerMetadata,
)
from api.server import INLINE_BODY_BYTES, Server, TokenCharge, off_loop_if_large
from runtime.errors import InputError, ModelNotFoundError, shown
from runtime.interface import POOLED_OUTPUT  # a text embedding model's output when the server pools
from runtime.serving import LoadedModel

_Body = TypeVar("_Body")

__all__ = [
    "EXTENSIONS",
    "TEXT_INPUT",
    "embedding_dim",
    "find_model",
    "json_answer",
    "model_metadata",
    "routes",
    "server_of",
]

#: the last two are served by :mod:`api.triton`
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "model_configuration", "statistics"]
TEXT_INPUT = "text"
HEADER_LENGTH = "Inference-Header-Content-Length"
#: seconds an audit append may wait on another process's lock before readiness says not ready
AUDIT_STALL_S = 5.0

Req = Request[Any, Any, Any]
KSERVE = "KServe v2"
HEALTH = "Health"
REPOSITORY = "Model repository"


def json_answer(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(msgspec.json.encode(value), status_code=status, media_type="application/json", headers=headers)


def server_of(request: Req) -> Server:
    server = request.app.state["server"]
    assert isinstance(server, Server)
    return server


def find_model(request: Req, name: str, version: int | None) -> LoadedModel:
    """The loaded model a request names, set on its context (for the audit record); a 404 if none."""
    ctx = context_of(request.scope)
    ctx.ask_model(name)
    model = server_of(request).registry.get(name, version)
    ctx.set_model(model)
    return model


def _text_output(model: LoadedModel) -> tuple[str, list[int]]:
    cfg = model.manifest.text
    name = model.text_output_name
    dim = -1
    for spec in model.manifest.outputs:
        if spec.name == name and spec.shape:
            dim = spec.shape[-1]
    if cfg is not None and cfg.pooling != "none":
        # The server pools the graph's token embeddings: what it answers is a sentence embedding.
        name = POOLED_OUTPUT
    return name, [-1, dim]


def embedding_dim(model: LoadedModel) -> int:
    """The embedding width from the manifest (-1 when dynamic)."""
    return _text_output(model)[1][-1]


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    if model.is_text:
        out_name, out_shape = _text_output(model)
        inputs = [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}]
        outputs = [{"name": out_name, "datatype": "FP32", "shape": out_shape}]
    else:
        inputs = [{"name": s.name, "datatype": datatype_of(s.dtype), "shape": s.shape} for s in model.manifest.inputs]
        outputs = [{"name": s.name, "datatype": datatype_of(s.dtype), "shape": s.shape} for s in model.manifest.outputs]
    return {
        "name": model.name,
        "versions": [str(model.version)],
        "platform": f"inferbox_{model.backend}",
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {
            "task": model.manifest.task,
            "variant": model.variant,
            "backend": model.backend,
            "exec_precision": model.exec_precision,
            # what the loaded session proved it runs on (providers / OpenVINO execution devices,
            # e.g. the device AUTO picked), comma-joined
            "active": ",".join(model.session.active),
            # what the session fell back from and to (allow_fallback), or empty
            "fallback": getattr(model.session, "fallback", None) or "",
            # class names of the main output, by index (what `classification` answers with), or empty
            "labels": list(model.manifest.labels or []),
        },
    }


@get(
    "/v2",
    opt={"scope": "infer"},
    security=KEY,
    operation_class=documented(ServerMetadata, KServeError, "The server's name, version and extensions.", tag=KSERVE),
)
async def server_metadata(request: Req) -> Response[bytes]:
    c = server_of(request).config
    return json_answer({"name": c.server_name, "version": c.server_version, "extensions": EXTENSIONS})


@get("/v2/health/live", operation_class=documented(Live, KServeError, "The server is up.", tag=HEALTH))
async def health_live() -> Response[bytes]:
    return json_answer({"live": True})


@get(
    "/v2/health/ready",
    operation_class=documented(
        Ready,
        KServeError,
        "A model is loaded and the audit log can be written.",
        tag=HEALTH,
        also={
            503: (
                "No model is loaded yet, the audit log cannot be written (a full disk) or its append has waited "
                "over 5 s (another process holding its lock), or the service is stopping (shutdown_drain_s).",
                Ready,
            )
        },
    ),
)
async def health_ready(request: Req) -> Response[bytes]:
    server = server_of(request)
    audit = server.metrics.audit_stats
    # every request is refused with 503 while the audit log cannot be written: a load balancer must
    # send them elsewhere (it answered 200 while all 3,000 requests of a review got 503)
    # and while it drains before a stop (shutdown_drain_s): a load balancer takes it out before the port closes;
    # and while an append waits past AUDIT_STALL_S on another process's lock (a prune): every request waits
    stats = audit() if audit is not None else None
    ready = (
        bool(server.registry.loaded())
        and not (stats is not None and (stats.failing or stats.stalled_s > AUDIT_STALL_S))
        and not server.draining
    )
    return json_answer({"ready": ready}, status=200 if ready else 503)


@get(
    ["/v2/models/{name:str}", "/v2/models/{name:str}/versions/{version:int}"],
    opt={"scope": "infer"},
    security=KEY,
    operation_class=documented(
        ModelMetadata, KServeError, "The model's inputs, outputs and what serves it.", (404,), tag=KSERVE
    ),
)
async def metadata(request: Req, name: str, version: int | None = None) -> Response[bytes]:
    return json_answer(model_metadata(find_model(request, name, version)))


@get(
    ["/v2/models/{name:str}/ready", "/v2/models/{name:str}/versions/{version:int}/ready"],
    opt={"scope": "infer"},
    security=KEY,
    operation_class=documented(
        ModelReady,
        KServeError,
        "The model is loaded.",
        (404,),
        tag=KSERVE,
        also={503: ("The model's package is in the repository but not loaded.", ModelReady)},
    ),
)
async def model_ready(request: Req, name: str, version: int | None = None) -> Response[bytes]:
    server = server_of(request)
    try:
        find_model(request, name, version)
    except ModelNotFoundError:
        known = any(e.name == name and (version is None or e.version == version) for e in server.registry.index())
        if not known:
            raise
        return json_answer({"name": name, "ready": False}, status=503)
    return json_answer({"name": name, "ready": True})


async def _infer(request: Req, name: str, version: int | None) -> Response[bytes]:
    server = server_of(request)
    ctx = context_of(request.scope)  # the route's audit_event (the guard set it): an inference
    model = find_model(request, name, version)
    body = await server.read_body(request)
    c = server.config
    req = await off_loop_if_large(
        len(body),
        INLINE_BODY_BYTES,
        decode_infer_request,
        body,
        header_length=_header_length(request.headers.get(HEADER_LENGTH), len(body)),
        max_inputs=c.max_inputs,
        max_tensor_elements=c.max_tensor_elements,
        max_json_depth=c.max_json_depth,
    )
    cut: list[int] = []  # the texts cut to the model's max_length
    results: list[tuple[str, Any]] = await (
        _infer_text(server, model, req, cut, token_charge(request))
        if model.is_text
        else _infer_tensor(server, model, req)
    )
    if req.classification:
        results = _classified(model, req, results)
    binary = {name: req.binary_outputs.get(name, req.binary_default) for name, _ in results}
    params = {k: v for k, v in req.parameters.items() if k != "binary_data_output"}
    payload, header_len = encode_infer_response(
        model_name=model.name,
        model_version=str(model.version),
        outputs=results,
        binary=binary,
        request_id=req.id,
        parameters=params,
    )
    ctx.details["outputs"] = str(len(results))
    # the body's model_version, also as /v1/embeddings and /v1/rerank say it, with the variant that answered
    headers = {**model_headers(model), **truncation_headers(cut)}
    if header_len is None:
        return Response(payload, media_type="application/json", headers=headers)
    return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_len), **headers})


def _classified(model: LoadedModel, req: InferRequest, results: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Outputs asked for with ``classification``: their top classes (labels on the model's main output)."""
    main = _text_output(model)[0] if model.is_text else model.manifest.outputs[0].name
    asked = req.outputs or []
    out: list[tuple[str, Any]] = []
    for name, value in results:
        count = req.classification.get(name)
        if count is None:
            out.append((name, value))
            continue
        labels = model.manifest.labels if name == main else None
        where = f"outputs[{asked.index(name)}].parameters"
        # a text model's answers always have a row per text; a tensor model's only when it batches
        batched = model.is_text or model.batchable
        out.append((name, classify(name, value, count, labels, where, batched=batched)))
    return out


def _header_length(header: str | None, body: int) -> int | None:
    """``Inference-Header-Content-Length`` as a byte count (None when absent)."""
    if header is None:
        return None
    text = header.strip()
    if not (text.isascii() and text.isdigit()):
        raise InputError(f"{HEADER_LENGTH}: {header!r:.40} is not a byte count", field=HEADER_LENGTH)
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(body)):  # past the body; and int() refuses over 4300 digits with a 500
        raise InputError(
            f"{HEADER_LENGTH}: a {len(digits)}-digit value is outside the body of {body} bytes", field=HEADER_LENGTH
        )
    return int(digits)


async def _infer_tensor(server: Server, model: LoadedModel, req: InferRequest) -> list[tuple[str, Any]]:
    inputs: dict[str, Any] = {}
    for i, inp in enumerate(req.inputs):
        if inp.array is None:
            raise InputError(
                f"inputs[{i}].datatype: model {model.name!r} takes tensors, not BYTES", field=f"inputs[{i}].datatype"
            )
        inputs[inp.name] = inp.array
    result = await server.infer(model, inputs, req.outputs)
    names = req.outputs if req.outputs is not None else model.output_names()
    return [(n, result[n]) for n in names]


async def _infer_text(
    server: Server, model: LoadedModel, req: InferRequest, cut: list[int], charge: TokenCharge | None
) -> list[tuple[str, Any]]:
    """The text model's answer; ``cut`` gets the indices of the texts cut to its max_length; ``charge``
    takes their tokens from the key's tokens-per-minute bucket."""
    out_name, _ = _text_output(model)
    if len(req.inputs) != 1:
        raise InputError(
            f"inputs: model {model.name!r} takes one BYTES input {TEXT_INPUT!r} holding the texts", field="inputs"
        )
    if req.inputs[0].texts is None:
        raise InputError(
            f"inputs[0].datatype: model {model.name!r} takes BYTES (the texts) in {TEXT_INPUT!r}, "
            f"not {req.inputs[0].datatype}",
            field="inputs[0].datatype",
        )
    if req.inputs[0].name != TEXT_INPUT:
        raise InputError(
            f"inputs[0].name: model {model.name!r} has no input {req.inputs[0].name!r}; it has [{TEXT_INPUT!r}]",
            field="inputs[0].name",
        )
    if req.outputs is not None:
        for i, n in enumerate(req.outputs):
            if n != out_name:
                raise InputError(
                    f"outputs[{i}].name: model {model.name!r} has no output {n!r}; it has [{out_name!r}]",
                    field=f"outputs[{i}].name",
                )
    vectors, _counts, truncated = await server.embed_texts(
        model, req.inputs[0].texts, field="inputs[0].data", charge=charge
    )
    cut.extend(truncated)
    dim = embedding_dim(model)
    if not len(vectors) and dim > 0:  # no texts: [0, D] as the metadata says, not [0, 0]
        vectors = np.zeros((0, dim), dtype=np.float32)
    return [(out_name, vectors)]


@post(
    ["/v2/models/{name:str}/infer", "/v2/models/{name:str}/versions/{version:int}/infer"],
    opt={"scope": "infer", "audit_event": "inference"},
    status_code=200,
    security=KEY,
    operation_class=documented(
        InferenceResponse,
        KServeError,
        "The outputs (application/octet-stream with Inference-Header-Content-Length when an output is binary).",
        (400, 404, 408, 413, 504),
        body=InferenceRequest,
        examples=INFER_EXAMPLES,
        description=INFER_DESCRIPTION,
        tag=KSERVE,
        binary=True,
        answer_headers=(
            HEADER_LENGTH,
            MODEL_VERSION_HEADER,
            MODEL_VARIANT_HEADER,
            TRUNCATED_HEADER,
            TRUNCATED_COUNT_HEADER,
        ),
    ),
)
async def infer(request: Req, name: str, version: int | None = None) -> Response[bytes]:
    return await _infer(request, name, version)


class RepositoryIndexRequest(msgspec.Struct, kw_only=True):
    """Optional: with `ready` true, only the loaded models."""

    ready: bool = False


@post(
    "/v2/repository/index",
    opt={"scope": "models:admin"},
    status_code=200,
    security=KEY,
    operation_class=documented(
        list[RepositoryEntry],
        KServeError,
        "The models in the repository, loaded or not (scope models:admin).",
        (400, 408, 413),
        body=RepositoryIndexRequest,
        body_required=False,
        examples={"ready": ("Only the loaded models", {"ready": True})},
        tag=REPOSITORY,
    ),
)
async def repository_index(request: Req) -> Response[bytes]:
    server = server_of(request)
    asked = _optional_body(await server.read_body(request), RepositoryIndexRequest)
    ready_only = asked is not None and asked.ready
    entries = [
        {"name": e.name, "version": str(e.version), "state": e.state, "reason": e.reason}
        for e in server.registry.index()
        if not ready_only or e.state == "READY"
    ]
    return json_answer(entries)


@post(
    "/v2/repository/models/{name:str}/load",
    opt={"scope": "models:admin", "audit_event": "model_load"},
    status_code=200,
    security=KEY,
    operation_class=documented(
        Empty,
        KServeError,
        "Loaded: the newest version in the repository serves (an older one when the loaded version was "
        "removed: a rollback), X-Model-Version says which; serving went on meanwhile.",
        (400, 404, 408, 409, 413),
        body=RepositoryModelRequest,
        body_required=False,
        examples={"empty": ("No parameters", {})},
        tag=REPOSITORY,
        answer_headers=(MODEL_VERSION_HEADER, MODEL_VARIANT_HEADER),
    ),
)
async def repository_load(request: Req, name: str) -> Response[bytes]:
    import anyio.to_thread

    server = server_of(request)
    ctx = context_of(request.scope)
    _optional_body(await server.read_body(request), RepositoryModelRequest)
    _one_worker(server, "load")
    ctx.finish_when_gone = True  # from here the change happens: its record must say so
    before = next((m for m in server.registry.loaded() if m.name == name), None)
    try:
        model = await anyio.to_thread.run_sync(server.registry.load, name, None)
    except ModelNotFoundError:  # its message names the repository's folder on the box: not for clients
        known = sorted({e.name for e in server.registry.index() if e.name != name})
        still = next((m for m in server.registry.loaded() if m.name == name), None)
        serving = (
            f"; version {still.version}, loaded before it was removed, still serves: unload it with "
            f"POST /v2/repository/models/{name}/unload"
            if still is not None
            else ""
        )
        raise ModelNotFoundError(
            f"model {shown(name)} is not in the repository (models there: {', '.join(known) or 'none'}); put it there "
            f"on the box with `inferbox export` or `inferbox models import`{serving}"
        ) from None
    ctx.set_model(model)
    if before is not None and before is not model:  # one record of the swap: what this load replaced
        ctx.details["replaced_version"] = str(before.version)
        ctx.details["replaced_sha256"] = before.package_sha256
    # KServe's answer is {}: the headers say which version now serves (a rollback serves an older one)
    return json_answer({}, headers=model_headers(model))


@post(
    "/v2/repository/models/{name:str}/unload",
    opt={"scope": "models:admin", "audit_event": "model_unload"},
    status_code=200,
    security=KEY,
    operation_class=documented(
        Empty,
        KServeError,
        "Closed: new requests get 404, the ones already accepted were answered first.",
        (400, 404, 408, 409, 413),
        body=RepositoryModelRequest,
        body_required=False,
        examples={"empty": ("No parameters", {})},
        tag=REPOSITORY,
    ),
)
async def repository_unload(request: Req, name: str) -> Response[bytes]:
    server = server_of(request)
    ctx = context_of(request.scope)
    _optional_body(await server.read_body(request), RepositoryModelRequest)
    _one_worker(server, "unload")
    ctx.finish_when_gone = True  # from here the change happens: its record must say so
    model = server.registry.get(name)
    ctx.set_model(model)
    server.registry.unload(name)  # new requests: 404 from here on
    await server.retired(model)  # its batches done, its session closed
    return json_answer({})


def _one_worker(server: Server, what: str) -> None:
    """A load or unload reaches the one worker process that took the request: with several, the others
    kept the old state (a review saw 7 of 20 requests answered by the old version after a load)."""
    workers = server.config.workers
    if workers > 1:
        raise HTTPException(
            status_code=409,
            detail=(
                f"this server runs {workers} worker processes, each holding its own models: a {what} here would "
                "change one of them. Restart the service to load the newest version of each model on all of them "
                "(systemctl restart inferbox-api), or serve with workers = 1 to use the repository routes"
            ),
        )


def _optional_body(body: bytes, kind: type[_Body]) -> _Body | None:
    """A repository route's optional JSON body as ``kind`` (None when empty); a 400 naming what is wrong."""
    if not body.strip():
        return None
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise InputError(f"body: {exc}", field=field_of(str(exc))) from None
    except UnicodeDecodeError as exc:
        raise not_utf8(exc) from None
    except msgspec.DecodeError as exc:
        raise not_json(exc, body) from None


routes: list[HTTPRouteHandler] = [
    server_metadata,
    health_live,
    health_ready,
    metadata,
    model_ready,
    infer,
    repository_index,
    repository_load,
    repository_unload,
]
