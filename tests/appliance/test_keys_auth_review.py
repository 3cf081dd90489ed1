"""Auth off only on loopback, the first admin key recorded, keys refusing a missing home, private
files, one-line errors for permission and database problems, and --model with a narrowed scope."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import appliance.commands.keys as keys_cmd
from appliance.cli import main
from appliance.commands.options import EXIT_CONFIG
from appliance.exposure import check_auth_off_is_loopback, is_loopback
from appliance.keys import KeyStore
from appliance.settings import load_settings
from runtime.errors import ConfigError, InputError


def _run(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


# -- 2. no API keys only on loopback --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("box.example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_serve_refuses_no_auth_on_a_network_address(tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = CliRunner().invoke(main, ["serve", "--home", str(home), "--no-auth", "--host", "0.0.0.0"])
    assert r.exit_code == EXIT_CONFIG, r.output
    assert "auth is off (cli)" in r.stderr and "'0.0.0.0' (cli)" in r.stderr and "loopback" in r.stderr
    assert not home.exists()  # refused before anything was prepared
    r = CliRunner().invoke(
        main, ["serve"], env={"INFERBOX_HOME": str(home), "INFERBOX_AUTH": "false", "INFERBOX_HOST": "10.0.0.5"}
    )
    assert r.exit_code == EXIT_CONFIG and "env INFERBOX_AUTH" in r.stderr and "env INFERBOX_HOST" in r.stderr


def test_auth_off_on_loopback_and_auth_on_anywhere_are_accepted(tmp_path: Path) -> None:
    for overrides in ({"auth": False, "host": "127.0.0.1"}, {"auth": False, "host": "::1"}, {"host": "0.0.0.0"}):
        check_auth_off_is_loopback(load_settings({"home": tmp_path, **overrides}, environ={}))


# -- 3. the first admin key is recorded -----------------------------------------------------------------


def test_the_first_admin_key_has_a_key_create_record(tmp_path: Path) -> None:
    from api.protocols import SCOPES
    from appliance.audit.log import AuditLog
    from appliance.server import prepare

    settings = load_settings({"home": tmp_path / "home"}, environ={})
    prepared = prepare(settings, build_default=False)
    assert prepared.admin_key_id is not None
    log = AuditLog.open(settings)
    try:
        created = [r for r in log.tail(50) if r.event == "key_create"]
    finally:
        log.close()
    assert [(r.credential_id, r.actor) for r in created] == [(prepared.admin_key_id, "system:first-start")]
    assert created[0].details["scopes"] == ",".join(SCOPES)
    assert prepared.admin_key is not None and prepared.admin_key not in repr(created)
    assert prepare(settings, build_default=False).admin_key is None  # once only


# -- 6. keys on a missing home; private files -----------------------------------------------------------


@pytest.mark.parametrize(
    "args", [("keys", "list"), ("keys", "revoke", "abcdefabcdef"), ("keys", "create", "--scope", "infer")]
)
def test_keys_refuse_a_home_that_does_not_exist(tmp_path: Path, args: tuple[str, ...]) -> None:
    typo = tmp_path / "hoem"
    r = CliRunner().invoke(main, list(args), env={"INFERBOX_HOME": str(typo), "INFERBOX_AUDIT": "false"})
    assert r.exit_code == 2, r.output
    assert f"no state folder at {typo}" in r.stderr and "INFERBOX_HOME=/var/lib/inferbox" in r.stderr
    assert not typo.exists()


@pytest.mark.parametrize(
    "args",
    [
        ("batch", "submit", "IN", "--model", "minilm"),
        ("batch", "run", "--once"),
        ("batch", "status"),
        ("batch", "retry", "20260101T000000Z-deadbeef"),
        ("audit", "tail"),
        ("audit", "verify"),
        ("audit", "export"),
        ("audit", "report"),
        ("models", "list"),
    ],
)
def test_batch_audit_and_models_refuse_a_home_that_does_not_exist(tmp_path: Path, args: tuple[str, ...]) -> None:
    """`batch submit --home <typo>` made a new state folder and put the job in its spool, where no
    worker looks; `audit tail` pointed at `signing-key create`, which made a home with an empty log;
    `models list` said there were no packages (exit 0)."""
    typo = tmp_path / "hoem"
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n')
    argv = [str(src) if a == "IN" else a for a in args]
    r = CliRunner().invoke(main, argv, env={"INFERBOX_HOME": str(typo)})
    assert r.exit_code in (2, 78), r.output  # 78: batch run, so that its unit does not restart it
    assert f"no state folder at {typo}" in r.stderr and "Traceback" not in r.output
    assert not typo.exists()


def test_models_list_of_a_repository_named_by_its_setting_needs_no_home(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    repository.mkdir()
    env = {"INFERBOX_HOME": str(tmp_path / "hoem"), "INFERBOX_REPOSITORY": str(repository)}
    r = CliRunner().invoke(main, ["models", "list"], env=env)
    assert r.exit_code == 0 and "no packages in" in r.output, r.output


def test_key_store_does_not_create_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no state folder at"):
        KeyStore(tmp_path / "missing" / "state.db")
    assert not (tmp_path / "missing").exists()


def test_files_the_cli_creates_are_private_and_the_umask_is_restored(tmp_path: Path) -> None:
    before = os.umask(0o022)
    try:
        r = CliRunner().invoke(
            main,
            ["keys", "create", "--scope", "infer", "--json"],
            env={"INFERBOX_HOME": str(tmp_path), "INFERBOX_AUDIT": "false"},
        )
        assert r.exit_code == 0, r.output
        assert stat.S_IMODE((tmp_path / "state.db").stat().st_mode) == 0o600
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)


def test_install_keeps_the_venv_and_units_readable_under_the_cli_umask(tmp_path: Path) -> None:
    r = _run("install", "--root", str(tmp_path), "--no-venv", "--prefix", "/opt/ib")
    assert r.exit_code == 0, r.output
    unit = tmp_path / "etc/systemd/system/inferbox-api.service"
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    doc = tmp_path / "opt/ib/share/doc/inferbox/operations.md"
    assert stat.S_IMODE(doc.stat().st_mode) == 0o644
    assert stat.S_IMODE(doc.parent.stat().st_mode) == 0o755


# -- 7. permission mistakes end in one `error:` line ----------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (
            PermissionError(13, "Permission denied", "/srv/home/state.db"),
            "error: Permission denied: /srv/home/state.db: run",
        ),
        (sqlite3.OperationalError("attempt to write a readonly database"), "error: a database in the state folder"),
    ],
)
def test_os_and_sqlite_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: Exception, expected: str
) -> None:
    def broken(path: Path) -> None:
        raise raised

    monkeypatch.setattr(keys_cmd, "KeyStore", broken)
    r = CliRunner().invoke(main, ["keys", "list"], env={"INFERBOX_HOME": str(tmp_path), "INFERBOX_AUDIT": "false"})
    assert r.exit_code == 2
    assert r.stderr.startswith(expected) and "Traceback" not in r.output
    assert "sudo -u inferbox" in r.stderr


# -- 9. --model with a model-scoped infer ---------------------------------------------------------------


def test_model_with_an_already_narrowed_scope_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "state.db")
    try:
        with pytest.raises(InputError, match=r"--model: 'other' narrows only a plain --scope infer"):
            store.create(["infer:tiny"], model="other")
        assert store.create(["infer:tiny"])[0].scopes == ("infer:tiny",)
        assert store.create(["infer"], model="other")[0].scopes == ("infer:other",)
    finally:
        store.close()
    r = _run("keys", "list", "--json", env={"INFERBOX_HOME": str(tmp_path), "INFERBOX_AUDIT": "false"})
    assert len(json.loads(r.stdout)) == 2


def test_serve_on_a_port_in_use_says_so_before_it_loads_or_records_anything(tmp_path: Path) -> None:
    """A second server on a used port loaded its models and recorded service_start, config and model_load
    before uvicorn failed to bind: the log showed a start that never served."""
    import socket

    home = tmp_path / "home"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(main, ["serve", "--home", str(home), "--port", str(port)])
    assert r.exit_code == 2 and f"error: 127.0.0.1:{port} is in use" in r.output and "--port" in r.output, r.output
    assert not (home / "audit.db").exists() and not (home / "models").exists()


def test_a_signing_key_another_first_start_made_meanwhile_is_kept_not_a_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two servers first started at once on one home: the second found no key, then could not write
    one ("already exists; ... pass --force", a flag serve lacks) and exited 78."""
    from appliance import server
    from runtime import signing

    settings = load_settings({"home": tmp_path}, environ={})
    settings.signing_key.parent.mkdir(parents=True)
    theirs = signing.generate_private_key()
    real = signing.write_private_key

    def racing(key: Any, path: Path) -> None:
        real(theirs, path)  # the other server, a moment earlier
        real(key, path)

    monkeypatch.setattr(signing, "write_private_key", racing)
    server.ensure_signing_key(settings)
    assert signing.key_id(signing.load_private_key(settings.signing_key)) == signing.key_id(theirs)
