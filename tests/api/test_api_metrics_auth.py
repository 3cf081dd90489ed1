"""``metrics_auth``: /metrics asks for a key with the metrics:read scope; refused scrapes are audited."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from click.testing import CliRunner

from appliance.cli import main
from appliance.keys import KeyStore
from appliance.settings import load_settings
from tests.api.conftest import MemoryAudit


def test_metrics_are_open_by_default_and_keyed_with_metrics_auth(
    tmp_path: Path, client_factory: Any, audit: MemoryAudit
) -> None:
    store = KeyStore(tmp_path / "state.db")
    _, scraper = store.create(["metrics:read"])
    _, inferer = store.create(["infer"])
    open_client = client_factory(keys=store)
    assert open_client.get("/metrics").status_code == 200
    keyed = client_factory(keys=store, metrics_auth=True)
    assert keyed.get("/metrics").status_code == 401
    assert keyed.get("/metrics", headers={"Authorization": f"Bearer {inferer}"}).status_code == 403
    ok = keyed.get("/metrics", headers={"Authorization": f"Bearer {scraper}"})
    assert ok.status_code == 200 and "inferbox_" in ok.text
    # refused scrapes are auth failures on the record; the scrapes themselves are not (every 15 s)
    metrics_records = [e for e in audit.events if e.action == "GET /metrics"]
    assert [(e.event, e.status) for e in metrics_records] == [("auth_failure", 401), ("auth_failure", 403)]


def test_the_setting_and_the_scope(tmp_path: Path) -> None:
    assert load_settings({"home": str(tmp_path)}, environ={}).metrics_auth is False
    assert load_settings({"home": str(tmp_path)}, environ={"INFERBOX_METRICS_AUTH": "true"}).metrics_auth is True
    made = CliRunner().invoke(
        main,
        ["keys", "create", "--scope", "metrics:read", "--json"],
        env={"INFERBOX_HOME": str(tmp_path), "INFERBOX_AUDIT": "false"},
        catch_exceptions=False,
    )
    assert made.exit_code == 0, made.output
