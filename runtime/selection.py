"""Which (backend, variant, exec precision) runs a package here: a pure ranking.

Preference is data (:class:`Preference`); ranking is a pure function of the
backend probes, the package manifest and the preference.  :func:`rank` returns
a :class:`Decision` with a :class:`Verdict` for *every* candidate, admissible
or not, each with a human reason, so ``inferbox doctor`` can print why a
backend was not chosen.

A candidate is rejected (first failing rule wins) when:

1. it is the ``fake`` backend and the preference does not ask for it;
2. the preference forces another backend;
3. the backend is not usable here (the probe's reason);
4. the backend cannot open the variant's format;
5. the variant does not list the backend as allowed;
6. the backend cannot compute in that precision here;
7. the preference excludes that precision;
8. the variant has not passed its accuracy gate for (runtime, exec precision).

The ``fake`` backend, once asked for, runs any variant it can open without a
gate (rules 5 and 8 do not apply to it).

Admissible candidates are ordered by the manifest's timings (throughput: best
``items_per_s`` of scenario ``b32-typical``, else any ``b32*``; latency: 1000 /
``p50_ms`` of scenario ``b1``).  For a server running streams
(``Preference.streams``) throughput is the ``stream`` scenario instead (a server's
small batches on one stream's session), when every timed candidate has one: on
2 AVX2 cores OpenVINO led at batch 32 x 128 on two threads while ORT ran a
server's batches 5 % faster on one.  A candidate without a timing is estimated as
the backend's speed class times :data:`PRECISION_SPEEDUP` of its precision
(int8 > bf16 > fp16 > fp32); such candidates rank above every timed one when
they run on an accelerator (:func:`runs_on_cpu` is false: a GPU or NPU the
exporting machine did not have, whose timings are a CPU's and do not compare),
or when their estimate beats the estimate of every timed one; else below them.
So on a CUDA box the untimed ``ort-tensorrt`` and ``ort-cuda`` candidates come
before every timed CPU one, and when TensorRT's session cannot be proved the
loader opens CUDA next.  Ties are broken by backend name, variant id and
precision, so the order is deterministic.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from runtime.backends.base import Probe
from runtime.errors import SelectionError
from runtime.manifest import Accuracy, Manifest, Variant

__all__ = [
    "EXEC_PRECISIONS",
    "LATENCY_SCENARIO",
    "PRECISION_SPEEDUP",
    "RANKED_SCENARIOS",
    "STREAM_SCENARIO",
    "THROUGHPUT_SCENARIO",
    "Candidate",
    "Decision",
    "Preference",
    "Verdict",
    "candidates",
    "preference_hash",
    "rank",
    "require_choice",
    "runs_on_cpu",
]

#: Exec precisions in the order they are tried when nothing else decides.
EXEC_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")

#: what a variant may require of the box (``Variant.requires``) that this version can check
KNOWN_REQUIREMENTS = frozenset({"cpu-vnni"})

#: How much faster than fp32 a precision is assumed to be when nothing was measured
#: (rough ratios seen on MiniLM: OpenVINO bf16 ~2.5x, INT8 ~3x; see ENVIRONMENT.md).
PRECISION_SPEEDUP: dict[str, float] = {"fp32": 1.0, "fp16": 1.5, "bf16": 1.8, "int8": 2.4}


@dataclass(frozen=True)
class Candidate:
    """One way to run a package: a backend, one of its variants, a compute precision."""

    backend: str
    variant: str
    exec_precision: str  # "fp32" | "bf16" | "fp16"

    def __str__(self) -> str:
        return f"{self.backend}/{self.variant}/{self.exec_precision}"


@dataclass(frozen=True)
class Verdict:
    """Why a candidate was rejected, or why it ranks where it does. Higher score = faster."""

    candidate: Candidate
    admissible: bool
    reason: str
    score: float = 0.0


@dataclass(frozen=True)
class Preference:
    """What the operator asks for. ``backend`` is a backend name or ``auto``."""

    backend: str = "auto"
    objective: Literal["throughput", "latency"] = "throughput"
    precisions: tuple[str, ...] = EXEC_PRECISIONS
    allow_fake: bool = False
    #: the choice serves online requests as streams (``serve``; :mod:`runtime.streams`): rank by
    #: the ``stream`` timings (a server's small batches on one stream's session) when every
    #: timed candidate has one, else as for a batch job (``b32``)
    streams: bool = False


@dataclass(frozen=True)
class Decision:
    """The choice (None when nothing is admissible) and every verdict, best first."""

    choice: Candidate | None
    verdicts: tuple[Verdict, ...]
    source: str = "rank"  # rank | autotune | cache

    @property
    def admissible(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.admissible)

    @property
    def rejected(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if not v.admissible)

    def verdict(self, candidate: Candidate) -> Verdict | None:
        for v in self.verdicts:
            if v.candidate == candidate:
                return v
        return None


def preference_hash(preference: Preference) -> str:
    """A short stable hash of the preference (part of the decision-cache key)."""
    raw = json.dumps(asdict(preference), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def runs_on_cpu(probe: Probe) -> bool:
    """Whether ``probe``'s backend computes on the CPU: its device is the CPU, or it is OpenVINO's
    ``AUTO`` and the only device AUTO can pick here is the CPU (the ``devices`` its probe lists)."""
    device = probe.device.lower()
    if device == "auto":
        covered = [d for d in probe.details.get("devices", "").split(",") if d]
        return bool(covered) and all(d.split(".")[0].lower() == "cpu" for d in covered)
    return device == "cpu"


def _is_fake(probe: Probe) -> bool:
    return probe.runtime == "fake" or probe.name == "fake"


def _exec_precisions(probe: Probe, variant: Variant) -> list[str]:
    """What the probe offers, plus what the variant was validated in for this runtime.

    The second part makes "bf16 passed its gate at export, but this CPU has no
    bf16" a visible rejection instead of a silent omission.
    """
    wanted = set(probe.precisions) | {a.exec_precision for a in variant.accuracy if a.runtime == probe.runtime}
    ordered = [p for p in EXEC_PRECISIONS if p in wanted]
    return ordered + sorted(wanted - set(ordered))


def candidates(probes: Sequence[Probe], manifest: Manifest) -> list[Candidate]:
    """Every (backend probe x variant x exec precision), in probe then variant order."""
    out: list[Candidate] = []
    for probe in probes:
        for variant in manifest.variants:
            for precision in _exec_precisions(probe, variant):
                out.append(Candidate(probe.name, variant.id, precision))
    return out


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _gate_failures(acc: Accuracy) -> list[str]:
    failures: list[str] = []
    for key, threshold in sorted(acc.gate.items()):
        kind, _, metric = key.partition("_")
        value = acc.metrics.get(metric)
        if value is None:
            failures.append(f"{metric} not measured (gate {key}={_fmt(threshold)})")
        elif kind == "min" and value < threshold:
            failures.append(f"{metric} {_fmt(value)} < {_fmt(threshold)}")
        elif kind == "max" and value > threshold:
            failures.append(f"{metric} {_fmt(value)} > {_fmt(threshold)}")
    return failures


def _gate_reason(variant: Variant, runtime: str, precision: str) -> str:
    measured = [a for a in variant.accuracy if a.runtime == runtime and a.exec_precision == precision]
    if not measured:
        others = sorted({f"{a.runtime}/{a.exec_precision}" for a in variant.accuracy if a.passed})
        hint = f" (it passed on {', '.join(others)})" if others else ""
        return (
            f"accuracy never validated for {runtime}/{precision}{hint}; "
            "re-export or re-validate the package with this precision to use it"
        )
    acc = measured[-1]
    metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(acc.metrics.items()))
    failures = _gate_failures(acc)
    why = "; ".join(failures) if failures else "marked failed"
    return f"accuracy gate failed for {runtime}/{precision}: {why} (measured {metrics} on {acc.samples} samples)"


def _rejection(
    probe: Probe, variant: Variant, precision: str, manifest: Manifest, preference: Preference
) -> str | None:
    """The first rule the candidate breaks, as a sentence; None when it is admissible."""
    fake = _is_fake(probe)
    if fake and not (preference.backend == probe.name or preference.allow_fake):
        return 'the fake backend is for tests (its answers are made up); --backend fake (backend = "fake") forces it'
    if preference.backend not in ("auto", probe.name):
        return f"backend is forced to {preference.backend} (setting backend); set backend=auto to consider others"
    if not probe.usable:
        return f"backend not usable here: {probe.reason}"
    if variant.format not in probe.formats:
        return f"{probe.name} cannot open {variant.format} variants (it opens {', '.join(probe.formats) or 'nothing'})"
    if not fake and probe.name not in variant.backends:
        allowed = ", ".join(variant.backends) or "no backend"
        return f"variant {variant.id} of {manifest.name} is allowed on {allowed}, not on {probe.name}"
    if precision not in probe.precisions:
        return (
            f"{probe.name} cannot compute in {precision} on this box "
            f"(it offers {', '.join(probe.precisions) or 'nothing'})"
        )
    if precision not in preference.precisions:
        return f"{precision} is excluded by the preference (allowed: {', '.join(preference.precisions)})"
    if not fake and not variant.passed(probe.runtime, precision):
        return _gate_reason(variant, probe.runtime, precision)
    unknown = sorted(set(variant.requires) - KNOWN_REQUIREMENTS)
    if unknown:
        return f"variant {variant.id} requires {', '.join(unknown)}, which this inferbox cannot check; upgrade inferbox"
    if "cpu-vnni" in variant.requires and probe.int8_saturates:
        return (
            f"variant {variant.id} has 8-bit weights validated on a CPU with VNNI; this CPU has no VNNI / AMX "
            "(or its ISA flags could not be read: see the notes of `inferbox doctor`), where INT8 kernels "
            "saturate and accuracy falls below the gate: re-export the model on this box (it then quantizes "
            "with 7-bit weights)"
        )
    return None


#: the timing scenario of a server's batches on one stream's session (timed by ``export``)
STREAM_SCENARIO = "stream"
#: the timing scenario a latency objective ranks by (batch 1)
LATENCY_SCENARIO = "b1"
#: the timing scenario a throughput objective ranks by (batch 32 of typical texts; else any b32*)
THROUGHPUT_SCENARIO = "b32-typical"
#: every scenario the ranking reads (``export`` times these side by side)
RANKED_SCENARIOS: tuple[str, ...] = (LATENCY_SCENARIO, THROUGHPUT_SCENARIO, STREAM_SCENARIO)


def _measured(
    variant: Variant, backend: str, precision: str, objective: str, *, streams: bool = False
) -> tuple[float, str] | None:
    """Score (items/s, higher is better) and a description from the manifest's timings;
    ``streams``: from the ``stream`` scenario only (None without one)."""
    timings = [t for t in variant.timings if t.backend == backend and t.exec_precision == precision]
    if streams:
        stream = [t for t in timings if t.scenario == STREAM_SCENARIO and t.items_per_s > 0]
        if not stream:
            return None
        best = max(stream, key=lambda t: t.items_per_s)
        return best.items_per_s, (
            f"measured {best.items_per_s:.4g} items/s at export on one stream "
            f"({best.threads} thread(s), batch {best.batch}, a server's batches)"
        )
    if objective == "latency":
        b1 = [t for t in timings if t.scenario == LATENCY_SCENARIO and t.p50_ms > 0]
        if not b1:
            return None
        best = min(b1, key=lambda t: t.p50_ms)
        return 1000.0 / best.p50_ms, f"measured b1 p50 {best.p50_ms:.3g} ms at export"
    typical = [t for t in timings if t.scenario == THROUGHPUT_SCENARIO]
    pool = typical or [t for t in timings if t.scenario.startswith("b32")]
    if not pool:
        return None
    best = max(pool, key=lambda t: t.items_per_s)
    return best.items_per_s, f"measured {best.items_per_s:.4g} items/s ({best.scenario}) at export"


def _effective_precision(variant: Variant, exec_precision: str) -> str:
    if variant.precision == "int8":
        return "int8"
    if exec_precision in ("bf16", "fp16"):
        return exec_precision
    return variant.precision


_Ranked = tuple[Candidate, Probe, tuple[float, str] | None, float, str]


def _by_stream_timings(admissible: list[_Ranked], variants: dict[str, Variant]) -> list[_Ranked]:
    """The candidates scored by their ``stream`` timings instead, when every timed one has one
    (items/s of a batch of 4 on one thread and of 32 on all cores do not compare); else as given."""
    stream = [
        _measured(variants[c.variant], c.backend, c.exec_precision, "throughput", streams=True)
        for c, _, _, _, _ in admissible
    ]
    timed = [i for i, (_, _, measured, _, _) in enumerate(admissible) if measured is not None]
    if not timed or any(stream[i] is None for i in timed):
        return admissible
    return [
        (c, probe, stream[i] if measured is not None else None, est, eff)
        for i, (c, probe, measured, est, eff) in enumerate(admissible)
    ]


def rank(probes: Sequence[Probe], manifest: Manifest, preference: Preference) -> Decision:
    """Rank every candidate; a pure function. ``choice`` is None when nothing is admissible."""
    by_name = {p.name: p for p in probes}
    if len(by_name) != len(probes):
        names = [p.name for p in probes]
        raise ValueError(f"probe names must be unique: {sorted({n for n in names if names.count(n) > 1})}")
    variants = {v.id: v for v in manifest.variants}
    rejected: list[Verdict] = []
    # (candidate, probe, measured score/description or None, estimate)
    admissible: list[tuple[Candidate, Probe, tuple[float, str] | None, float, str]] = []
    for cand in candidates(probes, manifest):
        probe, variant = by_name[cand.backend], variants[cand.variant]
        why = _rejection(probe, variant, cand.exec_precision, manifest, preference)
        if why is not None:
            rejected.append(Verdict(cand, False, why, 0.0))
            continue
        eff = _effective_precision(variant, cand.exec_precision)
        estimate = probe.speed_class * PRECISION_SPEEDUP.get(eff, 1.0)
        measured = _measured(variant, cand.backend, cand.exec_precision, preference.objective)
        admissible.append((cand, probe, measured, estimate, eff))
    if preference.streams and preference.objective == "throughput":
        admissible = _by_stream_timings(admissible, variants)

    timed_estimates = [est for _, _, m, est, _ in admissible if m is not None]
    top_timed = max(timed_estimates) if timed_estimates else None

    def tier(measured: tuple[float, str] | None, estimate: float, probe: Probe) -> int:
        if measured is not None:
            return 1
        if top_timed is None or estimate > top_timed or not runs_on_cpu(probe):
            return 2
        return 0

    precision_order = {p: i for i, p in enumerate(EXEC_PRECISIONS)}
    ordered = sorted(
        admissible,
        key=lambda item: (
            -tier(item[2], item[3], item[1]),
            -(item[2][0] if item[2] is not None else item[3]),
            item[0].backend,
            item[0].variant,
            precision_order.get(item[0].exec_precision, len(precision_order)),
        ),
    )
    verdicts: list[Verdict] = []
    for position, (cand, probe, measured, estimate, eff) in enumerate(ordered, start=1):
        if measured is not None:
            score, how = measured
        else:
            score = estimate
            how = (
                f"no timing on this box; ranked by backend class (speed class {probe.speed_class} x {eff} "
                f"{PRECISION_SPEEDUP.get(eff, 1.0):g} = {estimate:.4g})"
            )
            if top_timed is not None and not runs_on_cpu(probe):
                how += "; an accelerator, ranked above the timed candidates"
        verdicts.append(Verdict(cand, True, f"#{position}: {how}", score))
    choice = verdicts[0].candidate if verdicts else None
    return Decision(choice=choice, verdicts=(*verdicts, *rejected), source="rank")


def require_choice(decision: Decision, what: str) -> Candidate:
    """The decision's choice, or :class:`SelectionError` listing every rejection reason."""
    if decision.choice is not None:
        return decision.choice
    if not decision.verdicts:
        raise SelectionError(f"{what}: no candidate at all (no backend probed or no variant in the package)")
    lines = "\n  - ".join(f"{v.candidate}: {v.reason}" for v in decision.verdicts)
    raise SelectionError(
        f"{what}: no (backend, variant, precision) can run it here; run `inferbox doctor` for details:\n  - {lines}"
    )
