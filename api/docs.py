"""OpenAPI docs at ``/docs`` that work on a box without internet.

Litestar's Swagger page loads its JavaScript from a CDN; an appliance has none.
When the ``swagger-ui-bundle`` package is installed its files are served from
``/docs/assets`` and the page points there; without it the page falls back to
the CDN (``/docs/openapi.json`` works either way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

__all__ = ["ASSETS_PATH", "docs_routes", "openapi_config", "swagger_assets"]

ASSETS_PATH = "/docs/assets"


def swagger_assets() -> Path | None:
    """The folder of the installed Swagger UI bundle, or None."""
    try:
        import swagger_ui_bundle  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = Path(swagger_ui_bundle.swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def openapi_config(title: str, version: str) -> OpenAPIConfig:
    assets = swagger_assets()
    if assets is None:
        plugin = SwaggerRenderPlugin(path="/")
    else:
        plugin = SwaggerRenderPlugin(
            path="/",
            js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            css_url=f"{ASSETS_PATH}/swagger-ui.css",
            standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
            favicon=f"<link rel='icon' type='image/png' href='{ASSETS_PATH}/favicon-32x32.png'>",
        )
    return OpenAPIConfig(title=title, version=version, path="/docs", render_plugins=[plugin])


def docs_routes() -> list[Any]:
    """The static route for the local Swagger assets (empty when the bundle is not installed)."""
    assets = swagger_assets()
    if assets is None:
        return []
    from litestar.static_files import create_static_files_router

    return [create_static_files_router(path=ASSETS_PATH, directories=[assets], include_in_schema=False)]
