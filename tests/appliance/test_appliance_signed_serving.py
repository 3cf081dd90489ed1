"""With ``public_key`` set, the server loads only the packages that key signed (the settings
reach the loader: ``read_package`` refusing them alone proves nothing about serving)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import server as server_mod
from appliance.settings import load_settings
from runtime.signing import generate_private_key, public_key_pem
from tests.runtime.conftest import publish_mlp


@pytest.mark.parametrize("signer", ["none", "other", "trusted"])
def test_the_registry_loads_only_packages_the_public_key_signed(tmp_path: Path, signer: str) -> None:
    home = tmp_path / "home"
    trusted = generate_private_key()
    (home / "keys").mkdir(parents=True)
    pub = home / "keys" / "trusted.pub"
    pub.write_text(public_key_pem(trusted))
    (home / "inferbox.toml").write_text(f'[paths]\npublic_key = "{pub}"\n')
    key = {"none": None, "other": generate_private_key(), "trusted": trusted}[signer]
    publish_mlp(home / "models", ["ort-cpu"], "mlp", signing_key=key)
    registry = server_mod.build_registry(load_settings({"home": home}))
    try:
        loaded = [m.name for m in registry.loaded()]
    finally:
        registry.close()
    assert loaded == (["mlp"] if signer == "trusted" else [])


def test_a_broken_package_is_named_to_clients_by_its_repository_path_not_the_boxs(tmp_path: Path) -> None:
    """The repository routes (``models:admin``) say which file of which package is wrong, relative to
    the repository: the box's folders are not the client's business."""
    from litestar.testing import TestClient

    home = tmp_path / "home"
    publish_mlp(home / "models", ["ort-cpu"], "mlp")
    broken = home / "models" / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{")
    settings = load_settings({"home": home, "auth": False, "audit": False}, environ={})
    with TestClient(server_mod.build_app(settings)) as client:
        index = client.post("/v2/repository/index", json={})
        loaded = client.post("/v2/repository/models/broken/load")
    assert index.status_code == 200, index.text
    reason = next(e["reason"] for e in index.json() if e["name"] == "broken")
    assert loaded.status_code == 409, loaded.text
    for said in (reason, loaded.json()["error"]):
        assert "broken/1/manifest.json" in said, said
        assert str(tmp_path) not in said and str(tmp_path.resolve()) not in said, said
