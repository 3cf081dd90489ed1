"""Gates, variant lists and the spec's own checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.spec import (
    BATCH_GATE,
    DEFAULT_GATES,
    VARIANT_IDS,
    ExportSpec,
    check_gate,
    check_gates,
    gates_for,
    parse_gate,
    parse_variants,
)
from runtime.errors import ExportError, SourceError


def test_parse_gate() -> None:
    assert parse_gate("min_cosine_min=0.98") == ("min_cosine_min", 0.98)
    assert parse_gate(" max_max_abs_diff = 1e-3") == ("max_max_abs_diff", 0.001)
    with pytest.raises(ExportError, match="KEY=VALUE"):
        parse_gate("cosine_min=0.9")
    with pytest.raises(ExportError, match="not a number"):
        parse_gate("min_cosine_min=high")


def test_parse_variants_keeps_canonical_order() -> None:
    assert parse_variants("ov-int8, onnx-fp32") == ("onnx-fp32", "ov-int8")
    assert parse_variants(list(VARIANT_IDS)) == VARIANT_IDS
    with pytest.raises(ExportError, match="onnx-int4"):
        parse_variants("onnx-int4")


def test_check_gate_min_max_and_missing() -> None:
    gate = {"min_cosine_mean": 0.99, "max_max_abs_diff": 0.1}
    assert check_gate({"cosine_mean": 0.995, "max_abs_diff": 0.05}, gate) == (True, [])
    ok, why = check_gate({"cosine_mean": 0.98, "max_abs_diff": 0.2}, gate)
    assert not ok and len(why) == 2 and "cosine_mean 0.9800 < 0.99" in why[0]
    ok, why = check_gate({"cosine_mean": 0.995}, gate)
    assert not ok and why == ["max_abs_diff not measured"]
    assert check_gate({"cosine_mean": float("nan")}, {"min_cosine_mean": 0.5})[0] is False


def test_gates_for_defaults_overrides_and_labels() -> None:
    assert gates_for("feature-extraction", {}) == {
        "min_cosine_mean": 0.99,
        "min_cosine_min": 0.97,
        "max_batch_rel_diff": 0.01,
    }
    assert gates_for("feature-extraction", {"max_batch_rel_diff": 0.5})["max_batch_rel_diff"] == 0.5
    assert gates_for("feature-extraction", {"min_cosine_min": 0.98})["min_cosine_min"] == 0.98
    assert "max_label_accuracy_drop" in gates_for("image-classification", {}, labelled=True)
    assert gates_for("tensor", {}) == {**DEFAULT_GATES["tensor"], **BATCH_GATE}
    with pytest.raises(SourceError, match="not supported"):
        gates_for("translation", {})


def test_spec_rejects_unknown_task_timing_variant(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="task 'audio'"):
        ExportSpec(source=tmp_path, task="audio", name="m", repository=tmp_path)
    with pytest.raises(ExportError, match="timing"):
        ExportSpec(source=tmp_path, task="tensor", name="m", repository=tmp_path, timing="slow")
    with pytest.raises(ExportError, match="unknown variants"):
        ExportSpec(source=tmp_path, task="tensor", name="m", repository=tmp_path, variants=("trt",))


def test_public_surface_is_lazy_and_small() -> None:
    import subprocess
    import sys

    import export
    from export.pipeline import export_model

    assert export.__all__ == ["ExportSpec", "export_model"]
    assert export.export_model is export_model and export.ExportSpec is ExportSpec
    # importing the package (and the spec) pulls in no export toolchain
    code = "import sys, export, export.spec; print(sorted(m for m in ('torch', 'onnxruntime', 'openvino', 'nncf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("task", "gate", "why"),
    [
        ("feature-extraction", {"min_cosine_mean": 1.5}, "cosine_mean is at most 1"),
        ("text-classification", {"min_top1_agreement": 1.01}, "top1_agreement is at most 1"),
        ("tensor", {"max_max_rel_diff": -0.1}, "max_rel_diff is at least 0"),
    ],
)
def test_a_gate_no_variant_can_meet_is_refused_before_the_export(task: str, gate: dict[str, float], why: str) -> None:
    """--gate min_cosine_mean=1.5 ran the whole export, then every variant failed it."""
    with pytest.raises(ExportError, match=f"can never be met \\({why}\\)"):
        check_gates(task, gate)
    check_gates(task, {next(iter(gate)): 0.5 if "min" in next(iter(gate)) else 0.01})  # in range: fine
