"""An ONNX file whose inputs fix the batch axis (exported with batch 1, say) exports, validates and serves.

Before, the pipeline fed it validation batches of 32 rows and calibration rows one by one, and
the export failed with "input 'x' has size 16 on axis 0, the model wants 1".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from export.pipeline import export_model
from export.spec import ExportSpec
from runtime.autotune import load_samples
from runtime.errors import InputError
from runtime.loader import LoaderOptions, load_model
from runtime.manifest import TensorSpec, fixed_batch
from runtime.package import read_package


def _fix_batch(source: Path, target: Path, batch: int) -> Path:
    model = onnx.load(str(source))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, str(target))
    return target


def test_fixed_batch_reads_the_first_axis_of_every_input() -> None:
    def spec(*shape: int) -> TensorSpec:
        return TensorSpec(name="x", dtype="float32", shape=list(shape))

    assert fixed_batch([spec(1, 16)]) == 1
    assert fixed_batch([spec(4, 16), spec(4)]) == 4
    assert fixed_batch([spec(-1, 16)]) is None
    assert fixed_batch([spec(1, 16), spec(-1, 3)]) is None
    assert fixed_batch([spec(1, 16), spec(2, 3)]) is None  # no common batch axis
    assert fixed_batch([]) is None


@pytest.mark.parametrize("batch", [1, 4])
def test_a_fixed_batch_onnx_file_exports_and_serves(tmp_path: Path, tiny_onnx: Path, batch: int) -> None:
    source = _fix_batch(tiny_onnx, tmp_path / f"mlp{batch}.onnx", batch)
    rng = np.random.default_rng(0)
    manifest = export_model(
        ExportSpec(
            source=source,
            task="tensor",
            name="mlp",
            repository=tmp_path / "repo",
            timing="quick",
            calibration={"x": rng.standard_normal((10, 16)).astype(np.float32)},
            validation={"x": rng.standard_normal((18, 16)).astype(np.float32)},
            variants=("onnx-fp32", "onnx-int8", "ov-fp32"),
        )
    )
    assert [i.shape for i in manifest.inputs] == [[batch, 16]]
    fp32 = manifest.variant("onnx-fp32")
    (acc,) = [a for a in fp32.accuracy if a.runtime == "onnxruntime"]
    # 18 rows in whole calls of `batch` rows; each of the first rows also ran alone (repeated
    # `batch` times): an MLP's rows do not touch each other
    assert acc.passed and acc.samples == 18 - 18 % batch
    assert acc.metrics["max_abs_diff"] == 0.0 and acc.metrics["batch_rel_diff"] == 0.0
    assert {t.scenario for t in fp32.timings} >= {"b1", "b32-typical"}
    assert all(t.batch == batch for t in fp32.timings), [(t.scenario, t.batch) for t in fp32.timings]
    package = read_package(tmp_path / "repo" / "mlp" / "1")
    samples = load_samples(package)
    assert samples is not None and samples["x"].shape == (batch, 16)

    # the runtime loads it (autotune runs the samples as one call) and answers a call of `batch` rows
    model = load_model(tmp_path / "repo", "mlp", options=LoaderOptions(autotune=True, force_autotune=True))
    try:
        assert not model.batchable
        x = rng.standard_normal((batch, 16)).astype(np.float32)
        y = model.infer({"x": x})["y"]
        import onnxruntime as ort

        want = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, want, rtol=0.05, atol=0.05)
        with pytest.raises(InputError, match="x"):
            model.infer({"x": rng.standard_normal((batch + 1, 16)).astype(np.float32)})
    finally:
        model.close()


def test_inputs_without_one_batch_axis_are_refused_with_the_fix(tmp_path: Path) -> None:
    """Inputs that fix different first axes (or mix a fixed one with a dynamic one) cannot be cut
    into calls: a SourceError naming the axes and the fix, not an input error from inside a run."""
    from onnx import TensorProto, helper

    from runtime.errors import SourceError

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "add.onnx"))
    spec = ExportSpec(source=tmp_path / "add.onnx", task="tensor", name="add", repository=tmp_path / "repo")
    with pytest.raises(SourceError, match=r"first axes are \{'a': 1, 'b': -1\}.*re-export"):
        export_model(spec)
