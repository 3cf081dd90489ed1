"""inferbox REST API: Litestar app factory (KServe v2, OpenAI embeddings, metrics).

``api.protocols`` is imported by the audit log and the batch worker, so this
package imports Litestar only when :func:`create_app` is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api.app import create_app
    from api.config import ApiConfig

__all__ = ["ApiConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from api.app import create_app

        return create_app
    if name == "ApiConfig":
        from api.config import ApiConfig

        return ApiConfig
    raise AttributeError(f"module 'api' has no attribute {name!r}")
