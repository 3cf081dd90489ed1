"""``inferbox bench`` on tensor packages (an ONNX file's model), and the FLOP count behind peak_frac."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.roofline import conv_flops, count_matmul_flops
from bench.tensors import accuracy_stats

#: the CNN below: Conv 1 -> 8 channels, 3 x 3, on 8 x 8 (padded): 2 x (8 x 8 x 8) x (1 x 3 x 3);
#: Gemm 8 -> 3: 2 x 8 x 3
CNN_CONV_FLOPS = 2 * 8 * 8 * 8 * 9
CNN_GEMM_FLOPS = 2 * 8 * 3


def build_cnn(path: Path, batch: int | str = "batch") -> Path:
    """``pixels`` float32 [batch, 1, 8, 8] -> ``logits`` float32 [batch, 3]: Conv, Relu, global
    average pool, Gemm.  ``batch``: a name (dynamic) or a fixed size."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32) * 0.5, "cw"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "cb"),
        numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32) * 0.5, "fw"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32) * 0.1, "fb"),
    ]
    nodes = [
        helper.make_node("Conv", ["pixels", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_conv_flops_follow_the_weight_and_the_output() -> None:
    assert conv_flops([8, 1, 3, 3], [1, 8, 8, 8]) == CNN_CONV_FLOPS
    assert conv_flops([16, 4, 3, 3], [2, 16, 5, 5]) == 2 * (2 * 16 * 5 * 5) * (4 * 3 * 3)  # groups: C_in / g = 4
    with pytest.raises(ValueError, match="do not fit"):
        conv_flops([8, 1, 3, 3], [1, 4, 8, 8])


def test_count_flops_counts_convolutions_and_products(tmp_path: Path) -> None:
    path = build_cnn(tmp_path / "cnn.onnx")
    count = count_matmul_flops(path, {"pixels": np.ones((1, 1, 8, 8), np.float32)})
    assert count.by_op == {"Conv": CNN_CONV_FLOPS, "Gemm": CNN_GEMM_FLOPS}
    assert count.products == 2
    batch4 = count_matmul_flops(path, {"pixels": np.ones((4, 1, 8, 8), np.float32)})
    assert batch4.total == 4 * count.total


def test_count_flops_reads_an_operand_that_is_also_a_graph_output(tmp_path: Path) -> None:
    """A product whose input the graph already returns: counted, not a KeyError."""
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", 4]),
        ],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    count = count_matmul_flops(tmp_path / "m.onnx", {"x": np.ones((3, 4), np.float32)})
    assert count.by_op == {"MatMul": 2 * 3 * 4 * 2}


def test_accuracy_stats_compare_every_output_and_the_arg_max() -> None:
    ref = {"logits": np.array([[1.0, 0.0], [0.0, 1.0]]), "extra": np.zeros((2, 1))}
    same = accuracy_stats(ref, ref, classifier=True)
    assert same == {"max_abs_diff": 0.0, "cos_mean": 1.0, "cos_min": 1.0, "rows_compared": 2, "top1_agree": 1.0}
    flipped = {"logits": np.array([[1.0, 0.1], [1.0, 0.0]]), "extra": np.full((2, 1), 0.5)}
    got = accuracy_stats(flipped, ref, classifier=True)
    assert got["top1_agree"] == 0.5 and got["max_abs_diff"] == 1.0 and got["cos_min"] == 0.0
    assert "top1_agree" not in accuracy_stats(flipped, ref, classifier=False)
    with pytest.raises(ValueError, match="shape"):
        accuracy_stats({"logits": np.zeros((3, 2))}, ref, classifier=False)
    with pytest.raises(ValueError, match="no output in common"):
        accuracy_stats({"other": np.zeros((2, 2))}, ref, classifier=False)


def test_a_broken_answer_never_reads_as_agreement() -> None:
    ref = {"y": np.array([[1.0, 2.0], [3.0, 4.0]])}
    nan = accuracy_stats({"y": np.array([[1.0, np.nan], [3.0, 4.0]])}, ref, classifier=False)
    assert nan["max_abs_diff"] == float("inf") and np.isnan(nan["cos_min"])
    zeros = {"y": np.zeros((2, 2))}
    assert accuracy_stats(zeros, zeros, classifier=False)["cos_min"] == 1.0  # identical, not 0 / 0


@pytest.fixture(scope="module")
def cnn_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cnn`` (dynamic batch) and ``cnn4`` (batch fixed to 4), exported from ONNX files."""
    from export.pipeline import export_model
    from export.spec import ExportSpec

    tmp = tmp_path_factory.mktemp("cnn")
    rng = np.random.default_rng(1)
    pixels = rng.random((64, 1, 8, 8)).astype(np.float32)
    for name, batch in (("cnn", "batch"), ("cnn4", 4)):
        export_model(
            ExportSpec(
                source=build_cnn(tmp / f"{name}.onnx", batch),
                task="tensor",
                name=name,
                repository=tmp / "repo",
                timing="quick",
                calibration={"pixels": pixels[:32]},
                validation={"pixels": pixels[32:]},
                variants=("onnx-fp32", "onnx-int8", "ov-fp32"),
            )
        )
    return tmp / "repo"


def _bench(repo: Path, home: Path, *args: str) -> Any:
    from click.testing import CliRunner

    from appliance.cli import main

    return CliRunner().invoke(main, ["bench", *args, "--quick", "--repository", str(repo), "--home", str(home)])


def test_inferbox_bench_times_every_candidate_of_a_tensor_model(cnn_repository: Path, tmp_path: Path) -> None:
    res = _bench(cnn_repository, tmp_path / "home", "cnn", "--json", "--with-pytorch", "--out", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output[-3000:]
    out = json.loads(res.stdout)
    assert "no PyTorch baseline for cnn: it is a tensor model" in res.stderr
    assert out["kind"] == "tensor" and out["batch"] == 32
    assert out["inputs"] == {"pixels": {"shape": [8, 1, 8, 8], "dtype": "float32"}}
    assert out["flops"]["by_op_per_item"] == {"Conv": CNN_CONV_FLOPS, "Gemm": CNN_GEMM_FLOPS}
    rows = [r for r in out["rows"] if "skipped" not in r]
    labels = {r["runner"] for r in rows}
    assert {"ort-cpu/onnx-fp32/fp32", "ort-cpu/onnx-int8/fp32", "ov-cpu/ov-fp32/fp32"} <= labels
    assert out["reference"] == "ort-cpu/onnx-fp32/fp32"
    (ref,) = [r for r in rows if r["runner"] == out["reference"]]
    assert ref["max_abs_diff"] == 0.0 and ref["cos_min"] == 1.0
    for r in rows:
        assert r["rows_per_s"] > 0 and r["b1_p50_ms"] > 0 and r["batch"] == 32 and r["rows_compared"] == 8
        assert r["peak_frac"] > 0 and 0 <= r["max_abs_diff"] < 0.5 and r["cos_min"] > 0.99, r
    assert "rows_per_s" in out["table"] and "top1_agree" not in out["table"]  # no labels: not a classifier
    saved = json.loads((tmp_path / "out" / "inprocess.json").read_text())
    assert saved["rows"] == out["rows"]


def test_inferbox_bench_calls_a_fixed_batch_model_with_its_own_batch(cnn_repository: Path, tmp_path: Path) -> None:
    res = _bench(cnn_repository, tmp_path, "cnn4", "--json")
    assert res.exit_code == 0, res.output[-3000:]
    out = json.loads(res.stdout)
    assert out["batch"] == 4 and out["inputs"]["pixels"]["shape"] == [4, 1, 8, 8]
    rows = [r for r in out["rows"] if "skipped" not in r]
    assert rows and all(r["batch"] == 4 and r["rows_compared"] == 4 for r in rows)
    assert out["flops"]["flops_per_item"] == CNN_CONV_FLOPS + CNN_GEMM_FLOPS


def test_inferbox_bench_table_on_a_terminal(cnn_repository: Path, tmp_path: Path) -> None:
    res = _bench(cnn_repository, tmp_path, "cnn")
    assert res.exit_code == 0, res.output[-3000:]
    assert "accuracy against ort-cpu/onnx-fp32/fp32 on the package's 8 sample rows" in res.stdout
    assert "runner" in res.stdout and "rows_per_s" in res.stdout


def test_inferbox_bench_fails_when_no_candidate_could_be_measured(
    cnn_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every candidate failing to open is exit 1 naming the reasons, not an empty table and exit 0;
    with --json the record still comes out first."""
    import bench.tensors

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the backend broke")

    monkeypatch.setattr(bench.tensors, "open_candidate", broken)
    res = _bench(cnn_repository, tmp_path, "cnn", "--json")
    assert res.exit_code == 1
    assert "no candidate of cnn could be measured here" in res.stderr and "the backend broke" in res.stderr
    out = json.loads(res.stdout)
    assert out["rows"] and all("skipped" in r for r in out["rows"])


def test_the_suite_on_a_tensor_model_runs_its_tensor_part_and_says_why_the_text_parts_do_not(
    cnn_repository: Path, tmp_path: Path
) -> None:
    """``python -m bench.run_all --model cnn``: the in-process part is the tensor one, the parts that
    send texts are skipped with the reason, and the page shows the tensor table."""
    from bench import run_all
    from bench.common import Config

    cfg = Config(out=tmp_path / "out", quick=True, model="cnn", home=tmp_path / "home", repository=cnn_repository)
    report = run_all.run(cfg, parts=("inprocess", "http", "memory"), init=False)
    assert report["package"]["task"] == "tensor" and report["package"]["text"] is False
    inprocess = report["parts"]["inprocess"]
    assert inprocess["kind"] == "tensor" and [r for r in inprocess["rows"] if "skipped" not in r]
    assert report["parts"]["http"] == {"skipped": "this part sends texts to /v1/embeddings; cnn is a tensor model"}
    assert report["parts"]["memory"]["skipped"].startswith("this part runs batches of 32 x 128 tokens")
    page = (tmp_path / "out" / "README.md").read_text()
    assert "rows/s in calls of 32" in page and "rows_per_s" in page
    assert (
        f"FLOPs per row (matrix products and convolutions of `onnx-fp32`, counted from the graph): {CNN_CONV_FLOPS + CNN_GEMM_FLOPS:,} FLOP."
        in page
    )


def test_the_suite_does_not_build_the_default_model_for_another_missing_one(tmp_path: Path) -> None:
    from bench import run_all
    from bench.common import Config

    cfg = Config(out=tmp_path / "out", quick=True, model="mine", home=tmp_path / "home", repository=tmp_path / "repo")
    (tmp_path / "repo").mkdir()
    package = run_all.ensure_package(cfg, init=True)
    assert "`inferbox init` builds only the default model 'minilm'" in package["skipped"]
    assert not (tmp_path / "repo" / "minilm").exists()
