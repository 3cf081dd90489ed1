"""Unknown CPU flags fail closed on x86: a box whose /proc/cpuinfo cannot be read or has no flags line
(gVisor, ProcSubset=pid) is taken to saturate, so an INT8 variant that requires cpu-vnni is refused;
the probe says why in a note that ``inferbox doctor`` prints."""

from __future__ import annotations

import platform
from pathlib import Path

import msgspec
import pytest

from runtime.backends.openvino import OpenVinoBackend
from runtime.backends.ort import OrtBackend
from runtime.hardware import HardwareProfile, int8_saturates, probe_hardware
from runtime.selection import Preference, rank
from tests.runtime.test_runtime_selection import acc, manifest, timing, variant

NO_FLAGS = "processor\t: 0\nmodel name\t: Some x86\n\n"
AVX2_VNNI = "processor\t: 0\nmodel name\t: Some x86\nflags\t\t: fpu sse2 avx avx2 avx_vnni\n\n"


def _profile(tmp_path: Path, cpuinfo: str | None) -> HardwareProfile:
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    return probe_hardware(cpuinfo_path=path, nvidia_smi="/nonexistent/nvidia-smi")


@pytest.mark.parametrize("cpuinfo", [None, NO_FLAGS], ids=["unreadable", "no-flags-line"])
def test_unknown_flags_on_x86_saturate_and_refuse_a_vnni_variant(
    tmp_path: Path, cpuinfo: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    profile = _profile(tmp_path, cpuinfo)
    assert profile.cpu_flags == () and not profile.cpu_flags_known
    assert profile.int8_saturates()
    assert profile.to_dict()["int8_saturates"] is True
    (note,) = [n for n in profile.notes if "ISA flags unknown" in n]
    assert "cpu-vnni" in note and "refused" in note
    ort, ov = OrtBackend("ort-cpu").probe(profile), OpenVinoBackend("ov-cpu").probe(profile)
    assert ort.int8_saturates and ov.int8_saturates

    vnni_int8 = msgspec.structs.replace(
        variant("ov-int8", [acc("openvino", "fp32")], [timing("ov-cpu", "fp32", "b32-typical", 300.0)]),
        requires=["cpu-vnni"],
    )
    fp32 = variant("ov-fp32", [acc("openvino", "fp32")], [timing("ov-cpu", "fp32", "b32-typical", 100.0)])
    decision = rank([ov], manifest(fp32, vnni_int8), Preference(precisions=("fp32",)))
    assert str(decision.choice) == "ov-cpu/ov-fp32/fp32"
    (why,) = [str(v.reason) for v in decision.rejected if str(v.candidate) == "ov-cpu/ov-int8/fp32"]
    assert "ISA flags could not be read" in why


def test_unknown_flags_off_x86_do_not_saturate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    profile = _profile(tmp_path, None)
    assert not profile.cpu_flags_known and not profile.int8_saturates()
    assert any("ISA flags unknown" in n for n in profile.notes)


def test_known_flags_decide_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    profile = _profile(tmp_path, AVX2_VNNI)
    assert profile.cpu_flags_known and profile.cpu_flags == ("avx2", "avx_vnni")
    assert not profile.int8_saturates()
    assert not any("ISA flags unknown" in n for n in profile.notes)


def test_int8_saturates_with_unknown_flags() -> None:
    assert int8_saturates((), known=False, machine="x86_64") is True
    assert int8_saturates((), known=False, machine="AMD64") is True
    assert int8_saturates((), known=False, machine="aarch64") is False
    assert int8_saturates(()) is False  # known and empty: an x86 CPU without AVX2, as before
    assert HardwareProfile(cpu_flags_known=False, machine="x86_64").int8_saturates() is True
