"""Triton's classification extension: an output answered as its top-k "value:index[:label]" strings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from api.codec import decode_bytes_elements
from runtime.backends.fake import FakeBackend
from runtime.manifest import TensorSpec

from .conftest import _open_fake, infer_json, tensor_model, text_classifier

X = np.arange(20, dtype=np.float32).reshape(5, 4) / 7.0
IDS = np.arange(15, dtype=np.int64).reshape(5, 3)
LABELS = ["cat", "dog", "bird"]


def labelled(tmp: Path) -> Any:
    model = tensor_model(tmp)
    return replace(model, manifest=msgspec.structs.replace(model.manifest, labels=LABELS))


def _raw(c: Any, output: str) -> np.ndarray:
    r = c.post("/v2/models/tabular/infer", json=infer_json({"x": X, "ids": IDS}, outputs=[{"name": output}]))
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.array(out["data"]).reshape(out["shape"])


def _expected(raw: np.ndarray, k: int, labels: list[str] | None) -> list[str]:
    out = []
    for row in raw:
        order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))[:k]
        for i in order:
            value = f"{float(row[i]):f}" if raw.dtype.kind == "f" else str(int(row[i]))
            out.append(f"{value}:{i}:{labels[i]}" if labels else f"{value}:{i}")
    return out


def test_top_k_of_the_main_output_with_its_labels(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory([labelled(tmp_path)])
    raw = _raw(c, "y")
    body = infer_json({"x": X, "ids": IDS}, outputs=[{"name": "y", "parameters": {"classification": 2}}])
    r = c.post("/v2/models/tabular/infer", json=body)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [5, 2]
    assert out["data"] == _expected(raw, 2, LABELS)
    best = [s.split(":") for s in out["data"][::2]]
    assert [int(b[1]) for b in best] == raw.argmax(axis=1).tolist()
    assert [b[2] for b in best] == [LABELS[i] for i in raw.argmax(axis=1)]


def test_other_outputs_have_no_labels_and_ints_stay_ints(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory([labelled(tmp_path)])
    raw = _raw(c, "z")
    body = infer_json(
        {"x": X, "ids": IDS},
        outputs=[{"name": "z", "parameters": {"classification": 1}}, {"name": "y"}],
    )
    r = c.post("/v2/models/tabular/infer", json=body)
    assert r.status_code == 200, r.text
    z, y = r.json()["outputs"]
    assert z["name"] == "z" and z["shape"] == [5, 1] and z["data"] == _expected(raw, 1, None)
    assert y["datatype"] == "FP32" and y["shape"] == [5, 3]  # the other output stays a tensor


def test_more_classes_than_the_model_has_gives_them_all(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory([labelled(tmp_path)])
    body = infer_json({"x": X, "ids": IDS}, outputs=[{"name": "y", "parameters": {"classification": 10}}])
    out = c.post("/v2/models/tabular/infer", json=body).json()["outputs"][0]
    assert out["shape"] == [5, 3]
    assert out["data"] == _expected(_raw(c, "y"), 3, LABELS)


def test_classification_as_binary_output_decodes_as_tritonclient_reads_it(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory([labelled(tmp_path)])
    body = infer_json(
        {"x": X, "ids": IDS}, outputs=[{"name": "y", "parameters": {"classification": 3, "binary_data": True}}]
    )
    r = c.post("/v2/models/tabular/infer", json=body)
    assert r.status_code == 200
    n = int(r.headers["inference-header-content-length"])
    header = msgspec.json.decode(r.content[:n])
    (out,) = header["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [5, 3]
    values = decode_bytes_elements(r.content[n:], "response")
    assert values == _expected(_raw(c, "y"), 3, LABELS)


@pytest.mark.parametrize("count", [0, -1, "2", True, 1.5, None])
def test_a_bad_count_is_a_400_naming_it(client_factory: Any, count: Any) -> None:
    c = client_factory()
    body = infer_json(
        {"x": X, "ids": IDS}, outputs=[{"name": "y"}, {"name": "z", "parameters": {"classification": count}}]
    )
    r = c.post("/v2/models/tabular/infer", json=body)
    assert r.status_code == 400, r.text
    assert "outputs[1].parameters.classification" in r.json()["error"]


def test_a_text_classifier_answers_with_its_labels(client_factory: Any, tmp_path: Path) -> None:
    """A text model whose output is per-text scores (pooling none): top classes of each text."""
    model = text_classifier(tmp_path, "sentiment", ["NEGATIVE", "POSITIVE"])
    c = client_factory([model])
    texts = ["great product", "terrible service", "fine"]
    raw_body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": texts}]}
    raw = c.post("/v2/models/sentiment/infer", json=raw_body).json()["outputs"][0]
    scores = np.array(raw["data"], dtype=np.float32).reshape(raw["shape"])
    r = c.post(
        "/v2/models/sentiment/infer",
        json={**raw_body, "outputs": [{"name": "logits", "parameters": {"classification": 1}}]},
    )
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [3, 1]
    assert [s.rsplit(":", 1)[1] for s in out["data"]] == [["NEGATIVE", "POSITIVE"][i] for i in scores.argmax(1)]


def test_extension_and_labels_are_announced(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory([labelled(tmp_path)])
    assert "classification" in c.get("/v2").json()["extensions"]
    assert c.get("/v2/models/tabular").json()["parameters"]["labels"] == LABELS


def _model_with_output(tmp: Path, name: str, out_shape: list[int], in_shape: list[int]) -> Any:
    import hashlib

    from runtime.serving import LoadedModel

    from .conftest import _manifest

    manifest = _manifest(
        name,
        [TensorSpec(name="x", dtype="float32", shape=in_shape)],
        [TensorSpec(name="p", dtype="float32", shape=out_shape)],
        labels=["ham", "spam"],
    )
    return LoadedModel(
        name=name,
        version=1,
        manifest=manifest,
        package_sha256=hashlib.sha256(name.encode()).hexdigest(),
        backend="fake",
        variant="onnx-fp32",
        exec_precision="fp32",
        session=_open_fake(tmp, manifest, FakeBackend()),
    )


def test_a_batched_score_per_row_is_ranked_per_row_not_across_rows(client_factory: Any, tmp_path: Path) -> None:
    """Output [N] (one score per row): each row answers its own 'v:0', as Triton does; the rows
    were ranked against each other and given the class labels of row numbers."""
    model = _model_with_output(tmp_path, "scorer", [-1], [-1, 4])
    assert model.batchable
    c = client_factory([model])
    body = infer_json({"x": X[:2]}, outputs=[{"name": "p", "parameters": {"classification": 1}}])
    r = c.post("/v2/models/scorer/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [2, 1]
    assert all(s.endswith(":0") for s in out["data"])  # one value per row: index 0, no label (1 != 2 classes)


def test_an_unbatched_output_is_ranked_as_a_whole(client_factory: Any, tmp_path: Path) -> None:
    model = _model_with_output(tmp_path, "fixed", [1, 2], [1, 4])
    assert not model.batchable
    c = client_factory([model])
    body = infer_json({"x": X[:1]}, outputs=[{"name": "p", "parameters": {"classification": 2}}])
    r = c.post("/v2/models/fixed/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [2] and {s.rsplit(":", 1)[1] for s in out["data"]} == {"ham", "spam"}


def test_an_empty_batch_asked_for_classes_answers_an_empty_tensor(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory([labelled(tmp_path)])
    empty = {"x": np.zeros((0, 4), np.float32), "ids": np.zeros((0, 3), np.int64)}
    body = infer_json(empty, outputs=[{"name": "y", "parameters": {"classification": 2}}])
    r = c.post("/v2/models/tabular/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [0, 2] and r.json()["outputs"][0]["data"] == []
