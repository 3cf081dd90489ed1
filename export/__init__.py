"""inferbox export pipeline: a model the customer has -> a validated, signed package.

``export_model(spec, progress=None) -> Manifest`` (:mod:`export.pipeline`) is
the one entry point; :class:`~export.spec.ExportSpec` says what to export.
Nothing heavy is imported until used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExportSpec", "export_model"]


def __getattr__(name: str) -> Any:
    if name == "export_model":
        from export.pipeline import export_model

        return export_model
    if name == "ExportSpec":
        from export.spec import ExportSpec

        return ExportSpec
    raise AttributeError(name)
