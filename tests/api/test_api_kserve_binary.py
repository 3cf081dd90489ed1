"""The binary tensor data extension at its edges: what tritonclient sends and decodes, and the
client mistakes (sizes, shapes, flags, other extensions' parameters) that must be 400s naming
the field, never 500s or answers the client reads otherwise."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from api.codec import decode_bytes_elements, encode_bytes_elements
from runtime.errors import InputError

from .conftest import tensor_model

X = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
IDS = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
HEADER = "Inference-Header-Content-Length"


def _binary_body(inputs: list[tuple[str, np.ndarray, str]], **extra: Any) -> tuple[bytes, int]:
    """A request as tritonclient.http builds it: JSON, then each input's raw bytes in order."""
    raws = [a.tobytes() if dt != "BYTES" else encode_bytes_elements(list(a.ravel())) for _, a, dt in inputs]
    header = msgspec.json.encode(
        {
            "inputs": [
                {"name": n, "shape": list(a.shape), "datatype": dt, "parameters": {"binary_data_size": len(raw)}}
                for (n, a, dt), raw in zip(inputs, raws, strict=True)
            ],
            **extra,
        }
    )
    return header + b"".join(raws), len(header)


def _post(c: Any, body: bytes, header_length: int | str | None, model: str = "tabular") -> Any:
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers[HEADER] = str(header_length)
    return c.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def _as_numpy(r: Any) -> dict[str, np.ndarray]:
    """tritonclient.http.InferResult's decoding: binary outputs at offsets summed in JSON order."""
    n = int(r.headers[HEADER])
    meta, buf = msgspec.json.decode(r.content[:n]), r.content[n:]
    out, offset = {}, 0
    dtypes = {"FP32": "<f4", "INT32": "<i4"}
    for o in meta["outputs"]:
        size = o.get("parameters", {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = np.array(o["data"], dtype=dtypes[o["datatype"]]).reshape(o["shape"])
        else:
            out[o["name"]] = np.frombuffer(buf[offset : offset + size], dtype=dtypes[o["datatype"]]).reshape(o["shape"])
            offset += size
    assert offset == len(buf)
    return out


def test_tritonclient_shaped_requests_decode_as_tritonclient_reads_them(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory()
    expected = tensor_model(tmp_path, name="ref").session.run({"x": X, "ids": IDS})
    inputs = [("x", X, "FP32"), ("ids", IDS, "INT64")]
    # no outputs named: tritonclient asks binary_data_output
    body, n = _binary_body(inputs, parameters={"binary_data_output": True})
    r = _post(c, body, n)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    got = _as_numpy(r)
    np.testing.assert_array_equal(got["y"], expected["y"])
    np.testing.assert_array_equal(got["z"], expected["z"])
    # outputs named in reverse, the first in JSON: the binary one's offset is still 0
    body, n = _binary_body(
        inputs,
        outputs=[
            {"name": "z", "parameters": {"binary_data": False}},
            {"name": "y", "parameters": {"binary_data": True}},
        ],
        parameters={"binary_data_output": True},
    )
    r = _post(c, body, n)
    got = _as_numpy(r)
    assert list(got) == ["z", "y"]
    np.testing.assert_array_equal(got["y"], expected["y"])
    np.testing.assert_array_equal(got["z"], expected["z"])
    # zero rows: binary_data_size 0 for each output, and their shapes
    body, n = _binary_body([("x", X[:0], "FP32"), ("ids", IDS[:0], "INT64")], parameters={"binary_data_output": True})
    got = _as_numpy(_post(c, body, n))
    assert got["y"].shape == (0, 3) and got["z"].shape == (0, 2)


@pytest.mark.parametrize("value", ["9" * 5000, "1" + "0" * 30])
def test_a_header_length_past_any_body_is_a_400(client_factory: Any, value: str) -> None:
    # 5000 digits made int() raise (Python's 4300-digit limit): a 500 with a trace in the log
    c = client_factory()
    body, _ = _binary_body([("x", X, "FP32"), ("ids", IDS, "INT64")])
    r = _post(c, body, value)
    assert r.status_code == 400, r.text
    assert HEADER in r.json()["error"] and "outside the body" in r.json()["error"]
    assert len(r.json()["error"]) < 200


def test_a_header_length_with_leading_zeros_is_read_as_its_value(client_factory: Any) -> None:
    c = client_factory()
    body, n = _binary_body([("x", X, "FP32"), ("ids", IDS, "INT64")])
    assert _post(c, body, "0000000" + str(n)).status_code == 200


SHAPES = [
    ("rank over numpy's", [1] * 100, [1.0], 4),
    ("a 0 dim beside huge dims", [0, 2**62, 2**62], [], 0),
    ("a huge dim beside a 0", [2**70, 0], [], 0),
]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize(("what", "shape", "data", "size"), SHAPES, ids=[s[0] for s in SHAPES])
def test_shapes_numpy_cannot_hold_are_400s(
    client_factory: Any, what: str, shape: list[int], data: list[float], size: int, binary: bool
) -> None:
    # these reached numpy's reshape: ValueError, a 500
    c = client_factory()
    inp: dict[str, Any] = {"name": "x", "shape": shape, "datatype": "FP32"}
    if binary:
        inp["parameters"] = {"binary_data_size": size}
    else:
        inp["data"] = data
    header = msgspec.json.encode({"inputs": [inp]})
    r = _post(c, header + b"\0" * size, len(header)) if binary else _post(c, header, None)
    assert r.status_code == 400, r.text
    assert "inputs[0].shape" in r.json()["error"]


FLAGS = [
    ("binary_data 'false'", {"outputs": [{"name": "y", "parameters": {"binary_data": "false"}}]}, "outputs[0]"),
    ("binary_data 1", {"outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}, "outputs[0]"),
    ("binary_data_output 'false'", {"parameters": {"binary_data_output": "false"}}, "parameters.binary_data_output"),
]


@pytest.mark.parametrize(("what", "extra", "field"), FLAGS, ids=[f[0] for f in FLAGS])
def test_binary_output_flags_must_be_booleans(client_factory: Any, what: str, extra: Any, field: str) -> None:
    # bool("false") is True: the client asked JSON and got binary it could not read
    c = client_factory()
    body, n = _binary_body([("x", X, "FP32"), ("ids", IDS, "INT64")], **extra)
    r = _post(c, body, n)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"] and "true or false" in r.json()["error"]


UNSUPPORTED = [
    ("shm output", {"name": "y", "parameters": {"shared_memory_region": "r0", "shared_memory_byte_size": 24}}),
]  # classification is implemented (test_api_kserve_classification.py)


@pytest.mark.parametrize(("what", "output"), UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_other_extensions_parameters_are_refused_not_ignored(client_factory: Any, what: str, output: Any) -> None:
    # ignored, a shared-memory client read its (stale) region with a 200
    c = client_factory()
    body, n = _binary_body([("x", X, "FP32"), ("ids", IDS, "INT64")], outputs=[output])
    r = _post(c, body, n)
    assert r.status_code == 400, r.text
    key = next(k for k in output["parameters"] if k != "binary_data" and k != "shared_memory_byte_size")
    assert f"outputs[0].parameters.{key}" in r.json()["error"] and "not supported" in r.json()["error"]


def test_a_shared_memory_input_names_the_extension(client_factory: Any) -> None:
    c = client_factory()
    body = msgspec.json.encode(
        {
            "inputs": [
                {"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"shared_memory_region": "r0"}},
                {"name": "ids", "shape": [2, 3], "datatype": "INT64", "data": IDS.ravel().tolist()},
            ]
        }
    )
    r = c.post("/v2/models/tabular/infer", content=body)
    assert r.status_code == 400
    assert "inputs[0].parameters.shared_memory_region" in r.json()["error"]


def test_bytes_elements_past_max_inputs_are_refused_before_decoding(client_factory: Any) -> None:
    # 16 MiB of empty elements was a 4M-turn Python loop (seconds of a stalled event loop)
    # before the texts were counted against max_inputs
    c = client_factory(max_inputs=4)
    texts = np.array([""] * 5, dtype=object)
    body, n = _binary_body([("text", texts, "BYTES")])
    r = _post(c, body, n, model="minilm")
    assert r.status_code == 400, r.text
    assert "inputs[0].shape" in r.json()["error"] and "max_inputs" in r.json()["error"]
    body = msgspec.json.encode({"inputs": [{"name": "text", "shape": [5], "datatype": "BYTES", "data": [""] * 5}]})
    r = c.post("/v2/models/minilm/infer", content=body)
    assert r.status_code == 400 and "inputs[0].shape" in r.json()["error"]


def test_bytes_decoding_stops_at_the_shapes_count() -> None:
    buf = struct.pack("<I", 0) * 1000
    with pytest.raises(InputError, match="3996 bytes are left after the 1 elements"):
        decode_bytes_elements(buf, "inputs[0].binary_data", 1)
    assert decode_bytes_elements(encode_bytes_elements(["a", "bc"]), "w", 2) == ["a", "bc"]


def test_a_text_model_asked_no_texts_answers_0_by_its_width(client_factory: Any) -> None:
    # it answered shape [0, 0] where the metadata says [-1, 8]
    c = client_factory()
    body, n = _binary_body([("text", np.array([], dtype=object), "BYTES")], parameters={"binary_data_output": True})
    r = _post(c, body, n, model="minilm")
    assert r.status_code == 200, r.text
    meta = msgspec.json.decode(r.content[: int(r.headers[HEADER])])
    out = meta["outputs"][0]
    assert out["shape"] == [0, 8] and out["parameters"]["binary_data_size"] == 0
    assert c.get("/v2/models/minilm").json()["outputs"][0]["shape"] == [-1, 8]


def test_binary_data_without_the_header_says_the_header_is_missing(client_factory: Any) -> None:
    """A client that forgot Inference-Header-Content-Length got 'not valid JSON: trailing characters'."""
    c = client_factory()
    body, _n = _binary_body([("x", X, "FP32"), ("ids", IDS, "INT64")])
    r = _post(c, body, None)
    assert r.status_code == 400
    assert "Inference-Header-Content-Length: missing" in r.json()["error"]
    # plain JSON that is broken is still named as such
    r = _post(c, b'{"inputs": [', None)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_json_bytes_data_longer_than_its_shape_is_refused_without_reading_it_all(client_factory: Any) -> None:
    """fddfe78 bounded the binary path; JSON BYTES data of millions of "" still ran a Python loop
    over every string (0.7 s of a held event loop for 16 MiB) before the count check refused it."""
    c = client_factory()
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": [[""] * 100_000]}]}
    r = c.post("/v2/models/minilm/infer", json=body)
    assert r.status_code == 400
    assert "inputs[0].data: shape [2] needs 2 elements, data has more" in r.json()["error"]
    flat = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a", "b"]}]}
    r = c.post("/v2/models/minilm/infer", json=flat)
    assert r.status_code == 400 and "needs 3 elements, data has 2" in r.json()["error"]


def test_json_bytes_data_of_nested_empty_lists_is_refused_early(client_factory: Any) -> None:
    """Lists holding no string passed the string count: a 15 MiB tree of [] was walked whole (1.2 s)."""
    c = client_factory()
    tree: list[Any] = []
    for _ in range(8):  # every list holds 2 items (no more than the shape's count), 511 lists in all
        tree = [tree, tree]
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": tree}]}
    r = c.post("/v2/models/minilm/infer", json=body)
    assert r.status_code == 400
    assert "inputs[0].data: nested lists do not match shape [2]" in r.json()["error"]
    nested = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 2], "data": [["a", "b"], ["c", "d"]]}]}
    assert c.post("/v2/models/minilm/infer", json=nested).status_code == 200


def test_json_bytes_data_must_be_flat_or_nested_as_its_shape(client_factory: Any) -> None:
    """Ragged lists of strings with the right count were taken (numbers are refused so, by numpy)."""
    c = client_factory()
    for data in ([["a"], ["b", "c", "d"]], [["a", ["b"]], ["c", "d"]], ["a", ["b", "c"], "d"], [["a", "b", "c", "d"]]):
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 2], "data": data}]}
        r = c.post("/v2/models/minilm/infer", json=body)
        assert r.status_code == 400, (data, r.text)
        assert "inputs[0].data: nested lists do not match shape [2, 2]" in r.json()["error"], r.text
    for data in (["a", "b", "c", "d"], [["a", "b"], ["c", "d"]]):
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 2], "data": data}]}
        assert c.post("/v2/models/minilm/infer", json=body).status_code == 200, data


def test_an_input_with_data_and_binary_data_size_is_refused(client_factory: Any) -> None:
    """The JSON data was dropped unread and the binary bytes used: a client sending both got an
    answer for one of them without a word."""
    c = client_factory()
    raw = encode_bytes_elements(["hello"])
    header = msgspec.json.encode(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": ["other"],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    )
    r = _post(c, header + raw, len(header), model="minilm")
    assert r.status_code == 400 and "both data and parameters.binary_data_size" in r.json()["error"], r.text


def test_json_bytes_data_of_an_empty_shape_may_be_nested(client_factory: Any) -> None:
    c = client_factory()
    for shape, data in (([2, 0], [[], []]), ([3, 0], [[], [], []]), ([2, 2, 0], [[[], []], [[], []]])):
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape, "data": data}]}
        r = c.post("/v2/models/minilm/infer", json=body)
        assert r.status_code == 200, (shape, r.text)  # no texts, answered [0, D]
        assert r.json()["outputs"][0]["shape"][0] == 0


def test_a_header_length_that_cuts_the_json_short_is_named(client_factory: Any) -> None:
    """A stale Inference-Header-Content-Length (tritonclient writes it into a reused headers dict) on
    a JSON-only body was answered 'body: not valid JSON: Input data was truncated'."""
    c = client_factory()
    inputs = [
        {"name": "x", "datatype": "FP32", "shape": list(X.shape), "data": X.ravel().tolist()},
        {"name": "ids", "datatype": "INT64", "shape": list(IDS.shape), "data": IDS.ravel().tolist()},
    ]
    body = msgspec.json.encode({"inputs": inputs})
    r = _post(c, body, len(body) - 10)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error.startswith(f"Inference-Header-Content-Length: the first {len(body) - 10} bytes")
    assert "no such header for a body that is all JSON" in error
    # the whole body as the header's length is plain JSON, and broken JSON is still named as such
    assert _post(c, body, len(body)).status_code == 200
    r = _post(c, b'{"inputs": [', len(b'{"inputs": ['))
    assert r.status_code == 400 and "body: not valid JSON" in r.json()["error"]
