from __future__ import annotations

import json
import stat
from pathlib import Path

import msgspec
import pytest

from runtime.hardware import (
    ISA_FLAGS,
    GpuInfo,
    HardwareProfile,
    OrtInfo,
    default_threads,
    int8_saturates,
    local_cpu_flags,
    parse_cpu_flags,
    parse_cpu_model,
    parse_nvidia_smi,
    probe_hardware,
)

SPR_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t: 0
flags\t\t: fpu vme sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8 ht

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t: 0
flags\t\t: fpu vme sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8 ht
"""

OLD_CPUINFO = """\
processor\t: 0
model name\t: Intel(R) Core(TM) i5-4590 CPU @ 3.30GHz
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_parse_cpu_flags_spr_has_all_flags_in_table_order() -> None:
    assert parse_cpu_flags(SPR_CPUINFO) == ISA_FLAGS
    assert parse_cpu_model(SPR_CPUINFO) == "Intel(R) Xeon(R) Platinum 8480+"


def test_parse_cpu_flags_old_cpu_and_garbage() -> None:
    assert parse_cpu_flags(OLD_CPUINFO) == ("avx2",)
    assert parse_cpu_flags("") == ()
    assert parse_cpu_flags("no colon here\nflagsavx2") == ()
    assert parse_cpu_model("") == "unknown"
    # ARM spelling
    assert parse_cpu_flags("Features\t: fp asimd avx2\n") == ("avx2",)


def test_probe_reads_cpu_flags_of_this_box(hardware: HardwareProfile) -> None:
    text = Path("/proc/cpuinfo").read_text()
    first_flags = next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split()
    expected = tuple(f for f in ISA_FLAGS if f in first_flags)
    assert hardware.cpu_flags == expected
    for flag in ("avx512f", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"):
        assert hardware.has_flag(flag) == (flag in first_flags)
    assert hardware.cpu_model == parse_cpu_model(text)


def test_probe_facts_of_this_box(hardware: HardwareProfile) -> None:
    assert hardware.logical_cores >= hardware.physical_cores >= 1
    assert hardware.memory_total_bytes >= hardware.memory_available_bytes > 0
    assert hardware.onnxruntime is not None
    assert "CPUExecutionProvider" in hardware.onnxruntime.providers
    assert hardware.openvino is not None
    assert "CPU" in [d.name for d in hardware.openvino.devices]
    cpu = hardware.ov_device("CPU")
    assert cpu is not None and "FP32" in cpu.capabilities
    assert cpu.default_precision in ("fp32", "bf16", "fp16")
    if Path("/sys/devices/system/node/node0").exists():
        assert 0 in hardware.numa_nodes
    assert 1 <= default_threads() <= hardware.physical_cores


def test_probe_with_missing_files_records_facts(tmp_path: Path) -> None:
    profile = probe_hardware(cpuinfo_path=tmp_path / "nope", node_dir=tmp_path / "nonode")
    assert profile.cpu_flags == ()
    assert profile.numa_nodes == ()
    assert any("cannot read" in n for n in profile.notes)


def test_numa_nodes_from_sysfs_layout(tmp_path: Path) -> None:
    for name in ("node0", "node1", "possible", "nodeX"):
        (tmp_path / name).mkdir()
    assert probe_hardware(node_dir=tmp_path).numa_nodes == (0, 1)


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_nvidia_smi_output_is_parsed(tmp_path: Path) -> None:
    smi = _script(tmp_path, 'echo "NVIDIA H200, 143771 MiB, 570.86.15"; echo "NVIDIA L4, 23034 MiB, 570.86.15"')
    profile = probe_hardware(nvidia_smi=smi)
    assert profile.nvidia_smi == smi
    assert profile.gpus == (
        GpuInfo(name="NVIDIA H200", memory_total_mib=143771, driver_version="570.86.15"),
        GpuInfo(name="NVIDIA L4", memory_total_mib=23034, driver_version="570.86.15"),
    )


def test_failing_nvidia_smi_is_a_note_not_an_error(tmp_path: Path) -> None:
    smi = _script(tmp_path, "echo 'NVIDIA-SMI has failed because it could not communicate' >&2; exit 9")
    profile = probe_hardware(nvidia_smi=smi)
    assert profile.gpus == ()
    assert any("nvidia-smi exited 9" in n for n in profile.notes)
    missing = probe_hardware(nvidia_smi=str(tmp_path / "absent-smi"))
    assert missing.gpus == () and any("nvidia-smi failed to run" in n for n in missing.notes)


def test_parse_nvidia_smi_skips_garbage() -> None:
    assert parse_nvidia_smi("\nnot a row\nTesla T4, [N/A], 535.1\n") == (
        GpuInfo(name="Tesla T4", memory_total_mib=None, driver_version="535.1"),
    )


def test_fingerprint_ignores_memory_but_not_stable_facts(hardware: HardwareProfile) -> None:
    again = probe_hardware()
    assert again.fingerprint() == hardware.fingerprint()
    assert len(hardware.fingerprint()) == 64
    less_memory = msgspec.structs.replace(hardware, memory_available_bytes=1)
    assert less_memory.fingerprint() == hardware.fingerprint()
    other_flags = msgspec.structs.replace(hardware, cpu_flags=(*hardware.cpu_flags, "made_up"))
    assert other_flags.fingerprint() != hardware.fingerprint()
    with_gpu = msgspec.structs.replace(hardware, gpus=(GpuInfo(name="NVIDIA L4"),))
    assert with_gpu.fingerprint() != hardware.fingerprint()
    other_ort = msgspec.structs.replace(hardware, onnxruntime=OrtInfo(version="0", providers=("CPUExecutionProvider",)))
    assert other_ort.fingerprint() != hardware.fingerprint()


def test_to_dict_is_json(hardware: HardwareProfile) -> None:
    data = json.loads(json.dumps(hardware.to_dict()))
    assert data["fingerprint"] == hardware.fingerprint()
    assert data["cpu_flags"] == list(hardware.cpu_flags)
    assert data["onnxruntime"]["providers"] == list(hardware.onnxruntime.providers)  # type: ignore[union-attr]
    assert msgspec.convert({k: v for k, v in data.items() if k != "fingerprint"}, HardwareProfile) == hardware


def test_missing_library_is_a_recorded_fact(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name in ("onnxruntime", "openvino"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", fake_import)
    profile = probe_hardware()
    assert profile.onnxruntime is None and profile.openvino is None
    assert any(n.startswith("onnxruntime not installed") and "pip install inferbox" in n for n in profile.notes)
    assert any(n.startswith("openvino not installed") for n in profile.notes)


AVX2_NO_VNNI_CPUINFO = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
ZEN4_CPUINFO = "model name\t: AMD EPYC 9654\nflags\t\t: avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16\n"
ALDER_LAKE_CPUINFO = "model name\t: 12th Gen Intel(R) Core(TM) i7-12700\nflags\t\t: avx2 avx_vnni\n"


@pytest.mark.parametrize(
    ("cpuinfo", "saturates"),
    [
        (AVX2_NO_VNNI_CPUINFO, True),
        ("flags\t: avx2 avx512f avx512bw avx512vl\n", True),  # Skylake-SP: AVX-512 but no VNNI
        (ZEN4_CPUINFO, False),
        (ALDER_LAKE_CPUINFO, False),
        (SPR_CPUINFO, False),
        ("Features\t: fp asimd asimddp\n", False),  # ARM: its dot products do not saturate
        ("", False),  # unknown: nothing to go on
    ],
)
def test_int8_saturates_reads_vnni_from_the_flags(cpuinfo: str, saturates: bool) -> None:
    flags = parse_cpu_flags(cpuinfo)
    assert int8_saturates(flags) is saturates
    assert HardwareProfile(cpu_flags=flags).int8_saturates() is saturates


def test_local_cpu_flags_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(ALDER_LAKE_CPUINFO)
    assert local_cpu_flags(path) == ("avx2", "avx_vnni")
    assert local_cpu_flags(tmp_path / "missing") == ()


@pytest.mark.parametrize("cpuinfo", [AVX2_NO_VNNI_CPUINFO, ZEN4_CPUINFO])
def test_cpu_probes_say_whether_int8_saturates(cpuinfo: str) -> None:
    from runtime.backends.openvino import OpenVinoBackend
    from runtime.backends.ort import OrtBackend
    from runtime.hardware import OvDevice, OvInfo

    profile = HardwareProfile(
        cpu_flags=parse_cpu_flags(cpuinfo),
        onnxruntime=OrtInfo(version="1", providers=("CPUExecutionProvider", "CUDAExecutionProvider")),
        openvino=OvInfo(version="1", devices=(OvDevice(name="CPU", capabilities=("FP32", "INT8")),)),
        gpus=(GpuInfo(name="H200"),),
        nvidia_smi="/usr/bin/nvidia-smi",
    )
    saturates = int8_saturates(profile.cpu_flags)
    assert OrtBackend("ort-cpu").probe(profile).int8_saturates is saturates
    assert OpenVinoBackend("ov-cpu").probe(profile).int8_saturates is saturates
    assert OpenVinoBackend("ov-auto").probe(profile).int8_saturates is saturates
    cuda = OrtBackend("ort-cuda").probe(profile)
    assert cuda.usable and cuda.int8_saturates is False  # a GPU's INT8 is not the CPU's


def test_local_int8_saturates_fails_closed_when_the_flags_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import platform

    from runtime.hardware import local_int8_saturates

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    vnni = tmp_path / "vnni"
    vnni.write_text("flags\t\t: avx2 avx512_vnni\n")
    plain = tmp_path / "plain"
    plain.write_text("flags\t\t: avx2\n")
    no_flags = tmp_path / "noflags"
    no_flags.write_text("processor\t: 0\n")
    assert not local_int8_saturates(vnni)
    assert local_int8_saturates(plain)
    # export quantizes with 7-bit weights (exact everywhere) when VNNI cannot be shown
    assert local_int8_saturates(no_flags)
    assert local_int8_saturates(tmp_path / "missing")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not local_int8_saturates(no_flags)  # ARM's dot products do not saturate
