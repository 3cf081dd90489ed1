"""The tensor codec: JSON (flat and nested) and binary <-> numpy, round trips and refusals."""

from __future__ import annotations

import struct

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from api.codec import (
    DATATYPES,
    datatype_of,
    decode_bytes_elements,
    decode_infer_request,
    encode_bytes_elements,
    encode_infer_response,
    json_depth,
)
from runtime.errors import InputError

LIMITS = {"max_inputs": 16, "max_tensor_elements": 10_000, "max_json_depth": 32}

numeric_dtypes = st.sampled_from([d for k, d in DATATYPES.items()])
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5)


def arrays() -> st.SearchStrategy[np.ndarray]:
    return numeric_dtypes.flatmap(
        lambda dt: hnp.arrays(dt, shapes, elements=hnp.from_dtype(dt, allow_nan=False, allow_infinity=False))
    )


def _decode(body: bytes, header_length: int | None = None):
    return decode_infer_request(body, header_length=header_length, **LIMITS)


@settings(max_examples=60, deadline=None)
@given(arr=arrays(), nested=st.booleans())
def test_json_roundtrip(arr: np.ndarray, nested: bool) -> None:
    data = arr.tolist() if nested else arr.ravel().tolist()
    body = msgspec.json.encode(
        {"inputs": [{"name": "a", "shape": list(arr.shape), "datatype": datatype_of(arr.dtype), "data": data}]}
    )
    got = _decode(body).inputs[0].array
    assert got is not None
    assert got.dtype == arr.dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)
    # and back out as a response
    payload, header_len = encode_infer_response(
        model_name="m", model_version="1", outputs=[("a", arr)], binary={}, request_id=None
    )
    assert header_len is None
    out = msgspec.json.decode(payload)["outputs"][0]
    assert out["datatype"] == datatype_of(arr.dtype)
    np.testing.assert_array_equal(np.asarray(out["data"], dtype=arr.dtype).reshape(out["shape"]), arr)


@settings(max_examples=60, deadline=None)
@given(arr=arrays())
def test_binary_roundtrip(arr: np.ndarray) -> None:
    raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    header = msgspec.json.encode(
        {
            "inputs": [
                {
                    "name": "a",
                    "shape": list(arr.shape),
                    "datatype": datatype_of(arr.dtype),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    )
    got = _decode(header + raw, len(header)).inputs[0].array
    assert got is not None
    np.testing.assert_array_equal(got, arr)
    payload, header_len = encode_infer_response(
        model_name="m", model_version="1", outputs=[("a", arr)], binary={"a": True}, request_id="r"
    )
    assert header_len is not None
    meta = msgspec.json.decode(payload[:header_len])
    assert meta["id"] == "r"
    out = meta["outputs"][0]
    assert out["parameters"]["binary_data_size"] == len(payload) - header_len
    back = np.frombuffer(payload[header_len:], dtype=DATATYPES[out["datatype"]]).reshape(out["shape"])
    np.testing.assert_array_equal(back, arr)


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(max_size=20), max_size=6))
def test_bytes_elements_roundtrip(texts: list[str]) -> None:
    assert decode_bytes_elements(encode_bytes_elements(texts), "x") == texts


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(min_value=1, max_value=60))
def test_json_depth_counts_nesting_not_strings(depth: int) -> None:
    doc = "[" * depth + '"[[[{{{"' + "]" * depth
    assert json_depth(doc.encode()) == depth


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(min_value=1, max_value=60), limit=st.integers(min_value=1, max_value=40))
def test_json_depth_with_a_limit_decides_the_same(depth: int, limit: int) -> None:
    # the bracket count short-cut must never let a too-deep body through, nor stop a shallow one
    doc = ("[" * depth + '"[[[{{{"' + "]" * depth).encode()
    assert (json_depth(doc, limit=limit) > limit) == (depth > limit)
    wide = b'{"input": ["a", "b", "c"], "model": "m", "x": {"y": [1]}}'
    assert json_depth(wide, limit=3) == 3 and json_depth(wide, limit=4) <= 4


def test_bytes_json_and_binary_inputs() -> None:
    body = msgspec.json.encode({"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a", "bé"]}]})
    assert _decode(body).inputs[0].texts == ["a", "bé"]
    raw = encode_bytes_elements(["x", "yz"])
    header = msgspec.json.encode(
        {"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}]}
    )
    assert _decode(header + raw, len(header)).inputs[0].texts == ["x", "yz"]


@pytest.mark.parametrize(
    ("inp", "field"),
    [
        ({"name": "a", "shape": [2], "datatype": "FP32", "data": [1.0]}, "inputs[0].data"),
        ({"name": "a", "shape": [2], "datatype": "INT32", "data": [1.5, 2]}, "inputs[0].data"),
        ({"name": "a", "shape": [1], "datatype": "INT8", "data": [300]}, "inputs[0].data"),
        ({"name": "a", "shape": [1], "datatype": "BOOL", "data": [3]}, "inputs[0].data"),
        ({"name": "a", "shape": [1], "datatype": "FP16", "data": [1e10]}, "inputs[0].data"),
        ({"name": "a", "shape": [1], "datatype": "COMPLEX", "data": [1]}, "inputs[0].datatype"),
        ({"name": "a", "shape": [-1], "datatype": "FP32", "data": [1]}, "inputs[0].shape"),
        ({"name": "a", "shape": [100, 101], "datatype": "FP32", "data": [1]}, "inputs[0].shape"),
        ({"name": "a", "shape": [2], "datatype": "FP32", "data": [[1.0], [2.0, 3.0]]}, "inputs[0].data"),
        ({"name": "a", "shape": [1], "datatype": "BYTES", "data": [1]}, "inputs[0].data"),
        ({"name": "a", "shape": [1], "datatype": "FP32"}, "inputs[0].data"),
        ({"name": "a", "shape": "x", "datatype": "FP32", "data": [1]}, "inputs[0].shape"),
    ],
)
def test_refusals_name_the_field(inp: dict, field: str) -> None:
    with pytest.raises(InputError) as err:
        _decode(msgspec.json.encode({"inputs": [inp]}))
    assert err.value.field == field
    assert field.split(".", maxsplit=1)[0] in str(err.value)


def test_depth_and_count_limits() -> None:
    deep = (
        b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}]}"
    )
    with pytest.raises(InputError, match="depth") as err:
        _decode(deep)
    assert err.value.field == "body"
    many = {"inputs": [{"name": f"a{i}", "shape": [1], "datatype": "FP32", "data": [1]} for i in range(17)]}
    with pytest.raises(InputError, match="limit of 16") as err:
        _decode(msgspec.json.encode(many))
    assert err.value.field == "inputs"


def test_binary_size_mismatches() -> None:
    raw = np.zeros(3, dtype="<f4").tobytes()
    header = msgspec.json.encode(
        {"inputs": [{"name": "a", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}]}
    )
    with pytest.raises(InputError) as err:
        _decode(header + raw, len(header))
    assert err.value.field == "inputs[0].parameters.binary_data_size"
    with pytest.raises(InputError) as err:
        _decode(header + raw + b"xx", len(header))
    assert err.value.field == "inputs[0].parameters.binary_data_size"
    with pytest.raises(InputError) as err:
        _decode(header, len(header) + 10)
    assert err.value.field == "Inference-Header-Content-Length"
    bad = struct.pack("<I", 10) + b"abc"
    with pytest.raises(InputError):
        decode_bytes_elements(bad, "x")


@pytest.mark.parametrize("datatype", ["INT64", "INT32", "FP32", "FP64", "UINT8"])
@pytest.mark.parametrize("data", [[1, True, 3, 4], [[1, 2], [3, False]], [True, False, True, True]])
def test_booleans_in_numeric_data_are_refused(datatype: str, data: list[object]) -> None:
    """numpy reads [1, true] as integers: a true/false where a number belongs is a 400 naming the field."""
    from api.codec import tensor_from_data

    with pytest.raises(InputError, match=r"x\.data: .* must be numbers") as err:
        tensor_from_data(data, datatype, (2, 2), "x")
    assert err.value.field == "x.data"


def test_booleans_stay_welcome_in_bool_data_and_numbers_in_numeric_data() -> None:
    from api.codec import tensor_from_data

    assert tensor_from_data([True, False], "BOOL", (2,), "x").tolist() == [True, False]
    assert tensor_from_data([[1, 2], [3, 4]], "INT64", (2, 2), "x").tolist() == [[1, 2], [3, 4]]
    assert tensor_from_data([1.5, 2], "FP32", (2,), "x").dtype == np.float32
