"""The machine's physical limit: FLOPs per item from the graph, peak FLOP/s from the ISA.

FLOPs are counted, not assumed: :func:`count_matmul_flops` runs the ONNX graph
once in ONNX Runtime with every MatMul / Gemm input (and every Conv's weight and
output) exposed as an extra graph output, reads the real operand shapes, and adds
``2 * M * K * N`` (times the broadcast batch dimensions) per product and
``2 * |Y| * C_in / group * kernel`` per convolution.  Only matrix products and
convolutions are counted (they are > 98 % of a transformer encoder's or a CNN's
arithmetic); count on the plain fp32 variant — fused or quantized graphs hide
products inside other ops.

Peak throughput per core and cycle (``ops`` = 2 per multiply-accumulate):

====================  ======================================================
fp32, AVX-512         fma_units x 16 lanes x 2      (Intel Xeon: 2 units -> 64)
fp32, AVX2            2 units x 8 lanes x 2 = 32
bf16, AVX512_BF16     fma_units x 32 pairs x 2      (vdpbf16ps)
int8, AVX512_VNNI     fma_units x 64 MACs x 2       (vpdpbusd)
bf16, AMX             1024  (TDPBF16PS: 16x16x32 MACs per 16 cycles)
int8, AMX             2048  (TDPBSSD: 16x16x64 MACs per 16 cycles)
====================  ======================================================

A row that ran on an NVIDIA GPU (its session's active provider is CUDA or
TensorRT) is held to that GPU's datasheet peak instead (:data:`GPU_PEAKS`,
dense, no sparsity: fp32 on the CUDA cores, bf16 / fp16 / int8 on the tensor
cores), matched on the name ``nvidia-smi`` gives; a GPU not in the table, or
another accelerator, gets no fraction rather than the CPU's.

``fma_units`` (512-bit FMA pipes a core issues to each cycle) is 2 on Intel cores
with AVX-512 and on AMD Zen 5 server and desktop cores (family 26), and 1 on
AMD Zen 4 (family 25) and the Zen 5 laptop cores, which run a 512-bit
operation on two 256-bit halves.  Peak = physical cores x clock x ops/cycle.

The clock is psutil's ``cpu_freq().max`` when known, else ``cpu MHz`` from
/proc/cpuinfo; in a VM that is the nominal clock, and the cores run faster
(turbo) or slower (AVX-512 / AMX frequency licences).  A bare matrix product
cannot beat the peak, so :func:`gemm_rates` times one square product per
compute kind in OpenVINO on this box, and the clock is raised to the lowest one
those rates prove (:func:`clock_floor`) when the nominal one is lower.  On the
2-core AMD EPYC (Zen 5) this project is benchmarked on, the nominal 2.60 GHz
with one pipe put the fp32 peak at 166 G ops/s while a bare fp32 product ran
at 430: rows read 1.1-2.3 of the "peak".  The fractions are an
order-of-magnitude check of how much of the arithmetic units a row uses, not a
precise efficiency.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "GPU_PEAKS",
    "FlopCount",
    "MachinePeaks",
    "clock_floor",
    "conv_flops",
    "count_matmul_flops",
    "device_of",
    "fma_units",
    "gemm_rates",
    "gpu_peaks",
    "machine_peaks",
    "matmul_flops",
    "peak_for",
    "peaks_from",
]


def matmul_flops(a: Sequence[int], b: Sequence[int]) -> int:
    """FLOPs of numpy-style ``a @ b`` for operand shapes ``a`` and ``b`` (2 per MAC)."""
    if not a or not b:
        raise ValueError(f"matmul of a scalar: shapes {list(a)} @ {list(b)}")
    a2 = [1, *a] if len(a) == 1 else list(a)
    b2 = [*b, 1] if len(b) == 1 else list(b)
    m, k = a2[-2], a2[-1]
    k2, n = b2[-2], b2[-1]
    if k != k2:
        raise ValueError(f"matmul inner dimensions differ: {list(a)} @ {list(b)}")
    batch_a, batch_b = a2[:-2], b2[:-2]
    width = max(len(batch_a), len(batch_b))
    batch_a = [1] * (width - len(batch_a)) + batch_a
    batch_b = [1] * (width - len(batch_b)) + batch_b
    batch = math.prod(max(x, y) for x, y in zip(batch_a, batch_b, strict=True))
    return 2 * batch * m * k * n


def conv_flops(weight: Sequence[int], output: Sequence[int]) -> int:
    """FLOPs of an ONNX ``Conv`` with weight ``[C_out, C_in / group, k...]`` and output
    ``[N, C_out, spatial...]`` (2 per MAC): every output element sums C_in / group x kernel products."""
    if len(weight) < 3 or len(output) != len(weight) or output[1] != weight[0]:
        raise ValueError(f"conv shapes do not fit: weight {list(weight)}, output {list(output)}")
    return 2 * math.prod(output) * math.prod(weight[1:])


def _gemm_flops(a: Sequence[int], b: Sequence[int], attrs: Mapping[str, int]) -> int:
    m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
    n = b[0] if attrs.get("transB", 0) else b[1]
    return 2 * m * k * n


@dataclass(frozen=True)
class FlopCount:
    """Matrix-product FLOPs of one run of a graph on given feeds."""

    total: int
    by_op: dict[str, int]
    products: int  # how many MatMul / Gemm / Conv nodes were counted
    feeds: dict[str, list[int]] = field(default_factory=dict)  # the input shapes it was counted at

    def per_item(self, batch: int) -> float:
        return self.total / batch


def count_matmul_flops(model_path: Path, feeds: Mapping[str, Any]) -> FlopCount:
    """Run ``model_path`` once on ``feeds`` and count every MatMul / Gemm / Conv's FLOPs."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    products = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    existing = {o.name for o in model.graph.output}
    wanted: list[str] = []
    for node in products:
        # a Conv's FLOPs follow from its weight and its output: 2 x |Y| x (C_in / group x kernel)
        names = [node.input[1], node.output[0]] if node.op_type == "Conv" else list(node.input[:2])
        for name in names:
            if name not in inits and name not in wanted:
                wanted.append(name)
    for name in wanted:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    values = session.run(wanted, dict(feeds))
    shapes: dict[str, list[int]] = dict(inits)
    shapes.update({name: list(v.shape) for name, v in zip(wanted, values, strict=True)})
    total = 0
    by_op: dict[str, int] = {}
    for node in products:
        if node.op_type == "Conv":
            flops = conv_flops(shapes[node.input[1]], shapes[node.output[0]])
        elif node.op_type == "Gemm":
            attrs = {x.name: int(x.i) for x in node.attribute}
            flops = _gemm_flops(shapes[node.input[0]], shapes[node.input[1]], attrs)
        else:
            flops = matmul_flops(shapes[node.input[0]], shapes[node.input[1]])
        total += flops
        by_op[node.op_type] = by_op.get(node.op_type, 0) + flops
    return FlopCount(
        total=total,
        by_op=by_op,
        products=len(products),
        feeds={k: list(getattr(v, "shape", ())) for k, v in feeds.items()},
    )


@dataclass(frozen=True)
class MachinePeaks:
    """Peak ops/s of this CPU per compute kind, with the facts they came from, and of the NVIDIA
    GPUs ``nvidia-smi`` lists (datasheet)."""

    cpu: str
    vendor: str
    cores: int
    ghz: float
    clock_source: str
    fma_units: int
    #: kind ("fp32-avx512", "bf16-amx", ...) -> ops per core and cycle (:func:`ops_per_cycle`)
    per_cycle: dict[str, float]
    #: compute kind ("fp32", "bf16", "int8") -> ops per second a bare matrix product reached
    #: here (:func:`gemm_rates`; empty when not measured)
    gemm: dict[str, float] = field(default_factory=dict)
    #: the first NVIDIA GPU's name, and its kinds ("bf16-tensor", ...) -> ops per second (empty
    #: when it is not in :data:`GPU_PEAKS`)
    gpu: str | None = None
    gpu_peaks: dict[str, float] = field(default_factory=dict)
    #: the clock as reported, in words ("/proc/cpuinfo cpu MHz 2.60 GHz"), before any rate raised it
    reported_clock: str = "no clock reported"

    @property
    def peaks(self) -> dict[str, float]:
        """Kind ("fp32-avx512", "bf16-amx", ...) -> ops per second on every core at :attr:`ghz`."""
        hz = self.cores * self.ghz * 1e9
        return {k: hz * v for k, v in self.per_cycle.items()}

    def to_dict(self) -> dict[str, Any]:
        out = {
            "cpu": self.cpu,
            "vendor": self.vendor,
            "cores": self.cores,
            "ghz": self.ghz,
            "clock_source": self.clock_source,
            "fma_units_512": self.fma_units,
            "peak_gops": {k: v / 1e9 for k, v in self.peaks.items()},
        }
        if self.gemm:
            out["gemm_gops"] = {k: v / 1e9 for k, v in self.gemm.items()}
        if self.gpu is not None:
            out["gpu"] = self.gpu
            out["gpu_peak_gops"] = {k: v / 1e9 for k, v in self.gpu_peaks.items()}
        return out

    def with_rates(self, rates: Mapping[str, float]) -> MachinePeaks:
        """These peaks after bare matrix products measured again (a run's clock moves: other
        tenants, turbo): each kind's best rate is kept, and the clock rises to what the rates
        prove if that is higher (:func:`clock_floor`); the CPU's peaks scale with it."""
        best = dict(self.gemm)
        for kind, rate in rates.items():
            best[kind] = max(rate, best.get(kind, 0.0))
        floor, kind = clock_floor(best, self.per_cycle, self.cores)
        if floor <= self.ghz:
            return replace(self, gemm=best)
        source = f"{self.reported_clock}, raised to what a bare {kind} matrix product proves"
        return replace(self, ghz=floor, clock_source=source, gemm=best)

    def peak(self, kind: str, device: str = "cpu") -> tuple[str, float] | None:
        """The peak a row of compute ``kind`` that ran on ``device`` (:func:`device_of`) is held
        to; None when no peak is known for it."""
        if device == "cpu":
            return peak_for(self.peaks, kind)
        if device == "nvidia":
            order = {
                "fp32": ("fp32-cuda",),
                "bf16": ("bf16-tensor",),
                "fp16": ("fp16-tensor",),
                "int8": ("int8-tensor",),
            }.get(kind, ())
            return next(((k, self.gpu_peaks[k]) for k in order if k in self.gpu_peaks), None)
        return None


#: NVIDIA datasheet peaks in T ops/s, dense (no structured sparsity): (name part, fp32 on the CUDA
#: cores, bf16, fp16, int8 on the tensor cores; 0 = not supported).  Matched in order on the name
#: ``nvidia-smi`` gives, so the more specific names come first.
GPU_PEAKS: tuple[tuple[str, float, float, float, float], ...] = (
    ("H200 NVL", 60.0, 835.0, 835.0, 1671.0),
    ("H200", 67.0, 989.0, 989.0, 1979.0),
    ("H100 NVL", 60.0, 835.0, 835.0, 1671.0),
    ("H100 PCIe", 51.0, 756.0, 756.0, 1513.0),
    ("H100", 67.0, 989.0, 989.0, 1979.0),
    ("A100", 19.5, 312.0, 312.0, 624.0),
    ("L40S", 91.6, 362.0, 362.0, 733.0),
    ("L4", 30.3, 121.0, 121.0, 242.0),
    ("A10", 31.2, 125.0, 125.0, 250.0),
    ("T4", 8.1, 0.0, 65.0, 130.0),
)


def gpu_peaks(name: str) -> dict[str, float]:
    """Ops/s per kind for the NVIDIA GPU called ``name`` (``nvidia-smi``'s spelling, e.g.
    "NVIDIA H200"); empty when the table does not know it."""
    for part, fp32, bf16, fp16, int8 in GPU_PEAKS:
        if re.search(rf"(^|[\s-]){re.escape(part)}($|[\s-])", name):
            kinds = {"fp32-cuda": fp32, "bf16-tensor": bf16, "fp16-tensor": fp16, "int8-tensor": int8}
            return {k: v * 1e12 for k, v in kinds.items() if v > 0}
    return {}


def device_of(active: Sequence[str]) -> str:
    """Where a session runs, from what it proved active (ONNX Runtime's providers, OpenVINO's
    execution devices): ``cpu``, ``nvidia``, or the device's name lower-cased (``gpu.0``)."""
    first = active[0] if active else ""
    if first in ("CPUExecutionProvider", "OpenVINOExecutionProvider") or first.upper().startswith("CPU"):
        return "cpu"
    if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return "nvidia"
    return first.lower() or "unknown"


def fma_units(vendor: str, family: int = 0, model: int = 0) -> int:
    """512-bit FMA pipes per core (see the module docstring): 2 on Intel and on AMD family 26
    and later (Zen 5) save its laptop models (0x20-0x2F Strix Point, 0x60-0x6F Krackan Point),
    1 on older AMD (Zen 4 splits 512-bit operations in two)."""
    if vendor == "AMD":
        if family >= 26 and not (family == 26 and (0x20 <= model <= 0x2F or 0x60 <= model <= 0x6F)):
            return 2
        return 1
    return 2


def ops_per_cycle(flags: set[str], units: int) -> dict[str, float]:
    """Ops per core and cycle per compute kind for these ISA flags (see the module docstring);
    a kind is absent when the ISA lacks it."""
    out: dict[str, float] = {}
    if "avx512f" in flags:
        out["fp32-avx512"] = units * 16 * 2
    elif "avx2" in flags and "fma" in flags:
        out["fp32-avx2"] = 2 * 8 * 2
    if "avx512_bf16" in flags:
        out["bf16-avx512"] = units * 32 * 2
    if "avx512_vnni" in flags:
        out["int8-vnni"] = units * 64 * 2
    if "amx_bf16" in flags:
        out["bf16-amx"] = 1024
    if "amx_int8" in flags:
        out["int8-amx"] = 2048
    return out


def peaks_from(
    flags: set[str], *, vendor: str, cores: int, ghz: float, family: int = 0, model: int = 0
) -> tuple[int, dict[str, float]]:
    """Ops per second per compute kind for these ISA flags (see the module docstring).

    Returns ``(fma_units, peaks)``; a kind is absent when the ISA lacks it.
    """
    units = fma_units(vendor, family, model)
    hz = cores * ghz * 1e9
    return units, {k: hz * per_cycle for k, per_cycle in ops_per_cycle(flags, units).items()}


def clock_floor(rates: Mapping[str, float], per_cycle: Mapping[str, float], cores: int) -> tuple[float, str]:
    """The lowest clock (GHz) at which ``cores`` cores reach every measured ``rates`` (compute
    kind -> ops/s of a bare matrix product) at the ``per_cycle`` ops of that kind's best peak
    (:func:`peak_for`), and the kind that sets it; ``(0.0, "")`` without rates."""
    best, kind = 0.0, ""
    for k, rate in rates.items():
        peak = peak_for(per_cycle, k)
        if peak is None or peak[1] <= 0 or cores <= 0 or rate <= 0:
            continue
        ghz = rate / (cores * peak[1]) / 1e9
        if ghz > best:
            best, kind = ghz, k
    return best, kind


def gemm_rates(flags: set[str] | None = None, *, n: int = 1024, seconds: float = 0.4) -> dict[str, float]:
    """Ops per second of one bare ``n x n`` matrix product per compute kind (``fp32``; ``bf16``
    and ``int8`` where the ISA ``flags`` have them), timed in OpenVINO's CPU plugin on every core
    for about ``seconds`` each: what this box's arithmetic units reach at least. ``{}`` when
    OpenVINO cannot run here. ``int8`` quantizes both operands (FakeQuantize, which the plugin
    runs as an int8 product), so its time includes quantizing the activation."""
    import time

    import numpy as np

    try:
        import openvino as ov
        import openvino.opset13 as ops

        from runtime.offline import openvino_core
    except ImportError:
        return {}
    flags = flags if flags is not None else _cpu_flags()
    kinds = [("fp32", "f32", False)]
    if flags & {"avx512_bf16", "amx_bf16"}:
        kinds.append(("bf16", "bf16", False))
    if flags & {"avx512_vnni", "amx_int8"}:
        kinds.append(("int8", "f32", True))
    rng = np.random.default_rng(0)
    weight = (rng.random((n, n), dtype=np.float32) - 0.5).astype(np.float32)
    feed = (rng.random((n, n), dtype=np.float32) - 0.5).astype(np.float32)
    core = openvino_core()  # the process's one Core (runtime.offline says why)
    rates: dict[str, float] = {}
    for kind, precision, int8 in kinds:
        x = ops.parameter([n, n], np.float32, name="x")
        a: Any = x
        b: Any = ops.constant(weight)
        if int8:
            lo, hi = ops.constant(np.float32(-1.0)), ops.constant(np.float32(1.0))
            a = ops.fake_quantize(a, lo, hi, lo, hi, 256)
            b = ops.fake_quantize(b, lo, hi, lo, hi, 255)
        graph = ov.Model([ops.matmul(a, b, False, True)], [x], f"gemm-{kind}")
        try:
            compiled = core.compile_model(
                graph, "CPU", {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
            )
        except RuntimeError:
            continue
        request = compiled.create_infer_request()
        request.infer({0: feed})
        calls, start = 0, time.perf_counter()
        while True:
            request.infer({0: feed})
            calls += 1
            spent = time.perf_counter() - start
            if spent >= seconds:
                break
        rates[kind] = 2.0 * n**3 * calls / spent
    return rates


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def peak_for(peaks: Mapping[str, float], kind: str) -> tuple[str, float] | None:
    """The best peak available for a compute kind ``fp32`` / ``bf16`` / ``int8``."""
    order = {
        "fp32": ("fp32-avx512", "fp32-avx2"),
        "bf16": ("bf16-amx", "bf16-avx512", "fp32-avx512", "fp32-avx2"),
        "fp16": ("bf16-amx", "bf16-avx512", "fp32-avx512", "fp32-avx2"),
        "int8": ("int8-amx", "int8-vnni", "fp32-avx512", "fp32-avx2"),
    }.get(kind, ())
    for k in order:
        if k in peaks:
            return k, peaks[k]
    return None


def machine_peaks(
    cpuinfo: str | None = None,
    gpus: Sequence[str] | None = None,
    *,
    measure: float = 0.0,
    gemm: Mapping[str, float] | None = None,
) -> MachinePeaks:
    """Read this machine's CPU facts (or ``cpuinfo`` text) and its NVIDIA GPUs' names (or
    ``gpus``) and compute their peaks. With ``measure`` > 0 (or given ``gemm`` rates: compute
    kind -> ops/s), the clock is raised to what bare matrix products prove (:func:`clock_floor`;
    ``measure`` times them here with :func:`gemm_rates`, that many seconds a kind)."""
    from bench.common import physical_cores

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags_m = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    mhz_m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)$", cpuinfo, re.M)
    cpu = model.group(1).strip() if model else "unknown"
    flags = set(flags_m.group(1).split()) if flags_m else set()
    vendor_m = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.M)
    named = (vendor_m.group(1) if vendor_m else cpu).upper()
    vendor = "AMD" if "AMD" in named else ("Intel" if "INTEL" in named else "unknown")
    family_m = re.search(r"^cpu family\s*:\s*(\d+)", cpuinfo, re.M)
    model_m = re.search(r"^model\s*:\s*(\d+)", cpuinfo, re.M)
    family = int(family_m.group(1)) if family_m else 0
    model_no = int(model_m.group(1)) if model_m else 0
    ghz, source = 0.0, "unknown"
    try:
        import psutil

        freq = psutil.cpu_freq()
        if freq is not None and freq.max:
            ghz, source = freq.max / 1000.0, "psutil cpu_freq().max"
    except (ImportError, OSError, NotImplementedError):
        pass
    if not ghz and mhz_m:
        ghz, source = float(mhz_m.group(1)) / 1000.0, "/proc/cpuinfo cpu MHz"
    cores = physical_cores()
    units = fma_units(vendor, family, model_no)
    rates = dict(gemm) if gemm is not None else (gemm_rates(flags, seconds=measure) if measure > 0 else {})
    if gpus is None:
        from runtime.hardware import nvidia_gpus

        gpus = [g.name for g in nvidia_gpus()]
    gpu = gpus[0] if gpus else None
    reported = MachinePeaks(
        cpu=cpu,
        vendor=vendor,
        cores=cores,
        ghz=ghz,
        clock_source=source,
        fma_units=units,
        per_cycle=ops_per_cycle(flags, units),
        gpu=gpu,
        gpu_peaks=gpu_peaks(gpu) if gpu else {},
        reported_clock=f"{source} {ghz:.2f} GHz" if ghz else "no clock reported",
    )
    return reported.with_rates(rates)
