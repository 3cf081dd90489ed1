"""An existing ONNX file (magika's real model) as a generic tensor model; atomicity of a failed export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.pipeline import export_model
from export.quantize import count_ops
from export.spec import ExportSpec
from runtime.backends.base import OpenOptions
from runtime.backends.registry import get_backend
from runtime.errors import GateError
from runtime.manifest import Manifest
from runtime.package import read_package


@pytest.fixture(scope="module")
def magika_package(tmp_path_factory: pytest.TempPathFactory, magika_onnx: Path) -> tuple[Path, Manifest]:
    repo = tmp_path_factory.mktemp("magika-repo")
    manifest = export_model(
        ExportSpec(source=magika_onnx, task="tensor", name="magika", repository=repo, timing="quick")
    )
    return repo / "magika" / "1", manifest


def test_magika_imports_as_tensor_model(magika_package: tuple[Path, Manifest], magika_onnx: Path) -> None:
    path, manifest = magika_package
    pkg = read_package(path)
    assert pkg.manifest == manifest
    assert [(i.name, i.dtype, i.shape) for i in manifest.inputs] == [("bytes", "int32", [-1, 2048])]
    assert manifest.outputs[0].shape == [-1, 214]
    assert manifest.provenance.source_kind == "onnx" and manifest.provenance.source == str(magika_onnx.resolve())
    assert {"onnx-fp32", "ov-fp32"} <= {v.id for v in manifest.variants}
    samples = np.load(path / "samples" / "samples.npz")
    assert samples["bytes"].dtype == np.int32 and samples["bytes"].shape[1] == 2048


def test_every_kept_magika_variant_agrees_within_its_gate(magika_package: tuple[Path, Manifest]) -> None:
    path, manifest = magika_package
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, size=(16, 2048)).astype(np.int32)
    ref_session = get_backend("ort-cpu").open(path / "onnx" / "model.onnx", OpenOptions(intra_op_threads=2))
    ref = ref_session.run({"bytes": x})["target_label"]
    for variant in manifest.variants:
        assert variant.accuracy, variant.id
        for acc in variant.accuracy:
            if not acc.passed:
                continue
            assert acc.metrics["max_rel_diff"] <= acc.gate["max_max_rel_diff"]
            backend = "ort-cpu" if acc.runtime == "onnxruntime" else "ov-cpu"
            session = get_backend(backend).open(
                path / variant.files[0], OpenOptions(exec_precision=acc.exec_precision, intra_op_threads=2)
            )
            out = session.run({"bytes": x})["target_label"]
            # fresh inputs, same gate (a little slack: these inputs were not in the validation set)
            assert np.abs(out - ref).max() / np.abs(ref).max() <= 2 * acc.gate["max_max_rel_diff"], (variant.id, acc)
            assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
            session.close()
    # every attempt that was dropped really failed its gate, with numbers recorded
    for attempt in manifest.attempts:
        if not attempt.kept and attempt.accuracy:
            assert not any(a.passed for a in attempt.accuracy)
            assert all("max_rel_diff" in a.metrics for a in attempt.accuracy)


def test_quantized_variants_have_int8_nodes(magika_package: tuple[Path, Manifest]) -> None:
    path, manifest = magika_package
    int8 = {v.id: v for v in manifest.variants if v.precision == "int8"}
    if "onnx-int8" in int8:
        ops = count_ops(path / "onnx" / "model.int8.onnx")
        assert ops.get("MatMulInteger", 0) + ops.get("ConvInteger", 0) + ops.get("QuantizeLinear", 0) > 0
    tried = {a.variant for a in manifest.attempts}
    assert {"onnx-int8", "ov-int8"} <= tried


def test_failed_export_leaves_no_partial_package(tmp_path: Path, tiny_onnx: Path) -> None:
    def boom(staging: Path) -> None:
        assert (staging / "onnx" / "model.onnx").is_file()  # the package was fully built
        raise RuntimeError("disk full while finalizing")

    spec = ExportSpec(
        source=tiny_onnx,
        task="tensor",
        name="mlp",
        repository=tmp_path,
        timing="quick",
        variants=("onnx-fp32", "ov-fp32"),
        before_finalize=boom,
    )
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(spec)
    assert not (tmp_path / "mlp").exists()
    assert not any((tmp_path / ".staging").iterdir())


def test_no_passing_variant_is_a_gate_error(tmp_path: Path, tiny_onnx: Path) -> None:
    spec = ExportSpec(
        source=tiny_onnx,
        task="tensor",
        name="mlp",
        repository=tmp_path,
        timing="quick",
        variants=("onnx-int8",),
        gates={"max_max_rel_diff": 0.0},
    )
    with pytest.raises(GateError, match="no variant passed"):
        export_model(spec)
    assert not (tmp_path / "mlp").exists()
    assert not any((tmp_path / ".staging").iterdir())
