"""Triton's model configuration and statistics extensions, so that Triton's tooling reads this server.

``GET /v2/models/{m}[/versions/{v}]/config`` answers the model's configuration in
Triton's JSON form (``tritonclient``'s ``get_model_config``), built from the same
facts as the model's metadata: ``max_batch_size`` 0, since each request's tensors
carry their own first dimension (``dims`` are the metadata's shapes) and the
server batches requests of any size together by itself; what it batches to and
what serves it are in ``parameters``.

``GET /v2/models[/{m}[/versions/{v}]]/stats`` answers Triton's statistics of
each loaded version (``get_inference_statistics``), counted since it was loaded
in this worker process:

- ``success`` / ``fail``: inference requests answered below 400 / from 400 on (a
  400 for a bad input, a 504 timeout, a 499 whose client left), on any route
  (KServe, ``/v1/embeddings``, rerank) and their time from arrival to answer;
- ``queue`` / ``compute_infer``: per request answered in full, as Triton counts
  them: the time it waited before its first batch began, and the time of the
  batches that ran its texts (each batch once), so that ``ns / count`` is a
  request's average, comparable with ``success``;
- ``inference_count``: rows answered; ``execution_count``: batches run;
  ``batch_stats``: batches by rows, with their time;
- ``compute_input`` / ``compute_output`` / ``cache_hit``: zero (padding and
  pooling run inside ``compute_infer``; there is no response cache).

Both need an ``infer`` scope (``infer:<model>`` for one model); the list of all
models names only those the key may use.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get
from msgspec import Meta

from api.docs import KEY, documented
from api.envelope import context_of
from api.errors import KServeError
from api.kserve import find_model, json_answer, model_metadata, server_of
from api.server import Server
from runtime.serving import LoadedModel

__all__ = ["ModelConfig", "ModelStatistics", "config_of", "routes", "statistics_of"]

KSERVE = "KServe v2"
NS = 1_000_000_000

Req = Request[Any, Any, Any]

#: KServe datatype -> Triton's config data type
_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BF16": "TYPE_BF16",
    "BYTES": "TYPE_STRING",
}


class ConfigTensor(msgspec.Struct):
    name: str
    data_type: Annotated[str, Meta(description="Triton's type: TYPE_STRING for BYTES, TYPE_FP32 for FP32, ...")]
    dims: Annotated[list[int], Meta(description="The metadata's shape, its first dimension included (-1: any).")]


class InstanceGroup(msgspec.Struct):
    name: str
    kind: Annotated[str, Meta(description="KIND_CPU, KIND_GPU, or KIND_MODEL (an NPU).")]
    count: Annotated[int, Meta(description="Sessions running batches side by side (streams).")]


class StringParameter(msgspec.Struct):
    string_value: str


class ModelConfig(msgspec.Struct):
    """The model's configuration, in Triton's JSON form."""

    name: str
    platform: Annotated[str, Meta(description="inferbox_<backend>, as in the model's metadata.")]
    backend: Annotated[str, Meta(description="openvino or onnxruntime.")]
    max_batch_size: Annotated[
        int,
        Meta(
            description="0: each request's tensors carry their own first dimension; the server batches "
            "requests together itself (parameters.server_max_batch_size)."
        ),
    ]
    input: list[ConfigTensor]
    output: list[ConfigTensor]
    instance_group: list[InstanceGroup]
    parameters: Annotated[
        dict[str, StringParameter],
        Meta(
            description="version, variant, exec_precision, active (the proved devices), "
            "server_max_batch_size (rows a batch holds), max_queue_delay_ms, package_sha256."
        ),
    ]


class Duration(msgspec.Struct):
    count: int
    ns: int


class InferStatistics(msgspec.Struct):
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    cache_hit: Duration
    cache_miss: Duration


class BatchStatistics(msgspec.Struct):
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


class ModelStatistic(msgspec.Struct):
    name: str
    version: str
    last_inference: Annotated[int, Meta(description="When the last batch was answered: ms since the epoch (0: none).")]
    inference_count: Annotated[int, Meta(description="Rows answered (a text is one row).")]
    execution_count: Annotated[int, Meta(description="Batches run.")]
    inference_stats: InferStatistics
    batch_stats: list[BatchStatistics]


class ModelStatistics(msgspec.Struct):
    """Each loaded version's statistics since it was loaded (in this worker process)."""

    model_stats: list[ModelStatistic]


_NONE = Duration(0, 0)


def _ns(seconds: float) -> int:
    return max(0, round(seconds * NS))


def _instance_kind(model: LoadedModel) -> str:
    active = " ".join(model.session.active).upper()
    if any(word in active for word in ("GPU", "CUDA", "TENSORRT")):
        return "KIND_GPU"
    if "NPU" in active:
        return "KIND_MODEL"
    return "KIND_CPU"


def config_of(model: LoadedModel, server: Server) -> ModelConfig:
    """``model``'s configuration in Triton's terms (its tensors as its metadata gives them)."""
    meta = model_metadata(model)

    def tensors(entries: list[dict[str, Any]]) -> list[ConfigTensor]:
        return [ConfigTensor(t["name"], _TRITON_TYPES[t["datatype"]], list(t["shape"])) for t in entries]

    c = server.config
    parameters = {
        "version": str(model.version),
        "variant": model.variant,
        "exec_precision": model.exec_precision,
        "active": ",".join(model.session.active),
        "server_max_batch_size": str(c.max_batch_size),
        "max_queue_delay_ms": f"{c.max_queue_delay_s * 1000:g}",
        "package_sha256": model.package_sha256,
    }
    return ModelConfig(
        name=model.name,
        platform=meta["platform"],
        backend="openvino" if model.backend.startswith("ov-") else "onnxruntime",
        max_batch_size=0,
        input=tensors(meta["inputs"]),
        output=tensors(meta["outputs"]),
        instance_group=[InstanceGroup(f"{model.name}_0", _instance_kind(model), max(1, model.streams))],
        parameters={k: StringParameter(v) for k, v in parameters.items()},
    )


def statistics_of(model: LoadedModel, server: Server) -> ModelStatistic:
    """``model``'s counters: its batchers' (every kind, a replaced one's still answering too) and its
    inference requests' outcomes."""
    batches = server.batch_stats_of(model)
    ok, ok_s, failed, failed_s = server.metrics.outcomes_of(model.name, str(model.version), id(model))
    requests = sum(s.requests for s in batches)
    sizes: dict[int, list[float]] = {}
    for s in batches:
        for size, n in s.batch_sizes.items():
            counts = sizes.setdefault(size, [0, 0.0])
            counts[0] += n
            counts[1] += s.batch_seconds.get(size, 0.0)
    return ModelStatistic(
        name=model.name,
        version=str(model.version),
        last_inference=round(max((s.last_batch_at for s in batches), default=0.0) * 1000),
        inference_count=sum(s.completed_rows for s in batches),
        execution_count=sum(s.batches for s in batches),
        inference_stats=InferStatistics(
            success=Duration(ok, _ns(ok_s)),
            fail=Duration(failed, _ns(failed_s)),
            queue=Duration(requests, _ns(sum(s.request_queue_seconds for s in batches))),
            compute_input=_NONE,
            compute_infer=Duration(requests, _ns(sum(s.request_inference_seconds for s in batches))),
            compute_output=_NONE,
            cache_hit=_NONE,
            cache_miss=_NONE,
        ),
        batch_stats=[
            BatchStatistics(size, _NONE, Duration(int(n), _ns(seconds)), _NONE)
            for size, (n, seconds) in sorted(sizes.items())
        ],
    )


@get(
    ["/v2/models/{name:str}/config", "/v2/models/{name:str}/versions/{version:int}/config"],
    opt={"scope": "infer"},
    security=KEY,
    operation_class=documented(
        ModelConfig, KServeError, "The model's configuration in Triton's form.", (404,), tag=KSERVE
    ),
)
async def model_config(request: Req, name: str, version: int | None = None) -> Response[bytes]:
    return json_answer(config_of(find_model(request, name, version), server_of(request)))


@get(
    ["/v2/models/{name:str}/stats", "/v2/models/{name:str}/versions/{version:int}/stats"],
    opt={"scope": "infer"},
    security=KEY,
    operation_class=documented(
        ModelStatistics, KServeError, "The model version's statistics (Triton's form).", (404,), tag=KSERVE
    ),
)
async def model_statistics(request: Req, name: str, version: int | None = None) -> Response[bytes]:
    model = find_model(request, name, version)
    return json_answer(ModelStatistics([statistics_of(model, server_of(request))]))


@get(
    "/v2/models/stats",
    opt={"scope": "infer"},
    security=KEY,
    operation_class=documented(
        ModelStatistics, KServeError, "Every loaded model's statistics the key may see (Triton's form).", tag=KSERVE
    ),
)
async def all_statistics(request: Req) -> Response[bytes]:
    server = server_of(request)
    principal = context_of(request.scope).principal
    # as /v1/models: a key narrowed to some models sees only those (auth off: ANONYMOUS allows them all)
    shown = [m for m in server.registry.loaded() if principal is None or principal.allows("infer", m.name)]
    return json_answer(ModelStatistics([statistics_of(m, server) for m in shown]))


routes = [model_config, model_statistics, all_statistics]
