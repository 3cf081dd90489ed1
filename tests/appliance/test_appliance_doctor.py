"""``inferbox doctor`` on a real repository holding a tiny real package (real probes, real verification)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

from appliance.cli import main
from runtime.backends.registry import probe_all
from runtime.hardware import default_threads, int8_saturates, probe_hardware
from runtime.manifest import Accuracy, Manifest, Provenance, TensorSpec, Variant
from runtime.package import Package, finalize_package, staging_dir


def _tiny_onnx(path: Path) -> None:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _passed(runtime: str) -> Accuracy:
    return Accuracy(
        runtime=runtime,  # type: ignore[arg-type]
        exec_precision="fp32",
        samples=4,
        metrics={"max_abs_diff": 1e-7},
        gate={"max_max_abs_diff": 1e-4},
        passed=True,
        reference="onnx-fp32",
    )


def build_package(repo: Path) -> Package:
    import openvino as ov

    staging = staging_dir(repo)
    (staging / "onnx").mkdir()
    (staging / "openvino").mkdir()
    (staging / "samples").mkdir()
    _tiny_onnx(staging / "onnx" / "model.onnx")
    ov.save_model(ov.convert_model(str(staging / "onnx" / "model.onnx")), str(staging / "openvino" / "model.xml"))
    np.savez(staging / "samples" / "samples.npz", x=np.ones((2, 4), dtype=np.float32))
    manifest = Manifest(
        name="tiny",
        version=1,
        task="tensor",
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 3])],
        variants=[
            Variant(
                id="onnx-fp32",
                format="onnx",
                precision="fp32",
                files=["onnx/model.onnx"],
                backends=["ort-cpu", "ort-cuda", "ort-tensorrt"],
                recipe="onnx.helper",
                accuracy=[_passed("onnxruntime")],
            ),
            Variant(
                id="ov-fp32",
                format="openvino",
                precision="fp32",
                files=["openvino/model.xml", "openvino/model.bin"],
                backends=["ov-cpu", "ov-auto"],
                recipe="ov.convert_model",
                accuracy=[_passed("openvino")],
            ),
        ],
        files=[],
        provenance=Provenance(
            source_kind="onnx", source="tiny.onnx", source_sha256="0" * 64, created_at="2026-11-28T00:00:00Z"
        ),
        samples="samples/samples.npz",
    )
    return finalize_package(staging, manifest, repo)


@pytest.fixture(scope="module")
def built_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("doctor-home")
    build_package(home / "models")
    return home


@pytest.fixture
def home(built_home: Path, tmp_path: Path) -> Path:
    """A private copy of the built home (tests may tamper with it)."""
    copy = tmp_path / "home"
    shutil.copytree(built_home, copy)
    return copy


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import os

    for key in list(os.environ):
        if key.startswith("INFERBOX_") or key == "STATE_DIRECTORY":
            monkeypatch.delenv(key)
    yield


def doctor(*args: str) -> Result:
    return CliRunner().invoke(main, ["doctor", *args], catch_exceptions=False)


def doctor_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = doctor("--json", *args)
    return result.exit_code, json.loads(result.output)


def test_text_report(home: Path) -> None:
    result = doctor("--home", str(home))
    out = result.output
    assert result.exit_code == 0, out
    # hardware: ISA flags marked present/absent, runtimes, memory
    for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"):
        assert f"{flag} yes" in out or f"{flag} no" in out
    assert "onnxruntime: 1." in out and "CPUExecutionProvider" in out
    assert "openvino:    20" in out and "CPU" in out
    assert "GiB total" in out and "fingerprint: " in out
    hw = probe_hardware()
    assert ("int8:        saturating on 8-bit weights" in out) is hw.int8_saturates()
    assert ("int8:        exact" in out) is not hw.int8_saturates()
    # probes
    assert "[usable]   ort-cpu" in out
    assert "[usable]   ov-cpu" in out
    assert "[rejected] ort-cuda      CUDAExecutionProvider not in this onnxruntime build" in out
    # the model, its choice, its rejections
    assert f"tiny/1  ({home / 'models' / 'tiny' / '1'}; sha256 " in out
    assert "choice: ov-cpu/ov-fp32/fp32 (by rank)" in out
    cores = default_threads()
    serving = (
        f"2 streams x {cores // 2} thread{'s' if cores // 2 > 1 else ''} + 1 session x {cores} threads"
        if cores >= 2
        else "1 session x 1 thread"
    )
    assert f"    serving: {serving} (settings streams, threads)" in out
    assert "[admissible] ort-cpu/onnx-fp32/fp32: #" in out
    assert "[rejected]   ort-cuda/* (" in out
    assert "[rejected]   ov-cpu/onnx-fp32/fp32: variant onnx-fp32 of tiny is allowed on ort-cpu, ort-cuda" in out
    assert "[rejected]   fake/* (" in out and "the fake backend is for tests" in out
    assert "PROBLEM" not in out


def test_json_report(home: Path) -> None:
    code, data = doctor_json("--home", str(home))
    assert code == 0
    assert set(data) == {
        "hardware",
        "backends",
        "preference",
        "repository",
        "models",
        "server",
        "storage",
        "ok",
        "hint",
    }
    assert data["server"]["tls"] == "off" and data["server"]["problem"] is None
    assert data["ok"] is True and data["hint"] is None
    hw = data["hardware"]
    assert {"cpu_model", "cpu_flags", "physical_cores", "memory_total_bytes", "numa_nodes", "fingerprint"} <= set(hw)
    assert hw["int8_saturates"] is int8_saturates(tuple(hw["cpu_flags"]))
    assert hw["onnxruntime"]["version"].startswith("1.")
    assert "CPU" in [d["name"] for d in hw["openvino"]["devices"]]
    backends = {b["name"]: b for b in data["backends"]}
    assert backends["ort-cpu"]["usable"] and backends["ov-cpu"]["usable"]
    assert not backends["ort-cuda"]["usable"] and backends["ort-cuda"]["reason"]
    [model] = data["models"]
    assert (model["name"], model["version"], model["ok"], model["error"], model["runnable"]) == (
        "tiny",
        1,
        True,
        None,
        True,
    )
    assert model["choice"] == "ov-cpu/ov-fp32/fp32" and model["source"] == "rank"
    cores = default_threads()
    assert model["serving"] == {
        "streams": 2 if cores >= 2 else 1,
        "threads_per_stream": max(1, cores // 2) if cores >= 2 else cores,
        "all_core_threads": cores,
    }
    verdicts = {v["candidate"]: v for v in model["verdicts"]}
    assert verdicts["ov-cpu/ov-fp32/fp32"]["admissible"]
    assert verdicts["ort-cpu/onnx-fp32/fp32"]["admissible"]
    cuda = verdicts["ort-cuda/onnx-fp32/fp32"]
    assert not cuda["admissible"] and "backend not usable here" in cuda["reason"]
    assert cuda["backend"] == "ort-cuda" and cuda["exec_precision"] == "fp32"
    assert model["verdicts"][0]["candidate"] == model["choice"]


def test_forced_backend(home: Path) -> None:
    code, data = doctor_json("--home", str(home), "--backend", "ort-cpu")
    assert code == 0
    assert data["preference"]["backend"] == "ort-cpu"
    assert data["models"][0]["choice"] == "ort-cpu/onnx-fp32/fp32"
    code, data = doctor_json("--home", str(home), "--backend", "fake")
    assert code == 0
    assert data["preference"]["allow_fake"] is True
    assert data["models"][0]["choice"] == "fake/onnx-fp32/fp32"
    result = doctor("--home", str(home), "--backend", "ort-cuda")
    assert result.exit_code == 1
    assert "choice: NONE" in result.output
    assert "PROBLEM: cannot run tiny/1" in result.output
    assert "[rejected]   ort-cuda/* (2 candidates): backend not usable here" in result.output
    # two variants, each in every precision OpenVINO's CPU computes here (fp32, and bf16 where the ISA has it)
    ov_cpu = next(p for p in probe_all() if p.name == "ov-cpu")
    n_ov = 2 * len(ov_cpu.precisions)
    assert f"[rejected]   ov-cpu/* ({n_ov} candidates): backend is forced to ort-cuda" in result.output


def test_unknown_backend_is_a_usage_error(home: Path) -> None:
    result = CliRunner().invoke(main, ["doctor", "--home", str(home), "--backend", "cuda"])
    assert result.exit_code == 2
    assert "'cuda' is not a backend; use auto or one of ort-cpu" in result.output


def test_tampered_package_exits_1_and_names_the_file(home: Path) -> None:
    model = home / "models" / "tiny" / "1" / "onnx" / "model.onnx"
    model.chmod(0o644)
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    result = doctor("--home", str(home))
    assert result.exit_code == 1
    assert "REFUSED: IntegrityError" in result.output
    assert "onnx/model.onnx" in result.output
    code, report = doctor_json("--home", str(home))
    assert code == 1 and report["ok"] is False
    assert report["models"][0]["ok"] is False and "IntegrityError" in report["models"][0]["error"]


def test_empty_repository_hints_at_init(tmp_path: Path) -> None:
    result = doctor("--home", str(tmp_path))
    assert result.exit_code == 0
    assert f"no models in {tmp_path / 'models'}: run `inferbox init` to build the default model" in result.output
    code, data = doctor_json("--home", str(tmp_path))
    assert code == 0 and data["models"] == [] and "inferbox init" in data["hint"]


def test_one_package_folder(home: Path, tmp_path: Path) -> None:
    folder = home / "models" / "tiny" / "1"
    code, data = doctor_json("--home", str(tmp_path / "elsewhere"), "--package", str(folder))
    assert code == 0
    assert [m["name"] for m in data["models"]] == ["tiny"]
    assert data["models"][0]["choice"] == "ov-cpu/ov-fp32/fp32"
    (folder / "stray.txt").write_text("not listed")
    result = doctor("--home", str(tmp_path / "elsewhere"), "--package", str(folder))
    assert result.exit_code == 1
    assert "stray.txt" in result.output


def test_cached_autotune_decision_is_shown(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.autotune import DecisionCache, cache_key
    from runtime.hardware import probe_hardware
    from runtime.loader import LoaderOptions, preference_for
    from runtime.selection import Candidate, Decision, Verdict

    _, before = doctor_json("--home", str(home))
    sha = before["models"][0]["sha256"]
    chosen = Candidate("ort-cpu", "onnx-fp32", "fp32")
    tuned = Decision(
        choice=chosen, verdicts=(Verdict(chosen, True, "autotuned: median 0.010 ms", 1e5),), source="autotune"
    )
    cache = DecisionCache(home / "cache" / "decisions.json")
    # keyed by the preference `serve` ranks with (streams auto: the stream timings)
    cache.put(cache_key(probe_hardware().fingerprint(), sha, preference_for(LoaderOptions(streams=0))), tuned)
    # `serve` reads the cache only with autotune on (review 14), and doctor shows what it would run
    result = doctor("--home", str(home))
    assert result.exit_code == 0
    assert "(by cache)" not in result.output and "autotuned: median" not in result.output
    monkeypatch.setenv("INFERBOX_AUTOTUNE", "true")
    result = doctor("--home", str(home))
    assert result.exit_code == 0
    assert "choice: ort-cpu/onnx-fp32/fp32 (by cache)" in result.output
    assert "autotuned: median 0.010 ms" in result.output


def test_unsigned_package_refused_when_a_public_key_is_set(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.signing import generate_private_key, public_key_pem

    pub = home / "trusted.pub"
    pub.write_text(public_key_pem(generate_private_key()))
    monkeypatch.setenv("INFERBOX_PUBLIC_KEY", str(pub))
    code, data = doctor_json("--home", str(home))
    assert code == 1
    assert "SignatureError" in data["models"][0]["error"]
    assert "manifest.sig" in data["models"][0]["error"]


def test_an_unreadable_model_folder_is_reported_and_the_others_still_are(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model folder doctor cannot list (root copied it in, mode 0700) is one refused row naming the fix;
    the models beside it are still verified and decided for (the repository's one walk, `folders`)."""
    import os

    from runtime import package as package_mod

    (home / "models" / "locked" / "1").mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        if Path(str(path)) == home / "models" / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(package_mod.os, "scandir", scandir)
    code, report = doctor_json("--home", str(home))
    assert code == 1
    rows = {m["name"]: m for m in report["models"]}
    assert rows["tiny"]["ok"] is True and rows["tiny"]["choice"]
    assert rows["locked"]["ok"] is False and "chown -R inferbox:" in rows["locked"]["error"]


def _filesystem(free: int, total: int = 100 << 30, read_only: bool = False) -> os.statvfs_result:
    block = 4096
    flag = os.ST_RDONLY if read_only else 0
    return os.statvfs_result((block, block, total // block, free // block, free // block, 1000, 1000, 1000, flag, 255))


@pytest.mark.parametrize(
    ("free", "read_only", "exit_code", "said"),
    [
        (50 << 30, False, 0, "50.0 GiB free of 100.0 GiB"),
        (600 << 20, False, 0, "WARNING: 600.0 MiB free"),
        (10 << 20, False, 1, "PROBLEM: 10.0 MiB free on the file system"),
        (50 << 30, True, 1, "is mounted read-only"),
    ],
    ids=["roomy", "low", "full", "read-only"],
)
def test_storage_the_audit_log_needs_is_checked(
    home: Path, monkeypatch: pytest.MonkeyPatch, free: int, read_only: bool, exit_code: int, said: str
) -> None:
    """A full disk made every request a 503 (the audit log refuses records) and doctor said nothing and
    exited 0."""
    import appliance.commands.doctor as module

    real = os.statvfs
    monkeypatch.setattr(
        module.os, "statvfs", lambda p: _filesystem(free, read_only=read_only) if Path(p) == home else real(p)
    )
    result = doctor("--home", str(home))
    assert result.exit_code == exit_code, result.output
    assert said in result.output
    code, report = doctor_json("--home", str(home))
    assert code == exit_code and report["storage"]["free_bytes"] == free and report["ok"] is (exit_code == 0)


def test_an_audit_log_this_user_cannot_read_is_a_warning_not_a_traceback(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Path.is_file

    def denied(self: Path) -> bool:
        if self.name.startswith("audit.db"):
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "is_file", denied)
    result = doctor("--home", str(home))
    assert "Traceback" not in result.output and "cannot be read by this user (Permission denied)" in result.output
    code, report = doctor_json("--home", str(home))
    assert code == 0 and report["storage"]["audit_db_bytes"] is None and report["storage"]["problem"] is None
