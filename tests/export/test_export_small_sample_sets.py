"""A customer's own sample files that are small or of the wrong shape: the batch gate is measured
even when the validation set is one row (a probe batch), and a sample file whose rows are not the
model's shape is refused naming it, for every source (it used to make every calibrated recipe fail
quietly, and a PyTorch module's validation run end in a stack trace).  Tiny real models, built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.pipeline import PROBE_MIN_ROWS, export_model
from runtime.errors import CalibrationError, GateError, SourceError
from tests.export.conftest import build_mlp, tiny_bert_parts
from tests.export.conftest import quick_spec as _spec

WORDS = ["the", "a", "loan", "bank", "card", "pay", "good", "bad", "day", "night"]


def _batch_dependent_onnx(path: Path) -> Path:
    """``y = x - mean(x over the batch)``: every answer depends on the rows batched beside it."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["x", "m"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "batch_dependent",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_one_row_validation_file_still_measures_the_batch_gate_on_a_tensor_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "one.npz", x=rng.standard_normal((1, 4)).astype(np.float32))
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((20, 4)).astype(np.float32))
    source = _batch_dependent_onnx(tmp_path / "dep.onnx")
    spec = _spec(
        source,
        "tensor",
        tmp_path / "repo",
        validation=tmp_path / "one.npz",
        calibration=tmp_path / "cal.npz",
    )
    # one row batched with nothing measured 0 and the model was kept: its answers change with the batch
    with pytest.raises(GateError, match="batch_rel_diff"):
        export_model(spec)


def _lookup_onnx(path: Path) -> Path:
    """``y = table[ids]``: ids outside 0..9 are refused by ONNX Runtime (as a real embedding is)."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 4], [float(i) for i in range(40)])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 4])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_probe_never_fails_an_export_its_own_validation_passes(tmp_path: Path) -> None:
    """Without a calibration file the probe mixed in generated rows (ids 0..255), which the model
    refused: an export that passed before failed.  Generated rows are never probed, and a probe the
    model refuses (the customer's calibration rows) is said, not fatal."""
    np.savez(tmp_path / "two.npz", ids=np.array([[1], [7]], np.int64))
    source = _lookup_onnx(tmp_path / "lookup.onnx")
    alone = export_model(_spec(source, "tensor", tmp_path / "repo", validation=tmp_path / "two.npz"))
    assert "no probe batch could be formed (measured on those rows only)" in alone.notes["batch_probe"]
    np.savez(tmp_path / "cal.npz", ids=np.arange(20, dtype=np.int64).reshape(20, 1))  # 10..19: out of range
    refused = export_model(
        _spec(
            source,
            "tensor",
            tmp_path / "repo",
            validation=tmp_path / "two.npz",
            calibration=tmp_path / "cal.npz",
        )
    )
    assert "refused by model.onnx on ort-cpu/fp32: not measured there" in refused.notes["batch_probe"]
    assert [v.id for v in refused.variants] == ["onnx-fp32"]


def test_a_tensor_model_whose_answers_do_not_depend_on_the_batch_passes_with_one_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "one.npz", x=rng.standard_normal((1, 16)).astype(np.float32))
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((20, 16)).astype(np.float32))
    manifest = export_model(
        _spec(
            build_mlp(tmp_path / "mlp.onnx"),
            "tensor",
            tmp_path / "repo",
            validation=tmp_path / "one.npz",
            calibration=tmp_path / "cal.npz",
        )
    )
    assert "measured on a batch of 21 validation and calibration rows" in manifest.notes["batch_probe"]
    assert [v.id for v in manifest.variants] == ["onnx-fp32"]


def test_a_text_model_with_one_validation_text_is_batch_gated_on_the_built_in_texts(tmp_path: Path) -> None:
    import torch
    from transformers import BertForSequenceClassification

    tokenizer, config = tiny_bert_parts(WORDS)
    config.num_labels = 3
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")  # type: ignore[attr-defined]
    manifest = export_model(
        _spec(
            tmp_path / "m", "text-classification", tmp_path / "repo", variants=("onnx-int8",), validation=["good day"]
        )
    )
    assert "measured on 32 of the built-in validation texts" in manifest.notes["batch_probe"]
    dynamic = [a for a in manifest.attempts if a.recipe.startswith("dynamic")]
    assert dynamic, [a.recipe for a in manifest.attempts]
    # per-batch activation scales: an answer moves with its batch-mates (a batch of one row showed 0.0)
    assert all(x.metrics["batch_rel_diff"] > 1e-3 for a in dynamic for x in a.accuracy), dynamic


def test_a_validation_set_with_big_enough_batches_gets_no_probe(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "val.npz", x=rng.standard_normal((PROBE_MIN_ROWS, 16)).astype(np.float32))
    manifest = export_model(
        _spec(
            build_mlp(tmp_path / "mlp.onnx"),
            "tensor",
            tmp_path / "repo",
            validation=tmp_path / "val.npz",
        )
    )
    assert "batch_probe" not in manifest.notes


@pytest.mark.parametrize("which", ["calibration", "validation"])
def test_an_onnx_sample_file_of_the_wrong_shape_is_refused_naming_it(tmp_path: Path, which: str) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((40, 15), np.float32))
    spec = _spec(build_mlp(tmp_path / "mlp.onnx"), "tensor", tmp_path / "repo", **{which: bad})
    with pytest.raises(CalibrationError, match=r"bad\.npz: input 'x' has shape \[40, 15\], the model takes \[N, 16\]"):
        export_model(spec)
    assert not (tmp_path / "repo" / "m").exists()


@pytest.mark.parametrize("which", ["calibration", "validation"])
def test_a_module_sample_file_of_the_wrong_shape_is_refused_naming_it(tmp_path: Path, which: str) -> None:
    import torch

    module = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((10, 8, 8), np.float32))  # the channel axis left out
    spec = _spec(
        module,
        "image-classification",
        tmp_path / "repo",
        example_inputs={"pixels": np.zeros((1, 1, 8, 8), np.float32)},
        **{which: bad},
    )
    with pytest.raises(CalibrationError, match=r"bad\.npz: input 'pixels' has shape \[10, 8, 8\], the model takes"):
        export_model(spec)


def test_a_module_that_fails_on_the_validation_rows_is_a_source_error(tmp_path: Path) -> None:
    import torch

    class Picky(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 1:
                raise RuntimeError("one row at a time")
            return x * 2

    spec = _spec(
        Picky(),
        "tensor",
        tmp_path / "repo",
        example_inputs={"x": np.zeros((1, 4), np.float32)},
    )
    with pytest.raises(SourceError, match=r"Picky failed on the validation samples \(RuntimeError: one row at a time"):
        export_model(spec)
