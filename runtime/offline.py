"""Keep the appliance from phoning home.

``import openvino`` loads OpenVINO's converter, which loads ``openvino_telemetry``;
that package sends usage events to Google Analytics unless a consent file says
no (opt-out), from a forked process that can outlive its parent (seen: an
orphan stuck resolving the analytics host).  NNCF uses the same package.  Both
fall back to no-op stubs when it cannot be imported, so :func:`stay_offline`
makes that import fail, and sets the Hugging Face offline / no-telemetry
switches.  Entry points call it first (the CLI, uvicorn workers, Dask workers,
the benchmarks, the test session); importing this module does nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

__all__ = ["OFFLINE_ENV", "TELEMETRY_MODULES", "import_openvino", "openvino_core", "stay_offline"]

log = logging.getLogger(__name__)

#: modules that send telemetry; mapped to None in sys.modules so importing them raises ImportError
TELEMETRY_MODULES = ("openvino_telemetry",)

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}


def stay_offline(
    environ: MutableMapping[str, str] | None = None, modules: MutableMapping[str, Any] | None = None
) -> None:
    """Block telemetry modules and set the offline switches (existing values are kept)."""
    env = os.environ if environ is None else environ
    mods: MutableMapping[str, Any] = sys.modules if modules is None else modules
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    for name in TELEMETRY_MODULES:
        if mods.get(name) is not None:
            log.warning("%s was imported before stay_offline(); call it first in the entry point", name)
        mods[name] = None


def import_openvino() -> Any:
    """``import openvino``, telemetry blocked first: OpenVINO starts its telemetry client at import.

    Library code imports OpenVINO only through this, so even a caller that skipped
    the entry points (a notebook, a script) does not phone home.
    """
    stay_offline()
    import openvino

    return openvino


#: the one Core, once made (see :func:`openvino_core`)
_CORE: dict[str, Any] = {}
_CORE_LOCK = threading.Lock()


def openvino_core() -> Any:
    """The process's one ``openvino.Core`` (thread-safe; nothing here sets properties on it).

    One, kept for the life of the process, because OpenVINO's CPU plugin swaps the thread's
    alternate signal stack when a Core creates it and puts the one it saw back when that Core
    goes: two Cores released first-in-first-out leave the thread on a freed stack, and the next
    signal (Ctrl-C, the service's SIGTERM or SIGHUP) is a segmentation fault (reproduced with two
    Cores, openvino 2026.x)."""
    with _CORE_LOCK:
        if "core" not in _CORE:
            _CORE["core"] = import_openvino().Core()
        return _CORE["core"]
