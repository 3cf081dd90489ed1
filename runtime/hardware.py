"""What this box has: CPU, ISA flags, memory, NUMA, ONNX Runtime, OpenVINO, NVIDIA GPUs.

:func:`probe_hardware` never raises: a missing library or tool is a recorded
fact (``onnxruntime=None`` plus a note that says how to install it).  What a
library *lists* is not proof that it works (onnxruntime-gpu lists CUDA with no
GPU present); backends prove their choice after opening a session.

The profile is immutable; :meth:`HardwareProfile.fingerprint` hashes only the
facts that do not change while the box runs (not free memory), so that cached
decisions (autotune results) can be keyed on it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec

__all__ = [
    "ISA_FLAGS",
    "VNNI_FLAGS",
    "CpuBudget",
    "GpuInfo",
    "HardwareProfile",
    "OrtInfo",
    "OvDevice",
    "OvInfo",
    "cgroup_cpu_limit",
    "cpu_budget",
    "default_threads",
    "int8_saturates",
    "is_x86",
    "local_cpu_flags",
    "local_int8_saturates",
    "nvidia_gpus",
    "parse_cpu_flags",
    "parse_cpu_model",
    "parse_nvidia_smi",
    "probe_hardware",
]

logger = logging.getLogger(__name__)

#: The ISA flags that matter for inference speed, in /proc/cpuinfo spelling.
ISA_FLAGS: tuple[str, ...] = (
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)

#: x86 flags that give an exact u8 x s8 dot product (VPDPBUSD / AMX).  Without one, oneDNN
#: (OpenVINO) and MLAS (ONNX Runtime) use VPMADDUBSW, whose int16 pair sums saturate on
#: 8-bit weights: measured on all-MiniLM-L6-v2 (AVX2, no VNNI), static INT8 fell from a
#: passing cosine to min 0.93 / mean 0.984; with 7-bit weights it passes again.
VNNI_FLAGS: tuple[str, ...] = ("avx512_vnni", "avx_vnni", "amx_int8")

_OV_PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
_INSTALL_HINT = "pip install inferbox"


class OrtInfo(msgspec.Struct, frozen=True, kw_only=True):
    """ONNX Runtime as installed. ``providers`` is what it *lists*, not proof of use."""

    version: str
    providers: tuple[str, ...]


class OvDevice(msgspec.Struct, frozen=True, kw_only=True):
    """One OpenVINO device (``CPU``, ``GPU.0``, ``NPU``) and what it says it can do."""

    name: str
    full_name: str = ""
    #: OPTIMIZATION_CAPABILITIES, e.g. ("FP32", "BF16", "INT8")
    capabilities: tuple[str, ...] = ()
    #: the device's default INFERENCE_PRECISION_HINT in inferbox spelling (fp32 / bf16 / fp16)
    default_precision: str | None = None


class OvInfo(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    devices: tuple[OvDevice, ...]


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An NVIDIA GPU as nvidia-smi reports it."""

    name: str
    memory_total_mib: int | None = None
    driver_version: str = ""


class HardwareProfile(msgspec.Struct, frozen=True, kw_only=True):
    """Everything :func:`probe_hardware` found. Every field has a default so tests can build one."""

    cpu_model: str = "unknown"
    physical_cores: int = 1
    logical_cores: int = 1
    #: the subset of :data:`ISA_FLAGS` present, in that order
    cpu_flags: tuple[str, ...] = ()
    memory_total_bytes: int = 0
    memory_available_bytes: int = 0
    #: NUMA node ids visible under /sys/devices/system/node (empty when not visible)
    numa_nodes: tuple[int, ...] = ()
    onnxruntime: OrtInfo | None = None
    openvino: OvInfo | None = None
    gpus: tuple[GpuInfo, ...] = ()
    #: path of the nvidia-smi binary, None when absent
    nvidia_smi: str | None = None
    notes: tuple[str, ...] = ()
    #: False when /proc/cpuinfo could not be read or has no flags line: ``cpu_flags`` is then
    #: empty for want of knowledge, not because the CPU lacks them
    cpu_flags_known: bool = True
    #: ``platform.machine()`` (x86_64, aarch64, ...); empty when not probed
    machine: str = ""

    def has_flag(self, flag: str) -> bool:
        return flag in self.cpu_flags

    def int8_saturates(self) -> bool:
        """See :func:`int8_saturates`."""
        return int8_saturates(self.cpu_flags, known=self.cpu_flags_known, machine=self.machine)

    def ov_device(self, prefix: str) -> OvDevice | None:
        """The first OpenVINO device whose name is ``prefix`` or ``prefix.N`` (``GPU`` -> ``GPU.0``)."""
        if self.openvino is None:
            return None
        for d in self.openvino.devices:
            if d.name == prefix or d.name.startswith(prefix + "."):
                return d
        return None

    def fingerprint(self) -> str:
        """sha256 (hex) of the stable facts: CPU, flags, cores, ORT, OpenVINO, GPUs. Not memory."""
        stable = {
            "cpu_model": self.cpu_model,
            "cpu_flags": list(self.cpu_flags),
            "physical_cores": self.physical_cores,
            "logical_cores": self.logical_cores,
            "onnxruntime": msgspec.to_builtins(self.onnxruntime),
            "openvino": msgspec.to_builtins(self.openvino),
            "gpus": msgspec.to_builtins(self.gpus),
        }
        return hashlib.sha256(msgspec.json.encode(stable, order="sorted")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for ``--json``), with the fingerprint."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        out["fingerprint"] = self.fingerprint()
        out["int8_saturates"] = self.int8_saturates()
        return out


def parse_cpu_flags(cpuinfo: str) -> tuple[str, ...]:
    """The :data:`ISA_FLAGS` present in /proc/cpuinfo text (first ``flags`` line), in table order."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            present = set(value.split())
            return tuple(f for f in ISA_FLAGS if f in present)
    return ()


def is_x86(machine: str) -> bool:
    """``platform.machine()`` names an x86 CPU (x86_64, AMD64, i686, ...)."""
    m = machine.lower()
    return m in ("x86_64", "amd64", "x64", "x86") or bool(re.fullmatch(r"i[3-6]86", m))


def int8_saturates(cpu_flags: tuple[str, ...], *, known: bool = True, machine: str = "") -> bool:
    """True on an x86 CPU without VNNI / AMX, where INT8 kernels saturate on 8-bit weights.

    Read from the flags (x86 with AVX2 and none of :data:`VNNI_FLAGS`); False on a CPU
    that is not x86 (ARM's dot products do not saturate).  When the flags are not
    ``known`` (/proc/cpuinfo unreadable or without a flags line: gVisor, ``ProcSubset=pid``)
    on an x86 ``machine``, True: VNNI cannot be shown, so the box is taken to saturate
    (fail closed) rather than admit a variant that needs VNNI.
    """
    if not known:
        return is_x86(machine)
    return "avx2" in cpu_flags and not any(f in cpu_flags for f in VNNI_FLAGS)


def local_cpu_flags(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """:data:`ISA_FLAGS` of this machine (empty when /proc/cpuinfo cannot be read); cheap, no runtimes."""
    try:
        return parse_cpu_flags(cpuinfo_path.read_text(errors="replace"))
    except OSError:
        return ()


def local_int8_saturates(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> bool:
    """:func:`int8_saturates` for this machine, cheaply (no runtimes): unreadable flags on x86 fail closed."""
    try:
        cpuinfo = cpuinfo_path.read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    return int8_saturates(parse_cpu_flags(cpuinfo), known=_has_flags_line(cpuinfo), machine=platform.machine())


def _has_flags_line(cpuinfo: str) -> bool:
    return any(
        sep and key.strip() in ("flags", "Features")
        for key, sep, _ in (line.partition(":") for line in cpuinfo.splitlines())
    )


def parse_cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("model name", "Model", "cpu model", "Hardware") and value.strip():
            return value.strip()
    return "unknown"


def _physical_from_cpuinfo(cpuinfo: str) -> int | None:
    cores: set[tuple[str, str]] = set()
    physical = core = None
    for line in [*cpuinfo.splitlines(), ""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip():
            if physical is not None and core is not None:
                cores.add((physical, core))
            physical = core = None
    return len(cores) or None


def parse_nvidia_smi(text: str) -> tuple[GpuInfo, ...]:
    """Parse ``nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader``."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0]:
            continue
        m = re.match(r"(\d+)", parts[1])
        gpus.append(GpuInfo(name=parts[0], memory_total_mib=int(m.group(1)) if m else None, driver_version=parts[2]))
    return tuple(gpus)


def _read_cgroup_file(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _cgroup_dirs(mount: Path, rel: str) -> list[Path]:
    """``mount/rel`` and every folder above it up to ``mount`` (a quota anywhere on the path applies)."""
    parts = [p for p in rel.strip("/").split("/") if p and p not in (".", "..")]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_cpu_limit(
    root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")
) -> tuple[float, str] | None:
    """The CPU quota of this process's cgroup, in CPUs, and where it was read; None when unlimited.

    cgroup v2: ``cpu.max`` (``QUOTA PERIOD`` or ``max PERIOD``); v1: ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` (quota -1 = unlimited).  Read in the process's own cgroup (from
    ``self_cgroup``) and every cgroup above it; the smallest quota applies.  ``root`` is the
    cgroup mount (a test passes a folder of fake files).  Never raises.
    """
    v2_rel: str | None = None
    v1_rel: str | None = None
    text = _read_cgroup_file(self_cgroup) or ""
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hier == "0" and controllers == "":
            v2_rel = rel
        elif "cpu" in controllers.split(","):
            v1_rel = rel
    found: list[tuple[float, str]] = []
    for d in _cgroup_dirs(root, v2_rel or "/"):
        raw = _read_cgroup_file(d / "cpu.max")
        if raw is None:
            continue
        fields = raw.split()
        try:
            if len(fields) == 2 and fields[0] != "max" and int(fields[1]) > 0 and int(fields[0]) > 0:
                found.append((int(fields[0]) / int(fields[1]), f"{d / 'cpu.max'}: {raw}"))
        except ValueError:
            logger.info("cgroup file %s is not QUOTA PERIOD: %r", d / "cpu.max", raw)
    for mount in (root / "cpu,cpuacct", root / "cpu"):
        if not mount.is_dir():
            continue
        for d in _cgroup_dirs(mount, v1_rel or "/"):
            quota = _read_cgroup_file(d / "cpu.cfs_quota_us")
            period = _read_cgroup_file(d / "cpu.cfs_period_us")
            if quota is None or period is None:
                continue
            try:
                q, p = int(quota), int(period)
            except ValueError:
                continue
            if q > 0 and p > 0:
                found.append((q / p, f"{d / 'cpu.cfs_quota_us'}: {q} / cpu.cfs_period_us: {p}"))
        break
    return min(found, key=lambda f: f[0]) if found else None


class CpuBudget(msgspec.Struct, frozen=True, kw_only=True):
    """The threads ``threads = 0`` means for this process, and which bound decided it."""

    threads: int
    physical_cores: int
    #: CPUs in the affinity mask (None where the OS does not say)
    affinity: int | None
    #: ceil(quota / period) of the cgroup CPU quota, None when unlimited
    cgroup_cpus: int | None
    cgroup_source: str = ""
    workers: int = 1
    #: "physical cores", "CPU affinity" or "cgroup CPU quota"
    bound: str = "physical cores"

    def describe(self) -> str:
        """``2 (cgroup CPU quota: /sys/fs/cgroup/cpu.max: 200000 100000; 32 physical cores)``."""
        why = self.bound
        if self.bound == "cgroup CPU quota":
            why += f" {self.cgroup_source}"
        elif self.bound == "CPU affinity":
            why += f" {self.affinity} CPUs"
        per = f", shared by {self.workers} workers" if self.workers > 1 else ""
        return f"{self.threads} per process (bound: {why}; {self.physical_cores} physical cores{per})"


def cpu_budget(
    workers: int = 1, *, cgroup_root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")
) -> CpuBudget:
    """Physical cores, bounded by the affinity mask and the cgroup CPU quota, divided among ``workers``."""
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    limit = cgroup_cpu_limit(cgroup_root, self_cgroup)
    quota = max(1, math.ceil(limit[0] - 1e-9)) if limit is not None else None
    cores, bound = physical, "physical cores"
    if affinity is not None and affinity < cores:
        cores, bound = affinity, "CPU affinity"
    if quota is not None and quota < cores:
        cores, bound = quota, "cgroup CPU quota"
    workers = max(1, workers)
    return CpuBudget(
        threads=max(1, cores // workers),
        physical_cores=physical,
        affinity=affinity,
        cgroup_cpus=quota,
        cgroup_source=limit[1] if limit is not None else "",
        workers=workers,
        bound=bound,
    )


def default_threads(workers: int = 1) -> int:
    """Physical cores this process may use (what ``threads = 0`` means): bounded by the affinity
    mask and the cgroup CPU quota (``docker --cpus``, a Kubernetes CPU limit), divided among
    ``workers`` server processes (:func:`cpu_budget`)."""
    return cpu_budget(workers).threads


def _numa_nodes(node_dir: Path) -> tuple[int, ...]:
    try:
        names = [p.name for p in node_dir.iterdir()]
    except OSError:
        return ()
    return tuple(sorted(int(n[4:]) for n in names if re.fullmatch(r"node\d+", n)))


def _probe_ort(notes: list[str]) -> OrtInfo | None:
    try:
        import onnxruntime
    except ImportError as exc:
        notes.append(f"onnxruntime not installed ({exc}): {_INSTALL_HINT}")
        return None
    try:
        return OrtInfo(version=onnxruntime.__version__, providers=tuple(onnxruntime.get_available_providers()))
    except Exception as exc:
        notes.append(f"onnxruntime {getattr(onnxruntime, '__version__', '?')} cannot list providers: {exc}")
        return None


def _ov_precision(value: object) -> str | None:
    name = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return _OV_PRECISIONS.get(name, name)


def _probe_ov(notes: list[str]) -> OvInfo | None:
    try:
        from runtime.offline import import_openvino, openvino_core

        openvino = import_openvino()
    except ImportError as exc:
        notes.append(f"openvino not installed ({exc}): {_INSTALL_HINT}")
        return None
    try:
        core = openvino_core()
        names = list(core.available_devices)
    except Exception as exc:
        notes.append(f"openvino {openvino.__version__} cannot list devices: {exc}")
        return OvInfo(version=openvino.__version__, devices=())
    devices = []
    for name in names:
        props: dict[str, Any] = {}
        for prop in ("FULL_DEVICE_NAME", "OPTIMIZATION_CAPABILITIES", "INFERENCE_PRECISION_HINT"):
            try:
                props[prop] = core.get_property(name, prop)
            except Exception as exc:
                notes.append(f"openvino device {name}: cannot read {prop}: {exc}")
        hint = props.get("INFERENCE_PRECISION_HINT")
        devices.append(
            OvDevice(
                name=name,
                full_name=str(props.get("FULL_DEVICE_NAME", "")),
                capabilities=tuple(str(c) for c in props.get("OPTIMIZATION_CAPABILITIES", ())),
                default_precision=_ov_precision(hint) if hint is not None else None,
            )
        )
    return OvInfo(version=openvino.__version__, devices=tuple(devices))


def _probe_gpus(nvidia_smi: str | None, notes: list[str]) -> tuple[GpuInfo, ...]:
    if nvidia_smi is None:
        return ()
    cmd = [nvidia_smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        notes.append(f"nvidia-smi failed to run: {exc}")
        return ()
    if done.returncode != 0:
        notes.append(f"nvidia-smi exited {done.returncode}: {(done.stderr or done.stdout).strip()[:300]}")
        return ()
    return parse_nvidia_smi(done.stdout)


def nvidia_gpus(nvidia_smi: str | None = None) -> tuple[GpuInfo, ...]:
    """The NVIDIA GPUs ``nvidia-smi`` lists (none without it); never raises."""
    return _probe_gpus(nvidia_smi if nvidia_smi is not None else shutil.which("nvidia-smi"), [])


def probe_hardware(
    *,
    cpuinfo_path: Path = Path("/proc/cpuinfo"),
    node_dir: Path = Path("/sys/devices/system/node"),
    nvidia_smi: str | None = None,
) -> HardwareProfile:
    """Look at this box. Never raises; what could not be seen is in ``notes``.

    ``nvidia_smi`` is the binary to run (default: ``nvidia-smi`` on ``PATH``).
    """
    notes: list[str] = []
    try:
        cpuinfo = cpuinfo_path.read_text(errors="replace")
    except OSError as exc:
        notes.append(f"cannot read {cpuinfo_path}: {exc}")
        cpuinfo = ""
    try:
        import psutil

        logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
        physical = psutil.cpu_count(logical=False) or _physical_from_cpuinfo(cpuinfo) or logical
        mem = psutil.virtual_memory()
        mem_total, mem_available = int(mem.total), int(mem.available)
    except Exception as exc:
        notes.append(f"psutil failed ({exc}): {_INSTALL_HINT}")
        logical = os.cpu_count() or 1
        physical = _physical_from_cpuinfo(cpuinfo) or logical
        mem_total = mem_available = 0
    smi = nvidia_smi if nvidia_smi is not None else shutil.which("nvidia-smi")
    machine = platform.machine()
    flags_known = _has_flags_line(cpuinfo)
    if not flags_known:
        why = "it could not be read" if not cpuinfo else "it has no flags line"
        if is_x86(machine):
            notes.append(
                f"CPU ISA flags unknown ({cpuinfo_path}: {why}) on {machine}: VNNI / AMX cannot be shown, so INT8 "
                "is taken to saturate and variants that require cpu-vnni are refused; make /proc/cpuinfo "
                "readable (e.g. no ProcSubset=pid) to use them"
            )
        else:
            notes.append(f"CPU ISA flags unknown ({cpuinfo_path}: {why}) on {machine or 'an unknown machine'}")
    profile = HardwareProfile(
        cpu_model=parse_cpu_model(cpuinfo),
        physical_cores=physical,
        logical_cores=logical,
        cpu_flags=parse_cpu_flags(cpuinfo),
        memory_total_bytes=mem_total,
        memory_available_bytes=mem_available,
        numa_nodes=_numa_nodes(node_dir),
        onnxruntime=_probe_ort(notes),
        openvino=_probe_ov(notes),
        gpus=_probe_gpus(smi, notes),
        nvidia_smi=smi,
        notes=tuple(notes),
        cpu_flags_known=flags_known,
        machine=machine,
    )
    for note in notes:
        logger.info("hardware probe: %s", note)
    return profile
