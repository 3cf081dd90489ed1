"""The public surface of ``api`` and the light import path of ``api.protocols``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import api.app
import api.config

ROOT = Path(__file__).resolve().parents[2]


def test_package_exports() -> None:
    # in a subprocess from the repository root: the package's __init__ must run (an editable
    # install made before api/__init__.py existed maps ``api`` as a namespace package)
    code = (
        "import api; assert sorted(api.__all__) == ['ApiConfig', 'create_app'], api.__all__; "
        "assert callable(api.create_app) and api.ApiConfig().auth is True"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert api.app.__all__ == ["create_app"]
    assert api.config.__all__ == ["ApiConfig"]


def test_protocols_do_not_import_litestar() -> None:
    code = (
        "import sys, api.protocols, runtime.serving, runtime.batcher; assert 'litestar' not in sys.modules, 'litestar'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_config_from_settings_duck_typed() -> None:
    from appliance.settings import load_settings

    s = load_settings({"home": "/tmp/x", "max_queue_delay_ms": 5.0, "auth": False}, environ={})
    c = api.config.ApiConfig.from_settings(s)
    assert c.max_queue_delay_s == 0.005 and c.auth is False and c.max_body_bytes == s.max_body_bytes
    assert api.config.ApiConfig.from_settings(s, docs=False).docs is False
