"""Metrics and timing, on numbers whose answers are known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


class _TimedSession:
    """Each run advances a fake clock by ``seconds`` and counts itself."""

    input_names = ("x",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.now = 0.0
        self.calls = 0

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        self.now += self.seconds
        return {"y": feeds["x"]}

    def clock(self) -> float:
        return self.now


FEEDS = {"x": np.zeros((32, 4), dtype=np.float32), "unused": np.zeros(1)}


def test_a_fast_session_stays_inside_the_budget_and_runs_everything() -> None:
    s = _TimedSession(0.01)
    time_session(s, FEEDS, warmup=3, runs=20, budget_s=5.0, clock=s.clock)  # type: ignore[arg-type]
    assert s.calls == 23


def test_a_slow_session_stops_at_the_budget() -> None:
    s = _TimedSession(2.5)  # batch 32 x 256 tokens on the AVX2 box
    m = time_session(s, FEEDS, warmup=3, runs=20, budget_s=5.0, clock=s.clock)  # type: ignore[arg-type]
    # one warm-up (it already spent half the budget), then the minimum of three timed calls
    assert s.calls == 1 + 3
    assert m.items_per_s == pytest.approx(32 / 2.5)
    s = _TimedSession(0.5)
    time_session(s, FEEDS, warmup=3, runs=20, budget_s=5.0, clock=s.clock)  # type: ignore[arg-type]
    assert s.calls == 3 + 7  # three warm-ups (1.5 s), then timed calls until 5 s are spent
    s = _TimedSession(9.0)
    time_session(s, FEEDS, warmup=3, runs=2, budget_s=5.0, clock=s.clock)  # type: ignore[arg-type]
    assert s.calls == 1 + 2  # never fewer timed calls than asked when that is below the minimum


def test_a_fast_session_is_timed_for_at_least_min_s() -> None:
    s = _TimedSession(0.004)  # 20 calls would be a 0.08 s window
    m = time_session(s, FEEDS, warmup=3, runs=20, budget_s=5.0, min_s=1.0, clock=s.clock)  # type: ignore[arg-type]
    assert s.calls == 3 + 250
    assert m.items_per_s == pytest.approx(32 / 0.004)
    s = _TimedSession(0.5)  # the budget still bounds it: 3 warm-ups (1.5 s), timed until 5 s
    time_session(s, FEEDS, warmup=3, runs=1, budget_s=5.0, min_s=60.0, clock=s.clock)  # type: ignore[arg-type]
    assert s.calls == 3 + 7


class _SpellSession(_TimedSession):
    """Calls take ``seconds``, except the first ``slow`` calls, which take three times as long."""

    def __init__(self, seconds: float, slow: int) -> None:
        super().__init__(seconds)
        self.slow = slow

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        self.now += self.seconds * (3 if self.calls <= self.slow else 1)
        return {"y": feeds["x"]}


def test_items_per_s_is_the_best_window_so_a_slow_spell_does_not_decide() -> None:
    s = _SpellSession(0.01, slow=3 + 10)  # the warm-ups and the first 10 of 30 timed calls slow
    m = time_session(s, FEEDS, warmup=3, runs=30, budget_s=5.0, windows=3, clock=s.clock)  # type: ignore[arg-type]
    assert m.items_per_s == pytest.approx(32 / 0.01)
    assert m.p50_ms == pytest.approx(10.0)
    s = _SpellSession(0.01, slow=3 + 10)
    one = time_session(s, FEEDS, warmup=3, runs=30, budget_s=5.0, windows=1, clock=s.clock)  # type: ignore[arg-type]
    assert one.items_per_s == pytest.approx(32 / (0.01 * 50 / 30))  # the mean of all calls


def test_runs_must_be_positive() -> None:
    s = _TimedSession(0.1)
    with pytest.raises(ValueError, match="at least 1"):
        time_session(s, FEEDS, warmup=0, runs=0, clock=s.clock)  # type: ignore[arg-type]


@pytest.mark.parametrize("timing", ["full", "quick"])
def test_ranked_scenarios_are_timed_side_by_side_in_rounds_and_the_best_round_counts(
    tmp_path: Path, timing: str
) -> None:
    """Two candidates of equal speed on a box that slows down as time passes: timed one after
    the other each would read the drift; in alternating rounds both see the same box (also with
    quick timing, which a first ``serve`` builds with: its ranking picks what serve runs).  Each
    candidate's stream scenario runs on a stream's session, its b1 and b32-typical on one
    session of the export's threads, the same session for both."""
    from export.pipeline import _Exporter, _TimingJob
    from export.spec import RANKED_ROUNDS, STREAM_SCENARIO, ExportSpec
    from runtime.manifest import Variant

    now = [0.0]
    order: list[str] = []

    class Drifting:
        input_names = ("x",)

        def __init__(self, name: str) -> None:
            self.name = name
            self.closed = False

        def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
            order.append(self.name)
            now[0] += 0.005 * (1.0 + 0.1 * now[0])  # 5 ms a call, slower by 10 % per second passed
            return {"y": feeds["x"]}

        def close(self) -> None:
            self.closed = True

    spec = ExportSpec(source=tmp_path, task="tensor", name="m", repository=tmp_path, timing=timing, threads=2)
    exporter = _Exporter(spec, lambda step, message: None)
    exporter.variants = [
        Variant(id=v, format="openvino", precision="fp32", files=[], backends=[], recipe="t") for v in ("a", "b")
    ]
    sessions: list[tuple[str, int | None, Drifting]] = []

    def open_(backend: str, path: Path, precision: str, *, threads: int | None = None) -> Drifting:
        sessions.append((path.name, threads, Drifting(f"{path.name}/{threads}")))
        return sessions[-1][2]

    exporter.open = open_  # type: ignore[method-assign]
    feeds = {"x": np.zeros((4, 2), np.float32)}
    for v in ("a", "b"):
        exporter._queued.append(_TimingJob(v, "ov-cpu", "fp32", tmp_path / v, 1, STREAM_SCENARIO, feeds, 32))
        for scenario in ("b1", "b32-typical"):
            exporter._queued.append(_TimingJob(v, "ov-cpu", "fp32", tmp_path / v, None, scenario, feeds, 128))
    exporter.time_side_by_side(clock=lambda: now[0])
    # one stream session and one session of the export's threads per candidate, all closed
    assert [(name, threads) for name, threads, _ in sessions] == [("a", 1), ("a", None), ("b", 1), ("b", None)]
    assert all(s.closed for _, _, s in sessions)
    # in each round scenario by scenario, each on a then b: a's stream session, b's, then a's
    # session of the export's threads for b1, b's, and again for b32-typical
    runs = [name for i, name in enumerate(order) if i == 0 or order[i - 1] != name]
    assert runs == ["a/1", "b/1", "a/None", "b/None", "a/None", "b/None"] * RANKED_ROUNDS
    for scenario in (STREAM_SCENARIO, "b1", "b32-typical"):
        got = {v.id: [t for t in v.timings if t.scenario == scenario] for v in exporter.variants}
        assert [len(t) for t in got.values()] == [1, 1], scenario
        a, b = got["a"][0], got["b"][0]
        # side by side the two read the same box (within 5 %); one after the other (1 s each) b's
        # best window would come a second later, at 10 % slower
        assert a.items_per_s == pytest.approx(b.items_per_s, rel=0.05), scenario
        assert a.threads == (1 if scenario == STREAM_SCENARIO else 2)
        assert a.seq_len == (32 if scenario == STREAM_SCENARIO else 128)
    assert exporter._queued == []


@pytest.mark.parametrize("timing", ["full", "quick"])
def test_only_the_ranked_scenarios_wait_for_the_side_by_side_timing(tmp_path: Path, timing: str) -> None:
    """b32-max ranks nothing and is timed at once on the validated session with full timing, not
    at all with quick timing (a first `serve`'s build: what the ranking reads only); b1,
    b32-typical and (with streams) stream are queued, b1 and b32-typical on the export's threads."""
    from export.pipeline import _Candidate, _Exporter
    from export.sources import Prepared
    from export.spec import STREAM_SCENARIO, ExportSpec

    class Timed:
        input_names = ("x",)

        def __init__(self) -> None:
            self.calls = 0

        def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
            self.calls += 1
            return {"y": feeds["x"]}

        def close(self) -> None:
            pass

    spec = ExportSpec(source=tmp_path, task="tensor", name="m", repository=tmp_path, timing=timing, threads=2)
    exporter = _Exporter(spec, lambda step, message: None)
    feeds = {"x": np.zeros((4, 2), np.float32)}
    exporter.prepared = Prepared.__new__(Prepared)
    exporter.prepared.timing = {s: (feeds, 8) for s in ("b1", "b32-typical", "b32-max", STREAM_SCENARIO)}
    exporter.stream_plan = lambda backend: (2, 1)  # type: ignore[method-assign]
    session = Timed()
    timings = exporter.time(_Candidate([], {("ov-cpu", "fp32"): session}, tmp_path / "m.xml"), "v")
    if timing == "full":
        assert [t.scenario for t in timings] == ["b32-max"] and session.calls > 0
    else:
        assert timings == [] and session.calls == 0
    assert [(j.scenario, j.threads) for j in exporter._queued] == [
        ("b1", None),
        ("b32-typical", None),
        (STREAM_SCENARIO, 1),
    ]


def _padded_text_batches(lengths: list[list[int]]) -> list[dict[str, Any]]:
    """Validation batches of token ids (row r of batch b: ids b*100+r+1...), right-padded to
    each batch's longest row, with their attention masks."""
    batches = []
    for b, rows in enumerate(lengths):
        width = max(rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for r, n in enumerate(rows):
            ids[r, :n] = b * 100 + r + 1
            mask[r, :n] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def test_rows_answered_alone_are_the_most_padded_of_every_batch() -> None:
    """ALONE_ROWS of each batch, the ones with the fewest real tokens, up to ALONE_MAX."""
    from export.pipeline import ALONE_MAX, ALONE_ROWS, alone_rows
    from export.sources import Prepared
    from runtime.manifest import TextConfig

    assert ALONE_ROWS == 4
    p = Prepared.__new__(Prepared)
    p.inputs = []
    p.text = TextConfig(input_map={"input_ids": "input_ids", "attention_mask": "attention_mask"})
    p.validation = _padded_text_batches([[9, 8, 7, 6, 2, 9], [3, 12, 12, 12, 12, 1, 12, 12]])
    assert alone_rows(p) == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2), (1, 5)]
    p.validation = _padded_text_batches([[5] * 8] * (ALONE_MAX // ALONE_ROWS + 3))
    picked = alone_rows(p)
    assert len(picked) == ALONE_MAX and picked[:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]


def test_the_batch_gate_sees_an_answer_that_moves_only_when_a_short_text_is_padded(tmp_path: Path) -> None:
    """A model whose answer to a short text moves when the text is padded far beyond it (OpenVINO's
    run-time INT8 quantization on the AVX2 box did that), in the fifth validation batch only: the
    gate finds it there and drops the variant; the same model without the fault passes."""
    from export.pipeline import _Exporter
    from export.sources import Prepared
    from export.spec import ExportSpec, gates_for
    from runtime.manifest import TextConfig

    lengths = [[6, 7, 8, 9, 10, 11, 12, 12]] * 4 + [[2, 16, 16, 16, 16, 16, 16, 16]]
    validation = _padded_text_batches(lengths)

    def answers(feeds: dict[str, Any], faulty: bool) -> Any:
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        real = mask.sum(axis=1)
        first = ids[:, 0].astype(np.float32)
        out = np.stack([np.sin(first), np.cos(first), real / 16.0, np.ones_like(first)], axis=1)
        if faulty:  # a 2-token text in a 16-wide call
            out[:, 0] += np.where((real <= 2) & (ids.shape[1] >= 16), 0.05, 0.0)
        return out.astype(np.float32)

    class Model:
        input_names = ("input_ids", "attention_mask")

        def __init__(self, faulty: bool) -> None:
            self.faulty = faulty

        def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
            return {"y": answers(feeds, self.faulty)}

        def close(self) -> None:
            pass

    p = Prepared.__new__(Prepared)
    p.task, p.inputs, p.validation = "feature-extraction", [], validation
    p.text = TextConfig(input_map={"input_ids": "input_ids", "attention_mask": "attention_mask"}, output="y")
    p.output, p.output_references, p.reference_name = "y", {}, "onnx-fp32"
    # the reference: every row answered alone (what the fault never touches)
    p.reference = np.concatenate(
        [
            answers({k: v[i : i + 1, : int(b["attention_mask"][i].sum())] for k, v in b.items()}, True)
            for b in validation
            for i in range(len(b["input_ids"]))
        ]
    )
    spec = ExportSpec(source=tmp_path, task="feature-extraction", name="m", repository=tmp_path, threads=1)
    for faulty in (False, True):
        exporter = _Exporter(spec, lambda step, message: None)
        exporter.prepared = p
        exporter.gate = gates_for("feature-extraction", {})
        exporter.open = lambda backend, path, precision, *, threads=None, f=faulty: Model(f)  # type: ignore[method-assign]
        (accuracy,) = exporter.validate(tmp_path / "m.onnx", "onnx").accuracy
        assert accuracy.passed is not faulty, accuracy.metrics
        assert accuracy.metrics["batch_rel_diff"] == (pytest.approx(0.05, rel=1e-3) if faulty else 0.0)
