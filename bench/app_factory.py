"""Fallback server for the HTTP benchmarks while ``inferbox serve`` is not there.

Composes the real pieces the way the appliance does (settings from the
environment, repository, ranking, :class:`runtime.serving.ModelRegistry`, the
SQLite key store, the audit log when ``INFERBOX_AUDIT`` is on) and runs
``api.create_app`` under uvicorn on 127.0.0.1.  ``bench.server`` uses it only
when ``appliance.cli.COMMANDS`` has no ``serve``.

``python -m bench.app_factory --port P``
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.settings import Settings
    from runtime.serving import LoadedModel

__all__ = ["build_app", "main"]


def build_app(settings: Settings) -> Any:
    """The Litestar app over ``settings`` with the default model loaded."""
    from api import create_app
    from api.config import ApiConfig
    from bench.inprocess import open_model
    from runtime.backends.registry import probe_all
    from runtime.repository import Repository
    from runtime.selection import Preference, rank, require_choice
    from runtime.serving import IndexEntry, ModelRegistry

    repo = Repository(settings.repository)
    probes = probe_all()

    def loader(name: str, version: int | None) -> LoadedModel:
        package = repo.open(name, version)
        decision = rank(probes, package.manifest, Preference(backend=settings.backend))
        c = require_choice(decision, f"{name}/{package.version}")
        return open_model(
            package, c.backend, c.variant, c.exec_precision, threads=settings.threads, cache_dir=settings.cache_dir
        )

    def index() -> list[IndexEntry]:
        return [
            IndexEntry(e.name, e.version, "READY" if e.ok else "UNAVAILABLE", e.error or "")
            for e in repo.entries(verify_hashes=False)
        ]

    registry = ModelRegistry(loader, index)
    registry.load(settings.default_model)
    keys = None
    if settings.auth:
        from appliance.keys import KeyStore

        keys = KeyStore(settings.state_db)
    audit = None
    if settings.audit:
        from appliance.audit.log import AuditLog

        audit = AuditLog.open(settings)
        audit.start()
    return create_app(registry=registry, config=ApiConfig.from_settings(settings), audit=audit, keys=keys)


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from appliance.settings import load_settings

    p = argparse.ArgumentParser(description="fallback inferbox server for the benchmarks")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    settings = load_settings()
    app = build_app(settings)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
