"""The OpenAPI document at /docs/openapi.json says what the routes really do.

Its bodies are held to the real parsers (bodies the server answers 200 decode under the
documented Struct; bodies the documented Struct refuses get a 400; every example in the
document is answered 200), its answers and errors to what the routes send, and its security
to which routes the guard lets through without a key.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import TestClient

from api.app import create_app
from api.codec import InferRequestBody, RequestInput, RequestOutput
from api.config import ApiConfig
from api.docs import RouteDoc
from api.errors import KServeError, OpenAIError
from api.kserve import RepositoryIndexRequest
from api.openai import EmbeddingsBody, EmbeddingsRequest
from api.rerank import RerankBody, RerankRequest
from api.schemas import InferenceInput, InferenceOutput, InferenceRequest, RepositoryModelRequest
from runtime.errors import AuthError

from .conftest import DIM, make_registry, tensor_model, text_classifier, text_model

HEADER = "Inference-Header-Content-Length"


class _Reader:
    """One stored audit record, as the appliance's reader answers it."""

    def query(self, **_: Any) -> list[Any]:
        from appliance.audit.canonical import AuditRecord

        return [
            AuditRecord(
                seq=1,
                log_id="log-1",
                prev_hash="0" * 64,
                recorded_at="2026-05-01T12:00:00.000000Z",
                event="inference",
                action="POST /v1/embeddings",
                actor="k1",
                credential_id="",
                origin="127.0.0.1",
                outcome="success",
                status=200,
                started_at="2026-05-01T12:00:00.000000Z",
                ended_at="2026-05-01T12:00:00.001000Z",
                request_id="r1",
                model_name="minilm",
                model_version="1",
                model_sha256="1" * 64,
                backend="onnxruntime",
                variant="onnx-fp32",
                job_id="",
                input_digest="2" * 64,
                output_digest="3" * 64,
                digest_key_id="d1",
                details={"inputs": "1"},
                leaf_hash="4" * 64,
            )
        ]


class _NoKeys:
    def verify(self, secret: str) -> Any:
        raise AuthError("unknown key")


def _app(tmp_path: Path, **config: Any) -> Litestar:
    models = [
        text_model(tmp_path),  # "minilm", DIM-wide embeddings
        tensor_model(tmp_path),  # "tabular": x FP32 [-1, 4], ids INT64 [-1, 3] -> y FP32 [-1, 3], z INT32 [-1, 2]
        text_classifier(tmp_path, "reranker", ["LABEL_0"]),
        text_classifier(tmp_path, "sentiment", ["NEGATIVE", "POSITIVE"]),
    ]
    registry = make_registry(models, extra={"spare": lambda: tensor_model(tmp_path, name="spare")})
    keyed = config.pop("keys", None)
    return create_app(
        registry=registry,
        config=ApiConfig(auth=keyed is not None, **config),
        audit=None,
        keys=keyed,
        audit_reader=_Reader(),
    )


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Any]]:
    """One app for the module (its models take a while to open); a test that unloads a model loads it first."""
    with TestClient(_app(tmp_path_factory.mktemp("openapi")), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def doc(client: TestClient[Any]) -> dict[str, Any]:
    r = client.get("/docs/openapi.json")
    assert r.status_code == 200
    document: dict[str, Any] = r.json()
    return document


def _arrays_without_items(node: Any, where: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        if node.get("type") == "array" and "items" not in node and "prefixItems" not in node:
            yield where
        for key, value in node.items():
            yield from _arrays_without_items(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _arrays_without_items(value, f"{where}[{i}]")


def test_every_array_says_what_it_holds(doc: dict[str, Any]) -> None:
    """A KServe input's ``data`` (``list[Any]``) was ``{"type": "array"}``: openapi-python-client dropped
    the property, and a client generated from the document could not send a tensor."""
    assert list(_arrays_without_items(doc)) == []
    data = doc["components"]["schemas"]["InferenceInput"]["properties"]["data"]
    assert {"type": "array", "items": {}} in data["anyOf"]


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield method, path, op


def _routes(app: Litestar) -> Iterator[tuple[str, str, Any]]:
    """(method, path as the document writes it, handler) of every route in the schema."""
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            for method, (handler, _) in route.route_handler_map.items():
                if handler.resolve_include_in_schema():
                    yield method.lower(), route.path_format, handler


def _route_doc(handler: Any) -> RouteDoc:
    doc: RouteDoc = handler.operation_class.doc
    return doc


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def _same(tp: Any, raw: bytes) -> None:
    """``raw`` decodes as ``tp`` and nothing in it is left out of ``tp`` (nor added by it)."""
    value = msgspec.json.decode(raw, type=tp)
    assert msgspec.json.decode(msgspec.json.encode(value)) == msgspec.json.decode(raw), raw[:300]


# -- the document's shape -----------------------------------------------------------------------


def test_every_route_is_documented_with_its_answer_and_every_post_with_a_json_body(
    client: TestClient[Any], doc: dict[str, Any]
) -> None:
    routes = {(m, p) for m, p, _ in _routes(client.app)}
    assert routes == {(m, p) for m, p, _ in _operations(doc)}
    posts = [(p, op) for m, p, op in _operations(doc) if m == "post"]
    assert len(posts) == 8  # infer x2, embeddings, rerank x2, repository index, load, unload
    for path, op in posts:
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        name = schema["$ref"].rsplit("/", 1)[-1]
        assert doc["components"]["schemas"][name]["type"] == "object", path
        assert op["requestBody"]["content"]["application/json"]["examples"], path
    for method, path, op in _operations(doc):
        assert "$ref" in json.dumps(op["responses"]["200"]["content"]["application/json"]["schema"]), (method, path)
        for status, answer in op["responses"].items():
            assert answer["headers"]["X-Request-ID"], (path, status)


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    refs = set(_refs(doc))
    assert refs
    for ref in refs:
        _, kind, name = ref.rsplit("/", 2)
        assert name in doc["components"][kind], ref


def test_binary_extension_and_limits_are_documented(doc: dict[str, Any]) -> None:
    op = doc["paths"]["/v2/models/{name}/infer"]["post"]
    assert HEADER in op["description"] and "application/octet-stream" in op["requestBody"]["content"]
    assert HEADER in {p["name"] for p in op["parameters"]}
    assert "application/octet-stream" in op["responses"]["200"]["content"]
    schemas = doc["components"]["schemas"]
    shape = schemas["InferenceInput"]["properties"]["shape"]
    assert shape["maxItems"] == 32 and shape["items"]["minimum"] == 0
    assert schemas["InferenceRequest"]["properties"]["inputs"]["minItems"] == 1
    assert "BF16" not in schemas["InferenceInput"]["properties"]["datatype"]["enum"]
    assert schemas["OutputParameters"]["properties"]["classification"]["minimum"] == 1
    assert schemas["RerankRequest"]["properties"]["top_n"]["anyOf"][0]["minimum"] == 1
    assert schemas["EmbeddingsRequest"]["required"] == ["input", "model"]
    version = doc["paths"]["/v2/models/{name}/versions/{version}"]["get"]["parameters"][1]
    assert version["name"] == "version" and version["schema"] == {"type": "integer"}


def test_the_kserve_structs_document_the_parsers_fields() -> None:
    """Not subclasses (a parameters dict is not a Struct), so held to the parser's fields here."""
    for documented, parser in (
        (InferenceRequest, InferRequestBody),
        (InferenceInput, RequestInput),
        (InferenceOutput, RequestOutput),
    ):
        ours = {f.name: f.required for f in msgspec.structs.fields(documented)}
        theirs = {f.name: f.required for f in msgspec.structs.fields(parser)}
        assert ours == theirs, documented
    assert issubclass(EmbeddingsRequest, EmbeddingsBody) and issubclass(RerankRequest, RerankBody)


def test_the_audit_record_is_the_appliances() -> None:
    from api.schemas import AuditRecord
    from appliance.audit.canonical import AuditRecord as Stored

    assert [f.name for f in msgspec.structs.fields(AuditRecord)] == [f.name for f in msgspec.structs.fields(Stored)]


# -- security -----------------------------------------------------------------------------------


def test_bearer_scheme_is_required_exactly_where_the_guard_asks_for_a_key(tmp_path: Path) -> None:
    with TestClient(_app(tmp_path, keys=_NoKeys()), raise_server_exceptions=False) as c:
        doc = c.get("/docs/openapi.json").json()
        assert doc["components"]["securitySchemes"]["bearer"] == {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "ibx_<id>_<secret>",
            "description": doc["components"]["securitySchemes"]["bearer"]["description"],
        }
        assert "security" not in doc  # no global default: each operation says
        ops = {(m, p): op for m, p, op in _operations(doc)}
        open_routes = {p for (_, p), op in ops.items() if op["security"] == []}
        assert open_routes == {"/v2/health/live", "/v2/health/ready"}
        for method, path, handler in _routes(c.app):
            op = ops[(method, path)]
            keyed = "scope" in handler.opt
            assert op["security"] == ([{"bearer": []}] if keyed else []), path
            assert ("401" in op["responses"]) == keyed, path
            url = path.replace("{name}", "minilm").replace("{version}", "1")
            r = c.request(method.upper(), url)  # no Authorization header
            assert (r.status_code == 401) == keyed, (path, r.status_code, r.text)
            if keyed:  # a wrong key too
                assert c.request(method.upper(), url, headers={"Authorization": "Bearer ibx_x_y"}).status_code == 401


# -- bodies against the real parser -------------------------------------------------------------

X = [[0.5, 1.0, 1.5, 2.0]]
TABULAR = [
    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X},
    {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
]
RERANK = {"model": "reranker", "query": "refunds"}

#: (path, documented Struct, body): answered 200
VALID: list[tuple[str, Any, Any]] = [
    ("/v1/embeddings", EmbeddingsRequest, {"model": "minilm", "input": "hello"}),
    ("/v1/embeddings", EmbeddingsRequest, {"model": "minilm", "input": ["a", "b"], "encoding_format": "base64"}),
    (
        "/v1/embeddings",
        EmbeddingsRequest,
        {"model": "minilm", "input": [""], "encoding_format": "float", "dimensions": DIM, "user": "u1"},
    ),
    ("/v1/embeddings", EmbeddingsRequest, {"model": "minilm", "input": "x", "dimensions": None, "user": None}),
    ("/v1/embeddings", EmbeddingsRequest, {"model": "minilm", "input": "x", "unknown_field": [1]}),
    ("/v1/rerank", RerankRequest, {**RERANK, "documents": ["a"]}),
    (
        "/v2/rerank",
        RerankRequest,
        {**RERANK, "documents": ["a", {"text": "b", "title": "t"}], "top_n": 1, "return_documents": True},
    ),
    ("/v1/rerank", RerankRequest, {**RERANK, "documents": ["a", "b"], "top_n": 9, "max_tokens_per_doc": 512}),
    ("/v1/rerank", RerankRequest, {**RERANK, "documents": ["a"], "top_n": None, "return_documents": False}),
    ("/v2/models/tabular/infer", InferenceRequest, {"inputs": TABULAR}),
    (
        "/v2/models/tabular/versions/1/infer",
        InferenceRequest,
        {
            "id": "r1",
            "parameters": {"trace": "yes", "binary_data_output": False},
            "inputs": TABULAR,
            "outputs": [{"name": "z", "parameters": {"classification": 1}}, {"name": "y"}],
        },
    ),
    ("/v2/models/tabular/infer", InferenceRequest, {"inputs": TABULAR, "outputs": [], "id": None}),
    (
        "/v2/models/tabular/infer",
        InferenceRequest,
        {
            "inputs": [{**TABULAR[0], "data": [0.5, 1, 1.5, 2], "parameters": {"note": 1}}, TABULAR[1]],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
        },
    ),
    (
        "/v2/models/minilm/infer",
        InferenceRequest,
        {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": "hi"}]},
    ),
    (
        "/v2/models/minilm/infer",
        InferenceRequest,
        {"inputs": [{"name": "text", "shape": [0], "datatype": "BYTES", "data": []}]},
    ),
    (
        "/v2/models/sentiment/infer",
        InferenceRequest,
        {
            "inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["good"], ["bad"]]}],
            "outputs": [{"name": "logits", "parameters": {"classification": 5, "binary_data": True}}],
        },
    ),
    ("/v2/repository/index", RepositoryIndexRequest, {"ready": True}),
    ("/v2/repository/index", RepositoryIndexRequest, {}),
    ("/v2/repository/models/spare/load", RepositoryModelRequest, {"parameters": {"config": "{}"}}),
    ("/v2/repository/models/spare/unload", RepositoryModelRequest, {}),
]

#: (path, body): the documented Struct refuses it, and so does the server (400)
INVALID: list[tuple[str, Any]] = [
    ("/v1/embeddings", {"model": "minilm"}),
    ("/v1/embeddings", {"input": "x"}),
    ("/v1/embeddings", {"model": "minilm", "input": []}),
    ("/v1/embeddings", {"model": "minilm", "input": [[101, 102]]}),
    ("/v1/embeddings", {"model": "minilm", "input": 5}),
    ("/v1/embeddings", {"model": "minilm", "input": ["a", None]}),
    ("/v1/embeddings", {"model": "minilm", "input": "x", "encoding_format": "int8"}),
    ("/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 0}),
    ("/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": "8"}),
    ("/v1/rerank", {**RERANK, "documents": []}),
    ("/v1/rerank", {**RERANK, "documents": [3]}),
    ("/v2/rerank", {**RERANK, "documents": [{"title": "no text"}]}),
    ("/v2/rerank", {**RERANK, "documents": [{"text": 5}]}),
    ("/v1/rerank", {**RERANK, "documents": ["a"], "top_n": 0}),
    ("/v1/rerank", {**RERANK, "documents": ["a"], "return_documents": "yes"}),
    ("/v1/rerank", {"model": "reranker", "documents": ["a"]}),
    ("/v2/models/tabular/infer", {"inputs": []}),
    ("/v2/models/tabular/infer", {}),
    ("/v2/models/tabular/infer", {"inputs": [{**TABULAR[0], "datatype": "BF16"}, TABULAR[1]]}),
    ("/v2/models/tabular/infer", {"inputs": [{**TABULAR[0], "shape": [-1, 4]}, TABULAR[1]]}),
    ("/v2/models/tabular/infer", {"inputs": [{**TABULAR[0], "shape": [1] * 33, "data": [1.0]}]}),
    ("/v2/models/tabular/infer", {"inputs": [{**TABULAR[0], "data": None}, TABULAR[1]]}),
    ("/v2/models/tabular/infer", {"inputs": [{"shape": [1, 4], "datatype": "FP32", "data": X}]}),
    ("/v2/models/tabular/infer", {"inputs": [{**TABULAR[0], "parameters": {"binary_data_size": -1}}]}),
    (
        "/v2/models/tabular/infer",
        {"inputs": TABULAR, "outputs": [{"name": "y", "parameters": {"binary_data": "true"}}]},
    ),
    ("/v2/models/tabular/infer", {"inputs": TABULAR, "outputs": [{"name": "y", "parameters": {"classification": 0}}]}),
    (
        "/v2/models/tabular/infer",
        {"inputs": TABULAR, "outputs": [{"name": "y", "parameters": {"classification": True}}]},
    ),
    ("/v2/models/tabular/infer", {"inputs": TABULAR, "parameters": {"binary_data_output": "false"}}),
    ("/v2/models/tabular/infer", {"inputs": TABULAR, "id": 5}),
    ("/v2/repository/index", {"ready": "yes"}),
]


@pytest.mark.parametrize(("path", "documented", "body"), VALID, ids=lambda v: str(v)[:40])
def test_bodies_the_server_takes_fit_the_documented_struct(
    client: TestClient[Any], path: str, documented: Any, body: Any
) -> None:
    raw = json.dumps(body).encode()
    msgspec.json.decode(raw, type=documented)
    if path.endswith("/unload"):
        assert client.post(path.replace("/unload", "/load")).status_code == 200
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("path", "body"), INVALID, ids=lambda v: str(v)[:60])
def test_bodies_the_documented_struct_refuses_the_server_refuses(
    client: TestClient[Any], doc: dict[str, Any], path: str, body: Any
) -> None:
    raw = json.dumps(body).encode()
    documented = _documented_body(client.app, path)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(raw, type=documented)
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text


def _post_route(app: Litestar, url: str) -> tuple[str, Any]:
    """The path template of the POST route answering ``url``, and its handler."""
    for method, path, handler in _routes(app):
        if method == "post" and re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", path), url):
            return path, handler
    raise AssertionError(url)


def _documented_body(app: Litestar, url: str) -> Any:
    return _route_doc(_post_route(app, url)[1]).body


def test_binary_and_compressed_bodies_fit_the_documented_struct(client: TestClient[Any]) -> None:
    tail = b"".join(struct.pack("<I", len(t)) + t for t in (b"hello", b"box"))
    size = {"binary_data_size": len(tail)}
    raw = json.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "parameters": size}]}).encode()
    msgspec.json.decode(raw, type=InferenceRequest)
    r = client.post(
        "/v2/models/minilm/infer",
        content=raw + tail,
        headers={"Content-Type": "application/octet-stream", HEADER: str(len(raw))},
    )
    assert r.status_code == 200, r.text
    body = json.dumps({"model": "minilm", "input": ["gzip"]}).encode()
    r = client.post("/v1/embeddings", content=gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text


# -- examples and answers -----------------------------------------------------------------------

#: the model each infer example is written for
INFER_MODELS = {"texts": "minilm", "binary_output": "minilm", "classification": "sentiment"}


#: headers an answer may carry besides X-Request-ID
ANSWER_HEADERS = (HEADER, "X-Model-Version", "X-Model-Variant", "X-Truncated-Inputs", "X-Truncated-Count")


def _answer(r: Any) -> bytes:
    """The JSON part of an answer (all of it, unless binary outputs follow)."""
    length = r.headers.get(HEADER)
    content: bytes = r.content
    return content[: int(length)] if length is not None else content


def test_every_example_is_answered_200_and_as_documented(client: TestClient[Any], doc: dict[str, Any]) -> None:
    answers = {(m, p): _route_doc(h).answer for m, p, h in _routes(client.app)}
    seen = 0
    for method, path, op in _operations(doc):
        if "requestBody" not in op:
            continue
        for name, example in op["requestBody"]["content"]["application/json"]["examples"].items():
            model = INFER_MODELS[name] if path.endswith("/infer") else "spare"
            url = path.replace("{name}", model).replace("{version}", "1")
            if url.endswith("/unload"):
                assert client.post(url.replace("/unload", "/load")).status_code == 200
            r = client.post(url, json=example["value"])
            assert r.status_code == 200, (path, name, r.text)
            _same(answers[(method, path)], _answer(r))
            # the headers an answer carries are the ones its 200 documents (KServe's infer carried
            # X-Model-Version undocumented, and /v1/embeddings' were documented and not KServe's)
            sent = {h for h in ANSWER_HEADERS if h.lower() in r.headers}
            assert sent <= set(op["responses"]["200"]["headers"]), (path, name, sent)
            seen += 1
    assert seen >= 12


def test_get_answers_are_as_documented(client: TestClient[Any], doc: dict[str, Any]) -> None:
    answers = {(m, p): _route_doc(h).answer for m, p, h in _routes(client.app)}
    for (method, path), answer in answers.items():
        if method != "get":
            continue
        r = client.get(path.replace("{name}", "sentiment").replace("{version}", "1"))
        assert r.status_code == 200, (path, r.text)
        _same(answer, r.content)
    # the other answers a route documents: 503 with "ready": false (health: no model loaded)
    with TestClient(create_app(registry=make_registry([]), config=ApiConfig(auth=False), audit=None, keys=None)) as c:
        r = c.get("/v2/health/ready")
        assert r.status_code == 503
        _same(_route_doc(_handler(c.app, "/v2/health/ready")).also[503][1], r.content)


def _handler(app: Litestar, path: str) -> Any:
    return next(h for _, p, h in _routes(app) if p == path)


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/embeddings", {"model": "minilm", "input": 5}, 400),
        ("/v1/embeddings", {"model": "ghost", "input": "x"}, 404),
        ("/v2/rerank", {**RERANK, "documents": []}, 400),
        ("/v1/rerank", {"model": "minilm", "query": "q", "documents": ["a"]}, 404),
        ("/v2/models/tabular/infer", {"inputs": []}, 400),
        ("/v2/models/ghost/infer", {"inputs": TABULAR}, 404),
        ("/v2/repository/models/ghost/load", {}, 404),
    ],
)
def test_errors_have_the_documented_shape(
    client: TestClient[Any], doc: dict[str, Any], path: str, body: Any, status: int
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    template, _ = _post_route(client.app, path)
    ref = doc["paths"][template]["post"]["responses"][str(status)]["content"]["application/json"]["schema"]["$ref"]
    shape = {"KServeError": KServeError, "OpenAIError": OpenAIError}[ref.rsplit("/", 1)[-1]]
    _same(shape, r.content)


def test_the_document_costs_the_serving_path_nothing(client: TestClient[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Schemas are generated once, when the document is first asked for; requests never do it."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a JSON schema was generated while serving")

    monkeypatch.setattr(msgspec.json, "schema_components", refuse)
    assert client.post("/v1/embeddings", json={"model": "minilm", "input": "x"}).status_code == 200
    assert (
        client.post(
            "/v2/models/minilm/infer",
            json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]},
        ).status_code
        == 200
    )


def _documented_shape(doc: dict[str, Any], template: str, method: str, status: int) -> Any:
    schema = doc["paths"][template][method]["responses"][str(status)]["content"]["application/json"]["schema"]
    refs = [schema["$ref"]] if "$ref" in schema else [s["$ref"] for s in schema.get("anyOf", [])]
    shapes = {"KServeError": KServeError, "OpenAIError": OpenAIError}
    return [shapes[r.rsplit("/", 1)[-1]] for r in refs if r.rsplit("/", 1)[-1] in shapes]


def test_the_audit_refusal_and_a_missing_key_have_the_documented_shape_on_every_keyed_route(
    tmp_path: Path, doc: dict[str, Any]
) -> None:
    """The 503 of an audit log that cannot be written (the envelope's) and the guard's 401, route by route."""
    from .conftest import MemoryAudit

    class Keys:
        def verify(self, secret: str) -> Any:
            raise AuthError("the API key is not valid")

    failing = MemoryAudit()
    failing.fail = True
    models = [text_model(tmp_path), tensor_model(tmp_path), text_classifier(tmp_path, "reranker", ["LABEL_0"])]
    calls = [
        ("post", "/v1/embeddings", "/v1/embeddings", {"model": "minilm", "input": "x"}),
        ("post", "/v1/rerank", "/v1/rerank", {**RERANK, "documents": ["a"]}),
        ("post", "/v2/rerank", "/v2/rerank", {**RERANK, "documents": ["a"]}),
        ("post", "/v2/models/{name}/infer", "/v2/models/tabular/infer", {"inputs": TABULAR}),
        ("get", "/v1/models", "/v1/models", None),
        ("get", "/v2/models/{name}", "/v2/models/tabular", None),
    ]
    for audit, keys, status in ((failing, None, 503), (None, Keys(), 401)):
        app = create_app(
            registry=make_registry(models), config=ApiConfig(auth=keys is not None), audit=audit, keys=keys
        )
        with TestClient(app, raise_server_exceptions=False) as c:
            for method, template, url, body in calls:
                r = c.post(url, json=body) if method == "post" else c.get(url)
                assert r.status_code == status, (url, r.text)
                shapes = _documented_shape(doc, template, method, status)
                assert len(shapes) == 1, (template, status, shapes)
                _same(shapes[0], r.content)
                assert ("retry-after" in r.headers) is (status == 503)


def test_the_document_is_built_at_start_not_on_the_first_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/docs is open: its first request must not build the document on the event loop (~36 ms)."""
    with TestClient(_app(tmp_path), raise_server_exceptions=False) as c:

        def refuse(*_: Any, **__: Any) -> Any:
            raise AssertionError("the document was built on a request")

        monkeypatch.setattr(msgspec.json, "schema_components", refuse)
        r = c.get("/docs/openapi.json")
        assert r.status_code == 200 and r.json()["paths"]


def test_both_repository_routes_document_the_409_of_several_workers(doc: dict[str, Any]) -> None:
    """Load and unload both answer 409 with workers > 1 (api.kserve._one_worker); unload's entry
    left it out although the document promises every error status a route answers (review 14)."""
    for action in ("load", "unload"):
        assert "409" in doc["paths"][f"/v2/repository/models/{{name}}/{action}"]["post"]["responses"], action
