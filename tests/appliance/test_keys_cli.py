"""``inferbox keys create | list | revoke`` through the real CLI entry point."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import appliance.commands.keys as keys_cmd
from api.protocols import AuditEvent
from appliance.cli import main
from appliance.keys import KeyStore


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"INFERBOX_HOME": str(tmp_path), "INFERBOX_AUDIT": "false"}


def _run(env: dict[str, str], *args: str) -> Any:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result


def test_create_json_list_revoke(env: dict[str, str], tmp_path: Path) -> None:
    r = _run(env, "keys", "create", "--scope", "infer", "--model", "minilm", "--name", "team", "--json")
    assert r.exit_code == 0, r.output
    made = json.loads(r.stdout)
    assert set(made) == {"id", "key"}
    store = KeyStore(tmp_path / "state.db")
    assert store.verify(made["key"]).scopes == ("infer:minilm",)
    r = _run(env, "keys", "list", "--json")
    listed = json.loads(r.stdout)
    assert [k["id"] for k in listed] == [made["id"]] and listed[0]["state"] == "active"
    assert made["key"] not in r.stdout
    r = _run(env, "keys", "revoke", made["id"])
    assert r.exit_code == 0 and made["id"] in r.stdout
    assert json.loads(_run(env, "keys", "list", "--json").stdout)[0]["state"] == "revoked"
    store.close()


def test_plain_create_warns_it_is_shown_once(env: dict[str, str]) -> None:
    r = _run(env, "keys", "create", "--scope", "models:admin", "--expires", "2099-01-01")
    assert r.exit_code == 0
    assert "shown only once" in r.stderr
    assert any(line.startswith("ibx_") for line in r.stdout.splitlines())
    listing = _run(env, "keys", "list").stdout
    assert "models:admin" in listing and "2099-01-01" in listing


def test_errors_name_the_fix(env: dict[str, str]) -> None:
    r = _run(env, "keys", "create", "--scope", "root")
    assert r.exit_code == 2 and "--scope" in r.stderr
    r = _run(env, "keys", "revoke", "abcdefabcdef")
    assert r.exit_code == 2 and "keys list" in r.stderr
    r = _run(env, "keys", "create", "--scope", "infer", "--expires", "soon")
    assert r.exit_code == 2 and "YYYY-MM-DD" in r.stderr


def test_revoke_takes_the_whole_key_and_never_repeats_a_secret(env: dict[str, str]) -> None:
    """The key from first-admin.key is what an operator has at hand: revoke took only the id, and
    its error quoted the whole secret back into the terminal (and any log of it)."""
    made = json.loads(_run(env, "keys", "create", "--scope", "infer", "--json").stdout)
    r = _run(env, "keys", "revoke", made["key"])
    assert r.exit_code == 0 and r.stdout.strip() == f"revoked key {made['id']}", r.output
    assert made["key"] not in r.output
    secret = made["key"].split("_", 2)[2]
    for mistyped in (made["key"][:-1], made["key"] + "x", secret):
        r = _run(env, "keys", "revoke", "--", mistyped)  # a secret may start with "-"
        assert r.exit_code == 2 and "a key id is 12 hexadecimal characters" in r.stderr, r.output
        assert secret[:20] not in r.output, r.output


def test_a_key_for_a_model_the_repository_lacks_is_made_with_a_warning(env: dict[str, str], tmp_path: Path) -> None:
    r = _run(env, "keys", "create", "--scope", "infer", "--model", "minlm", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["key"].startswith("ibx_")  # stdout stays the key alone
    assert "warning: model 'minlm' is not in the repository" in r.stderr and "models list" in r.stderr
    assert "warning" not in _run(env, "keys", "create", "--scope", "infer").stderr  # no --model, no warning


def test_a_negative_rate_limit_is_refused_naming_the_flag(env: dict[str, str]) -> None:
    r = _run(env, "keys", "create", "--scope", "infer", "--rate-limit", "-5")
    assert r.exit_code == 2 and "--rate-limit" in r.stderr and "rate_limit_per_minute" not in r.stderr, r.output


def test_create_and_revoke_are_recorded(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[AuditEvent] = []

    @contextmanager
    def recorder(settings: Any) -> Any:
        yield events.append

    monkeypatch.setattr(keys_cmd, "recorder_factory", recorder)
    made = json.loads(_run(env, "keys", "create", "--scope", "infer", "--rate-limit", "7", "--json").stdout)
    _run(env, "keys", "revoke", made["id"])
    assert [(e.event, e.credential_id) for e in events] == [("key_create", made["id"]), ("key_revoke", made["id"])]
    assert made["key"] not in repr(events)
    assert events[0].details["rate_limit_per_minute"] == "7"  # the record said all but the key's rate limit


def test_a_name_with_a_control_character_is_refused(env: dict[str, str]) -> None:
    """`keys list` prints a key a line: a newline in a name could forge another key's line."""
    forged = "ops\nabcdef123456  keys:admin  active"
    r = _run(env, "keys", "create", "--scope", "infer", "--name", forged)
    assert r.exit_code == 2 and "--name" in r.stderr and "control characters" in r.stderr
    assert _run(env, "keys", "create", "--scope", "infer", "--name", "Ops team, ünïcode").exit_code == 0


def test_keys_is_a_registered_command(env: dict[str, str]) -> None:
    r = _run(env, "--help")
    assert "keys" in r.stdout


def test_real_audit_log_records_key_create(tmp_path: Path) -> None:
    from appliance.audit.log import AuditLog
    from appliance.settings import load_settings
    from runtime.signing import generate_private_key, write_private_key

    env = {"INFERBOX_HOME": str(tmp_path), "INFERBOX_AUDIT": "true"}
    settings = load_settings({"home": tmp_path}, environ={})
    write_private_key(generate_private_key(), settings.signing_key)
    made = json.loads(_run(env, "keys", "create", "--scope", "infer", "--json").stdout)
    with AuditLog.open(settings) as log:
        records = log.tail(10)
    created = [r for r in records if r.event == "key_create"]
    assert len(created) == 1 and created[0].credential_id == made["id"]
    assert created[0].details["scopes"] == "infer"
    assert made["key"] not in repr(records)
