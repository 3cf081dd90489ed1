"""Tensor batching never hands a client rows computed from another client's input.

A model whose output's first dimension is dynamic but is not the batch axis (``[N, 4] ->
Reshape(-1, 2) -> [2N, 2]``: detections, flattened scores) used to be batched and its output
split at the *input* row bounds.  Now: the dimension names from the ONNX file keep such a model
from batching (:attr:`LoadedModel.batchable`), and a package without names (exported before)
is caught by :func:`run_tensor_batch`, which runs each request alone when an output's rows do
not add up.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import msgspec
import numpy as np
import onnx
from onnx import TensorProto, helper

from export.sources import onnx_io
from runtime.backends.base import OpenOptions
from runtime.backends.ort import OrtBackend
from runtime.batcher import DynamicBatcher
from runtime.manifest import Manifest, Provenance, TensorSpec, decode_manifest, encode_manifest
from runtime.serving import LoadedModel, TensorRequest, run_tensor_batch, tensor_group


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def pairs_model(path: Path, out_dim: str = "M") -> Path:
    """x [N, 4] -> y = Reshape(x, [-1, 2]): [2N, 2], its first dim named ``out_dim``."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 2])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [out_dim, 2])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "pairs", [x], [y], [shape])
    return _save(graph, path)


def double_model(path: Path) -> Path:
    """x [N, 4] -> y = x + x: [N, 4], the output's first dim named as the input's."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "double", [x], [y])
    return _save(graph, path)


def loaded(path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> LoadedModel:
    manifest = Manifest(
        name="m",
        version=1,
        task="tensor",
        inputs=inputs,
        outputs=outputs,
        variants=[],
        files=[],
        provenance=Provenance(source_kind="onnx", source="x", source_sha256="0", created_at="now"),
    )
    session = OrtBackend("ort-cpu").open(path, OpenOptions(intra_op_threads=1))
    return LoadedModel(
        name="m",
        version=1,
        manifest=manifest,
        package_sha256="0",
        backend="ort-cpu",
        variant="onnx-fp32",
        exec_precision="fp32",
        session=session,
    )


def _strip_names(specs: list[TensorSpec]) -> list[TensorSpec]:
    """The specs as a package exported before dimension names were kept has them."""
    return [TensorSpec(name=s.name, dtype=s.dtype, shape=s.shape) for s in specs]


A = np.array([[1, 2, 3, 4]], np.float32)
C = np.array([[5, 6, 7, 8]], np.float32)


async def _two_clients(model: LoadedModel) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[int]]:
    """Two one-row requests queued together behind a first one that holds the inference thread,
    so that they do form one batch if the model allows it. Returns their answers and the rows
    of each session call after the first."""
    calls: list[int] = []
    entered, release = threading.Event(), threading.Event()
    inner = model.session.run

    def gated(feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        if not entered.is_set():
            entered.set()
            assert release.wait(10)
        else:
            calls.append(int(next(iter(feeds.values())).shape[0]))
        return dict(inner(feeds, outputs))

    model.session.run = gated  # type: ignore[method-assign]
    batcher: DynamicBatcher[TensorRequest, dict[str, np.ndarray]] = DynamicBatcher(
        run_tensor_batch(model),
        group=tensor_group(model),
        rows=lambda r: r.rows,
        max_batch_size=8,
        max_delay_s=0.0,
        queue_limit=8,
        timeout_s=20.0,
    )
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit(TensorRequest({"x": A}, None)))
        assert await asyncio.to_thread(entered.wait, 10)
        both = asyncio.gather(
            batcher.submit(TensorRequest({"x": A}, None)), batcher.submit(TensorRequest({"x": C}, None))
        )
        while batcher.stats.queue_depth < 2:
            await asyncio.sleep(0)
        release.set()
        await first
        ra, rc = await both
    finally:
        await batcher.stop()
    return ra, rc, calls


def test_onnx_io_keeps_the_dimension_names(tmp_path: Path) -> None:
    inputs, outputs = onnx_io(pairs_model(tmp_path / "p.onnx"))
    assert inputs[0].shape == [-1, 4] and inputs[0].dim_names == ["N", ""]
    assert outputs[0].shape == [-1, 2] and outputs[0].dim_names == ["M", ""]


def test_a_manifest_without_names_keeps_its_bytes() -> None:
    """Old packages: no dim_names in manifest.json, none written back (signatures hold)."""
    spec = TensorSpec(name="x", dtype="float32", shape=[-1, 4])
    raw = msgspec.json.encode(spec)
    assert b"dim_names" not in raw
    assert msgspec.json.decode(raw, type=TensorSpec) == spec
    named = TensorSpec(name="x", dtype="float32", shape=[-1, 4], dim_names=["N", ""])
    assert msgspec.json.decode(msgspec.json.encode(named), type=TensorSpec) == named


def test_a_manifest_round_trips_with_names(tmp_path: Path) -> None:
    inputs, outputs = onnx_io(double_model(tmp_path / "d.onnx"))
    model = loaded(tmp_path / "d.onnx", inputs, outputs)
    again = decode_manifest(encode_manifest(model.manifest))
    assert again.inputs == inputs and again.outputs == outputs


def test_an_output_whose_first_dim_is_not_the_batch_axis_is_not_batched(tmp_path: Path) -> None:
    path = pairs_model(tmp_path / "p.onnx")
    model = loaded(path, *onnx_io(path))
    assert not model.batchable
    ra, rc, calls = asyncio.run(asyncio.wait_for(_two_clients(model), 30))
    assert ra["y"].tolist() == [[1, 2], [3, 4]]
    assert rc["y"].tolist() == [[5, 6], [7, 8]]
    assert calls == [1, 1]


def test_an_unnamed_output_dim_is_not_taken_for_the_batch_axis(tmp_path: Path) -> None:
    path = pairs_model(tmp_path / "p.onnx")
    inputs, outputs = onnx_io(path)
    unnamed = [TensorSpec(name=o.name, dtype=o.dtype, shape=o.shape, dim_names=["", ""]) for o in outputs]
    assert not loaded(path, inputs, unnamed).batchable


def test_the_same_named_batch_axis_batches(tmp_path: Path) -> None:
    path = double_model(tmp_path / "d.onnx")
    model = loaded(path, *onnx_io(path))
    assert model.batchable
    ra, rc, calls = asyncio.run(asyncio.wait_for(_two_clients(model), 30))
    assert ra["y"].tolist() == (A * 2).tolist()
    assert rc["y"].tolist() == (C * 2).tolist()
    assert calls == [2]  # one batched call


def test_a_package_without_names_runs_each_request_alone_when_rows_do_not_add_up(tmp_path: Path) -> None:
    """An old package (no names) still batches, but an output of 4 rows for 2 input rows is
    never split by input rows: each request runs again on its own, and later ones run alone."""
    path = pairs_model(tmp_path / "p.onnx")
    inputs, outputs = onnx_io(path)
    model = loaded(path, _strip_names(inputs), _strip_names(outputs))
    assert model.batchable  # nothing tells it apart beforehand
    ra, rc, calls = asyncio.run(asyncio.wait_for(_two_clients(model), 30))
    assert ra["y"].tolist() == [[1, 2], [3, 4]]
    assert rc["y"].tolist() == [[5, 6], [7, 8]]
    assert calls == [2, 1, 1]  # the batched try, then each alone


def test_run_tensor_batch_remembers_a_model_that_does_not_split(tmp_path: Path) -> None:
    path = pairs_model(tmp_path / "p.onnx")
    inputs, outputs = onnx_io(path)
    model = loaded(path, _strip_names(inputs), _strip_names(outputs))
    calls: list[int] = []
    inner = model.session.run

    def counting(feeds: dict[str, np.ndarray], wanted: list[str] | None = None) -> dict[str, np.ndarray]:
        calls.append(int(feeds["x"].shape[0]))
        return dict(inner(feeds, wanted))

    model.session.run = counting  # type: ignore[method-assign]
    run = run_tensor_batch(model)
    batch = [TensorRequest({"x": A}, None), TensorRequest({"x": C}, None)]
    first = run(batch)
    second = run(batch)
    assert [r["y"].tolist() for r in first] == [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    assert [r["y"].tolist() for r in second] == [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    assert calls == [2, 1, 1, 1, 1]


def seq_first_model(path: Path) -> Path:
    """x [N, 2, 2] -> y = Transpose(x, [1, 0, 2]): [2, N, 2], declared as ``[N, N, 2]`` (what the
    PyTorch source wrote when it named every output's axis 0 ``batch``: torch's inference names
    axis 1 too)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "N", 2])
    node = helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2])
    return _save(helper.make_graph([node], "seqfirst", [x], [y]), path)


def test_a_batch_name_on_another_axis_too_is_not_one_batch_axis(tmp_path: Path) -> None:
    path = seq_first_model(tmp_path / "s.onnx")
    inputs, outputs = onnx_io(path)
    assert outputs[0].dim_names == ["N", "N", ""]
    assert not loaded(path, inputs, outputs).batchable


def test_a_pytorch_export_names_only_the_batch_axes_torch_can_follow(tmp_path: Path) -> None:
    """Through the PyTorch source: a sequence-first output and a flattening reshape are not
    batched; a plain [N, C] output is (review 2: every output's axis 0 was named ``batch``)."""
    import torch

    from export.pipeline import export_model
    from export.spec import ExportSpec
    from runtime.package import read_package

    class SeqFirst(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.transpose(0, 1)

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    cases = [
        ("seqfirst", SeqFirst(), np.ones((4, 3, 2), np.float32), False),
        ("plain", Plain(), np.ones((4, 2), np.float32), True),
    ]
    for name, module, example, batchable in cases:
        spec = ExportSpec(
            source=module,
            task="tensor",
            name=name,
            repository=tmp_path / "repo",
            example_inputs={"x": example},
            variants=("onnx-fp32",),
            timing="quick",
            threads=1,
        )
        export_model(spec, progress=lambda step, message: None)
        package = read_package(tmp_path / "repo" / name / "1")
        model = loaded(package.variant_path("onnx-fp32"), package.manifest.inputs, package.manifest.outputs)
        assert model.batchable is batchable, (name, package.manifest.outputs)
