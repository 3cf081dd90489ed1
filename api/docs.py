"""The OpenAPI document at ``/docs/openapi.json`` and the Swagger page at ``/docs``, offline.

Litestar's Swagger page loads its JavaScript from a CDN; an appliance has none.
When the ``swagger-ui-bundle`` package is installed its files are served from
``/docs/assets`` and the page points there; without it the page falls back to
the CDN (``/docs/openapi.json`` works either way).

What the document says about a route comes from its ``operation_class=documented(...)``:
the handlers read their bodies themselves (for speed, and so that an error names the
exact field), so Litestar sees no body type.  ``documented`` names the msgspec Structs
of the body (each next to the code that parses it) and of the answer, the errors the
route answers and in which shape, and examples; a handler given ``security=KEY`` needs
an API key (the bearer scheme; ``Authorize`` in Swagger), one without is documented as
open.  The Structs' JSON schemas (``msgspec.json.schema_components``) become
``components/schemas``.  Litestar builds the document once, on its first request: the
serving path pays nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgspec
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, OpenAPIHeader, Operation, Schema, SecurityRequirement, SecurityScheme
from litestar.openapi.spec.enums import OpenAPIType

from api.errors import KServeError, OpenAIError

__all__ = [
    "ASSETS_PATH",
    "BEARER",
    "KEY",
    "RouteDoc",
    "docs_routes",
    "documented",
    "openapi_config",
    "swagger_assets",
]

ASSETS_PATH = "/docs/assets"
REF = "#/components/schemas/{name}"
BEARER = "bearer"
#: ``security=`` of a route that needs an API key
KEY: list[SecurityRequirement] = [{BEARER: []}]

#: what an error status means, on every route that answers it
_STATUS = {
    400: "The body, a header or a parameter is invalid; the message names the field.",
    401: "No API key, or a malformed, unknown, wrong, revoked or expired one.",
    403: "The key lacks the scope for this route or model.",
    404: "No such model (or version) is loaded.",
    409: "The model's package cannot be used (integrity, signature, or no backend can run it).",
    408: "The body did not arrive in full within body_timeout_s.",
    413: "The body is over max_body_bytes (as sent or decompressed).",
    429: "The key's rate limit or the model's queue is full; retry after Retry-After seconds.",
    500: "Internal error: the message holds the request id, the server log the details.",
    503: "The audit log cannot be written, so the request was refused; retry after Retry-After seconds.",
    504: "The request waited longer than request_timeout_s.",
}
#: the errors of every route that needs a key (and is recorded in the audit log)
_KEYED = (401, 403, 429, 500, 503)
_ERROR_HEADERS = {401: ("WWW-Authenticate",), 429: ("Retry-After",), 503: ("Retry-After",)}
_INTEGER = Schema(type=OpenAPIType.INTEGER)
_STRING = Schema(type=OpenAPIType.STRING)
_HEADERS = {
    "X-Request-ID": OpenAPIHeader(
        schema=_STRING,
        description="The request's id (the client's X-Request-ID if it matches [A-Za-z0-9._:-]{1,128}, else a "
        "new one), as the audit log records it.",
    ),
    "Retry-After": OpenAPIHeader(schema=_INTEGER, description="Seconds to wait before retrying."),
    "WWW-Authenticate": OpenAPIHeader(schema=_STRING, description='Bearer realm="inferbox"'),
    "X-Truncated-Inputs": OpenAPIHeader(
        schema=_STRING,
        description="The indices (comma-separated) of the texts cut to the model's maximum length; absent when "
        "none was. Over 1 KiB, as ranges (0-999), cut with ',...' if still longer.",
    ),
    "X-Truncated-Count": OpenAPIHeader(
        schema=_INTEGER, description="How many texts were cut to the model's maximum length; absent when none was."
    ),
    "X-Model-Version": OpenAPIHeader(
        schema=_STRING,
        description="The version of the model package that answered (an OpenAI or Cohere body names only the "
        "model); on a repository load's answer, the version that serves now.",
    ),
    "X-Model-Variant": OpenAPIHeader(
        schema=_STRING,
        description="What of that package answered: backend/variant/precision (ov-cpu/ov-int8/bf16). Variants "
        "pass one accuracy gate but do not answer alike: do not mix their vectors in one index.",
    ),
    "Inference-Header-Content-Length": OpenAPIHeader(
        schema=_INTEGER, description="The byte length of the JSON part of a binary answer; the outputs' bytes follow."
    ),
}
_BINARY = {"type": "string", "format": "binary"}
_HEADER_LENGTH_PARAMETER = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "required": False,
    "schema": {"type": "integer", "minimum": 0},
    "description": "With a binary body (application/octet-stream): the byte length of its JSON part; the inputs' "
    "bytes follow it.",
}


def _with_items(node: Any) -> Any:
    """``node`` with ``items: {}`` (any value) in every array schema that has none.

    msgspec writes ``list[Any]`` (a KServe input's ``data``: numbers, booleans or
    strings, flat or nested) as ``{"type": "array"}``; client generators
    (openapi-python-client) then drop the property, and with it the request model.
    """
    if isinstance(node, dict):
        out = {k: _with_items(v) for k, v in node.items()}
        if out.get("type") == "array" and "items" not in out and "prefixItems" not in out:
            out["items"] = {}
        return out
    if isinstance(node, list):
        return [_with_items(v) for v in node]
    return node


def _json_schemas(types: Iterable[Any]) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    """``msgspec.json.schema_components`` of ``types`` (refs to ``components/schemas``), every array with items."""
    schemas, components = msgspec.json.schema_components(tuple(types), ref_template=REF)
    return tuple(_with_items(s) for s in schemas), _with_items(components)


def _schema(tp: Any) -> dict[str, Any]:
    """The JSON schema of ``tp``, referring to ``components/schemas`` for its Structs."""
    (schema,), _ = _json_schemas([tp])
    return schema


def _header(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


@dataclass(frozen=True)
class RouteDoc:
    """What the document says about one route (see :func:`documented`)."""

    answer: Any
    shape: type[KServeError] | type[OpenAIError]
    ok: str
    errors: tuple[int, ...] = ()
    body: Any = None
    body_required: bool = True
    examples: Mapping[str, tuple[str, Any]] = field(default_factory=dict)
    description: str | None = None
    tag: str | None = None
    binary: bool = False
    answer_headers: tuple[str, ...] = ()
    also: Mapping[int, tuple[str, Any]] = field(default_factory=dict)

    def types(self) -> list[Any]:
        """The types whose schemas the document needs for this route."""
        return [t for t in (self.body, self.answer, self.shape, KServeError) if t is not None] + [
            tp for _, tp in self.also.values()
        ]

    def render(self, operation: dict[str, Any]) -> dict[str, Any]:
        """Litestar's operation (id, summary, path parameters, the handler's ``security``) completed."""
        keyed = bool(operation.get("security"))
        out = {**operation, "responses": self._responses(keyed)}
        out.setdefault("security", [])  # no key: explicitly open, whatever a global default says
        if self.tag is not None:
            out["tags"] = [self.tag]
        if self.description is not None:
            out["description"] = self.description
        parameters = [_path_parameter(p) for p in operation.get("parameters", [])]
        if self.binary:
            parameters.append(_HEADER_LENGTH_PARAMETER)
        if parameters:
            out["parameters"] = parameters
        if self.body is not None:
            json: dict[str, Any] = {"schema": _schema(self.body)}
            if self.examples:
                json["examples"] = {k: {"summary": s, "value": v} for k, (s, v) in self.examples.items()}
            content = {"application/json": json}
            if self.binary:
                content["application/octet-stream"] = {"schema": _BINARY}
            out["requestBody"] = {"required": self.body_required, "content": content}
        return out

    def _responses(self, keyed: bool) -> dict[str, Any]:
        ok: dict[str, Any] = {"application/json": {"schema": _schema(self.answer)}}
        if self.binary:
            ok["application/octet-stream"] = {"schema": _BINARY}
        out = {"200": _response(self.ok, ok, ("X-Request-ID", *self.answer_headers))}
        errors = set(self.errors) | (set(_KEYED) if keyed else set())
        for status in sorted(errors | set(self.also)):
            texts: list[str] = []
            shapes: list[Any] = []
            if status in self.also:
                text, shape = self.also[status]
                texts.append(text)
                shapes.append(shape)
            if status in errors:
                texts.append(_STATUS[status])
                shapes.append(self.shape)
            schema = _schema(shapes[0]) if len(shapes) == 1 else {"anyOf": [_schema(s) for s in shapes]}
            # Retry-After and WWW-Authenticate come with the keyed routes' errors, not a route's own (a
            # health probe's 503 has none)
            headers = ("X-Request-ID", *(_ERROR_HEADERS.get(status, ()) if status in errors else ()))
            out[str(status)] = _response(" Or: ".join(texts), {"application/json": {"schema": schema}}, headers)
        return out


def _response(description: str, content: dict[str, Any], headers: Iterable[str]) -> dict[str, Any]:
    return {"description": description, "headers": {h: _header(h) for h in headers}, "content": content}


def _path_parameter(parameter: dict[str, Any]) -> dict[str, Any]:
    """A path parameter is never null (Litestar documents ``version: int | None = None`` as int or null)."""
    alternatives = [s for s in parameter.get("schema", {}).get("oneOf", []) if s.get("type") != "null"]
    if parameter.get("in") == "path" and len(alternatives) == 1:
        return {**parameter, "schema": alternatives[0]}
    return parameter


class _DocumentedOperation(Operation):
    doc: ClassVar[RouteDoc]

    def to_schema(self) -> dict[str, Any]:
        return self.doc.render(super().to_schema())


def documented(
    answer: Any,
    shape: type[KServeError] | type[OpenAIError],
    ok: str,
    errors: tuple[int, ...] = (),
    *,
    body: Any = None,
    body_required: bool = True,
    examples: Mapping[str, tuple[str, Any]] | None = None,
    description: str | None = None,
    tag: str | None = None,
    binary: bool = False,
    answer_headers: tuple[str, ...] = (),
    also: Mapping[int, tuple[str, Any]] | None = None,
) -> type[Operation]:
    """The ``operation_class`` of a route: it answers ``answer`` (a type msgspec encodes) with 200,
    meaning ``ok``, and each status of ``errors`` with ``shape``; a route with ``security=KEY`` also
    answers 401, 403, 429, 500 and 503.  ``body``: the Struct of its JSON body, with ``examples``
    (name -> (summary, body)); ``binary``: the binary tensor data extension (octet-stream bodies and
    answers); ``also``: statuses answered with another body (status -> (meaning, type))."""
    route = RouteDoc(
        answer=answer,
        shape=shape,
        ok=ok,
        errors=errors,
        body=body,
        body_required=body_required,
        examples=dict(examples or {}),
        description=description,
        tag=tag,
        binary=binary,
        answer_headers=answer_headers,
        also=dict(also or {}),
    )

    class DocumentedOperation(_DocumentedOperation):
        doc = route

    return DocumentedOperation


@dataclass
class _Components(Components):
    """Litestar's components, plus the JSON schemas of the documented Structs (Litestar replaces
    ``schemas`` with the ones it generated itself, so they are added as the document is written)."""

    documented: tuple[Any, ...] = ()

    @property
    def _exclude_fields(self) -> set[str]:
        return {"documented"}

    def to_schema(self) -> dict[str, Any]:
        out = super().to_schema()
        _, ours = _json_schemas(self.documented)
        theirs: dict[str, Any] = out.get("schemas", {})
        if clash := ours.keys() & theirs.keys():
            raise RuntimeError(f"OpenAPI schema names used twice: {sorted(clash)}")
        out["schemas"] = dict(sorted({**theirs, **ours}.items()))
        return out


def _documented_types(handlers: Iterable[Any]) -> tuple[Any, ...]:
    types: dict[Any, None] = {}
    for handler in handlers:
        operation = getattr(handler, "operation_class", None)
        if isinstance(operation, type) and issubclass(operation, _DocumentedOperation):
            types.update(dict.fromkeys(operation.doc.types()))
    return tuple(types)


_DESCRIPTION = """\
An on-prem inference appliance: KServe v2 (Open Inference Protocol, with the binary tensor data,
classification and model repository extensions), OpenAI's embeddings API and Cohere's rerank API.

Every route but the health probes needs an API key: `Authorization: Bearer ibx_<id>_<secret>`
(**Authorize** above takes the key itself). `infer` lets a key use every model, `infer:<model>` one.
"""


def swagger_assets() -> Path | None:
    """The folder of the installed Swagger UI bundle, or None."""
    try:
        import swagger_ui_bundle  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = Path(swagger_ui_bundle.swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def openapi_config(title: str, version: str, handlers: Iterable[Any] = ()) -> OpenAPIConfig:
    """The document and its Swagger page at ``/docs``; ``handlers``: the app's route handlers,
    whose ``documented`` Structs the document's ``components/schemas`` hold."""
    assets = swagger_assets()
    if assets is None:
        plugin = SwaggerRenderPlugin(path="/")
    else:
        plugin = SwaggerRenderPlugin(
            path="/",
            js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            css_url=f"{ASSETS_PATH}/swagger-ui.css",
            standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
            favicon=f"<link rel='icon' type='image/png' href='{ASSETS_PATH}/favicon-32x32.png'>",
        )
    components = _Components(
        documented=_documented_types(handlers),
        headers=dict(_HEADERS),
        security_schemes={
            BEARER: SecurityScheme(
                type="http",
                scheme="bearer",
                bearer_format="ibx_<id>_<secret>",
                description="An API key from `inferbox keys create`; a route's scope says which keys it takes.",
            )
        },
    )
    return OpenAPIConfig(
        title=title,
        version=version,
        description=_DESCRIPTION,
        path="/docs",
        render_plugins=[plugin],
        components=components,
    )


def docs_routes() -> list[Any]:
    """The static route for the local Swagger assets (empty when the bundle is not installed)."""
    assets = swagger_assets()
    if assets is None:
        return []
    from litestar.static_files import create_static_files_router

    return [create_static_files_router(path=ASSETS_PATH, directories=[assets], include_in_schema=False)]
