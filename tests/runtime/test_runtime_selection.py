"""Backend selection: "what this box has" -> "what it picks", and why the rest were rejected."""

from __future__ import annotations

import dataclasses
import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.backends.base import Probe
from runtime.backends.fake import FakeBackend
from runtime.backends.openvino import OpenVinoBackend
from runtime.backends.ort import OrtBackend
from runtime.errors import SelectionError
from runtime.manifest import Accuracy, Manifest, Provenance, TensorSpec, Timing, Variant
from runtime.selection import (
    Candidate,
    Decision,
    Preference,
    candidates,
    preference_hash,
    rank,
    require_choice,
)

# --------------------------------------------------------------------------- factories

# the registry's own speed classes: the table under test is the real one
SPEED = {
    **{name: OrtBackend(name).speed_class for name in ("ort-cpu", "ort-cuda", "ort-tensorrt", "ort-openvino")},
    **{name: OpenVinoBackend(name).speed_class for name in ("ov-cpu", "ov-gpu", "ov-npu", "ov-auto")},
    "fake": FakeBackend().probe().speed_class,
}
RUNTIME = {"ort": "onnxruntime", "ov": "openvino", "fake": "fake"}


def probe(name: str, usable: bool = True, reason: str = "", precisions: tuple[str, ...] = ("fp32",)) -> Probe:
    runtime = RUNTIME[name.split("-", maxsplit=1)[0]]
    formats = ("openvino", "onnx") if runtime == "openvino" else ("onnx",)
    if name == "fake":
        formats = ("onnx", "openvino")
    device = {"ort-cuda": "cuda:0", "ort-tensorrt": "cuda:0", "ov-gpu": "GPU"}.get(name, "cpu")
    return Probe(
        name=name,
        usable=usable,
        reason=reason or ("found" if usable else "missing"),
        runtime=runtime,  # type: ignore[arg-type]
        device=device,
        precisions=precisions if usable else (),
        formats=formats,
        speed_class=SPEED[name],
    )


def acc(runtime: str, precision: str, passed: bool = True, cosine_min: float = 0.999) -> Accuracy:
    return Accuracy(
        runtime=runtime,  # type: ignore[arg-type]
        exec_precision=precision,  # type: ignore[arg-type]
        samples=64,
        metrics={"cosine_mean": 0.9995 if passed else 0.95, "cosine_min": cosine_min if passed else 0.91},
        gate={"min_cosine_mean": 0.99, "min_cosine_min": 0.98},
        passed=passed,
        reference="pytorch",
    )


def timing(backend: str, precision: str, scenario: str, items_per_s: float, p50_ms: float = 10.0) -> Timing:
    return Timing(
        backend=backend,
        exec_precision=precision,  # type: ignore[arg-type]
        scenario=scenario,
        batch=1 if scenario == "b1" else 32,
        seq_len=128,
        p50_ms=p50_ms,
        p99_ms=p50_ms * 1.5,
        items_per_s=items_per_s,
        threads=2,
    )


ORT_BACKENDS = ["ort-cpu", "ort-cuda", "ort-tensorrt", "ort-openvino"]
OV_BACKENDS = ["ov-cpu", "ov-gpu", "ov-npu", "ov-auto"]


def variant(
    vid: str,
    accuracy: list[Accuracy] | None = None,
    timings: list[Timing] | None = None,
    backends: list[str] | None = None,
) -> Variant:
    fmt = "openvino" if vid.startswith("ov-") else "onnx"
    precision = "int8" if vid.endswith("int8") else "fp32"
    default_backends = OV_BACKENDS if fmt == "openvino" else (["ort-cpu"] if precision == "int8" else ORT_BACKENDS)
    return Variant(
        id=vid,
        format=fmt,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        files=[f"{fmt}/{vid}.{'xml' if fmt == 'openvino' else 'onnx'}"],
        backends=backends if backends is not None else default_backends,
        recipe="test",
        accuracy=accuracy if accuracy is not None else [],
        timings=timings if timings is not None else [],
    )


def manifest(*variants: Variant) -> Manifest:
    return Manifest(
        name="minilm",
        version=1,
        task="feature-extraction",
        inputs=[TensorSpec(name="input_ids", dtype="int64", shape=[-1, -1])],
        outputs=[TensorSpec(name="sentence_embedding", dtype="float32", shape=[-1, 384])],
        variants=list(variants),
        files=[],
        provenance=Provenance(
            source_kind="onnx", source="test", source_sha256="0" * 64, created_at="2026-11-28T00:00:00Z"
        ),
    )


def cpu_box(amx: bool = False, ort: bool = True, ov: bool = True, gpu_build: bool = False) -> list[Probe]:
    no_gpu = "no NVIDIA GPU: CUDA provider listed by onnxruntime-gpu but no device found"
    ort_missing = "onnxruntime is not installed (pip install inferbox)"
    return [
        probe("ort-cpu") if ort else probe("ort-cpu", False, ort_missing),
        probe("ort-cuda", False, no_gpu if gpu_build else "CUDAExecutionProvider not in onnxruntime 1.32 (CPU build)"),
        probe("ort-tensorrt", False, no_gpu if gpu_build else "TensorrtExecutionProvider not in onnxruntime 1.32"),
        probe("ov-cpu", precisions=("fp32", "bf16") if amx else ("fp32",))
        if ov
        else probe("ov-cpu", False, "openvino is not installed (pip install inferbox)"),
        probe("ov-gpu", False, "OpenVINO lists no GPU device (devices: CPU)"),
    ]


def gpu_box() -> list[Probe]:
    return [
        probe("ort-cpu"),
        probe("ort-cuda", precisions=("fp32", "fp16")),
        probe("ort-tensorrt", precisions=("fp32", "fp16")),
        probe("ov-cpu"),
        probe("ov-gpu", precisions=("fp32", "fp16")),
    ]


STANDARD = manifest(
    variant("onnx-fp32", [acc("onnxruntime", "fp32")]),
    variant("ov-fp32", [acc("openvino", "fp32"), acc("openvino", "bf16")]),
)

# --------------------------------------------------------------------------- the table

C = Candidate
CASES: list[tuple[str, list[Probe], Manifest, Preference, Candidate | None, dict[Candidate, str]]] = [
    (
        "cpu-only-no-amx",
        cpu_box(),
        STANDARD,
        Preference(),
        C("ov-cpu", "ov-fp32", "fp32"),
        {
            C("ov-cpu", "ov-fp32", "bf16"): "cannot compute in bf16 on this box (it offers fp32)",
            C("ort-cuda", "onnx-fp32", "fp32"): "backend not usable here: CUDAExecutionProvider not in",
            C("ort-cpu", "ov-fp32", "fp32"): "ort-cpu cannot open openvino variants",
            C("ov-gpu", "ov-fp32", "fp32"): "OpenVINO lists no GPU device",
        },
    ),
    (
        "cpu-only-amx-bf16",
        cpu_box(amx=True),
        STANDARD,
        Preference(),
        C("ov-cpu", "ov-fp32", "bf16"),
        {C("ort-tensorrt", "onnx-fp32", "fp32"): "backend not usable here"},
    ),
    (
        "ort-gpu-build-without-gpu",
        cpu_box(gpu_build=True),
        STANDARD,
        Preference(),
        C("ov-cpu", "ov-fp32", "fp32"),
        {
            C("ort-cuda", "onnx-fp32", "fp32"): "no NVIDIA GPU: CUDA provider listed",
            C("ort-tensorrt", "onnx-fp32", "fp32"): "no NVIDIA GPU",
        },
    ),
    (
        "real-gpu-box",
        gpu_box(),
        STANDARD,
        Preference(),
        C("ort-tensorrt", "onnx-fp32", "fp32"),
        {
            C("ort-tensorrt", "onnx-fp32", "fp16"): "accuracy never validated for onnxruntime/fp16 (it passed on",
            C("ov-gpu", "ov-fp32", "fp16"): "accuracy never validated for openvino/fp16",
            C("ov-gpu", "ov-fp32", "bf16"): "ov-gpu cannot compute in bf16",
        },
    ),
    (
        "real-gpu-box-fp16-validated",
        gpu_box(),
        manifest(variant("onnx-fp32", [acc("onnxruntime", "fp32"), acc("onnxruntime", "fp16")])),
        Preference(),
        C("ort-tensorrt", "onnx-fp32", "fp16"),
        {},
    ),
    (
        "gpu-untimed-beats-cpu-timed",
        gpu_box(),
        manifest(
            variant("onnx-fp32", [acc("onnxruntime", "fp32")], [timing("ort-cpu", "fp32", "b32-typical", 90.0)]),
            variant("ov-fp32", [acc("openvino", "fp32")], [timing("ov-cpu", "fp32", "b32-typical", 80.0)]),
        ),
        Preference(backend="auto"),
        C("ort-tensorrt", "onnx-fp32", "fp32"),
        {},
    ),
    (
        "openvino-missing",
        cpu_box(ov=False),
        STANDARD,
        Preference(),
        C("ort-cpu", "onnx-fp32", "fp32"),
        {C("ov-cpu", "ov-fp32", "fp32"): "openvino is not installed (pip install inferbox)"},
    ),
    (
        "onnxruntime-missing",
        cpu_box(ort=False),
        STANDARD,
        Preference(),
        C("ov-cpu", "ov-fp32", "fp32"),
        {C("ort-cpu", "onnx-fp32", "fp32"): "onnxruntime is not installed"},
    ),
    (
        "int8-failed-its-gate",
        cpu_box(ov=False),
        manifest(
            variant("onnx-fp32", [acc("onnxruntime", "fp32")]),
            variant("onnx-int8", [acc("onnxruntime", "fp32", passed=False)]),
        ),
        Preference(),
        C("ort-cpu", "onnx-fp32", "fp32"),
        {
            C("ort-cpu", "onnx-int8", "fp32"): "accuracy gate failed for onnxruntime/fp32: cosine_mean 0.95 < 0.99; "
            "cosine_min 0.91 < 0.98 (measured cosine_mean=0.95, cosine_min=0.91 on 64 samples)",
            C("ort-cuda", "onnx-int8", "fp32"): "backend not usable here",
        },
    ),
    (
        "int8-passed-beats-fp32-by-class",
        cpu_box(ov=False),
        manifest(
            variant("onnx-fp32", [acc("onnxruntime", "fp32")]),
            variant("onnx-int8", [acc("onnxruntime", "fp32")]),
        ),
        Preference(),
        C("ort-cpu", "onnx-int8", "fp32"),
        {},
    ),
    (
        "bf16-fails-fp32-passes",
        cpu_box(amx=True),
        manifest(variant("ov-fp32", [acc("openvino", "fp32"), acc("openvino", "bf16", passed=False)])),
        Preference(),
        C("ov-cpu", "ov-fp32", "fp32"),
        {C("ov-cpu", "ov-fp32", "bf16"): "accuracy gate failed for openvino/bf16"},
    ),
    (
        "bf16-validated-but-no-bf16-here",
        cpu_box(amx=False),
        manifest(variant("ov-fp32", [acc("openvino", "bf16")])),
        Preference(),
        None,
        {
            C("ov-cpu", "ov-fp32", "bf16"): "ov-cpu cannot compute in bf16 on this box",
            C("ov-cpu", "ov-fp32", "fp32"): "accuracy never validated for openvino/fp32 (it passed on openvino/bf16)",
        },
    ),
    (
        "forced-backend",
        cpu_box(amx=True),
        STANDARD,
        Preference(backend="ort-cpu"),
        C("ort-cpu", "onnx-fp32", "fp32"),
        {C("ov-cpu", "ov-fp32", "bf16"): "backend is forced to ort-cpu (setting backend); set backend=auto"},
    ),
    (
        "forced-backend-unusable",
        cpu_box(gpu_build=True),
        STANDARD,
        Preference(backend="ort-cuda"),
        None,
        {
            C("ort-cuda", "onnx-fp32", "fp32"): "backend not usable here: no NVIDIA GPU",
            C("ort-cpu", "onnx-fp32", "fp32"): "backend is forced to ort-cuda",
        },
    ),
    (
        "nothing-admissible",
        cpu_box(),
        manifest(
            variant("onnx-fp32", [acc("onnxruntime", "fp32", passed=False)]),
            variant("ov-fp32", []),
        ),
        Preference(),
        None,
        {
            C("ort-cpu", "onnx-fp32", "fp32"): "accuracy gate failed for onnxruntime/fp32",
            C("ov-cpu", "ov-fp32", "fp32"): "accuracy never validated for openvino/fp32; re-export",
        },
    ),
    (
        "precision-excluded-by-preference",
        cpu_box(amx=True),
        STANDARD,
        Preference(precisions=("fp32",)),
        C("ov-cpu", "ov-fp32", "fp32"),
        {C("ov-cpu", "ov-fp32", "bf16"): "bf16 is excluded by the preference (allowed: fp32)"},
    ),
    (
        "variant-not-allowed-on-backend",
        [probe("ort-cpu"), probe("ort-openvino")],
        manifest(variant("onnx-fp32", [acc("onnxruntime", "fp32")], backends=["ort-cpu"])),
        Preference(),
        C("ort-cpu", "onnx-fp32", "fp32"),
        {
            C(
                "ort-openvino", "onnx-fp32", "fp32"
            ): "variant onnx-fp32 of minilm is allowed on ort-cpu, not on ort-openvino"
        },
    ),
    (
        "fake-rejected-by-default",
        [*cpu_box(ov=False), probe("fake")],
        STANDARD,
        Preference(),
        C("ort-cpu", "onnx-fp32", "fp32"),
        {C("fake", "onnx-fp32", "fp32"): "the fake backend is for tests (its answers are made up); --backend fake"},
    ),
    (
        "fake-forced-needs-no-gate",
        [*cpu_box(), probe("fake")],
        manifest(variant("onnx-fp32", [])),
        Preference(backend="fake"),
        C("fake", "onnx-fp32", "fp32"),
        {C("ort-cpu", "onnx-fp32", "fp32"): "backend is forced to fake"},
    ),
    (
        "fake-allowed-ranks-last-by-class",
        [probe("ort-cpu"), probe("fake")],
        manifest(variant("onnx-fp32", [acc("onnxruntime", "fp32")])),
        Preference(allow_fake=True),
        C("ort-cpu", "onnx-fp32", "fp32"),
        {},
    ),
    (
        "throughput-timings-decide",
        cpu_box(amx=True),
        manifest(
            variant("onnx-int8", [acc("onnxruntime", "fp32")], [timing("ort-cpu", "fp32", "b32-typical", 300.0)]),
            variant(
                "ov-fp32",
                [acc("openvino", "fp32"), acc("openvino", "bf16")],
                [
                    timing("ov-cpu", "fp32", "b32-typical", 80.0),
                    timing("ov-cpu", "bf16", "b32-typical", 200.0),
                ],
            ),
        ),
        Preference(),
        C("ort-cpu", "onnx-int8", "fp32"),
        {},
    ),
    (
        "throughput-falls-back-to-any-b32",
        cpu_box(amx=True),
        manifest(
            variant("onnx-fp32", [acc("onnxruntime", "fp32")], [timing("ort-cpu", "fp32", "b32-max", 500.0)]),
            variant("ov-fp32", [acc("openvino", "bf16")], [timing("ov-cpu", "bf16", "b32-typical", 200.0)]),
        ),
        Preference(),
        C("ort-cpu", "onnx-fp32", "fp32"),
        {},
    ),
    (
        "latency-uses-b1-p50",
        cpu_box(amx=True),
        manifest(
            variant(
                "onnx-int8",
                [acc("onnxruntime", "fp32")],
                [timing("ort-cpu", "fp32", "b1", 100.0, p50_ms=2.0), timing("ort-cpu", "fp32", "b32-typical", 100.0)],
            ),
            variant(
                "ov-fp32",
                [acc("openvino", "bf16")],
                [timing("ov-cpu", "bf16", "b1", 50.0, p50_ms=5.0), timing("ov-cpu", "bf16", "b32-typical", 900.0)],
            ),
        ),
        Preference(objective="latency"),
        C("ort-cpu", "onnx-int8", "fp32"),
        {},
    ),
]


@pytest.mark.parametrize(
    ("probes", "man", "pref", "choice", "rejections"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rank_table(
    probes: list[Probe], man: Manifest, pref: Preference, choice: Candidate | None, rejections: dict[Candidate, str]
) -> None:
    decision = rank(probes, man, pref)
    assert decision.choice == choice
    assert decision.source == "rank"
    # one verdict per candidate, admissible ones first
    assert sorted(map(str, (v.candidate for v in decision.verdicts))) == sorted(map(str, candidates(probes, man)))
    flags = [v.admissible for v in decision.verdicts]
    assert flags == sorted(flags, reverse=True)
    if choice is not None:
        assert decision.verdicts[0].candidate == choice and decision.verdicts[0].admissible
    else:
        assert not any(flags)
    for cand, expected in rejections.items():
        verdict = decision.verdict(cand)
        assert verdict is not None, f"{cand} is not a candidate"
        assert not verdict.admissible, f"{cand} should be rejected"
        assert expected in verdict.reason


def test_same_decision_whatever_the_probe_order() -> None:
    probes = [*cpu_box(amx=True)[:1], *gpu_box()[1:3], *cpu_box(amx=True)[3:], probe("fake")]
    man = manifest(
        variant("onnx-fp32", [acc("onnxruntime", "fp32")]),
        variant("onnx-int8", [acc("onnxruntime", "fp32")]),
        variant("ov-fp32", [acc("openvino", "fp32"), acc("openvino", "bf16")]),
    )
    reference = rank(probes, man, Preference())
    rng = random.Random(7)
    for _ in range(5):
        shuffled = probes[:]
        rng.shuffle(shuffled)
        again = rank(shuffled, man, Preference())
        assert again.choice == reference.choice
        assert [v.candidate for v in again.admissible] == [v.candidate for v in reference.admissible]


def test_reason_says_how_it_was_ranked() -> None:
    man = manifest(
        variant("onnx-fp32", [acc("onnxruntime", "fp32")], [timing("ort-cpu", "fp32", "b32-typical", 123.0)]),
        variant("ov-fp32", [acc("openvino", "fp32")]),
    )
    decision = rank([probe("ort-cpu"), probe("ov-cpu")], man, Preference())
    by_backend = {v.candidate.backend: v for v in decision.admissible}
    assert "measured 123 items/s (b32-typical)" in by_backend["ort-cpu"].reason
    assert by_backend["ort-cpu"].score == 123.0
    assert "no timing on this box; ranked by backend class" in by_backend["ov-cpu"].reason
    # the untimed ov-cpu has a higher class than the timed ort-cpu, so it leads
    assert decision.choice == Candidate("ov-cpu", "ov-fp32", "fp32")
    assert decision.verdicts[0].reason.startswith("#1: ")


def test_untimed_candidates_rank_below_timed_unless_their_estimate_beats_them() -> None:
    man = manifest(
        variant("onnx-int8", [acc("onnxruntime", "fp32")], [timing("ort-cpu", "fp32", "b32-typical", 10.0)]),
        variant("onnx-fp32", [acc("onnxruntime", "fp32")]),
        variant("ov-fp32", [acc("openvino", "fp32"), acc("openvino", "bf16")]),
    )
    probes = [probe("ort-cpu"), probe("ov-auto", precisions=("fp32", "bf16")), probe("ort-cuda")]
    decision = rank(probes, man, Preference())
    order = [str(v.candidate) for v in decision.admissible]
    # ort-cuda fp32 (class 40) beats the timed ort-cpu int8 (15 x 2.4 = 36); ov-auto does not
    assert order == [
        "ort-cuda/onnx-fp32/fp32",
        "ort-cpu/onnx-int8/fp32",
        "ov-auto/ov-fp32/bf16",  # below the timed one: 19 x 1.8 = 34.2
        "ov-auto/ov-fp32/fp32",  # 19
        "ort-cpu/onnx-fp32/fp32",  # 15
    ]
    assert decision.admissible[1].score == 10.0
    assert "speed class 40 x fp32 1 = 40" in decision.admissible[0].reason


def test_duplicate_probe_names_are_refused() -> None:
    with pytest.raises(ValueError, match="ort-cpu"):
        rank([probe("ort-cpu"), probe("ort-cpu", False)], STANDARD, Preference())


def test_require_choice_lists_every_reason() -> None:
    decision = rank(cpu_box(gpu_build=True), STANDARD, Preference(backend="ort-cuda"))
    with pytest.raises(SelectionError) as err:
        require_choice(decision, "minilm/1")
    text = str(err.value)
    assert "minilm/1: no (backend, variant, precision) can run it here" in text
    assert "inferbox doctor" in text
    assert "ort-cuda/onnx-fp32/fp32: backend not usable here: no NVIDIA GPU" in text
    assert "ov-cpu/ov-fp32/fp32: backend is forced to ort-cuda" in text
    ok = rank(cpu_box(), STANDARD, Preference())
    assert require_choice(ok, "minilm/1") == ok.choice
    with pytest.raises(SelectionError, match="no candidate at all"):
        require_choice(Decision(choice=None, verdicts=()), "empty/1")


def test_candidates_include_validated_precisions_the_backend_lacks() -> None:
    cands = candidates([probe("ov-cpu")], STANDARD)
    assert cands == [
        Candidate("ov-cpu", "onnx-fp32", "fp32"),
        Candidate("ov-cpu", "ov-fp32", "fp32"),
        Candidate("ov-cpu", "ov-fp32", "bf16"),
    ]


def test_preference_hash_is_stable_and_discriminating() -> None:
    assert preference_hash(Preference()) == preference_hash(Preference())
    assert len(preference_hash(Preference())) == 16
    hashes = {
        preference_hash(p)
        for p in (
            Preference(),
            Preference(backend="ov-cpu"),
            Preference(objective="latency"),
            Preference(precisions=("fp32",)),
            Preference(allow_fake=True),
        )
    }
    assert len(hashes) == 5


PROBE_NAMES = ["ort-cpu", "ort-cuda", "ov-cpu", "ov-gpu", "fake"]


@settings(max_examples=60, deadline=None)
@given(
    usable=st.lists(st.booleans(), min_size=len(PROBE_NAMES), max_size=len(PROBE_NAMES)),
    bf16=st.booleans(),
    passed=st.lists(st.booleans(), min_size=4, max_size=4),
    objective=st.sampled_from(["throughput", "latency"]),
)
def test_rank_invariants(usable: list[bool], bf16: bool, passed: list[bool], objective: str) -> None:
    probes = [
        probe(n, u, precisions=("fp32", "bf16") if bf16 and n.startswith("ov") else ("fp32",))
        for n, u in zip(PROBE_NAMES, usable, strict=True)
    ]
    man = manifest(
        variant("onnx-fp32", [acc("onnxruntime", "fp32", passed[0])]),
        variant("onnx-int8", [acc("onnxruntime", "fp32", passed[1])]),
        variant("ov-fp32", [acc("openvino", "fp32", passed[2]), acc("openvino", "bf16", passed[3])]),
    )
    pref = Preference(objective=objective)  # type: ignore[arg-type]
    decision = rank(probes, man, pref)
    again = rank(list(reversed(probes)), man, pref)
    assert again.admissible == decision.admissible
    assert sorted(map(str, again.rejected)) == sorted(map(str, decision.rejected))
    for v in decision.admissible:
        p = next(p for p in probes if p.name == v.candidate.backend)
        assert p.usable and p.name != "fake"
        assert man.variant(v.candidate.variant).passed(p.runtime, v.candidate.exec_precision)
    expected_any = any(v.admissible for v in decision.verdicts)
    assert (decision.choice is not None) == expected_any


def test_int8_with_8bit_weights_needs_vnni_on_the_cpu() -> None:
    """A variant validated with 8-bit weights on a VNNI CPU is refused where INT8 saturates."""
    vnni_int8 = msgspec.structs.replace(
        variant("ov-int8", [acc("openvino", "fp32")], [timing("ov-cpu", "fp32", "b32-typical", 300.0)]),
        requires=["cpu-vnni"],
    )
    fp32 = variant("ov-fp32", [acc("openvino", "fp32")], [timing("ov-cpu", "fp32", "b32-typical", 100.0)])
    man = manifest(fp32, vnni_int8)
    saturating = dataclasses.replace(probe("ov-cpu"), int8_saturates=True)
    decision = rank([saturating], man, Preference())
    assert str(decision.choice) == "ov-cpu/ov-fp32/fp32"
    (why,) = [v.reason for v in decision.rejected if v.candidate.variant == "ov-int8"]
    assert "8-bit weights validated on a CPU with VNNI" in why and "re-export the model on this box" in why
    # the same package on a VNNI CPU (or a GPU probe, which never saturates) takes the INT8 variant
    assert str(rank([probe("ov-cpu")], man, Preference()).choice) == "ov-cpu/ov-int8/fp32"
    # a variant with 7-bit weights requires nothing and runs on the saturating CPU
    seven_bit = msgspec.structs.replace(vnni_int8, requires=[])
    assert str(rank([saturating], manifest(fp32, seven_bit), Preference()).choice) == "ov-cpu/ov-int8/fp32"


def test_a_requirement_this_version_cannot_check_is_refused() -> None:
    future = msgspec.structs.replace(variant("ov-fp32", [acc("openvino", "fp32")]), requires=["gpu-fp8"])
    decision = rank([probe("ov-cpu")], manifest(future), Preference())
    assert decision.choice is None
    assert "requires gpu-fp8, which this inferbox cannot check; upgrade inferbox" in decision.rejected[0].reason


def _served_box() -> tuple[Manifest, list[Probe]]:
    """OpenVINO leads at batch 32 on every core, ORT on a server's batches on one stream (as
    measured on 2 AVX2 cores)."""
    man = manifest(
        variant(
            "onnx-fp32",
            [acc("onnxruntime", "fp32")],
            [timing("ort-cpu", "fp32", "b32-typical", 45.0), timing("ort-cpu", "fp32", "stream", 110.0)],
        ),
        variant(
            "ov-fp32",
            [acc("openvino", "fp32")],
            [timing("ov-cpu", "fp32", "b32-typical", 48.0), timing("ov-cpu", "fp32", "stream", 104.0)],
        ),
    )
    return man, [probe("ort-cpu"), probe("ov-cpu")]


def test_a_server_running_streams_ranks_by_the_stream_timings() -> None:
    man, probes = _served_box()
    batch = rank(probes, man, Preference())
    assert batch.choice == Candidate("ov-cpu", "ov-fp32", "fp32")  # a batch job: b32
    served = rank(probes, man, Preference(streams=True))
    assert served.choice == Candidate("ort-cpu", "onnx-fp32", "fp32")
    assert served.admissible[0].score == 110.0
    assert "at export on one stream (2 thread(s), batch 32" in served.admissible[0].reason
    # streams change nothing for the latency objective (b1; none here: both ranked by class)
    latency = rank(probes, man, Preference(objective="latency", streams=True))
    assert [v.score for v in latency.admissible] == [
        v.score for v in rank(probes, man, Preference(objective="latency")).admissible
    ]


def test_stream_timings_rank_only_when_every_timed_candidate_has_one() -> None:
    man, probes = _served_box()
    ov = man.variants[1]
    no_stream = msgspec.structs.replace(ov, timings=[t for t in ov.timings if t.scenario != "stream"])
    mixed = msgspec.structs.replace(man, variants=[man.variants[0], no_stream])
    # items/s of a batch of 4 on one thread and of 32 on all cores do not compare: b32 for all
    decision = rank(probes, mixed, Preference(streams=True))
    assert decision.choice == Candidate("ov-cpu", "ov-fp32", "fp32")
    assert decision.admissible[0].score == 48.0
