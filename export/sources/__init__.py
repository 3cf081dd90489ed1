"""Sources: turn what the customer has into an fp32 ONNX file, a reference, and sample batches.

Every source module has ``prepare(spec, staging, report) -> Prepared``: it writes
``onnx/model.onnx`` (plus ``tokenizer/`` for text) into the staging folder and
computes the reference answers on the validation batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from runtime.errors import SourceError
from runtime.manifest import TensorSpec, TextConfig

__all__ = ["Feeds", "Prepared", "hash_files", "hash_path", "join_parts", "onnx_io", "tile_rows", "weights_precision"]

Feeds = dict[str, npt.NDArray[np.generic]]

_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
}


@dataclass
class Prepared:
    """What a source hands to the pipeline. ``reference`` answers line up with ``validation`` batches."""

    kind: Literal["hf", "pytorch", "onnx"]
    task: str
    source: str
    source_sha256: str
    onnx_path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    reference_name: str  # "pytorch" | "onnx-fp32"
    validation: list[Feeds]
    calibration: list[Feeds]  # one sample per entry (B rows for a model fixing its batch axis to B), unpadded
    reference: npt.NDArray[np.generic]  # task answers for the concatenated validation batches
    timing: dict[str, tuple[Feeds, int | None]]  # scenario -> (feeds, seq_len)
    #: output name holding the answer (classification logits / tensor output); text: text.output
    output: str
    text: TextConfig | None = None
    labels: list[str] | None = None
    validation_labels: npt.NDArray[np.generic] | None = None
    #: (num_heads, hidden_size) when the ORT transformer optimizer applies (BERT-like)
    bert: tuple[int, int] | None = None
    notes: dict[str, str] = field(default_factory=dict)
    #: text sources: texts -> feeds as validation's are made (a cross-encoder's: query-document pairs
    #: of them), for the batch gate's probe (export.pipeline.batch_probe); None otherwise
    encode: Callable[[list[str]], Feeds] | None = None
    #: the reference of every other graph output the server returns (a tensor model's KServe
    #: answer holds all of them), by name, lined up with ``validation``; an output the source
    #: has no reference for is compared with the fp32 ONNX file's (see export.pipeline)
    output_references: dict[str, npt.NDArray[np.generic]] = field(default_factory=dict)


def _hash_into(h: Any, path: Path) -> None:
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def hash_files(files: list[tuple[str, Path]]) -> str:
    """sha256 of named files in order, each as name + NUL + bytes (a folder's hash,
    :func:`hash_path`, over the files one model is made of, named as the model names them)."""
    h = hashlib.sha256()
    for name, f in files:
        h.update(name.encode() + b"\0")
        _hash_into(h, f)
    return h.hexdigest()


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a folder: every file in sorted relative-path order (path + NUL + bytes)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return hash_files([(f.relative_to(path).as_posix(), f) for f in files])
    h = hashlib.sha256()
    _hash_into(h, path)
    return h.hexdigest()


def onnx_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file (dynamic dimensions as -1, with their symbolic names in
    ``dim_names``); unreadable files are a SourceError."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise SourceError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); check the file") from exc
    init = {i.name for i in model.graph.initializer}

    def spec(v: onnx.ValueInfoProto) -> TensorSpec:
        t = v.type.tensor_type
        dtype = _ONNX_DTYPES.get(t.elem_type)
        if dtype is None:
            raise SourceError(f"{path}: tensor {v.name!r} has an unsupported element type {t.elem_type}")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        # the symbolic names say which dynamic axes are one and the same (the batch axis of the
        # inputs and of each output): the server batches requests only where they agree
        names = [d.dim_param if d.HasField("dim_param") and not d.HasField("dim_value") else "" for d in t.shape.dim]
        return TensorSpec(name=v.name, dtype=dtype, shape=dims, dim_names=names)

    inputs = [spec(v) for v in model.graph.input if v.name not in init]
    outputs = [spec(v) for v in model.graph.output]
    if not inputs or not outputs:
        raise SourceError(f"{path}: the graph has no inputs or no outputs; is it a complete model?")
    return inputs, outputs


def weights_precision(path: Path) -> Literal["fp32", "fp16"]:
    """The float precision an ONNX file stores its weights in: ``fp16`` when half-precision
    initializers (and ``Constant`` tensors) hold more bytes than single-precision ones, else
    ``fp32``.  Written into the manifest of the variants that keep the source's weights as they
    are (the plain and graph-optimized ONNX, the OpenVINO IR converted without compression)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t")]
    size: dict[int, int] = {}
    for t in tensors:
        n = int(np.prod(t.dims)) if t.dims else 1
        size[t.data_type] = size.get(t.data_type, 0) + n
    half, single = size.get(onnx.TensorProto.FLOAT16, 0) * 2, size.get(onnx.TensorProto.FLOAT, 0) * 4
    return "fp16" if half > single else "fp32"


def tile_rows(feeds: Feeds, n: int) -> Feeds:
    """``n`` rows from ``feeds`` (repeating them when there are fewer)."""
    out: Feeds = {}
    for k, v in feeds.items():
        reps = -(-n // len(v))
        out[k] = np.ascontiguousarray(np.concatenate([v] * reps)[:n])
    return out


def join_parts(parts: list[npt.NDArray[np.float32]], rows: list[int]) -> npt.NDArray[np.float32]:
    """One output's answers to several batches, joined for comparison: concatenated along the
    batch axis when each part has its batch's rows there, else each part flattened, in order (a
    scalar, a statistic over the batch, a ``[T, N, F]`` or ``Reshape(-1, ...)`` output: compared
    element by element, as the same batches give them)."""
    if all(part.ndim >= 1 and part.shape[0] == n for part, n in zip(parts, rows, strict=True)):
        return np.concatenate(parts)
    return np.concatenate([part.reshape(-1) for part in parts])
