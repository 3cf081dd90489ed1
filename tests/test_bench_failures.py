"""A piece of the benchmark suite that fails shows as a reason on the results page, never as a
number: a failed batch job, a missing API key, a crashed memory child, an audit window with
failed requests, a reference run that broke, a missing PyTorch."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import audit_onoff, memory, run_all
from bench import server as bench_server
from bench.batch_vs_inprocess import check_job_done
from bench.common import Config, skipped
from bench.http import Reference, row_failure


def _status(**job: Any) -> dict[str, Any]:
    return {"jobs": [{"job_id": "j1", "state": "done", "ok": 10, "rejected": 0, "error": "", **job}], "spooled": []}


def test_a_batch_job_counts_only_when_done_with_every_record_answered() -> None:
    check_job_done(_status(), "j1", expected=10)
    with pytest.raises(RuntimeError, match=r"state failed, ok 0 of 10.*model gone"):
        check_job_done(_status(state="failed", ok=0, error="model gone"), "j1", expected=10)
    with pytest.raises(RuntimeError, match="ok 9 of 10, rejected 1"):
        check_job_done(_status(ok=9, rejected=1), "j1", expected=10)
    with pytest.raises(RuntimeError, match="not in `batch status`"):
        check_job_done(_status(), "j2", expected=10)


def test_a_key_that_cannot_be_made_stops_the_server_part_with_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 2, stdout="", stderr="Error: the state database is locked")

    monkeypatch.setattr(bench_server.subprocess, "run", failing)
    with pytest.raises(bench_server.ServerError, match=r"keys create failed \(2\).*database is locked"):
        bench_server._create_key({})

    def no_key(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 0, stdout='{"key_id": "k1"}', stderr="")

    monkeypatch.setattr(bench_server.subprocess, "run", no_key)
    with pytest.raises(bench_server.ServerError, match="printed no key"):
        bench_server._create_key({})


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (subprocess.CompletedProcess([], 0, stdout="opening...\nnot json\n", stderr=""), "printed no JSON"),
        (subprocess.CompletedProcess([], 0, stdout='{"target": "x"}\n', stderr=""), "no peak_rss_mb"),
        (subprocess.CompletedProcess([], 1, stdout="", stderr="Killed"), "exited 1: Killed"),
        (subprocess.TimeoutExpired(["child"], 600), "ran past 600 s"),
    ],
)
def test_a_memory_child_that_fails_costs_its_row_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, outcome: object, reason: str
) -> None:
    def fake_run(*args: Any, **kwargs: Any) -> object:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(memory.subprocess, "run", fake_run)
    row = memory._child_row("ov-cpu/ov-fp32", Config(out=tmp_path, quick=True), str(tmp_path))
    assert row["target"] == "ov-cpu/ov-fp32" and reason in row["skipped"]


def test_an_audit_window_with_failed_requests_is_not_a_throughput() -> None:
    audit_onoff.check_window({"rps": 500.0, "ok": 2000, "errors": {}})
    with pytest.raises(RuntimeError, match=r"in the window: requests failed: \{'non-2xx': 1900\}"):
        audit_onoff.check_window({"rps": 900.0, "ok": 100, "errors": {"non-2xx": 1900}})
    with pytest.raises(RuntimeError, match="in the window: no successful request"):
        audit_onoff.check_window({"rps": 0.0, "ok": 0, "errors": {}})
    with pytest.raises(RuntimeError, match="in the window: server gone"):
        audit_onoff.check_window(skipped("server gone"))
    rows = [
        {"audit": False, "rps": 500.0},
        {"audit": True, "rps": 480.0},
        {"audit": True, **skipped("requests failed in the window: {'non-2xx': 1900}")},
    ]
    assert audit_onoff.on_vs_off(rows) == pytest.approx(0.96)


def test_a_row_is_a_throughput_only_when_its_requests_succeeded() -> None:
    assert row_failure({"rps": 500.0, "ok": 3000, "errors": {}}) is None
    assert row_failure({"rps": 500.0, "ok": 3000, "errors": {"timeout": 2}}) is None  # a few: still measured
    assert row_failure({"rps": 500.0, "ok": 3000, "errors": {"timeout": 2}}, any_error=True) == (
        "requests failed: {'timeout': 2}"
    )
    assert row_failure({"ok": 0, "errors": {"401": 40}, "first_error": "401 Unauthorized"}) == (
        "no successful request: 401 Unauthorized"
    )
    # a level measure_endpoints already skipped keeps its reason (the windows in turn used to
    # raise KeyError('errors') on it and lose the cause)
    assert row_failure(skipped("no successful request: 401")) == "no successful request: 401"


def test_the_results_page_lists_every_skip_inside_a_part(tmp_path: Path) -> None:
    parts: dict[str, Any] = {
        "inprocess": {
            "baselines": skipped("not installed here: torch"),
            "head_to_head": skipped("no PyTorch baseline ran"),
            "rows": [{"runner": "c", **skipped("cannot open")}],
        },
        "http": {
            "rows": [],
            "inprocess": {
                "items_per_s": 5.0,
                "batcher": {"8": skipped("boom")},
                "before": {"items_per_s": 5.0, "batcher": {"8": skipped("boom")}},
                "after": skipped("the box ran out of memory"),
            },
        },
        "coldstart": {
            "server": {},
            "imports": [{"module": "onnx", "import_s": 0.1}, {"module": "x", **skipped("gone")}],
        },
        "batch": skipped("batch not here"),
    }
    report = {"started_at": "s", "finished_at": "f", "seconds": 1.0, "quick": True, "out": str(tmp_path)}
    page = run_all.render_readme({**report, "parts": parts, "targets": run_all.targets(parts)})
    section = page.split("## Not measured in this run", 1)[1]
    for line in (
        "- inprocess.baselines: not installed here: torch",
        "- inprocess.head_to_head: no PyTorch baseline ran",
        "- http.inprocess.after: the box ran out of memory",
        "- coldstart.imports[1]: gone",
    ):
        assert line in section
    # a part's own skip and its table rows' are shown with the part, not again; a skip inside
    # an averaged run is listed once, from the mean
    assert "batch not here" not in section and "cannot open" not in section
    assert section.count("boom") == 1 and "- http.inprocess.batcher.8: boom" in section
    (row,) = [t for t in run_all.targets(parts) if t["target"].startswith("b32x128")]
    assert row["value"] is None and "none ran" in row["target"] and "no PyTorch baseline ran" in row["from"]


class _FakeModel:
    """Embeds at a fixed cost per text (a sleep: no CPU), as ``LoadedModel.embed`` returns."""

    def __init__(self, seconds_per_text: float) -> None:
        self.seconds_per_text = seconds_per_text

    def embed(self, batch: list[str], truncate: bool = True) -> tuple[np.ndarray, list[int]]:
        import time

        time.sleep(self.seconds_per_text * len(batch))
        return np.zeros((len(batch), 4), dtype=np.float32), [1] * len(batch)


def test_the_in_process_reference_names_its_faster_way_and_that_ways_cpu() -> None:
    texts = [f"text {i}" for i in range(64)]
    slow_one = Reference("c", _FakeModel(0.0004), [_FakeModel(0.0001), _FakeModel(0.0001)], [len(t) for t in texts])
    out = slow_one.throughput(texts, 0.4)
    assert out["way"] == "streams" and out["items_per_s"] == out["streams_per_s"] > out["one_session"]
    assert out["cpu_ms_per_item"] == out["streams_cpu_ms_per_item"]
    assert {"one_session_cpu_ms_per_item", "streams_cpu_ms_per_item"} <= out.keys()
    alone = Reference("c", _FakeModel(0.0001), [], [len(t) for t in texts]).throughput(texts, 0.2)
    assert alone["way"] == "one_session" and alone["items_per_s"] == alone["one_session"]
    assert alone["cpu_ms_per_item"] == alone["one_session_cpu_ms_per_item"] and "streams_per_s" not in alone


def test_an_opened_reference_measures_other_texts_by_their_own_token_counts() -> None:
    """The batch part opens its reference once (probe texts) and measures the job's texts on it."""

    class Tokenizing(_FakeModel):
        def tokenize(self, texts: list[str], truncate: bool = True) -> list[list[int]]:
            return [[0] * len(t.split()) for t in texts]

    model, stream = Tokenizing(0.0001), Tokenizing(0.0001)
    probe = Reference("ort-cpu/onnx-fp32/fp32", model, [stream, stream], [1, 1])
    job = [" ".join(["w"] * (i % 7 + 1)) for i in range(40)]
    other = probe.with_texts(job)
    assert other.lengths == [i % 7 + 1 for i in range(40)] and probe.lengths == [1, 1]
    assert other.model is model and len(other.streams) == 2  # the same sessions, not opened again
    figures = other.figures(job, 0.2)
    assert figures["candidate"] == "ort-cpu/onnx-fp32/fp32" and figures["stream_count"] == 2
    assert figures["items_per_s"] > 0 and figures["way"] in ("one_session", "streams")


def test_inferbox_bench_without_pytorch_says_so_and_scores_accuracy_against_the_plainest_fp32(
    minilm_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``inferbox bench --with-pytorch`` on a box without torch: every candidate is measured, the
    plainest fp32 one is the accuracy reference, and the head to head says why it did not run."""
    import importlib.util
    import json

    from click.testing import CliRunner

    from appliance.cli import main

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name in ("torch", "sentence_transformers") else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    args = ["bench", "minilm", "--quick", "--json", "--with-pytorch", "--repository", str(minilm_repository)]
    res = CliRunner().invoke(main, [*args, "--home", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-2000:]
    out = json.loads(res.stdout)
    assert out["baselines"] == skipped("not installed here: torch, sentence_transformers (make bench installs them)")
    assert out["head_to_head"]["skipped"].startswith("no PyTorch baseline ran")
    rows = [r for r in out["rows"] if "skipped" not in r]
    assert rows and not [r for r in rows if r["runner"].startswith("pytorch")]
    assert out["reference"] is not None and out["reference"].endswith("/fp32")
    (ref,) = [r for r in rows if r["runner"] == out["reference"]]
    assert ref["cos_min"] == 1.0
    assert all(isinstance(r["cos_min"], float) and r["cos_min"] > 0.9 for r in rows)
