"""The backend interface: ``probe()`` says what is here, ``open()`` gives a session.

A backend is a small class registered by name in :mod:`runtime.backends.registry`.
``probe()`` never raises: a missing library or device is a fact in the
:class:`Probe`, with the reason.  ``open()`` returns a :class:`Session` whose
``run`` has the same signature for every backend, and which has *proved* what
is really executing (``active``) — ONNX Runtime falls back to CPU silently,
OpenVINO's AUTO picks a device at will.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["Backend", "OpenOptions", "Probe", "Session"]

Runtime = Literal["onnxruntime", "openvino", "fake"]


@dataclass(frozen=True)
class Probe:
    """What a backend found on this box."""

    name: str
    usable: bool
    reason: str  # why not usable, or what was found ("CPUExecutionProvider in onnxruntime 1.32")
    runtime: Runtime
    device: str  # "cpu", "cuda:0", "GPU", "NPU", "AUTO"
    #: exec precisions this backend can compute in here (fp32 / bf16 / fp16)
    precisions: tuple[str, ...] = ("fp32",)
    #: variant formats it can open
    formats: tuple[str, ...] = ("onnx",)
    #: rough relative speed class used to break ties when no timings exist (higher = faster)
    speed_class: int = 0
    details: dict[str, str] = field(default_factory=dict)
    #: INT8 kernels here saturate on 8-bit weights (a CPU device on x86 without VNNI / AMX):
    #: a variant that ``requires`` ``cpu-vnni`` would lose the accuracy it was validated with
    int8_saturates: bool = False


@dataclass(frozen=True)
class OpenOptions:
    """How to open a session. Threads and precision are always set explicitly."""

    intra_op_threads: int = 0  # 0 = physical cores
    inter_op_threads: int = 1
    exec_precision: str = "fp32"
    allow_fallback: bool = False
    #: OpenVINO PERFORMANCE_HINT: LATENCY or THROUGHPUT; None leaves the default
    performance_hint: str | None = None
    num_streams: int | None = None
    #: OpenVINO CPU ENABLE_CPU_PINNING; None leaves the default.  Streams opened as separate
    #: single-thread sessions must not pin: each would pin its thread to the same first core
    cpu_pinning: bool | None = None
    cache_dir: Path | None = None  # OpenVINO CACHE_DIR / TensorRT engine cache
    #: OpenVINO: static-shape copies compiled for input shapes that repeat (0 = none; each costs a
    #: compiled model's memory), :mod:`runtime.backends.static_shapes`
    static_shapes: int = 0
    #: compares a static-shape copy's outputs with the dynamic model's on a copy's first call (the
    #: inputs, the dynamic model's outputs, the copy's): None when they agree, else why not.  None
    #: compares every output within ``COPY_TOLERANCE`` of its largest value; a text model compares
    #: its answers, the pooled embeddings the gate held (:func:`runtime.text.answers_agree`)
    copy_check: CopyCheck | None = None


Arrays = dict[str, "npt.NDArray[np.generic]"]
CopyCheck = Callable[[Arrays, Arrays, Arrays], "str | None"]


@runtime_checkable
class Session(Protocol):
    """An open model. ``run`` is the same for every backend."""

    backend: str
    #: what is really executing, proved after opening (providers / execution devices)
    active: tuple[str, ...]
    #: set when the session runs somewhere other than requested and fallback was allowed
    fallback: str | None
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(
        self, inputs: dict[str, npt.NDArray[np.generic]], outputs: list[str] | None = None
    ) -> dict[str, npt.NDArray[np.generic]]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str

    def probe(self) -> Probe: ...

    def open(self, model_path: Path, options: OpenOptions) -> Session: ...
