"""Autotune (timing order from an injected clock), the decision cache, decide(), load_samples()."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pytest

from runtime.autotune import DecisionCache, autotune, cache_key, decide, load_samples, recall
from runtime.backends.base import Probe
from runtime.errors import BackendError, PackageError, UnsafePathError
from runtime.manifest import Accuracy, Manifest, Provenance, TensorSpec, Variant
from runtime.package import Package
from runtime.selection import Candidate, Decision, Preference, rank


class Clock:
    """A clock that only moves when a fake session runs."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeSession:
    backend: str
    cost_s: float
    clock: Clock
    fail_on_run: bool = False
    input_names: tuple[str, ...] = ("x",)
    output_names: tuple[str, ...] = ("y",)
    active: tuple[str, ...] = ("fake",)
    fallback: str | None = None
    runs: int = 0
    closed: bool = False
    seen: list[set[str]] = field(default_factory=list)

    def run(
        self, inputs: dict[str, npt.NDArray[np.generic]], outputs: list[str] | None = None
    ) -> dict[str, npt.NDArray[np.generic]]:
        if self.fail_on_run:
            raise BackendError("kernel not implemented for this op")
        self.seen.append(set(inputs))
        self.runs += 1
        self.clock.now += self.cost_s
        return {"y": inputs["x"]}

    def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class Pkg:
    manifest: Manifest
    sha256: str
    path: Path


def acc(runtime: str, precision: str = "fp32") -> Accuracy:
    return Accuracy(
        runtime=runtime,  # type: ignore[arg-type]
        exec_precision=precision,  # type: ignore[arg-type]
        samples=8,
        metrics={"max_abs_diff": 0.0},
        gate={"max_max_abs_diff": 1e-4},
        passed=True,
        reference="onnx-fp32",
    )


def make_manifest(samples: str | None = "samples/samples.npz") -> Manifest:
    return Manifest(
        name="tiny",
        version=1,
        task="tensor",
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 4])],
        variants=[
            Variant(
                id="onnx-fp32",
                format="onnx",
                precision="fp32",
                files=["onnx/model.onnx"],
                backends=["ort-cpu", "ort-cuda"],
                recipe="export",
                accuracy=[acc("onnxruntime")],
            ),
            Variant(
                id="ov-fp32",
                format="openvino",
                precision="fp32",
                files=["openvino/model.xml"],
                backends=["ov-cpu"],
                recipe="convert",
                accuracy=[acc("openvino"), acc("openvino", "bf16")],
            ),
        ],
        files=[],
        provenance=Provenance(
            source_kind="onnx", source="t", source_sha256="0" * 64, created_at="2026-01-01T00:00:00Z"
        ),
        samples=samples,
    )


def probes(ov_bf16: bool = True) -> list[Probe]:
    return [
        Probe("ort-cpu", True, "ok", "onnxruntime", "cpu", speed_class=1),
        Probe("ort-cuda", False, "no GPU", "onnxruntime", "cuda:0", speed_class=4),
        Probe(
            "ov-cpu",
            True,
            "ok",
            "openvino",
            "CPU",
            precisions=("fp32", "bf16") if ov_bf16 else ("fp32",),
            formats=("onnx", "openvino"),
            speed_class=2,
        ),
    ]


SAMPLES: dict[str, npt.NDArray[np.generic]] = {
    "x": np.ones((3, 4), dtype=np.float32),
    "unused": np.zeros((3,), dtype=np.int64),
}


def opener(clock: Clock, costs: dict[Candidate, float], broken: dict[Candidate, str] | None = None) -> Any:
    opened: dict[Candidate, FakeSession] = {}

    def open_session(cand: Candidate) -> FakeSession:
        if broken and cand in broken and broken[cand] == "open":
            raise BackendError(f"{cand.backend}: cannot load the model: bad IR version")
        session = FakeSession(cand.backend, costs[cand], clock, fail_on_run=bool(broken and broken.get(cand) == "run"))
        opened[cand] = session
        return session

    open_session.opened = opened  # type: ignore[attr-defined]
    return open_session


ORT = Candidate("ort-cpu", "onnx-fp32", "fp32")
OV32 = Candidate("ov-cpu", "ov-fp32", "fp32")
OV16 = Candidate("ov-cpu", "ov-fp32", "bf16")


def test_autotune_keeps_the_fastest_median(tmp_path: Path) -> None:
    pkg = Pkg(make_manifest(), "a" * 64, tmp_path)
    ranked = rank(probes(), pkg.manifest, Preference())
    assert ranked.choice == OV16  # by class: ov-cpu (2) bf16 first
    clock = Clock()
    costs = {ORT: 0.002, OV32: 0.010, OV16: 0.004}
    open_session = opener(clock, costs)
    tuned = autotune(pkg, ranked, open_session, SAMPLES, warmup=2, runs=5, clock=clock)
    assert tuned.source == "autotune"
    assert tuned.choice == ORT
    assert [v.candidate for v in tuned.admissible] == [ORT, OV16, OV32]
    first = tuned.admissible[0]
    assert "median 2.000 ms over 5 runs of batch 3" in first.reason
    assert first.score == pytest.approx(3 / 0.002)
    # rejections of the ranking are kept
    assert {v.candidate for v in tuned.rejected} == {v.candidate for v in ranked.rejected}
    # every session ran warmup + runs times and was closed; inputs limited to the session's inputs
    for session in open_session.opened.values():
        assert session.runs == 7
        assert session.closed
        assert session.seen == [{"x"}] * 7


def test_autotune_rejects_candidates_that_fail(tmp_path: Path) -> None:
    pkg = Pkg(make_manifest(), "a" * 64, tmp_path)
    ranked = rank(probes(), pkg.manifest, Preference())
    clock = Clock()
    costs = {ORT: 0.001, OV32: 0.010, OV16: 0.004}
    open_session = opener(clock, costs, broken={ORT: "open", OV16: "run"})
    tuned = autotune(pkg, ranked, open_session, SAMPLES, warmup=0, runs=3, clock=clock)
    assert tuned.choice == OV32
    assert "autotune: could not open: ort-cpu: cannot load the model: bad IR version" in tuned.verdict(ORT).reason  # type: ignore[union-attr]
    bad = tuned.verdict(OV16)
    assert bad is not None and not bad.admissible
    assert "failed on the package samples: kernel not implemented" in bad.reason
    assert open_session.opened[OV16].closed


def test_autotune_with_nothing_that_works(tmp_path: Path) -> None:
    pkg = Pkg(make_manifest(), "a" * 64, tmp_path)
    ranked = rank(probes(ov_bf16=False), pkg.manifest, Preference())
    clock = Clock()
    open_session = opener(clock, {}, broken={ORT: "open", OV32: "open"})
    tuned = autotune(pkg, ranked, open_session, SAMPLES, clock=clock)
    assert tuned.choice is None
    assert not tuned.admissible
    with pytest.raises(ValueError, match="runs"):
        autotune(pkg, ranked, open_session, SAMPLES, runs=0)


def write_samples(root: Path, rel: str = "samples/samples.npz") -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    np.savez(root / rel, x=SAMPLES["x"], unused=SAMPLES["unused"])


def test_load_samples(tmp_path: Path) -> None:
    write_samples(tmp_path)
    got = load_samples(Pkg(make_manifest(), "a" * 64, tmp_path))
    assert got is not None
    assert set(got) == {"x", "unused"}
    np.testing.assert_array_equal(got["x"], SAMPLES["x"])
    assert got["unused"].dtype == np.int64
    assert load_samples(Pkg(make_manifest(samples=None), "a" * 64, tmp_path)) is None


def test_load_samples_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"samples file samples/samples.npz is missing .*re-export"):
        load_samples(Pkg(make_manifest(), "a" * 64, tmp_path))
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "samples.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(PackageError, match=r"not a readable \.npz"):
        load_samples(Pkg(make_manifest(), "a" * 64, tmp_path))
    with pytest.raises(UnsafePathError, match="leaves the package"):
        load_samples(Pkg(make_manifest(samples="../outside.npz"), "a" * 64, tmp_path))
    # object arrays need pickle: refused
    np.savez(tmp_path / "samples" / "samples.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(PackageError, match=r"not a readable \.npz"):
        load_samples(Pkg(make_manifest(), "a" * 64, tmp_path))


def decision_of(*cands: Candidate) -> Decision:
    from runtime.selection import Verdict

    verdicts = tuple(Verdict(c, True, f"#{i}", float(10 - i)) for i, c in enumerate(cands))
    return Decision(choice=cands[0], verdicts=verdicts, source="autotune")


def test_cache_put_get_clear(tmp_path: Path) -> None:
    cache = DecisionCache(tmp_path / "cache" / "decisions.json")
    assert cache.get("k1") is None
    assert cache.clear() == 0
    d = decision_of(ORT, OV32)
    cache.put("k1", d)
    cache.put("k2", decision_of(OV32))
    got = cache.get("k1")
    assert got is not None
    assert got.source == "cache"
    assert got.choice == ORT
    assert got.verdicts == d.verdicts
    assert cache.keys() == ["k1", "k2"]
    assert cache.clear("k1") == 1
    assert cache.clear("k1") == 0
    assert cache.get("k1") is None and cache.get("k2") is not None
    assert cache.clear() == 1
    assert cache.keys() == []
    # no temp files left behind
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["decisions.json"]


def test_cache_survives_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "decisions.json"
    path.write_text("{not json")
    cache = DecisionCache(path)
    assert cache.get("k") is None
    cache.put("k", decision_of(ORT))
    assert cache.get("k") is not None
    path.write_text(json.dumps({"format": 99, "entries": {}}))
    assert cache.get("k") is None
    path.write_text(json.dumps({"format": 1, "entries": {"k": {"choice": None}}}))
    assert cache.get("k") is None


def test_cache_key_parts() -> None:
    key = cache_key("f" * 8, "s" * 8, Preference())
    assert key.startswith("ffffffff:ssssssss:")
    assert key != cache_key("f" * 8, "s" * 8, Preference(objective="latency"))


def test_decide_cache_hit_force_and_fingerprint(tmp_path: Path) -> None:
    write_samples(tmp_path)
    pkg = Pkg(make_manifest(), "a" * 64, tmp_path)
    cache = DecisionCache(tmp_path / "decisions.json")
    clock = Clock()
    costs = {ORT: 0.003, OV32: 0.010, OV16: 0.004}
    calls: list[Candidate] = []
    base = opener(clock, costs)

    def open_session(cand: Candidate) -> FakeSession:
        calls.append(cand)
        session: FakeSession = base(cand)
        return session

    kw: dict[str, Any] = {"cache": cache, "open_session": open_session, "clock": clock, "runs": 3, "warmup": 0}
    # no autotune: the ranking, nothing cached
    d0 = decide(pkg, probes(), Preference(), fingerprint="box1", autotune=False, force=False, **kw)
    assert (d0.source, d0.choice, calls, cache.keys()) == ("rank", OV16, [], [])
    # autotune (samples come from the package): timed and cached
    d1 = decide(pkg, probes(), Preference(), fingerprint="box1", autotune=True, force=False, **kw)
    assert (d1.source, d1.choice) == ("autotune", ORT)
    assert len(calls) == 3
    assert cache.keys() == [cache_key("box1", pkg.sha256, Preference())]
    # hit: nothing is opened
    costs[OV16] = 0.001
    d2 = decide(pkg, probes(), Preference(), fingerprint="box1", autotune=True, force=False, **kw)
    assert (d2.source, d2.choice, len(calls)) == ("cache", ORT, 3)
    # without autotune the cache is not read: the ranking (review 14: `autotune = false` after a
    # `serve --autotune` still served the cached pick, "decided by cache")
    d3 = decide(pkg, probes(), Preference(), fingerprint="box1", autotune=False, force=False, **kw)
    assert (d3.source, d3.choice) == ("rank", OV16)
    assert recall(pkg, probes(), Preference(), fingerprint="box1", cache=cache).source == "cache"
    # force re-times and overwrites
    d4 = decide(pkg, probes(), Preference(), fingerprint="box1", autotune=True, force=True, **kw)
    assert (d4.source, d4.choice, len(calls)) == ("autotune", OV16, 6)
    assert cache.get(cache_key("box1", pkg.sha256, Preference())).choice == OV16  # type: ignore[union-attr]
    # another box (fingerprint) or another package or preference: miss
    assert recall(pkg, probes(), Preference(), fingerprint="box2", cache=cache).source == "rank"
    other = Pkg(pkg.manifest, "b" * 64, tmp_path)
    assert recall(other, probes(), Preference(), fingerprint="box1", cache=cache).source == "rank"
    latency = Preference(objective="latency")
    assert recall(pkg, probes(), latency, fingerprint="box1", cache=cache).source == "rank"
    # cached choice no longer admissible (bf16 gone from this box): re-decided
    d6 = recall(pkg, probes(ov_bf16=False), Preference(), fingerprint="box1", cache=cache)
    assert (d6.source, d6.choice) == ("rank", OV32)
    # clear one: miss again
    assert cache.clear(cache_key("box1", pkg.sha256, Preference())) == 1
    assert recall(pkg, probes(), Preference(), fingerprint="box1", cache=cache).source == "rank"
    assert len(calls) == 6  # recall never times


def test_decide_without_samples_falls_back_to_ranking(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pkg = Pkg(make_manifest(samples=None), "a" * 64, tmp_path)
    cache = DecisionCache(tmp_path / "decisions.json")
    d = decide(pkg, probes(), Preference(), fingerprint="f", cache=cache, autotune=True, force=False, open_session=None)
    assert d.source == "rank" and d.choice == OV16
    assert "the package has no samples" in caplog.text
    assert cache.keys() == []


def test_decide_with_nothing_admissible(tmp_path: Path) -> None:
    pkg = Pkg(make_manifest(), "a" * 64, tmp_path)
    d = decide(pkg, probes(), Preference(backend="ort-cuda"), fingerprint="f", autotune=True, force=False)
    assert d.choice is None
    assert "no GPU" in d.verdict(Candidate("ort-cuda", "onnx-fp32", "fp32")).reason  # type: ignore[union-attr]


# --------------------------------------------------------------------------- real sessions


@pytest.fixture(scope="module")
def real_package(tiny_mlp: Path, tiny_mlp_ir: Path, tmp_path_factory: pytest.TempPathFactory) -> Package:
    import shutil

    from runtime.package import finalize_package, staging_dir

    repo = tmp_path_factory.mktemp("repo")
    staging = staging_dir(repo)
    (staging / "onnx").mkdir()
    shutil.copy(tiny_mlp, staging / "onnx" / "model.onnx")
    (staging / "openvino").mkdir()
    shutil.copy(tiny_mlp_ir, staging / "openvino" / "model.xml")
    shutil.copy(tiny_mlp_ir.with_suffix(".bin"), staging / "openvino" / "model.bin")
    (staging / "samples").mkdir()
    np.savez(staging / "samples" / "samples.npz", x=np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32))
    base = make_manifest()
    man = msgspec.structs.replace(
        base,
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 8])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[-1, 4])],
        variants=[
            msgspec.structs.replace(base.variants[0], backends=["ort-cpu", "ort-cuda", "ort-tensorrt", "ov-cpu"]),
            msgspec.structs.replace(
                base.variants[1], files=["openvino/model.xml", "openvino/model.bin"], accuracy=[acc("openvino")]
            ),
        ],
    )
    return finalize_package(staging, man, repo)


def test_autotune_real_sessions_and_cache(real_package: Package, tmp_path: Path) -> None:
    from runtime.autotune import session_opener
    from runtime.backends.registry import probe_all

    probes = probe_all()
    cache = DecisionCache(tmp_path / "decisions.json")
    opened: list[Candidate] = []
    real_open = session_opener(real_package, threads=1)

    def open_session(cand: Candidate) -> Any:
        opened.append(cand)
        return real_open(cand)

    d = decide(
        real_package,
        probes,
        Preference(),
        fingerprint="this-box",
        cache=cache,
        autotune=True,
        force=False,
        open_session=open_session,
        warmup=1,
        runs=3,
    )
    assert d.source == "autotune"
    tuned = {str(v.candidate) for v in d.admissible}
    assert tuned == {"ort-cpu/onnx-fp32/fp32", "ov-cpu/ov-fp32/fp32"}
    assert set(map(str, opened)) == tuned
    assert d.choice is not None and str(d.choice) in tuned
    for v in d.admissible:
        assert "autotuned: median" in v.reason and "batch 4" in v.reason and v.score > 0
    medians = [v.score for v in d.admissible]
    assert medians == sorted(medians, reverse=True)  # fastest (most items/s) first
    rejected = {str(v.candidate): v.reason for v in d.rejected}
    assert "not usable here" in rejected["ort-cuda/onnx-fp32/fp32"]
    ov_cpu = next(p for p in probes if p.name == "ov-cpu")
    if "bf16" in ov_cpu.precisions:  # a CPU with bf16 (AVX512_BF16 / AMX): offered, but never validated
        assert "accuracy never validated for openvino/bf16" in rejected["ov-cpu/ov-fp32/bf16"]
    else:  # no bf16 here: not a candidate at all
        assert not any(c.endswith("/bf16") for c in rejected) and not any(c.endswith("/bf16") for c in tuned)
    assert "never validated for openvino/fp32 (it passed on onnxruntime/fp32)" in rejected["ov-cpu/onnx-fp32/fp32"]
    # second call: the cache answers, nothing is opened
    again = decide(
        real_package,
        probes,
        Preference(),
        fingerprint="this-box",
        cache=cache,
        autotune=True,
        force=False,
        open_session=open_session,
    )
    assert again.source == "cache" and again.choice == d.choice
    assert len(opened) == 2
