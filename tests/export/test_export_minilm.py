"""The embedded default: all-MiniLM-L6-v2 built once per session (``minilm_repository``, as ``inferbox init``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from appliance.cli import main
from export.default import minilm_dir
from export.openvino import DYNAMIC_GROUP, count_ov_ops
from export.quantize import count_ops
from export.samples import default_texts
from runtime.backends.base import OpenOptions
from runtime.backends.openvino import OvSession
from runtime.backends.registry import get_backend
from runtime.hardware import int8_saturates, local_cpu_flags
from runtime.package import read_package
from runtime.streams import plan_streams
from runtime.text import TextEncoder, postprocess


@pytest.fixture(scope="module")
def package(minilm_repository: Path):  # type: ignore[no-untyped-def]
    return read_package(minilm_repository / "minilm" / "1")


def test_package_layout_and_text_config(package) -> None:  # type: ignore[no-untyped-def]
    m = package.manifest
    assert m.task == "feature-extraction" and m.name == "minilm"
    assert m.text is not None
    assert m.text.pooling == "mean" and m.text.normalize and m.text.output == "last_hidden_state"
    assert m.text.max_length == 256
    assert m.text.input_map == {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "token_type_ids": "token_type_ids",
    }
    assert (package.path / "tokenizer" / "tokenizer.json").read_bytes() == (
        minilm_dir() / "tokenizer.json"
    ).read_bytes()
    assert m.samples == "samples/samples.npz"
    samples = np.load(package.path / m.samples)
    assert set(samples.files) == {"input_ids", "attention_mask", "token_type_ids"}
    p = m.provenance
    assert p.source_kind == "hf" and len(p.source_sha256) == 64 and p.created_at.endswith("Z")
    for tool in ("onnx", "onnxruntime", "openvino", "nncf", "torch", "transformers", "optimum"):
        assert p.tool_versions[tool] != "not installed", tool
    assert p.machine["cpus"] and p.machine["machine"]


def test_an_int8_variant_passes_the_cosine_gate_on_200_plus_sentences(package) -> None:  # type: ignore[no-untyped-def]
    int8 = [v for v in package.manifest.variants if v.precision == "int8"]
    assert int8, [(a.variant, a.recipe, a.reason) for a in package.manifest.attempts]
    for v in int8:
        passing = [a for a in v.accuracy if a.passed]
        assert passing, v.id
        for a in passing:
            assert a.samples >= 200 and a.reference == "pytorch"
            assert a.metrics["cosine_mean"] >= 0.99 and a.metrics["cosine_min"] >= 0.97
            assert a.gate == {"min_cosine_mean": 0.99, "min_cosine_min": 0.97, "max_batch_rel_diff": 0.01}
            assert a.metrics["batch_rel_diff"] <= 0.01  # a request's answer does not depend on its batch
            assert 0.0 <= a.metrics["topk_agreement"] <= 1.0


def test_variants_backends_and_timings(package) -> None:  # type: ignore[no-untyped-def]
    m = package.manifest
    ids = [v.id for v in m.variants]
    assert ids[:2] == ["onnx-fp32", "onnx-opt"] and "ov-fp32" in ids
    for v in m.variants:
        expected = (
            ["ort-cpu", "ort-cuda", "ort-tensorrt", "ort-openvino"]
            if v.format == "onnx"
            else ["ov-cpu", "ov-gpu", "ov-npu", "ov-auto"]
        )
        assert v.backends == expected
        runtimes = {"onnxruntime"} if v.format == "onnx" else {"openvino"}
        assert {a.runtime for a in v.accuracy} == runtimes
        if v.format == "openvino":
            assert "fp32" in {a.exec_precision for a in v.accuracy}
        # the stream scenario where a server on the export's cores would run streams
        threads = next((t.threads for t in v.timings if t.scenario == "b1"), 0)
        streams, per_stream = plan_streams(0, "cpu", threads)
        for a in v.accuracy:
            if a.passed:
                got = {t.scenario for t in v.timings if t.exec_precision == a.exec_precision}
                # built with quick timing (as a first `serve`): the scenarios the ranking reads only
                want = {"b1", "b32-typical"} | ({"stream"} if streams > 1 else set())
                assert got == want, (v.id, a.exec_precision)
        for t in v.timings:
            assert t.p50_ms > 0 and t.p99_ms >= t.p50_ms and t.items_per_s > 0
            assert t.batch == {"b1": 1, "stream": 4}.get(t.scenario, 32)
            assert t.seq_len == {"b32-max": 256, "stream": 32}.get(t.scenario, 128)
            if t.scenario == "stream":  # a server's batches on one stream's share of the cores
                assert t.threads == per_stream < threads


def test_failed_recipes_are_recorded_with_numbers(package) -> None:  # type: ignore[no-untyped-def]
    attempts = package.manifest.attempts
    int8 = [a for a in attempts if a.variant == "onnx-int8"]
    assert int8[0].recipe == "dynamic-per-channel"
    kept = [a for a in attempts if a.kept]
    assert {a.variant for a in kept} == {v.id for v in package.manifest.variants}
    for a in attempts:
        if not a.kept and a.accuracy:
            assert not any(x.passed for x in a.accuracy)
            assert "cosine_min" in a.accuracy[0].metrics
    # recipes are tried in order and stop at the first that passes
    for variant in ("onnx-int8", "ov-int8"):
        tried = [a for a in attempts if a.variant == variant]
        assert sum(a.kept for a in tried) <= 1
        if any(a.kept for a in tried):
            assert tried[-1].kept


def _kept_reason(package, variant_id: str) -> str:  # type: ignore[no-untyped-def]
    (kept,) = [a for a in package.manifest.attempts if a.variant == variant_id and a.kept]
    return str(kept.reason)


def test_quantized_graph_structure(package) -> None:  # type: ignore[no-untyped-def]
    ids = {v.id for v in package.manifest.variants}
    attempts = package.manifest.attempts
    # a request's answer must not depend on what the server batched beside it: ORT's dynamic INT8
    # (one activation scale per batch) moves MiniLM's answers by ~10 % and fails that gate
    dynamic = [a for a in attempts if a.variant == "onnx-int8" and a.recipe.startswith("dynamic")]
    assert dynamic and not any(a.kept for a in dynamic)
    for a in dynamic:
        assert a.accuracy and all(acc.metrics["batch_rel_diff"] > 0.01 for acc in a.accuracy), a.reason
        assert "batch_rel_diff" in a.reason
    if "onnx-int8" in ids:
        onnx_int8 = package.manifest.variant("onnx-int8")
        assert onnx_int8.recipe == "static-qdq"
        ops = count_ops(package.path / "onnx" / "model.int8.onnx")
        assert ops.get("QuantizeLinear", 0) >= 1 and ops.get("DequantizeLinear", 0) >= 1
        assert ops.get("MatMul", 0) >= 1  # sensitive MatMuls stayed in fp32
        assert onnx_int8.requires == ([] if int8_saturates(local_cpu_flags()) else ["cpu-vnni"])
    if "ov-int8" in ids:
        ops = count_ov_ops(package.path / "openvino" / "model.int8.xml")
        assert ops.get("Constant:int8", 0) >= 1 and ops.get("FakeQuantize", 0) >= 1
        assert count_ov_ops(package.path / "openvino" / "model.xml").get("Constant:int8", 0) == 0
        # full INT8 fails the gate on MiniLM; then static INT8 (FakeQuantize) for most MatMuls with
        # INT8 weights + run-time activation quantization for the FFN down projections, or, where
        # that fails a gate on this CPU, the same with the down projections and last layer in fp32
        ov_int8 = package.manifest.variant("ov-int8")
        assert ov_int8.recipe in ("nncf-quantize-dynamic-down", "nncf-quantize-skip-sensitive")
        if ov_int8.recipe == "nncf-quantize-skip-sensitive":
            (down,) = [a for a in attempts if a.recipe == "nncf-quantize-dynamic-down"]
            assert not down.kept and "fail (" in down.reason
        # quantized for this CPU: 7-bit weights where INT8 saturates, else 8-bit ones that require VNNI
        if int8_saturates(local_cpu_flags()):
            assert ov_int8.requires == [] and "7-bit weights" in _kept_reason(package, "ov-int8")
        else:
            assert ov_int8.requires == ["cpu-vnni"] and "7-bit" not in _kept_reason(package, "ov-int8")
        session = get_backend("ov-cpu").open(
            package.path / "openvino" / "model.int8.xml", OpenOptions(exec_precision="fp32", intra_op_threads=1)
        )
        try:
            assert isinstance(session, OvSession)
            if ov_int8.recipe == "nncf-quantize-dynamic-down":
                assert session.compiled_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == str(DYNAMIC_GROUP)
        finally:
            session.close()


def test_int8_agrees_with_fp32_through_the_runtime(package) -> None:  # type: ignore[no-untyped-def]
    m = package.manifest
    assert m.text is not None
    texts = ["?", "ok", "Where is the nearest branch?", max(default_texts("validation"), key=len)]
    enc = TextEncoder.from_dir(package.path / m.text.tokenizer_dir, m.text).encode(texts)
    assert max(enc.lengths) == 256 and min(enc.lengths) == 3

    def embed(variant_id: str, backend: str, precision: str = "fp32") -> np.ndarray:
        v = m.variant(variant_id)
        s = get_backend(backend).open(
            package.path / v.files[0], OpenOptions(exec_precision=precision, intra_op_threads=2)
        )
        try:
            return postprocess(s.run(enc.feeds), enc.attention_mask, m.text)
        finally:
            s.close()

    ref = embed("onnx-fp32", "ort-cpu")
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
    for v in m.variants:
        if v.precision != "int8":
            continue
        backend = "ort-cpu" if v.format == "onnx" else "ov-cpu"
        got = embed(v.id, backend)
        cos = (got * ref).sum(axis=1)
        assert cos.min() >= 0.95, (v.id, cos)


def test_init_is_idempotent(minilm_repository: Path) -> None:
    env = {k: None for k in os.environ if k.startswith("INFERBOX_")}
    result = CliRunner().invoke(
        main, ["init", "--home", str(minilm_repository.parent), "--repository", str(minilm_repository)], env=env
    )
    assert result.exit_code == 0, result.output
    assert "already in" in result.output
    assert sorted(p.name for p in (minilm_repository / "minilm").iterdir()) == ["1"]


def test_init_signs_with_the_boxs_own_key_and_records_the_build(minilm_repository: Path) -> None:
    """As serve's first start: ``init`` on a new home (the session's build) makes the box's signing
    key, signs the package with it, and records the build (it left the package unsigned before)."""
    import sqlite3

    from runtime.signing import load_public_keys

    home = minilm_repository.parent
    (public,) = load_public_keys(home / "keys" / "signing.key.pub")
    assert read_package(minilm_repository / "minilm" / "1", public_key=public).signed_by is not None
    with sqlite3.connect(f"file:{home / 'audit.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT action, model_name FROM records WHERE event = 'model_export'").fetchall()
    assert rows == [("inferbox init", "minilm")]
