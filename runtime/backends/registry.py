"""The table of backends by name, and probing them all.

``BACKENDS`` maps a name to a factory; nothing heavy is imported until a
backend is probed or opened.  :func:`probe_all` looks at the hardware once and
asks every backend what it can do there; it never raises.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from runtime.backends.base import Backend, Probe
from runtime.backends.fake import FakeBackend
from runtime.backends.openvino import OpenVinoBackend
from runtime.backends.ort import OrtBackend
from runtime.errors import BackendUnavailableError

if TYPE_CHECKING:
    from runtime.hardware import HardwareProfile

__all__ = ["BACKENDS", "get_backend", "probe_all", "ran_on"]

logger = logging.getLogger(__name__)

BACKENDS: dict[str, Callable[[], Backend]] = {
    "ort-cpu": lambda: OrtBackend("ort-cpu"),
    "ort-cuda": lambda: OrtBackend("ort-cuda"),
    "ort-tensorrt": lambda: OrtBackend("ort-tensorrt"),
    "ort-openvino": lambda: OrtBackend("ort-openvino"),
    "ov-cpu": lambda: OpenVinoBackend("ov-cpu"),
    "ov-gpu": lambda: OpenVinoBackend("ov-gpu"),
    "ov-npu": lambda: OpenVinoBackend("ov-npu"),
    "ov-auto": lambda: OpenVinoBackend("ov-auto"),
    "fake": FakeBackend,
}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; an unknown name is a BackendUnavailableError listing the known ones."""
    factory = BACKENDS.get(name)
    if factory is None:
        raise BackendUnavailableError(f"unknown backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}")
    return factory()


def ran_on(backend: str, active: Sequence[str]) -> str:
    """The backend that really runs a session opened by ``backend`` whose proof found ``active``
    (its providers / execution devices): ``backend`` itself unless the session fell back to another
    provider or device (``ort-cuda`` running on ``CPUExecutionProvider`` ran as ``ort-cpu``)."""
    from runtime.backends.openvino import OV_BACKENDS
    from runtime.backends.ort import ORT_BACKENDS

    if not active:
        return backend
    first = active[0]
    if backend in ORT_BACKENDS:
        if first == ORT_BACKENDS[backend][0]:
            return backend
        return next((name for name, spec in ORT_BACKENDS.items() if spec[0] == first), backend)
    if backend in OV_BACKENDS:
        device = OV_BACKENDS[backend][0]
        if device in ("AUTO", first) or first.startswith(device + "."):
            return backend
        return next(
            (
                name
                for name, spec in OV_BACKENDS.items()
                if spec[0] != "AUTO" and (first == spec[0] or first.startswith(spec[0] + "."))
            ),
            backend,
        )
    return backend


def _runtime_of(name: str) -> str:
    if name.startswith("ort-"):
        return "onnxruntime"
    if name.startswith("ov-"):
        return "openvino"
    return "fake"


def probe_all(profile: HardwareProfile | None = None) -> list[Probe]:
    """A :class:`Probe` for every registered backend, in table order. Never raises.

    The hardware is probed once (or ``profile`` is used) and handed to every
    backend whose ``probe`` accepts a ``profile`` argument.
    """
    if profile is None:
        from runtime.hardware import probe_hardware

        profile = probe_hardware()
    probes: list[Probe] = []
    for name, factory in BACKENDS.items():
        try:
            backend = factory()
            if "profile" in inspect.signature(backend.probe).parameters:
                probe: Probe = backend.probe(profile)  # type: ignore[call-arg]
            else:
                probe = backend.probe()
        except Exception as exc:
            logger.warning("probing backend %s failed: %s", name, exc)
            probe = Probe(
                name=name,
                usable=False,
                reason=f"probe failed: {type(exc).__name__}: {exc}",
                runtime=_runtime_of(name),  # type: ignore[arg-type]
                device="?",
            )
        probes.append(probe)
    return probes
