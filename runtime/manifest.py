"""The typed, versioned schema of a model package's ``manifest.json``.

A package is one version of one model::

    <repository>/<name>/<version>/
      manifest.json   this schema (canonical JSON, sorted keys)
      manifest.sig    detached Ed25519 signature of manifest.json's bytes (optional)
      tokenizer/...   text tasks
      onnx/model.onnx, onnx/model.opt.onnx, onnx/model.int8.onnx
      openvino/model.xml + .bin, openvino/model.int8.xml + .bin
      samples/samples.npz   sample inputs for autotune and smoke checks

Every file in the folder except ``manifest.json`` and ``manifest.sig`` is listed
in :attr:`Manifest.files` with its sha256 and size; a reader refuses anything else.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from runtime.errors import ManifestError

__all__ = [
    "SCHEMA_VERSION",
    "Accuracy",
    "Attempt",
    "FileEntry",
    "Manifest",
    "Provenance",
    "Task",
    "TensorSpec",
    "TextConfig",
    "Timing",
    "Variant",
    "decode_manifest",
    "encode_manifest",
    "fixed_batch",
]

SCHEMA_VERSION = 1

Task = Literal["feature-extraction", "text-classification", "image-classification", "tensor"]
Format = Literal["onnx", "openvino"]
#: Precision the *weights* are stored in.
Precision = Literal["fp32", "fp16", "int8"]
#: Precision a backend computes in (OpenVINO's INFERENCE_PRECISION_HINT; ORT: "fp32").
ExecPrecision = Literal["fp32", "bf16", "fp16"]


class TensorSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One model input or output. ``shape`` uses -1 for a dynamic dimension.

    ``dim_names`` holds the ONNX symbolic name of each dimension (``dim_param``; "" for a fixed
    or unnamed one); None in packages exported before it was kept (and then left out of
    manifest.json, so their bytes and signatures stay as they were).  The server batches a
    tensor model's requests only when every output's first dimension bears the inputs' batch
    name (:attr:`runtime.serving.LoadedModel.batchable`).
    """

    name: str
    dtype: str  # numpy dtype name: float32, int64, int32, uint8, ...
    shape: list[int]
    dim_names: list[str] | None = None


def fixed_batch(inputs: list[TensorSpec]) -> int | None:
    """The rows every call must have when each input fixes its first (batch) axis to the same
    size (an ONNX file exported with batch 1, say), else None (a dynamic batch axis)."""
    firsts = {spec.shape[0] for spec in inputs if spec.shape}
    if len(firsts) != 1 or -1 in firsts:
        return None
    size = firsts.pop()
    return size if size > 0 else None


class FileEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A file of the package: POSIX path relative to the package folder."""

    path: str
    sha256: str
    bytes: int


class Accuracy(msgspec.Struct, frozen=True, kw_only=True):
    """How one (variant, runtime, exec precision) compares with the reference.

    ``metrics`` keys by task: embeddings ``cosine_mean``, ``cosine_min``,
    ``topk_agreement``; classification ``top1_agreement``, ``max_prob_diff``;
    tensors ``max_abs_diff``, ``max_rel_diff``.  ``gate`` maps a metric name
    prefixed ``min_`` or ``max_`` to its threshold.
    """

    runtime: Literal["onnxruntime", "openvino"]
    exec_precision: ExecPrecision
    samples: int
    metrics: dict[str, float]
    gate: dict[str, float]
    passed: bool
    reference: str  # "pytorch" | "onnx-fp32"


class Timing(msgspec.Struct, frozen=True, kw_only=True):
    """A timing on the exporting machine. ``scenario``: ``b1``, ``b32-typical``, ``b32-max``, ``stream``
    (a server's small batches on one stream's share of the cores, ``threads``; ranks ``serve``'s choice)."""

    backend: str
    exec_precision: ExecPrecision
    scenario: str
    batch: int
    seq_len: int | None
    p50_ms: float
    p99_ms: float
    items_per_s: float
    threads: int


class Variant(msgspec.Struct, frozen=True, kw_only=True):
    """One stored form of the model.

    ``id`` is unique in the package (``onnx-fp32``, ``onnx-opt``, ``onnx-int8``,
    ``ov-fp32``, ``ov-int8``).  ``files[0]`` is the file a backend opens (the
    ``.onnx`` or the ``.xml``); the others belong to it (``.bin``, external data).
    ``backends`` are the backend names allowed to run it.
    """

    id: str
    format: Format
    precision: Precision
    files: list[str]
    backends: list[str]
    recipe: str
    accuracy: list[Accuracy] = []
    timings: list[Timing] = []
    #: what a box needs for the validated accuracy to hold: ``cpu-vnni`` (INT8 with full 8-bit
    #: weights, validated on a CPU with VNNI / AMX; without them x86 INT8 kernels saturate)
    requires: list[str] = []

    def passed(self, runtime: str, exec_precision: str) -> bool:
        return any(a.passed and a.runtime == runtime and a.exec_precision == exec_precision for a in self.accuracy)


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """A quantization recipe tried during export, kept or not, with its numbers."""

    variant: str
    recipe: str
    kept: bool
    reason: str
    accuracy: list[Accuracy] = []


class TextConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How a text model turns strings into tensors and outputs into answers."""

    tokenizer_dir: str = "tokenizer"
    max_length: int = 256
    #: graph input name -> what feeds it: input_ids | attention_mask | token_type_ids
    input_map: dict[str, str] = {}
    #: output name holding the answer (sentence embedding / logits)
    output: str = ""
    #: "mean" when the graph gives token embeddings and the runtime must pool; "none"
    pooling: Literal["mean", "cls", "none"] = "none"
    normalize: bool = False
    do_lower_case: bool = False


class Provenance(msgspec.Struct, frozen=True, kw_only=True):
    source_kind: Literal["hf", "pytorch", "onnx"]
    source: str
    source_sha256: str
    created_at: str  # UTC ISO 8601
    tool_versions: dict[str, str] = {}
    machine: dict[str, str] = {}


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: int
    task: Task
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    variants: list[Variant]
    files: list[FileEntry]
    provenance: Provenance
    text: TextConfig | None = None
    labels: list[str] | None = None
    samples: str | None = None  # path of samples.npz (a listed file)
    attempts: list[Attempt] = []
    #: reference accuracy of the original where known (e.g. digits test accuracy)
    notes: dict[str, str] = {}

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise ManifestError(
            f"package {self.name}/{self.version} has no variant {variant_id!r}; it has {[v.id for v in self.variants]}"
        )

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise ManifestError(
            f"file {path!r} is not listed in the manifest",
        )


def encode_manifest(manifest: Manifest) -> bytes:
    """Canonical bytes: sorted keys, no whitespace variance, newline at end."""
    raw = msgspec.json.encode(manifest, order="sorted")
    return msgspec.json.format(raw, indent=2) + b"\n"


def decode_manifest(data: bytes, where: str = "manifest.json") -> Manifest:
    try:
        m = msgspec.json.decode(data, type=Manifest)
    except msgspec.ValidationError as exc:
        raise ManifestError(f"{where}: invalid manifest: {exc}", path=where) from exc
    except msgspec.DecodeError as exc:
        raise ManifestError(f"{where}: not valid JSON: {exc}", path=where) from exc
    if m.schema_version != SCHEMA_VERSION:
        raise ManifestError(
            f"{where}: schema_version {m.schema_version} is not supported "
            f"(this inferbox reads {SCHEMA_VERSION}); re-export the model or upgrade inferbox",
            path=where,
        )
    return m
