"""Metrics and timing, on numbers whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from export.timing import time_session
from export.validate import classification_metrics, embedding_metrics, softmax, tensor_metrics


def test_embedding_metrics_identical_and_perturbed() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((20, 8)).astype(np.float32)
    m = embedding_metrics(ref * 3.0, ref)  # scale does not matter
    assert m["cosine_mean"] == pytest.approx(1.0, abs=1e-6) and m["topk_agreement"] == 1.0
    out = ref.copy()
    out[0] = -ref[0]
    m = embedding_metrics(out, ref)
    assert m["cosine_min"] == pytest.approx(-1.0, abs=1e-6)
    assert m["cosine_mean"] == pytest.approx((19 - 1) / 20, abs=1e-5)
    assert m["topk_agreement"] < 1.0


def test_classification_metrics_with_labels() -> None:
    ref = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    out = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 1.0], [0.0, 1.0]])
    m = classification_metrics(out, ref, labels=[0, 1, 0, 1])
    assert m["top1_agreement"] == 0.75
    assert m["max_prob_diff"] == pytest.approx(
        float(softmax(np.array([1.0, 0.0]))[0] - softmax(np.array([0.0, 1.0]))[0])
    )
    assert m["reference_label_accuracy"] == 1.0 and m["label_accuracy"] == 0.75
    assert m["label_accuracy_drop"] == pytest.approx(0.25)


def test_tensor_metrics() -> None:
    ref = np.array([[1.0, -4.0], [2.0, 0.0]])
    m = tensor_metrics(ref + np.array([[0.0, 0.5], [0.0, 0.0]]), ref)
    assert m == {"max_abs_diff": 0.5, "max_rel_diff": 0.125}


class _Session:
    input_names = ("x",)

    def __init__(self) -> None:
        self.calls = 0

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        return {"y": feeds["x"]}


def test_time_session_uses_injected_clock() -> None:
    ticks = iter([0.0, 0.010, 1.0, 1.030, 2.0, 2.020])
    session = _Session()
    m = time_session(
        session,
        {"x": np.zeros((4, 2)), "extra": np.zeros(1)},
        warmup=2,
        runs=3,  # type: ignore[arg-type]
        clock=lambda: next(ticks),
    )
    assert session.calls == 5
    assert m.batch == 4
    assert m.p50_ms == pytest.approx(20.0)
    assert m.items_per_s == pytest.approx(4 / 0.020)
    assert m.p99_ms == pytest.approx(29.8, abs=0.01)
