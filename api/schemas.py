"""Structs the OpenAPI document publishes for the KServe routes, ``GET /v1/models`` and ``GET /v1/audit``.

Documentation only: no handler decodes or encodes these.  The infer request's
Structs are the ones :func:`api.codec.decode_infer_request` decodes
(:class:`~api.codec.InferRequestBody`, :class:`~api.codec.RequestInput`,
:class:`~api.codec.RequestOutput`), field for field, with the types and limits
its own checks hold them to (the parameters' known names, the datatypes, shapes
of at most ``MAX_RANK`` non-negative dimensions); not subclasses, as a
parameters dict is not a Struct.  The answers mirror the dicts the handlers
build.  ``tests/api/test_api_openapi.py`` holds both to the parser's fields and
to the real routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from api.codec import MAX_RANK

__all__ = [
    "INFER_DESCRIPTION",
    "INFER_EXAMPLES",
    "AuditPage",
    "AuditRecord",
    "InferenceInput",
    "InferenceOutput",
    "InferenceRequest",
    "Live",
    "ModelCard",
    "ModelList",
    "ModelMetadata",
    "ModelReady",
    "Ready",
    "RepositoryEntry",
    "RepositoryModelRequest",
    "ServerMetadata",
]

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]


class InputParameters(msgspec.Struct, kw_only=True):
    """An input's parameters; shared_memory_region, shared_memory_byte_size and shared_memory_offset
    are refused (400: the shared memory extension is not implemented), other names are ignored."""

    binary_data_size: (
        Annotated[
            int,
            Meta(
                ge=0,
                description="The input's bytes follow the JSON part of a binary body (in input order) instead "
                "of `data`: shape's elements x the datatype's size (little endian; BOOL one byte each), or for "
                "BYTES a 4-byte little-endian length and the UTF-8 bytes per element.",
            ),
        ]
        | UnsetType
    ) = UNSET


class InferenceInput(msgspec.Struct, kw_only=True):
    """One input tensor.  A text model takes one BYTES input `text` holding the texts."""

    name: str
    shape: Annotated[
        list[Annotated[int, Meta(ge=0)]],
        Meta(
            max_length=MAX_RANK,
            description="Its dimensions (a 0 aside) multiply to at most max_tensor_elements; a BYTES input "
            "holds at most max_inputs elements.",
        ),
    ]
    datatype: Annotated[Datatype, Meta(description="BF16 is refused (numpy has no type for it).")]
    parameters: InputParameters = msgspec.field(default_factory=InputParameters)
    data: (
        Annotated[
            list[Any] | int | float | bool | str,
            Meta(
                description="The values, flat or nested (row major), as many as the shape holds: numbers, "
                "true/false for BOOL, strings for BYTES.  Absent when parameters.binary_data_size is given."
            ),
        ]
        | UnsetType
    ) = UNSET


class OutputParameters(msgspec.Struct, kw_only=True):
    """A requested output's parameters; the shared_memory_* ones are refused (400), other names are ignored."""

    binary_data: (
        Annotated[bool, Meta(description="Answer this output's bytes after the JSON (application/octet-stream).")]
        | UnsetType
    ) = UNSET
    classification: (
        Annotated[
            int,
            Meta(
                ge=1,
                description='Answer the top k classes instead (BYTES "<value>:<index>[:<label>]", highest '
                "first): [N, k] for a model that batches, else [k]; the output must be numeric.",
            ),
        ]
        | UnsetType
    ) = UNSET


class InferenceOutput(msgspec.Struct, kw_only=True):
    """An output asked for (by its name in the model's metadata)."""

    name: str
    parameters: OutputParameters = msgspec.field(default_factory=OutputParameters)


class RequestParameters(msgspec.Struct, kw_only=True):
    """The request's parameters: echoed in the answer (less binary_data_output)."""

    binary_data_output: (
        Annotated[bool, Meta(description="Answer every output's bytes after the JSON (application/octet-stream).")]
        | UnsetType
    ) = UNSET


class InferenceRequest(msgspec.Struct, kw_only=True):
    """KServe v2 inference request (the Open Inference Protocol's JSON; with the binary tensor data
    extension, the JSON part of the body)."""

    inputs: Annotated[list[InferenceInput], Meta(min_length=1, description="At most max_inputs inputs.")]
    id: Annotated[str | None, Meta(description="Echoed in the answer.")] = None
    parameters: RequestParameters = msgspec.field(default_factory=RequestParameters)
    outputs: (
        Annotated[
            list[InferenceOutput],
            Meta(description="The outputs to answer, in this order, each at most once; absent or []: all of them."),
        ]
        | None
    ) = None


INFER_DESCRIPTION = """\
Run the model on the inputs (KServe v2 / Open Inference Protocol).  A text model takes one BYTES input
`text` holding the texts and answers its embeddings (or a classifier's scores); a tensor model takes the
inputs of its metadata.

**Binary tensor data**: send the body as application/octet-stream with the header
`Inference-Header-Content-Length: <n>`: the first n bytes are the JSON request, then each input
with `parameters.binary_data_size` as raw bytes, in input order (little endian; BOOL one byte per
element; BYTES a 4-byte little-endian length and the UTF-8 bytes per element).  Outputs asked for
with `parameters.binary_data` (or all, with the request's `parameters.binary_data_output`) come back
the same way: application/octet-stream, `Inference-Header-Content-Length`, and each binary output's
`parameters.binary_data_size`.

**Classification**: an output asked for with `parameters.classification: k` comes back as its top k
classes.  The body may be gzip or deflate (Content-Encoding).
"""
#: name -> (summary, body); tests/api/test_api_openapi.py posts each to the model it is written for
INFER_EXAMPLES: dict[str, tuple[str, Any]] = {
    "texts": (
        "Texts to a text model (e.g. minilm)",
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [2],
                    "data": ["The patient was discharged.", "Der Bericht ist fertig."],
                }
            ]
        },
    ),
    "binary_output": (
        "Its embeddings as raw little-endian float32 after the JSON",
        {
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}],
            "outputs": [{"name": "sentence_embedding", "parameters": {"binary_data": True}}],
        },
    ),
    "classification": (
        "The top 2 classes of a text classifier (e.g. a sentiment model)",
        {
            "id": "ticket-4711",
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["The delivery was late again."]}],
            "outputs": [{"name": "logits", "parameters": {"classification": 2}}],
        },
    ),
}


class ServerMetadata(msgspec.Struct):
    name: str
    version: str
    extensions: list[str]


class Live(msgspec.Struct):
    live: bool


class Ready(msgspec.Struct):
    """Whether a model is loaded (200 true, 503 false)."""

    ready: bool


class TensorMetadata(msgspec.Struct):
    name: str
    datatype: Datatype
    shape: Annotated[list[int], Meta(description="-1: any size.")]


class ModelParameters(msgspec.Struct):
    task: str
    variant: Annotated[str, Meta(description="The package variant being served, e.g. onnx-int8 or openvino-fp32.")]
    backend: str
    exec_precision: Annotated[str, Meta(description="The precision the proved session runs in.")]
    active: Annotated[
        str,
        Meta(
            description="What the loaded session proved it runs on: its providers or OpenVINO execution devices "
            "(the device AUTO picked), comma-joined."
        ),
    ]
    fallback: Annotated[str, Meta(description="What the session fell back from and to (allow_fallback), or empty.")]
    labels: Annotated[list[str], Meta(description="The main output's class names by index, or empty.")]


class ModelMetadata(msgspec.Struct):
    name: str
    versions: list[str]
    platform: Annotated[str, Meta(description="inferbox_<backend>")]
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: ModelParameters


class ModelReady(msgspec.Struct):
    """Whether the model is loaded (200 true, 503 false for a package on disk that is not)."""

    name: str
    ready: bool


class RepositoryModelRequest(msgspec.Struct, kw_only=True):
    """Accepted and ignored (KServe lets a client pass load parameters; this server takes none)."""

    parameters: dict[str, Any] = {}


class RepositoryEntry(msgspec.Struct):
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: Annotated[str, Meta(description="Why the model is not loaded, or empty.")]


class Empty(msgspec.Struct):
    """`{}`: done."""


class ModelCard(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(msgspec.Struct):
    """The loaded models the key may use (an `infer:<model>` key sees only its models)."""

    object: Literal["list"]
    data: list[ModelCard]


class AuditRecord(msgspec.Struct, kw_only=True):
    """One audit record (docs/audit.md): the event, its place in the hash chain and its leaf hash."""

    seq: int
    log_id: str
    prev_hash: str
    recorded_at: str
    event: str
    action: str
    actor: str
    credential_id: str
    origin: str
    outcome: Literal["success", "failure"]
    status: int
    started_at: str
    ended_at: str
    request_id: str
    model_name: str
    model_version: str
    model_sha256: str
    backend: str
    variant: str
    job_id: str
    input_digest: str
    output_digest: str
    digest_key_id: str
    details: dict[str, str]
    leaf_hash: str


class AuditPage(msgspec.Struct):
    records: Annotated[list[AuditRecord], Meta(description="Oldest first.")]
    next_after_seq: Annotated[
        int | None, Meta(description="after_seq for the next page; null once a page has fewer than limit records.")
    ]
