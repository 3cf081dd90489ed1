"""ONNX Runtime backends: ``ort-cpu``, ``ort-cuda``, ``ort-tensorrt``, ``ort-openvino``.

"Available" is not "usable": onnxruntime-gpu lists CUDA and TensorRT with no GPU
present, and a session asked for an execution provider that cannot load runs on
CPU with only a warning (onnxruntime 1.32 warns ``UserWarning: Specified provider
... is not in available provider names`` and, for providers it cannot create,
prints "EP Error ... Falling back" and retries on CPU).  So :meth:`OrtBackend.open`
*proves* the choice: ``session.get_providers()[0]`` must be the requested
provider, else :class:`~runtime.errors.FallbackError` (or, with
``allow_fallback``, a recorded ``fallback`` and a warning).  The run-time
fallback of onnxruntime is switched off (``disable_fallback``) so a session
never changes provider after it was proved.

An :class:`OrtSession` is safe to call from several threads (onnxruntime's
``run`` is thread-safe).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.backends.base import OpenOptions, Probe
from runtime.backends.checks import TensorInfo, check_inputs, check_outputs, physical_threads
from runtime.errors import BackendError, BackendUnavailableError, FallbackError, InputError

if TYPE_CHECKING:
    import numpy.typing as npt

    from runtime.hardware import HardwareProfile

__all__ = ["ORT_BACKENDS", "OrtBackend", "OrtSession"]

logger = logging.getLogger(__name__)
#: ``warnings.catch_warnings`` swaps process-wide state: two opens overlapping (a model's streams
#: open side by side) could leave the filters at "always" or swallow each other's warnings
_CATCHING = threading.Lock()

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: TensorRT has no per-session TF32 switch (onnxruntime 1.32); NVIDIA_TF32_OVERRIDE=0 turns its
#: TF32 off for the process (it is read when CUDA starts)
TF32_OVERRIDE = "NVIDIA_TF32_OVERRIDE"

_ORT_TYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}

#: name -> (provider, device, speed_class, needs an NVIDIA GPU, install hint when the provider is missing)
ORT_BACKENDS: dict[str, tuple[str, str, int, bool, str]] = {
    "ort-cpu": (CPU, "cpu", 15, False, "pip install inferbox"),
    "ort-cuda": (CUDA, "cuda:0", 40, True, "install the gpu profile: onnxruntime-gpu"),
    "ort-tensorrt": (
        "TensorrtExecutionProvider",
        "cuda:0",
        50,
        True,
        "install the gpu profile: onnxruntime-gpu and TensorRT",
    ),
    "ort-openvino": (
        "OpenVINOExecutionProvider",
        "cpu",
        20,
        False,
        "install the onnxruntime-openvino profile, or use the native ov-* backends",
    ),
}


class OrtSession:
    """An open onnxruntime InferenceSession whose provider was proved."""

    def __init__(self, backend: str, session: Any, fallback: str | None) -> None:
        self.backend = backend
        self._session = session
        self.active: tuple[str, ...] = tuple(session.get_providers())
        self.fallback = fallback
        self.exec_precision = "fp32"
        self._inputs = tuple(
            TensorInfo(
                name=i.name,
                dtype=np.dtype(_ORT_TYPES[i.type]) if i.type in _ORT_TYPES else None,
                shape=tuple(d if isinstance(d, int) and d >= 0 else None for d in i.shape),
            )
            for i in session.get_inputs()
        )
        self.input_names: tuple[str, ...] = tuple(i.name for i in self._inputs)
        self.output_names: tuple[str, ...] = tuple(o.name for o in session.get_outputs())
        import onnxruntime

        #: a run's failure is the exception :meth:`run` turns into an error (a client's bad input:
        #: a 400); onnxruntime's own log line for it (stderr, coloured) is not written
        self._run_options = onnxruntime.RunOptions()
        self._run_options.log_severity_level = 4

    @property
    def threads(self) -> int:
        """Intra-op threads as the open session reports them (0: onnxruntime's default)."""
        if self._session is None:
            raise BackendError(f"{self.backend} session is closed; open a new one")
        return int(self._session.get_session_options().intra_op_num_threads)

    def run(
        self, inputs: dict[str, npt.NDArray[np.generic]], outputs: list[str] | None = None
    ) -> dict[str, npt.NDArray[np.generic]]:
        if self._session is None:
            raise BackendError(f"{self.backend} session is closed; open a new one")
        check_inputs(inputs, self._inputs)
        names = check_outputs(outputs, self.output_names)
        try:
            results = self._session.run(names, inputs, self._run_options)
        except Exception as exc:
            kind = type(exc).__name__
            if kind in ("InvalidArgument", "INVALID_ARGUMENT"):
                raise InputError(f"the model rejected the input: {exc}") from exc
            raise BackendError(f"{self.backend} failed to run the model: {kind}: {exc}") from exc
        return dict(zip(names, results, strict=True))

    def close(self) -> None:
        self._session = None


class OrtBackend:
    """One onnxruntime execution provider.

    ``providers`` overrides the provider list handed to ``InferenceSession``
    (default: the requested provider, then CUDA after TensorRT, then CPU for the nodes it cannot
    take; the CUDA EP with ``use_tf32 = 0``, so fp32 is computed in fp32).
    """

    def __init__(self, name: str, *, providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None) -> None:
        if name not in ORT_BACKENDS:
            raise BackendUnavailableError(f"unknown onnxruntime backend {name!r}; known: {sorted(ORT_BACKENDS)}")
        self.name = name
        self.provider, self.device, self.speed_class, self._needs_gpu, self._hint = ORT_BACKENDS[name]
        self._providers = list(providers) if providers is not None else None

    def probe(self, profile: HardwareProfile | None = None) -> Probe:
        if profile is None:
            from runtime.hardware import probe_hardware

            profile = probe_hardware()
        ort = profile.onnxruntime

        def result(usable: bool, reason: str) -> Probe:
            details = {"version": ort.version, "providers": ",".join(ort.providers)} if ort else {}
            return Probe(
                name=self.name,
                usable=usable,
                reason=reason,
                runtime="onnxruntime",
                device=self.device,
                precisions=("fp32",),
                formats=("onnx",),
                speed_class=self.speed_class,
                details=details,
                int8_saturates=self.device == "cpu" and profile.int8_saturates(),
            )

        if ort is None:
            return result(False, "onnxruntime not installed: pip install inferbox")
        if self.provider not in ort.providers:
            return result(False, f"{self.provider} not in this onnxruntime build ({self._hint})")
        if self._needs_gpu:
            if profile.nvidia_smi is None:
                return result(False, "no NVIDIA GPU found (nvidia-smi absent)")
            if not profile.gpus:
                return result(False, "no NVIDIA GPU found (nvidia-smi lists none)")
            return result(True, f"{self.provider} in onnxruntime {ort.version}; GPU 0: {profile.gpus[0].name}")
        return result(True, f"{self.provider} in onnxruntime {ort.version}")

    def _provider_list(self, options: OpenOptions) -> list[str | tuple[str, dict[str, Any]]]:
        if self._providers is not None:
            return list(self._providers)
        if self.provider == CPU:
            return [CPU]
        opts: dict[str, Any] = {}
        # fp32 means fp32: the CUDA EP's default use_tf32=1 runs fp32 MatMul/Conv in TF32 (10-bit
        # mantissa) on Ampere and newer, a precision no gate was measured in
        cuda: tuple[str, dict[str, Any]] = (CUDA, {"device_id": 0, "use_tf32": 0})
        if self.provider == CUDA:
            return [cuda, CPU]
        if self.provider == "TensorrtExecutionProvider":
            opts["device_id"] = 0
            if options.cache_dir is not None:
                trt = options.cache_dir / "trt"
                trt.mkdir(parents=True, exist_ok=True)
                opts["trt_engine_cache_enable"] = True
                opts["trt_engine_cache_path"] = str(trt)
            # the nodes TensorRT rejects run on CUDA, not on the CPU with copies to and fro
            return [(self.provider, opts), cuda, CPU]
        if self.provider == "OpenVINOExecutionProvider":
            # explicit, like the native backends: OpenVINO would pick bf16 on AMX CPUs
            opts["device_type"] = "CPU"
            opts["precision"] = "FP32"
            if options.cache_dir is not None:
                ov_cache = options.cache_dir / "ort-openvino"
                ov_cache.mkdir(parents=True, exist_ok=True)
                opts["cache_dir"] = str(ov_cache)
        return [(self.provider, opts), CPU]

    def open(self, model_path: Path, options: OpenOptions) -> OrtSession:
        if options.exec_precision != "fp32":
            raise BackendError(
                f"{self.name} computes in fp32 only, asked for {options.exec_precision}: "
                "use exec_precision fp32, or an ov-* backend for bf16/fp16"
            )
        try:
            import onnxruntime
        except ImportError as exc:
            raise BackendUnavailableError(f"onnxruntime not installed ({exc}): pip install inferbox") from exc
        so = onnxruntime.SessionOptions()
        so.intra_op_num_threads = physical_threads(options.intra_op_threads)
        so.inter_op_num_threads = max(1, options.inter_op_threads)
        so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = self._provider_list(options)
        requested = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if requested == "TensorrtExecutionProvider" and os.environ.setdefault(TF32_OVERRIDE, "0") != "0":
            logger.warning(
                "%s: %s=%s lets TensorRT compute fp32 in TF32; unset it for fp32 results",
                self.name,
                TF32_OVERRIDE,
                os.environ[TF32_OVERRIDE],
            )
        fallback: str | None = None
        with _CATCHING, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                session = onnxruntime.InferenceSession(str(model_path), so, providers=providers)
            except Exception as exc:
                if requested == CPU or not options.allow_fallback:
                    if requested == CPU:
                        raise BackendError(f"{self.name} cannot open {model_path}: {exc}") from exc
                    raise FallbackError(
                        f"{self.name}: onnxruntime could not create {requested} ({exc}); "
                        f"fix the {requested} install or allow fallback (allow_fallback = true)",
                        requested=requested,
                        active=[],
                    ) from exc
                logger.warning("%s: %s failed (%s); retrying on %s", self.name, requested, exc, CPU)
                try:
                    session = onnxruntime.InferenceSession(str(model_path), so, providers=[CPU])
                except Exception as exc2:
                    raise BackendError(f"{self.name} cannot open {model_path}: {exc2}") from exc2
        _report(self.name, caught)
        active = list(session.get_providers())
        if not active or active[0] != requested:
            message = (
                f"{self.name}: asked onnxruntime for {requested}, the session runs on {active[0] if active else '?'}"
                f" (providers {active})"
            )
            if not options.allow_fallback:
                raise FallbackError(
                    f"{message}; install/fix {requested} ({self._hint}), pick another backend, "
                    "or allow fallback (allow_fallback = true)",
                    requested=requested,
                    active=active,
                )
            fallback = f"{requested} -> {active[0] if active else '?'}"
            logger.warning("%s; running anyway because fallback is allowed", message)
        if hasattr(session, "disable_fallback"):
            session.disable_fallback()
        return OrtSession(self.name, session, fallback)


def _report(backend: str, caught: list[warnings.WarningMessage]) -> None:
    """Log onnxruntime's warnings from an open; hand on those other threads raised meanwhile (the
    event loop's, say), which the process-wide catch took from them."""
    for w in caught:
        if "onnxruntime" in Path(w.filename).parts:
            logger.info("%s: onnxruntime warned: %s", backend, w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
