"""The serving settings the API needs, as one frozen struct (the API never imports appliance)."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["ApiConfig"]


class ApiConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything :func:`api.create_app` needs to know about serving."""

    auth: bool = True
    docs: bool = True
    #: ``/metrics`` asks for a key with the ``metrics:read`` scope (else it is open, as scrapers expect)
    metrics_auth: bool = False
    truncate: bool = True
    # limits
    max_body_bytes: int = 16 << 20
    max_inputs: int = 2048
    max_tensor_elements: int = 16 * 1024 * 1024
    max_json_depth: int = 32
    rate_limit_per_minute: int = 0
    #: tokens a key's text requests may bring per minute (0: unlimited); a key's own limit comes first
    tokens_per_minute: int = 0
    # batching
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.002
    queue_limit: int = 4096
    request_timeout_s: float = 30.0
    #: seconds a request's body may take to arrive in full (then 408)
    body_timeout_s: float = 60.0
    #: server processes, each with its own models (a repository load / unload reaches one of them)
    workers: int = 1
    #: with several workers: the folder where each writes its metrics, so that any of them answers
    #: ``/metrics`` with all of them added up (:mod:`api.metrics_share`); empty: this process only
    metrics_folder: str = ""
    #: name and version reported by ``GET /v2``
    server_name: str = "inferbox"
    server_version: str = "0.1.0"

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> ApiConfig:
        """Build from :class:`appliance.settings.Settings` (duck-typed: plain attribute access)."""
        values: dict[str, Any] = {
            "auth": bool(settings.auth),
            "docs": bool(settings.docs),
            "metrics_auth": bool(settings.metrics_auth),
            "truncate": bool(settings.truncate),
            "max_body_bytes": int(settings.max_body_bytes),
            "max_inputs": int(settings.max_inputs),
            "max_tensor_elements": int(settings.max_tensor_elements),
            "max_json_depth": int(settings.max_json_depth),
            "rate_limit_per_minute": int(settings.rate_limit_per_minute),
            "tokens_per_minute": int(getattr(settings, "tokens_per_minute", 0)),
            "max_batch_size": int(settings.max_batch_size),
            "max_queue_delay_s": float(settings.max_queue_delay_ms) / 1000.0,
            "queue_limit": int(settings.queue_limit),
            "request_timeout_s": float(settings.request_timeout_s),
            "body_timeout_s": float(settings.body_timeout_s),
            "workers": int(getattr(settings, "workers", 1)),
        }
        values.update(overrides)
        return cls(**values)
