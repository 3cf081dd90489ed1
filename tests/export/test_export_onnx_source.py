"""An existing ONNX file (magika's real model) as a generic tensor model; atomicity of a failed export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.pipeline import export_model
from export.quantize import count_ops
from export.spec import ExportSpec
from runtime.backends.base import OpenOptions
from runtime.backends.registry import get_backend
from runtime.errors import ExportError, GateError, SourceError
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


def _external_data_model(folder: Path, location: str = "weights.bin") -> Path:
    """A MatMul whose weight is kept in an external file beside the .onnx (as torch.onnx.export
    writes), plus a bias in a Constant node's attribute tensor, kept there too."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["b"], value=bias),
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location=location, size_threshold=0, convert_attribute=True)
    return path


def test_weights_in_an_external_file_are_packaged_into_one_model(tmp_path: Path) -> None:
    """The .onnx alone used to be copied: every backend then failed on a missing weights file under
    the staging folder. Now the weights are read and saved into the package's one model.onnx,
    and the source hash covers them."""
    source = _external_data_model(tmp_path / "src")
    manifest = export_model(
        ExportSpec(
            source=source,
            task="tensor",
            name="ext",
            repository=tmp_path / "repo",
            timing="quick",
            variants=("onnx-fp32", "ov-fp32"),
        )
    )
    package = tmp_path / "repo" / "ext" / "1"
    assert sorted(p.name for p in (package / "onnx").iterdir()) == ["model.onnx"]
    assert manifest.variant("onnx-fp32").accuracy[0].passed and manifest.variant("ov-fp32").accuracy[0].passed
    x = np.ones((2, 16), np.float32)
    import onnxruntime as ort

    want = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(package / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    from export.sources import hash_path

    assert manifest.provenance.source_sha256 != hash_path(source)  # the weights count too
    from export.sources.onnx_file import external_files

    assert list(external_files(source)) == ["weights.bin"]
    import onnx

    kept = onnx.load(str(source), load_external_data=False)
    constant = kept.graph.node[0].attribute[0].t
    assert constant.data_location == onnx.TensorProto.EXTERNAL  # the Constant's bias was external too
    first = manifest.provenance.source_sha256
    weights = tmp_path / "src" / "weights.bin"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # other weights, same layout
    again = export_model(
        ExportSpec(
            source=source,
            task="tensor",
            name="ext2",
            repository=tmp_path / "repo",
            timing="quick",
            variants=("onnx-fp32",),
        )
    )
    assert again.provenance.source_sha256 != first


def test_a_missing_or_outside_weights_file_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from export.sources import onnx_file

    source = _external_data_model(tmp_path / "a")
    (tmp_path / "a" / "weights.bin").unlink()
    spec = ExportSpec(source=source, task="tensor", name="x", repository=tmp_path / "repo")
    with pytest.raises(SourceError, match=r"'weights\.bin', which is not in .*copy the weights file next to"):
        export_model(spec)
    import onnx

    outside = _external_data_model(tmp_path / "b")  # then pointed at a file outside its folder
    (tmp_path / "secret.bin").write_bytes((tmp_path / "b" / "weights.bin").read_bytes())
    model = onnx.load(str(outside), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    outside.write_bytes(model.SerializeToString())
    spec = ExportSpec(source=outside, task="tensor", name="x", repository=tmp_path / "repo")
    with pytest.raises(SourceError, match=r"outside the model's folder"):
        export_model(spec)
    linked = _external_data_model(tmp_path / "d")
    (tmp_path / "d" / "weights.bin").rename(tmp_path / "elsewhere.bin")
    (tmp_path / "d" / "weights.bin").symlink_to(tmp_path / "elsewhere.bin")
    spec = ExportSpec(source=linked, task="tensor", name="x", repository=tmp_path / "repo")
    with pytest.raises(SourceError, match=r"which is a link; copy the file itself"):
        export_model(spec)
    short = _external_data_model(tmp_path / "e")
    (tmp_path / "e" / "weights.bin").write_bytes(b"\0" * 16)  # cut short: the tensors read past its end
    spec = ExportSpec(source=short, task="tensor", name="x", repository=tmp_path / "repo")
    with pytest.raises(SourceError, match=r"its external weights cannot be read .*re-export the model"):
        export_model(spec)
    big = _external_data_model(tmp_path / "c")
    monkeypatch.setattr(onnx_file, "PROTOBUF_LIMIT", 100)
    spec = ExportSpec(source=big, task="tensor", name="x", repository=tmp_path / "repo")
    with pytest.raises(SourceError, match=r"over 2 GiB are not supported yet"):
        export_model(spec)


def _to_fp16_weights(source: Path, target: Path) -> Path:
    """``source`` with every float initializer stored as fp16 and the graph computing in fp16
    between a Cast of its float32 input and a Cast back (what fp16 converters write with
    ``keep_io_types``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    halves = [numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name) for t in graph.initializer]
    del graph.initializer[:]
    graph.initializer.extend(halves)
    (x,), (y,) = graph.input, graph.output
    for node in graph.node:
        node.input[:] = [f"{x.name}_16" if i == x.name else i for i in node.input]
        node.output[:] = [f"{y.name}_16" if o == y.name else o for o in node.output]
    graph.node.insert(0, helper.make_node("Cast", [x.name], [f"{x.name}_16"], to=TensorProto.FLOAT16))
    graph.node.append(helper.make_node("Cast", [f"{y.name}_16"], [y.name], to=TensorProto.FLOAT))
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return target


def test_a_source_with_fp16_weights_is_labelled_fp16(tmp_path: Path, tiny_onnx: Path) -> None:
    """The manifest says what the variants store: the plain ONNX, its optimized graph and the
    OpenVINO IR keep an fp16 source's weights in fp16 (they were labelled fp32), and the bench
    still finds the plain ONNX file to count FLOPs on and to compare with."""
    from bench.inprocess import plain_fp32_onnx
    from export.sources import weights_precision

    source = _to_fp16_weights(tiny_onnx, tmp_path / "mlp16.onnx")
    assert weights_precision(tiny_onnx) == "fp32" and weights_precision(source) == "fp16"
    rng = np.random.default_rng(0)
    manifest = export_model(
        ExportSpec(
            source=source,
            task="tensor",
            name="mlp16",
            repository=tmp_path / "repo",
            timing="quick",
            validation={"x": rng.standard_normal((16, 16)).astype(np.float32)},
            variants=("onnx-fp32", "onnx-opt", "ov-fp32"),
        )
    )
    labels = {v.id: v.precision for v in manifest.variants}
    assert labels == {"onnx-fp32": "fp16", "onnx-opt": "fp16", "ov-fp32": "fp16"}, labels
    attempt = next(a for a in manifest.attempts if a.variant == "onnx-fp32")
    assert attempt.reason.startswith("fp16 ONNX from the onnx source"), attempt.reason
    package = read_package(tmp_path / "repo" / "mlp16" / "1")
    plain = plain_fp32_onnx(package)
    assert plain is not None and plain.id == "onnx-fp32"

    import json

    from click.testing import CliRunner

    from appliance.cli import main

    args = ["bench", "mlp16", "--quick", "--json", "--repository", str(tmp_path / "repo"), "--home", str(tmp_path)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output[-3000:]
    out = json.loads(res.stdout)
    assert out["reference"] == "ort-cpu/onnx-fp32/fp32"
    assert out["flops"]["flops_per_item"] == 2 * (16 * 32 + 32 * 4)
    assert all(r["cos_min"] > 0.99 for r in out["rows"] if "skipped" not in r), out["rows"]


def _export_mlp(tmp_path: Path, source: Path, **spec: Any) -> Manifest:
    """``source`` exported as tensor model ``mlp`` into ``tmp_path/repo``, quick timing, ``spec`` on top."""
    return export_model(
        ExportSpec(source=source, task="tensor", name="mlp", repository=tmp_path / "repo", timing="quick", **spec)
    )


def test_the_report_says_whose_samples_decided_what_passed(
    tmp_path: Path, tiny_onnx: Path, magika_package: tuple[Path, Manifest]
) -> None:
    """A tensor model without --validation was validated on random rows (an int8 variant kept or dropped
    by noise), and the report said "64 validation samples"; with --calibration alone, validation still
    ran on noise though the customer's rows were at hand."""
    from export.report import format_report
    from export.samples import GENERATED

    _, made_up = magika_package  # exported with no samples at all
    assert made_up.notes["validation_source"] == made_up.notes["calibration_source"] == GENERATED
    assert f"validation: {made_up.notes['validation_samples']} samples, GENERATED" in format_report(made_up)
    rows = np.random.default_rng(3).uniform(0, 1, (24, 16)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x=rows)
    manifest = _export_mlp(tmp_path, tiny_onnx, calibration=tmp_path / "mine.npz", variants=("onnx-fp32", "ov-fp32"))
    assert manifest.notes["calibration_source"] == "file mine.npz"
    assert (
        manifest.notes["validation_source"] == "file mine.npz (the calibration samples: none were given for "
        "validation; the calibrated INT8 variants' gates are in-sample)"
    )
    assert manifest.notes["validation_samples"] == "24"  # the file's rows, not 64 random ones


@pytest.mark.parametrize("asked", ["static", "dynamic"])
def test_the_int8_recipes_tried_can_be_chosen(tmp_path: Path, tiny_onnx: Path, asked: str) -> None:
    """Static QDQ was only the fourth recipe for a transformer and could not be asked for: a calibration
    file then fed no ONNX Runtime variant when a dynamic recipe passed first."""
    manifest = _export_mlp(
        tmp_path,
        tiny_onnx,
        variants=("onnx-fp32", "onnx-int8"),
        int8_recipe=asked,
        validation={"x": np.random.default_rng(0).uniform(0, 1, (32, 16)).astype(np.float32)},
    )
    int8 = [a for a in manifest.attempts if a.variant == "onnx-int8"]
    tried = [a.recipe for a in int8 if a.reason != f"not tried: --int8-recipe {asked}"]
    skipped = [a.recipe for a in int8 if a.reason == f"not tried: --int8-recipe {asked}"]
    assert tried and all(r.startswith(asked) for r in tried), int8
    assert not any(r.startswith(asked) for r in skipped)
    if asked == "dynamic":  # a small MLP's first recipe is static QDQ: passed over, said so
        assert "static-qdq" in skipped


def test_an_unknown_int8_recipe_is_refused_before_any_work(tmp_path: Path, tiny_onnx: Path) -> None:
    with pytest.raises(ExportError, match="int8 recipe 'fast' is not one of auto, static, dynamic"):
        ExportSpec(source=tiny_onnx, task="tensor", name="m", repository=tmp_path, int8_recipe="fast")
