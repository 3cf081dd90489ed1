"""Accuracy gates that can fail: every served output, single-logit heads, outputs that are already
probabilities, and INT8 variants that hold no INT8."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.pipeline import _metrics, export_model
from export.quantize import QUANT_OPS, count_ops
from export.spec import ExportSpec, check_gate, gates_for
from export.validate import classification_metrics, looks_like_probabilities


def _save(path: Path, nodes: list[onnx.NodeProto], outputs: list[onnx.ValueInfoProto], inits: list) -> Path:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _two_outputs(path: Path) -> Path:
    """``y`` [N, 1] = sum(2x): exact in INT8; ``y2`` [N, 4] = x @ W2 - x @ W3 with W2 ~ W3 large:
    a small difference of large products that INT8 ruins."""
    rng = np.random.default_rng(0)
    w3 = (rng.standard_normal((16, 4)) * 10).astype(np.float32)
    w2 = w3 + (rng.standard_normal((16, 4)) * 0.01).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["x2"]),
        helper.make_node("ReduceSum", ["x2", "axes"], ["y"], keepdims=1),
        helper.make_node("MatMul", ["x", "w2"], ["a"]),
        helper.make_node("MatMul", ["x", "w3"], ["b"]),
        helper.make_node("Sub", ["a", "b"], ["y2"]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1]),
        helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 4]),
    ]
    inits = [
        numpy_helper.from_array(np.array(2, np.float32), "two"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(w3, "w3"),
    ]
    return _save(path, nodes, outputs, inits)


def test_every_output_is_gated(tmp_path: Path) -> None:
    """The server returns y and y2; an INT8 file that keeps y but ruins y2 must not be kept."""
    manifest = export_model(
        ExportSpec(
            source=_two_outputs(tmp_path / "two.onnx"),
            task="tensor",
            name="two",
            repository=tmp_path / "repo",
            timing="quick",
            threads=1,
            variants=("onnx-fp32", "onnx-int8"),
        )
    )
    assert [v.id for v in manifest.variants] == ["onnx-fp32"]
    metrics = manifest.variant("onnx-fp32").accuracy[0].metrics
    assert {"max_rel_diff[y]", "max_rel_diff[y2]", "max_abs_diff[y2]"} <= set(metrics)
    from export.report import format_report

    assert "max_rel_diff[y2]=" in format_report(manifest)
    int8 = [a for a in manifest.attempts if a.variant == "onnx-int8"]
    assert int8 and not any(a.kept for a in int8)
    for attempt in int8:
        (acc,) = attempt.accuracy
        assert not acc.passed and acc.metrics["max_rel_diff[y2]"] > 0.05
        # max_rel_diff is the worst of both outputs
        assert acc.metrics["max_rel_diff"] == max(acc.metrics["max_rel_diff[y]"], acc.metrics["max_rel_diff[y2]"])
    # dynamic INT8 quantizes only the MatMuls: y alone would have passed (the first output was all
    # the gate saw before)
    (dynamic,) = [a for a in int8 if a.recipe == "dynamic-per-channel"]
    assert dynamic.accuracy[0].metrics["max_rel_diff[y]"] <= 0.05


def test_other_outputs_of_a_classifier_get_the_tensor_gate() -> None:
    assert "max_max_rel_diff" not in gates_for("image-classification", {})
    gate = gates_for("image-classification", {}, other_outputs=True)
    assert gate["max_max_rel_diff"] == 0.05 and gate["min_top1_agreement"] == 0.98
    assert gates_for("image-classification", {"max_max_rel_diff": 0.2}, other_outputs=True)["max_max_rel_diff"] == 0.2
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((32, 5)).astype(np.float32)
    feats = rng.standard_normal((32, 8)).astype(np.float32)
    p = SimpleNamespace(
        task="image-classification",
        reference=logits,
        validation_labels=None,
        output="logits",
        output_references={"features": feats},
    )
    m = _metrics(p, logits, {"features": feats + 1.0})  # type: ignore[arg-type]
    assert m["top1_agreement"] == 1.0 and m["max_rel_diff[features]"] > 0.05
    assert not check_gate(m, gate)[0]


def test_single_logit_gate_can_fail() -> None:
    """softmax over one class is always 1: the sigmoid and the decision at 0 are gated instead."""
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal((64, 1)) * 3).astype(np.float32)
    gate = gates_for("text-classification", {})
    same = classification_metrics(ref + 1e-4, ref)
    same["batch_rel_diff"] = 0.0
    assert check_gate(same, gate) == (True, [])
    garbage = classification_metrics(-ref + 100.0, ref)  # ranking inverted and shifted
    garbage["batch_rel_diff"] = 0.0
    passed, failures = check_gate(garbage, gate)
    assert not passed
    assert any(f.startswith("max_prob_diff") for f in failures) and any(
        f.startswith("top1_agreement") for f in failures
    )
    # the raw scores' relative difference is reported for a gate on ranking
    assert garbage["max_rel_diff"] > 1.0 and same["max_rel_diff"] < 1e-3


def test_probabilities_are_not_softmaxed_again() -> None:
    """A module that ends in Softmax: its outputs are compared as the probabilities they are."""
    rng = np.random.default_rng(0)
    n, c = 64, 1000
    ref = np.full((n, c), 0.05 / (c - 1), np.float32)
    top = rng.integers(0, c, n)
    ref[np.arange(n), top] = 0.95
    var = ref.copy()
    var[np.arange(n), top] = 0.40  # confidence 0.95 -> 0.40, still the top class
    var[np.arange(n), (top + 1) % c] += 0.35
    assert looks_like_probabilities(ref)
    assert not looks_like_probabilities(rng.standard_normal((8, 4)))
    assert not looks_like_probabilities(np.full((8, 4), 0.3))  # rows sum to 1.2
    p = SimpleNamespace(
        task="image-classification", reference=ref, validation_labels=None, output="probs", output_references={}
    )
    m = _metrics(p, var)  # type: ignore[arg-type]
    assert m["top1_agreement"] == 1.0
    assert m["max_prob_diff"] == pytest.approx(0.55, abs=1e-4)
    m["batch_rel_diff"] = 0.0
    assert not check_gate(m, gates_for("image-classification", {}))[0]


def test_int8_variant_without_int8_is_not_kept(tmp_path: Path) -> None:
    """Mul + Add: no recipe quantizes anything; an fp32 copy labelled int8 (requires cpu-vnni) is dropped."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    inits = [
        numpy_helper.from_array(np.linspace(0.5, 2, 16).astype(np.float32), "s"),
        numpy_helper.from_array(np.ones(16, np.float32), "b"),
    ]
    src = _save(
        tmp_path / "affine.onnx", nodes, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], inits
    )
    manifest = export_model(
        ExportSpec(
            source=src,
            task="tensor",
            name="affine",
            repository=tmp_path / "repo",
            timing="quick",
            threads=1,
            variants=("onnx-fp32", "onnx-int8", "ov-int8"),
        )
    )
    assert [v.id for v in manifest.variants] == ["onnx-fp32"]
    dropped = [a for a in manifest.attempts if a.variant in ("onnx-int8", "ov-int8")]
    assert {a.variant for a in dropped} == {"onnx-int8", "ov-int8"}
    for attempt in dropped:
        assert not attempt.kept and "nothing quantized" in attempt.reason, attempt
    package = tmp_path / "repo" / "affine" / "1"
    assert not (package / "onnx" / "model.int8.onnx").exists()
    assert not (package / "openvino").exists()
    assert not set(count_ops(package / "onnx" / "model.onnx")) & set(QUANT_OPS)


@pytest.mark.parametrize("second", ["scalar", "stat"])
def test_outputs_without_a_row_per_input_row_are_compared_element_by_element(tmp_path: Path, second: str) -> None:
    """A scalar or a per-call statistic beside the answer (review 2: once every output was
    gated, their references were concatenated by rows and the export died in a traceback)."""
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    nodes = [helper.make_node("Add", ["x", "x"], ["y"])]
    if second == "scalar":
        z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [])
        nodes.append(helper.make_node("ReduceSum", ["x"], ["z"], keepdims=0))
    else:
        z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16])
        nodes.append(helper.make_node("ReduceMean", ["x"], ["z"], axes=[0], keepdims=1))
    path = _save(tmp_path / "m.onnx", nodes, [y, z], [])
    spec = ExportSpec(
        source=path, task="tensor", name="m", repository=tmp_path / "r", variants=("onnx-fp32",), timing="quick"
    )
    manifest = export_model(spec)
    (acc,) = manifest.variant("onnx-fp32").accuracy
    assert acc.passed and acc.metrics["max_rel_diff[z]"] == 0.0


def test_an_answer_of_another_shape_fails_the_gate() -> None:
    from export.validate import tensor_metrics

    assert tensor_metrics(np.zeros((3, 2)), np.zeros((2, 2)))["max_rel_diff"] == float("inf")


def test_every_kind_of_quantized_op_counts_as_int8() -> None:
    """Review 2: an LSTM quantizes to DynamicQuantizeLSTM alone, element-wise ops to QLinearAdd /
    QLinearMul: such files are INT8 variants, not copies to drop."""
    from export.quantize import is_quantized

    for op in ("DynamicQuantizeLSTM", "QGemm", "QLinearAdd", "QLinearMul", "MatMulInteger", "QuantizeLinear"):
        assert is_quantized(op), op
    for op in ("MatMul", "Add", "LSTM", "Gemm", "Softmax"):
        assert not is_quantized(op), op
