"""Tensor codec of the Open Inference Protocol: JSON and binary tensor data <-> numpy.

Request bodies are decoded with msgspec; ``data`` may be flat or nested (row
major), and with the binary tensor data extension an input's bytes follow the
JSON header (``Inference-Header-Content-Length``) in input order, sized by its
``parameters.binary_data_size``.  BYTES elements in binary form are a 4-byte
little-endian length followed by the bytes.  Every problem raises
:class:`~runtime.errors.InputError` naming the field.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import numpy as np
import numpy.typing as npt
from msgspec import Meta

from api.classification import BytesTensor, classification_count
from runtime.errors import InputError

__all__ = [
    "DATATYPES",
    "MAX_RANK",
    "DecodedInput",
    "InferRequest",
    "InferRequestBody",
    "InferenceResponse",
    "RequestInput",
    "RequestOutput",
    "ResponseOutput",
    "datatype_of",
    "decode_bytes_elements",
    "decode_infer_request",
    "encode_bytes_elements",
    "encode_infer_response",
    "field_of",
    "json_depth",
    "not_utf8",
    "tensor_from_data",
]

Array = npt.NDArray[Any]

#: v2 datatype -> numpy dtype (little endian); BYTES is handled apart
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_BY_KIND = {np.dtype(v).newbyteorder("=").str: k for k, v in DATATYPES.items()}


def datatype_of(dtype: np.dtype[Any] | str) -> str:
    """numpy dtype (or name) -> v2 datatype; strings/objects are BYTES."""
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return "BYTES"
    name = _BY_KIND.get(dt.newbyteorder("=").str)
    if name is None:
        raise InputError(f"dtype {dt} has no Open Inference Protocol datatype")
    return name


class RequestInput(msgspec.Struct, kw_only=True):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None


class RequestOutput(msgspec.Struct, kw_only=True):
    name: str
    parameters: dict[str, Any] = {}


class InferRequestBody(msgspec.Struct, kw_only=True):
    inputs: list[RequestInput]
    id: str | None = None
    parameters: dict[str, Any] = {}
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True)
class DecodedInput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    #: numeric tensor, or a flat list of str for BYTES
    array: Array | None
    texts: list[str] | None


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: list[DecodedInput]
    #: requested output names (None = all) and whether each is wanted in binary
    outputs: list[str] | None
    binary_outputs: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False
    #: outputs asked for as their top classes (Triton's classification extension): name -> count
    classification: dict[str, int] = field(default_factory=dict)


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(raw: bytes, *, limit: int | None = None) -> int:
    """Deepest nesting of ``[`` / ``{`` in JSON bytes (strings ignored); vectorized.

    With ``limit``, a body holding at most ``limit`` brackets in all cannot nest deeper and
    answers their count at once (an upper bound of the depth: single requests and a few
    inputs take this path; bigger bodies get the full scan).
    """
    if limit is not None:
        brackets = raw.count(b"[") + raw.count(b"{")
        if brackets <= limit:
            return brackets
    stripped = _STRING.sub(b'""', raw)
    buf = np.frombuffer(stripped, dtype=np.uint8)
    step = np.zeros(buf.shape, dtype=np.int32)
    step[(buf == ord("[")) | (buf == ord("{"))] = 1
    step[(buf == ord("]")) | (buf == ord("}"))] = -1
    return int(np.cumsum(step).max(initial=0))


#: the most dimensions a tensor may have (numpy's own limit is 32 or 64, by version)
MAX_RANK = 32


def _check_shape(shape: list[int], where: str, max_elements: int) -> tuple[int, ...]:
    if any((not isinstance(d, int)) or isinstance(d, bool) or d < 0 for d in shape):
        raise InputError(f"{where}.shape: {shape} must be a list of non-negative integers", field=f"{where}.shape")
    if len(shape) > MAX_RANK:
        raise InputError(
            f"{where}.shape: {len(shape)} dimensions is over the limit of {MAX_RANK}", field=f"{where}.shape"
        )
    count = math.prod(shape)
    # a 0 dimension makes the count 0 but not the others harmless: numpy refuses to shape an
    # empty array whose other dimensions multiply past its index range
    span = math.prod(d or 1 for d in shape)
    if span > max_elements:
        what = f"has {count} elements" if count else f"has dimensions multiplying to {span}"
        raise InputError(
            f"{where}.shape: {shape} {what}, over the limit of {max_elements} (max_tensor_elements)",
            field=f"{where}.shape",
        )
    return tuple(shape)


def _flatten_strings(data: Any, where: str, shape: tuple[int, ...]) -> list[str]:
    """The strings of (nested) ``data``, exactly as many as ``shape`` holds, else a 400; stops as
    soon as there are more (a body of millions of tiny strings would hold the event loop)."""
    expected = math.prod(shape)
    widest = max(expected, *shape, 0)  # a list holds at most this many items ([[], []] for [2, 0])
    too_many = InputError(
        f"{where}.data: shape {list(shape)} needs {expected} elements, data has more", field=f"{where}.data"
    )
    out: list[str] = []
    stack = [data]
    # data shaped as ``shape`` (flat or nested) holds at most this many lists; a tree of empty
    # lists holds no string to count and would otherwise be walked whole
    nested = 1  # the lists of the fully nested form: one per prefix of the shape, down to a 0
    width = 1
    for dim in shape[:-1]:
        width *= dim
        if width == 0:
            break
        nested += width
    lists_left = max(nested, (expected + 1) * (len(shape) + 1))
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            if len(item) > widest:
                raise too_many
            lists_left -= 1
            if lists_left < 0:
                raise InputError(f"{where}.data: nested lists do not match shape {list(shape)}", field=f"{where}.data")
            stack.extend(reversed(item))
        elif isinstance(item, str):
            out.append(item)
            if len(out) > expected:
                raise too_many
        else:
            raise InputError(
                f"{where}.data: BYTES data must hold strings, got {type(item).__name__}", field=f"{where}.data"
            )
    if len(out) != expected:
        raise InputError(
            f"{where}.data: shape {list(shape)} needs {expected} elements, data has {len(out)}", field=f"{where}.data"
        )
    if not _flat_or_shaped(data, shape):
        # numbers refuse ragged lists (numpy does); strings were taken in any nesting with the right count
        raise InputError(
            f"{where}.data: nested lists do not match shape {list(shape)}; send the strings flat, or nested "
            "exactly as the shape",
            field=f"{where}.data",
        )
    return out


def _flat_or_shaped(data: Any, shape: tuple[int, ...]) -> bool:
    """``data`` (strings in lists, as many as ``shape`` holds: :func:`_flatten_strings` counted them) is
    one string, a flat list, or lists nested exactly as ``shape``."""
    if not isinstance(data, list) or all(isinstance(item, str) for item in data):
        return True
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if depth == len(shape):
            if not isinstance(item, str):
                return False
        elif not isinstance(item, list) or len(item) != shape[depth]:
            return False
        else:
            stack.extend((x, depth + 1) for x in item)
    return True


#: how a refused JSON array reads in an error, by numpy's kind for it
_KIND_NAMES = {"U": "text", "S": "text", "O": "mixed values", "b": "booleans", "f": "fractional numbers"}


def tensor_from_data(data: Any, datatype: str, shape: tuple[int, ...], where: str) -> Array:
    """JSON ``data`` (flat or nested) -> numpy array of ``shape`` and ``datatype``."""
    dtype = DATATYPES[datatype]
    if not isinstance(data, list):
        data = [data]
    try:
        raw = np.asarray(data)
    except ValueError:
        raise InputError(
            f"{where}.data: nested lists are ragged; use flat data or a full nesting", field=f"{where}.data"
        ) from None
    count = math.prod(shape)
    if raw.size != count:
        raise InputError(
            f"{where}.data: shape {list(shape)} needs {count} elements, data has {raw.size}", field=f"{where}.data"
        )
    kind = raw.dtype.kind if raw.size else dtype.kind
    if dtype.kind in "iu" and kind in "fO":  # integers beyond int64 make numpy pick float64 / object
        flat = np.asarray(data, dtype=object).ravel().tolist()
        if all(type(v) is int for v in flat):
            try:
                return np.array(flat, dtype=dtype).reshape(shape)
            except OverflowError:
                raise InputError(
                    f"{where}.data: a value is out of range for {datatype}", field=f"{where}.data"
                ) from None
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if dtype.kind != "b" and raw.size and kind in "iuf" and _holds_bool(data):
        # numpy reads [1, true] as integers: a boolean where a number belongs is a client's mistake
        raise InputError(
            f"{where}.data: {datatype} data must be numbers, got true/false; send 1/0 or use datatype BOOL",
            field=f"{where}.data",
        )
    if kind not in allowed:
        raise InputError(
            f"{where}.data: {datatype} data must be {'booleans' if dtype.kind == 'b' else 'numbers'}"
            + (" (integers)" if dtype.kind in "iu" else "")
            + f", got {_KIND_NAMES.get(kind, raw.dtype.name)}",
            field=f"{where}.data",
        )
    with np.errstate(over="ignore", invalid="ignore"):
        arr = raw.astype(dtype)
    if dtype.kind in "iu" and raw.size and not np.array_equal(arr, raw):
        raise InputError(f"{where}.data: a value is out of range for {datatype}", field=f"{where}.data")
    if dtype.kind == "f" and raw.size and not bool(np.isfinite(arr).all()):
        raise InputError(f"{where}.data: a value overflows or is not finite for {datatype}", field=f"{where}.data")
    return arr.reshape(shape)


def _holds_bool(data: list[Any]) -> bool:
    """Whether a (nested) JSON array holds true or false anywhere."""
    stack = [data]
    while stack:
        items = stack.pop()
        for item in items:
            if item is True or item is False:
                return True
            if isinstance(item, list):
                stack.append(item)
    return False


def decode_bytes_elements(buf: bytes, where: str, count: int | None = None) -> list[str]:
    """Binary BYTES tensor (4-byte LE length + bytes, repeated) -> list of str (UTF-8).

    With ``count`` (the elements the shape holds), bytes left after that many elements are
    refused at once, never decoded: a body of empty elements would otherwise cost a Python
    loop turn per 4 bytes.
    """
    out: list[str] = []
    pos = 0
    while pos < len(buf):
        if count is not None and len(out) == count:
            raise InputError(
                f"{where}: {len(buf) - pos} bytes are left after the {count} elements of the shape", field=where
            )
        if pos + 4 > len(buf):
            raise InputError(f"{where}: truncated BYTES element length", field=where)
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise InputError(f"{where}: BYTES element of {n} bytes runs past the binary data", field=where)
        try:
            out.append(buf[pos : pos + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"{where}: BYTES element is not UTF-8 text", field=where) from None
        pos += n
    return out


def encode_bytes_elements(items: list[str] | list[bytes]) -> bytes:
    parts: list[bytes] = []
    for item in items:
        b = item.encode("utf-8") if isinstance(item, str) else item
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def decode_infer_request(
    body: bytes,
    *,
    header_length: int | None,
    max_inputs: int,
    max_tensor_elements: int,
    max_json_depth: int,
) -> InferRequest:
    """Decode an infer request (JSON, or JSON header + binary data when ``header_length`` is set)."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InputError(
                f"Inference-Header-Content-Length: {header_length} is outside the body of {len(body)} bytes",
                field="Inference-Header-Content-Length",
            )
        header, binary = body[:header_length], body[header_length:]
    else:
        header, binary = body, b""
    depth = json_depth(header, limit=max_json_depth)
    if depth > max_json_depth:
        raise InputError(f"body: JSON nesting depth {depth} is over the limit of {max_json_depth}", field="body")
    try:
        req = msgspec.json.decode(header, type=InferRequestBody)
    except msgspec.ValidationError as exc:
        raise InputError(f"body: {exc}", field=field_of(str(exc))) from None
    except (UnicodeDecodeError, msgspec.DecodeError, RecursionError) as exc:
        if header_length is None and b'"binary_data_size"' in header:
            # binary tensor data after the JSON, without the header that says where the JSON ends
            raise InputError(
                "Inference-Header-Content-Length: missing; the body holds binary tensor data "
                "(binary_data_size), so send this header with the byte length of the body's JSON part",
                field="Inference-Header-Content-Length",
            ) from None
        if isinstance(exc, UnicodeDecodeError):
            raise not_utf8(exc) from None
        if header_length is not None and header_length < len(body):
            # a stale or wrong header cuts the JSON short (tritonclient writes it into the caller's
            # headers dict, so a dict reused for a JSON-only request still carries the old length)
            raise InputError(
                f"Inference-Header-Content-Length: the first {header_length} bytes of the {len(body)} byte body "
                f"are not valid JSON ({exc}); send the byte length of the body's JSON part, "
                "or no such header for a body that is all JSON",
                field="Inference-Header-Content-Length",
            ) from None
        raise not_json(exc, header) from None
    if not req.inputs:
        raise InputError("inputs: at least one input is required", field="inputs")
    if len(req.inputs) > max_inputs:
        raise InputError(f"inputs: {len(req.inputs)} inputs is over the limit of {max_inputs}", field="inputs")
    decoded: list[DecodedInput] = []
    offset = 0
    names: set[str] = set()
    for i, inp in enumerate(req.inputs):
        where = f"inputs[{i}]"
        if inp.name in names:
            raise InputError(f"{where}.name: input {inp.name!r} appears twice", field=f"{where}.name")
        names.add(inp.name)
        if inp.datatype != "BYTES" and inp.datatype not in DATATYPES:
            raise InputError(
                f"{where}.datatype: {inp.datatype!r} is not supported; use one of {[*DATATYPES, 'BYTES']}",
                field=f"{where}.datatype",
            )
        shape = _check_shape(inp.shape, where, max_tensor_elements)
        _refuse_unsupported(inp.parameters, f"{where}.parameters")
        if inp.datatype == "BYTES" and math.prod(shape) > max_inputs:
            # BYTES inputs are texts, and a request holds at most max_inputs of them: refused
            # before their strings are walked one by one in Python
            raise InputError(
                f"{where}.shape: {list(shape)} holds {math.prod(shape)} BYTES elements (texts), over the limit "
                f"of {max_inputs} (max_inputs)",
                field=f"{where}.shape",
            )
        size = inp.parameters.get("binary_data_size")
        if size is not None and inp.data is not None:  # the data was dropped unread, and the binary used
            raise InputError(
                f"{where}: has both data and parameters.binary_data_size; send the tensor one way",
                field=f"{where}.data",
            )
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise InputError(
                    f"{where}.parameters.binary_data_size: {size!r} does not fit the {len(binary) - offset} "
                    "binary bytes left",
                    field=f"{where}.parameters.binary_data_size",
                )
            chunk = binary[offset : offset + size]
            offset += size
            if inp.datatype == "BYTES":
                texts = decode_bytes_elements(chunk, f"{where}.binary_data", math.prod(shape))
                if len(texts) != math.prod(shape):
                    raise InputError(
                        f"{where}.binary_data: shape {list(shape)} needs {math.prod(shape)} elements, got {len(texts)}",
                        field=f"{where}.binary_data",
                    )
                decoded.append(DecodedInput(inp.name, "BYTES", shape, None, texts))
                continue
            dtype = DATATYPES[inp.datatype]
            if size != math.prod(shape) * dtype.itemsize:
                raise InputError(
                    f"{where}.parameters.binary_data_size: shape {list(shape)} of {inp.datatype} needs "
                    f"{math.prod(shape) * dtype.itemsize} bytes, got {size}",
                    field=f"{where}.parameters.binary_data_size",
                )
            if dtype.kind == "b":  # one byte per element; any non-zero byte is true
                arr = np.frombuffer(chunk, dtype=np.uint8).reshape(shape).astype(np.bool_)
            else:
                arr = np.frombuffer(chunk, dtype=dtype).reshape(shape)
            decoded.append(DecodedInput(inp.name, inp.datatype, shape, arr, None))
            continue
        if inp.data is None:
            raise InputError(f"{where}.data: missing (or give parameters.binary_data_size)", field=f"{where}.data")
        if inp.datatype == "BYTES":
            texts = _flatten_strings(inp.data, where, shape)
            decoded.append(DecodedInput(inp.name, "BYTES", shape, None, texts))
        else:
            decoded.append(
                DecodedInput(
                    inp.name, inp.datatype, shape, tensor_from_data(inp.data, inp.datatype, shape, where), None
                )
            )
    if offset != len(binary):
        raise InputError(
            f"body: {len(binary) - offset} binary bytes are not claimed by any input's binary_data_size",
            field="Inference-Header-Content-Length",
        )
    binary_default = _bool_parameter(req.parameters, "binary_data_output", "parameters")
    outputs: list[str] | None = None
    binary_outputs: dict[str, bool] = {}
    classification: dict[str, int] = {}
    if req.outputs:  # absent or [] (as Triton reads it): every output
        outputs = []
        for j, out in enumerate(req.outputs):
            if out.name in outputs:
                raise InputError(f"outputs[{j}].name: {out.name!r} is asked for twice", field=f"outputs[{j}].name")
            outputs.append(out.name)
            _refuse_unsupported(out.parameters, f"outputs[{j}].parameters")
            if "binary_data" in out.parameters:
                binary_outputs[out.name] = _bool_parameter(out.parameters, "binary_data", f"outputs[{j}].parameters")
            count = classification_count(out.parameters, f"outputs[{j}].parameters")
            if count is not None:
                classification[out.name] = count
    return InferRequest(req.id, req.parameters, decoded, outputs, binary_outputs, binary_default, classification)


#: parameters of a Triton extension this server does not implement (shared memory):
#: ignoring one would answer something else than what the client reads
_UNSUPPORTED = {
    "shared_memory_region": "the shared memory extension",
    "shared_memory_byte_size": "the shared memory extension",
    "shared_memory_offset": "the shared memory extension",
}


def _refuse_unsupported(parameters: dict[str, Any], where: str) -> None:
    for key, extension in _UNSUPPORTED.items():
        if key in parameters:
            raise InputError(
                f"{where}.{key}: {extension} is not supported here; send the tensor data in the request "
                "(JSON or binary_data_size) and read it from the response",
                field=f"{where}.{key}",
            )


def _bool_parameter(parameters: dict[str, Any], key: str, where: str) -> bool:
    """A boolean extension parameter (false when absent); anything but true/false is a 400."""
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InputError(f"{where}.{key}: must be true or false, got {value!r:.40}", field=f"{where}.{key}")
    return value


def not_utf8(exc: UnicodeDecodeError) -> InputError:
    """The 400 for a JSON body whose strings are not UTF-8 (a Latin-1 or cp1252 client)."""
    return InputError(f"body: not UTF-8 text ({exc.reason}); send JSON in UTF-8", field="body")


#: a \uD800-\uDBFF escape not followed by the \uDC00-\uDFFF escape that completes its pair
_LONE_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def not_json(exc: Exception, body: bytes) -> InputError:
    """The 400 for a body msgspec cannot read as JSON.  A lone high surrogate escape (``"\\ud800"``) is
    one it calls "Input data was truncated", which sends a client looking for a cut body that is whole."""
    message = str(exc)
    if "truncated" in message and _LONE_HIGH_SURROGATE.search(body):
        message = (
            "a \\uD800-\\uDBFF escape without the \\uDC00-\\uDFFF escape after it (a lone surrogate is no character)"
        )
    return InputError(f"body: not valid JSON: {message}", field="body")


def field_of(message: str) -> str:
    """msgspec's ``... - at `$.inputs[0].shape` `` (and ``missing required field `x` ``) -> our field name."""
    m = re.search(r"at `\$\.?([^`]*)`", message)
    path = m.group(1) if m else ""
    missing = re.search(r"missing required field `([^`]+)`", message)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or "body"


class ResponseOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One output tensor of an answer."""

    name: str
    datatype: str
    shape: list[int]
    parameters: Annotated[
        dict[str, Any],
        Meta(description="binary_data_size: the byte length of this output's bytes after the JSON (binary answers)."),
    ] = {}
    data: Annotated[Any, Meta(description="The values, flat (row major); absent for a binary output.")] = None


class InferenceResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """KServe v2 inference answer (with binary outputs, the JSON part of the body)."""

    model_name: str
    model_version: str
    outputs: list[ResponseOutput]
    id: Annotated[str | None, Meta(description="The request's id, when it had one.")] = None
    parameters: Annotated[dict[str, Any], Meta(description="The request's parameters, less binary_data_output.")] = {}


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    outputs: list[tuple[str, Array | list[str] | BytesTensor]],
    binary: dict[str, bool],
    request_id: str | None,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Response bytes and the JSON header length (None when no output is binary)."""
    items: list[ResponseOutput] = []
    chunks: list[bytes] = []
    for name, output in outputs:
        if isinstance(output, BytesTensor):
            value: Array | list[str] = output.values
            datatype, shape = "BYTES", output.shape
        elif isinstance(output, list):
            value = output
            datatype, shape = "BYTES", [len(output)]
        else:
            value = output
            datatype, shape = datatype_of(output.dtype), list(output.shape)
        if binary.get(name, False):
            if isinstance(value, list):
                chunk = encode_bytes_elements(value)
            else:
                arr = np.ascontiguousarray(value, dtype=DATATYPES[datatype])
                chunk = arr.tobytes()
            chunks.append(chunk)
            items.append(
                ResponseOutput(name=name, datatype=datatype, shape=shape, parameters={"binary_data_size": len(chunk)})
            )
        else:
            data = value if isinstance(value, list) else np.asarray(value).ravel().tolist()
            items.append(ResponseOutput(name=name, datatype=datatype, shape=shape, data=data))
    header = msgspec.json.encode(
        InferenceResponse(
            model_name=model_name,
            model_version=model_version,
            outputs=items,
            id=request_id,
            parameters=parameters or {},
        )
    )
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
