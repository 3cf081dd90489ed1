"""Provenance of a package: the source, its digest, when, with which tools, on which machine."""

from __future__ import annotations

import datetime as dt
import os
import platform

from export.sources import Prepared
from runtime.manifest import Provenance

__all__ = ["TOOLS", "provenance_of"]

TOOLS = (
    "onnx",
    "onnxruntime",
    "openvino",
    "nncf",
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "sentence-transformers",
    "numpy",
    "inferbox",
)


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in TOOLS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "cpus": str(os.cpu_count() or 0),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def provenance_of(p: Prepared) -> Provenance:
    return Provenance(
        source_kind=p.kind,
        source=p.source,
        source_sha256=p.source_sha256,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        tool_versions=_tool_versions(),
        machine=_machine(),
    )
