"""Native OpenVINO backends: ``ov-cpu``, ``ov-gpu``, ``ov-npu``, ``ov-auto``.

The compute precision is always set explicitly (``INFERENCE_PRECISION_HINT``):
OpenVINO's CPU plugin runs an "fp32" model in bf16 by default on CPUs with
bf16/AMX support.  After compiling, :meth:`OpenVinoBackend.open` *proves* what
runs: ``EXECUTION_DEVICES`` (AUTO may pick any device) and the precision read
back from the compiled model (for AUTO: from ``DEVICE_PROPERTIES`` of the
device it picked).  A device or precision other than the one asked for is a
:class:`~runtime.errors.FallbackError`, or a recorded ``fallback`` when allowed
(e.g. fp16 asked on a CPU without fp16 compute: OpenVINO silently uses bf16).

Models are read from ``.onnx`` or OpenVINO IR ``.xml`` (with its ``.bin``);
dynamic dimensions stay dynamic.  With ``OpenOptions.static_shapes`` > 0 a session
also compiles static-shape copies of the model for the input shapes it is called
with repeatedly (:mod:`runtime.backends.static_shapes`); each copy is proved like
the session (same device, same precision) before it serves.

An :class:`OvSession` holds one infer request (and one per static copy); ``run``
takes a lock, so calls from several threads are serialized (one inference at a
time per session).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.backends.base import CopyCheck, OpenOptions, Probe
from runtime.backends.checks import TensorInfo, check_inputs, check_outputs, physical_threads
from runtime.backends.static_shapes import COPY_TOLERANCE, ShapeKey, StaticShapes
from runtime.errors import BackendError, BackendUnavailableError, FallbackError

if TYPE_CHECKING:
    import numpy.typing as npt

    from runtime.hardware import HardwareProfile, OvDevice

__all__ = [
    "OV_BACKENDS",
    "PAD_MULTIPLES",
    "OpenVinoBackend",
    "OvSession",
    "cache_lock",
    "model_cache",
    "ov_precision_name",
]

logger = logging.getLogger(__name__)

#: name -> (OpenVINO device, speed_class, install hint when the device is missing)
OV_BACKENDS: dict[str, tuple[str, int, str]] = {
    "ov-cpu": ("CPU", 20, "pip install inferbox"),
    "ov-gpu": ("GPU", 30, "install the Intel GPU compute runtime (intel-opencl-icd) and check /dev/dri"),
    "ov-npu": ("NPU", 25, "install the Intel NPU driver (linux-npu-driver) and check /dev/accel"),
    "ov-auto": ("AUTO", 19, "pip install inferbox"),
}

#: a text batch's width (a lone text's too) is padded to a multiple of this many tokens for a session
#: with dynamic inputs, by its precision.  Each new input shape costs OpenVINO a preparation of every
#: node: a call on a shape not seen before took 20-25 % longer than the same call again (MiniLM INT8,
#: one thread, AMD EPYC with AVX-512 BF16, 2026-12-06), and the shapes of mixed texts in the small
#: batches a busy server forms rarely repeat (batch rows x exact width).  Padded, they do, and warm
#: calls cost no more: bf16 padded to 16 ran 0.95-1.00x the exact widths' time (lone texts, batches of
#: ~5, sorted batches of 32); fp32 padded to 8 0.97-1.05x (to 16: up to 1.12x on sorted batches of 32).
#: Over HTTP at 32 closed-loop clients, padding to 16 and planning batches on the padded widths served
#: 10-12 % more requests/s in three sets of alternating windows.
PAD_MULTIPLES = {"bf16": 16, "fp16": 16, "fp32": 8}

#: inferbox exec precision -> OpenVINO INFERENCE_PRECISION_HINT
_TO_OV = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_FROM_OV = {v: k for k, v in _TO_OV.items()}


def ov_precision_name(value: object) -> str:
    """An OpenVINO element type (or its name) in inferbox spelling: f32 -> fp32, f16 -> fp16."""
    name = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return _FROM_OV.get(name, name)


def _device_precisions(device: OvDevice) -> tuple[str, ...]:
    caps = set(device.capabilities)
    out = ["fp32"]
    if "BF16" in caps:
        out.append("bf16")
    if "FP16" in caps and not device.name.startswith("CPU"):
        out.append("fp16")
    return tuple(out)


#: a model's compiled blobs no load has used for this long are removed (its package was replaced or
#: removed; a later load compiles again), as the verified copies are (runtime.verified.STALE_S)
CACHE_STALE_S = 30 * 24 * 3600


def model_cache(root: Path, model_path: Path) -> Path:
    """``<root>/<key>``: the folder of one model file's compiled blobs (a package version's variant: its
    verified copy's path names the package), touched at each use.  Folders, and blobs of the flat
    layout before, that no load used for :data:`CACHE_STALE_S` are removed: OpenVINO names a blob by a
    hash of the model and never removes one, so ``<home>/cache/openvino`` grew with every version
    and precision ever loaded."""
    from runtime.verified import remove_unused

    folder = root / hashlib.sha256(str(model_path.resolve()).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    os.utime(folder)
    remove_unused(root, keep=folder, older_than_s=CACHE_STALE_S, suffix=".blob")
    return folder


@contextlib.contextmanager
def cache_lock(cache_dir: str | None) -> Iterator[None]:
    """Hold ``<cache_dir>/.compile.lock`` (an exclusive flock) while a model compiles with the cache:
    the server's workers, a second server and the batch worker share one cache, and OpenVINO writing a
    blob another process maps killed that process with SIGBUS (seen with two servers starting on an
    empty cache).  Within the lock a process finds the blob whole, or writes it alone."""
    if cache_dir is None:
        yield
        return
    with open(Path(cache_dir) / ".compile.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class _Copy:
    """One compiled model and its infer request (the session's own, or a static-shape copy)."""

    __slots__ = ("checked", "compiled", "outputs", "request")

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request: Any = compiled.create_infer_request()
        self.outputs = list(compiled.outputs)
        #: a static-shape copy's answers were compared with the dynamic model's once
        self.checked = False


class OvSession:
    """A compiled OpenVINO model whose device and precision were proved."""

    def __init__(
        self,
        backend: str,
        compiled: Any,
        active: tuple[str, ...],
        exec_precision: str,
        fallback: str | None,
        static: StaticShapes[_Copy] | None = None,
        copy_check: CopyCheck | None = None,
    ) -> None:
        self.backend = backend
        self.active = active
        self.exec_precision = exec_precision
        self.fallback = fallback
        self._compiled = compiled
        self._own: _Copy | None = _Copy(compiled)
        self._lock = threading.Lock()
        self._inputs = tuple(_tensor_info(port) for port in compiled.inputs)
        self.input_names: tuple[str, ...] = tuple(i.name for i in self._inputs)
        self.output_names: tuple[str, ...] = tuple(_port_name(p, i, "output") for i, p in enumerate(compiled.outputs))
        self._static = static
        self._copy_check = copy_check
        self._pad_multiple = PAD_MULTIPLES.get(exec_precision, 8) if _has_dynamic_input(compiled) else 1

    @property
    def pad_multiple(self) -> int:
        """The text path pads every call's width to a multiple of this many tokens (a model
        with dynamic inputs: :data:`PAD_MULTIPLES` by precision, so shapes repeat; else 1)."""
        return self._pad_multiple

    def wait_static(self, timeout: float | None = None) -> bool:
        """Wait for a static-shape copy being compiled (what a benchmark's warm-up waits for);
        False when one is still compiling after ``timeout``."""
        return True if self._static is None else self._static.wait(timeout)

    @property
    def static_shapes(self) -> list[ShapeKey]:
        """The input shapes (in ``input_names`` order) that run on a static-shape copy."""
        return [] if self._static is None else self._static.shapes

    def run(
        self, inputs: dict[str, npt.NDArray[np.generic]], outputs: list[str] | None = None
    ) -> dict[str, npt.NDArray[np.generic]]:
        own, static = self._own, self._static
        if own is None:
            raise BackendError(f"{self.backend} session is closed; open a new one")
        check_inputs(inputs, self._inputs)
        names = check_outputs(outputs, self.output_names)
        key = tuple(inputs[name].shape for name in self.input_names) if static is not None else ()
        copy = static.get(key) if static is not None else None
        if copy is not None and not copy.checked:
            return self._first_on_copy(own, copy, key, inputs, names)
        model = copy or own
        with self._lock:
            start = time.perf_counter()
            by_name = self._infer(model, inputs)
            elapsed = time.perf_counter() - start
        if static is not None and copy is None:
            static.observe(key, elapsed)
        return {name: by_name[name] for name in names}

    def _infer(self, model: _Copy, inputs: dict[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.generic]]:
        """One call (under the lock): the outputs by name."""
        try:
            # inputs shared (the call is synchronous and holds them; ~35 us less per call on
            # MiniLM batch 1), outputs copied (the next call would overwrite them)
            results = model.request.infer(inputs, share_inputs=True, share_outputs=False)
        except Exception as exc:
            raise BackendError(f"{self.backend} failed to run the model: {exc}") from exc
        return {name: np.asarray(results[port]) for name, port in zip(self.output_names, model.outputs, strict=True)}

    def _first_on_copy(
        self,
        own: _Copy,
        copy: _Copy,
        key: ShapeKey,
        inputs: dict[str, npt.NDArray[np.generic]],
        names: list[str],
    ) -> dict[str, npt.NDArray[np.generic]]:
        """A copy's first call runs on the dynamic model too: the copy is kept only when it answers
        the same (within :data:`COPY_TOLERANCE`), else dropped; the dynamic model's answer is returned."""
        with self._lock:
            mine = self._infer(own, inputs)
            theirs = self._infer(copy, inputs)
        check = self._copy_check or (lambda _inputs, a, b: _disagreement(a, b))
        why = check(inputs, mine, theirs)
        if why is None:
            copy.checked = True
        elif self._static is not None:
            self._static.reject(key, why)
        return {name: mine[name] for name in names}

    @property
    def threads(self) -> int:
        """``INFERENCE_NUM_THREADS`` as the compiled model reports it."""
        return int(self.compiled_property("INFERENCE_NUM_THREADS"))

    def compiled_property(self, name: str) -> str:
        """A property of the compiled model as OpenVINO reports it (what really runs, e.g.
        ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` set by the IR's ``rt_info/runtime_options``)."""
        if self._compiled is None:
            raise BackendError(f"{self.backend} session is closed; open a new one")
        try:
            return str(self._compiled.get_property(name))
        except Exception as exc:
            raise BackendError(f"{self.backend}: cannot read {name} from the compiled model: {exc}") from exc

    def close(self) -> None:
        if self._static is not None:
            self._static.close()
        self._own = None
        self._compiled = None


def _port_name(port: Any, index: int, kind: str) -> str:
    try:
        return str(port.get_any_name())
    except Exception:
        return f"{kind}{index}"


def _tensor_info(port: Any) -> TensorInfo:
    try:
        dtype: np.dtype[np.generic] | None = np.dtype(port.get_element_type().to_dtype())
    except Exception:
        dtype = None
    pshape = port.get_partial_shape()
    shape: tuple[int | None, ...] | None = None
    if pshape.rank.is_static:
        shape = tuple(d.get_length() if d.is_static else None for d in pshape)
    return TensorInfo(name=_port_name(port, 0, "input"), dtype=dtype, shape=shape)


class OpenVinoBackend:
    """One OpenVINO device (CPU, GPU, NPU or AUTO)."""

    def __init__(self, name: str) -> None:
        if name not in OV_BACKENDS:
            raise BackendUnavailableError(f"unknown OpenVINO backend {name!r}; known: {sorted(OV_BACKENDS)}")
        self.name = name
        self.device, self.speed_class, self._hint = OV_BACKENDS[name]

    def probe(self, profile: HardwareProfile | None = None) -> Probe:
        if profile is None:
            from runtime.hardware import probe_hardware

            profile = probe_hardware()
        ov = profile.openvino

        def result(usable: bool, reason: str, precisions: tuple[str, ...] = ("fp32",), **details: str) -> Probe:
            if ov is not None:
                details = {"version": ov.version, "devices": ",".join(d.name for d in ov.devices), **details}
            return Probe(
                name=self.name,
                usable=usable,
                reason=reason,
                runtime="openvino",
                device=self.device,
                precisions=precisions,
                formats=("onnx", "openvino"),
                speed_class=self.speed_class,
                details=details,
                int8_saturates=self.device in ("CPU", "AUTO") and profile.int8_saturates(),
            )

        if ov is None:
            return result(False, "openvino not installed: pip install inferbox")
        names = [d.name for d in ov.devices]
        if self.device == "AUTO":
            if not ov.devices:
                return result(False, "OpenVINO lists no devices; check the OpenVINO install (pip install inferbox)")
            # AUTO may pick any device: only what all of them can do is safe.
            common = set.intersection(*(set(_device_precisions(d)) for d in ov.devices))
            precisions = tuple(p for p in ("fp32", "bf16", "fp16") if p in common)
            return result(True, f"AUTO over {names} in openvino {ov.version}", precisions)
        device = profile.ov_device(self.device)
        if device is None:
            return result(False, f"no {self.device} device in OpenVINO (devices: {names}); {self._hint}")
        return result(
            True,
            f"{device.name} ({device.full_name or 'unnamed'}) in openvino {ov.version}",
            _device_precisions(device),
            full_name=device.full_name,
            capabilities=",".join(device.capabilities),
        )

    def _get_core(self) -> Any:
        from runtime.offline import openvino_core

        try:
            return openvino_core()
        except ImportError as exc:
            raise BackendUnavailableError(f"openvino not installed ({exc}): pip install inferbox") from exc

    def compile_config(self, options: OpenOptions) -> dict[str, Any]:
        """The compile_model config for ``options`` (precision always explicit)."""
        if options.exec_precision not in _TO_OV:
            raise BackendError(f"{self.name}: exec_precision {options.exec_precision!r} is not one of {sorted(_TO_OV)}")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _TO_OV[options.exec_precision]}
        if self.device in ("CPU", "AUTO"):
            config["INFERENCE_NUM_THREADS"] = physical_threads(options.intra_op_threads)
        if options.performance_hint is not None:
            config["PERFORMANCE_HINT"] = options.performance_hint.upper()
        if options.num_streams is not None:
            config["NUM_STREAMS"] = options.num_streams
        if options.cpu_pinning is not None and self.device == "CPU":
            config["ENABLE_CPU_PINNING"] = options.cpu_pinning
        if options.cache_dir is not None:
            cache = options.cache_dir / "openvino"
            cache.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache)
        return config

    def open(self, model_path: Path, options: OpenOptions) -> OvSession:
        config = self.compile_config(options)
        shared = config.get("CACHE_DIR")  # its lock is every process's and every model's
        if shared is not None:
            config["CACHE_DIR"] = str(model_cache(Path(shared), model_path))
        core = self._get_core()
        try:
            model = core.read_model(str(model_path))
        except Exception as exc:
            raise BackendError(f"{self.name} cannot read {model_path}: {exc}") from exc
        try:
            with cache_lock(shared):
                compiled = core.compile_model(model, self.device, config)
        except Exception as exc:
            text = str(exc)
            if (
                self.device != "AUTO"
                and self.device not in core.available_devices
                and not any(d.startswith(self.device + ".") for d in core.available_devices)
            ):
                raise BackendUnavailableError(
                    f"{self.name}: OpenVINO has no {self.device} device ({core.available_devices}); {self._hint}"
                ) from exc
            raise BackendError(f"{self.name} cannot compile {model_path} for {self.device}: {text}") from exc
        devices = tuple(str(d) for d in compiled.get_property("EXECUTION_DEVICES"))
        precision = _read_precision(compiled, self.device, devices)
        requested = f"{self.device}/{options.exec_precision}"
        actual = f"{','.join(devices) or '?'}/{precision}"
        device_ok = self.device == "AUTO" or any(d == self.device or d.startswith(self.device + ".") for d in devices)
        fallback: str | None = None
        if not device_ok or precision != options.exec_precision:
            message = f"{self.name}: asked OpenVINO for {requested}, the compiled model runs {actual}"
            if not options.allow_fallback:
                raise FallbackError(
                    f"{message}; pick a precision this device supports (see `inferbox doctor`), "
                    "another backend, or allow fallback (allow_fallback = true)",
                    requested=requested,
                    active=[actual],
                )
            fallback = f"{requested} -> {actual}"
            logger.warning("%s; running anyway because fallback is allowed", message)
        static = None
        if options.static_shapes > 0 and _has_dynamic_input(compiled):
            compile_copy = self._copy_compiler(model, config, devices, precision)
            static = StaticShapes(compile_copy, options.static_shapes, name=f"{self.name} {model_path.name}")
        return OvSession(self.name, compiled, devices, precision, fallback, static, options.copy_check)

    def _copy_compiler(
        self, model: Any, config: dict[str, Any], devices: tuple[str, ...], precision: str
    ) -> Callable[[ShapeKey], _Copy]:
        """Compiles a copy of ``model`` reshaped to one input shape, proved to run where and in
        what the session runs (no CACHE_DIR: one blob per shape would fill the disk)."""
        core = self._get_core()
        copy_config = {k: v for k, v in config.items() if k != "CACHE_DIR"}

        def compile_copy(key: ShapeKey) -> _Copy:
            copy = model.clone()
            copy.reshape({i: list(shape) for i, shape in enumerate(key)})
            compiled = core.compile_model(copy, self.device, copy_config)
            got_devices = tuple(str(d) for d in compiled.get_property("EXECUTION_DEVICES"))
            got = _read_precision(compiled, self.device, got_devices)
            if got_devices != devices or got != precision:
                raise BackendError(
                    f"the static copy runs {','.join(got_devices)}/{got}, the session {','.join(devices)}/{precision}"
                )
            return _Copy(compiled)

        return compile_copy


def _disagreement(mine: dict[str, npt.NDArray[np.generic]], theirs: dict[str, npt.NDArray[np.generic]]) -> str | None:
    """Why a static copy's outputs are not the dynamic model's (None: within :data:`COPY_TOLERANCE`)."""
    for name, want in mine.items():
        got = theirs[name]
        if got.shape != want.shape:
            return f"output {name!r} has shape {list(got.shape)}, the dynamic model's {list(want.shape)}"
        if not np.issubdtype(want.dtype, np.number) or want.size == 0:
            if not np.array_equal(got, want):
                return f"output {name!r} differs"
            continue
        a, b = want.astype(np.float64), got.astype(np.float64)
        scale = float(np.abs(a).max())
        diff = float(np.abs(a - b).max())
        if not np.isfinite(diff) or diff > COPY_TOLERANCE * max(scale, 1e-12):
            return (
                f"output {name!r} differs by {diff:.3g} ({diff / scale if scale else diff:.2%} of its largest value; "
                f"at most {COPY_TOLERANCE:.0%})"
            )
    return None


def _has_dynamic_input(compiled: Any) -> bool:
    return any(not port.get_partial_shape().is_static for port in compiled.inputs)


def _read_precision(compiled: Any, device: str, devices: tuple[str, ...]) -> str:
    """The INFERENCE_PRECISION_HINT the compiled model really uses ("unknown" if unreadable)."""
    if device != "AUTO":
        try:
            return ov_precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        except Exception as exc:
            logger.warning("cannot read INFERENCE_PRECISION_HINT back from %s: %s", device, exc)
            return "unknown"
    try:
        props = compiled.get_property("DEVICE_PROPERTIES")
    except Exception as exc:
        logger.warning("cannot read DEVICE_PROPERTIES back from AUTO: %s", exc)
        return "unknown"
    found = set()
    for d in devices:
        entry = props.get(d) or props.get(d.split(".")[0]) or {}
        hint = entry.get("INFERENCE_PRECISION_HINT")
        found.add(ov_precision_name(hint) if hint is not None else "unknown")
    return found.pop() if len(found) == 1 else ",".join(sorted(found)) or "unknown"
