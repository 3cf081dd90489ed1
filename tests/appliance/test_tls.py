"""HTTPS settings: every wrong TLS file is refused before the model loads, with the setting named.

The real handshake (TLS, mutual TLS, plain HTTP and TLS 1.1 refused) is tested
against a real ``inferbox serve`` in ``tests/test_e2e_serve.py``.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.commands.doctor import server_report
from appliance.commands.options import EXIT_CONFIG
from appliance.exposure import check_plaintext
from appliance.settings import load_settings
from appliance.tls import plan_tls, server_context, ssl_options
from runtime.errors import ConfigError


def settings(tmp_path: Path, **values: Any) -> Any:
    return load_settings({"home": str(tmp_path / "home"), **values}, environ={})


def test_tls_off_by_default(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert plan_tls(s) is None
    assert ssl_options(None) == {}
    check_plaintext(s, None)  # loopback: plain HTTP is fine


def test_valid_files_give_a_plan_with_the_certificate(tmp_path: Path, tls_files: Any) -> None:
    plan = plan_tls(settings(tmp_path, tls_cert=tls_files.cert, tls_key=tls_files.key))
    assert plan is not None and plan.mode == "tls"
    assert "CN=server" in plan.certificate.subject
    assert set(plan.certificate.names) == {"127.0.0.1", "localhost"}
    assert 29 < plan.certificate.days_left() < 31
    assert len(plan.certificate.sha256) == 64
    options = ssl_options(plan)
    assert options["ssl_certfile"] == str(tls_files.cert) and options["ssl_keyfile"] == str(tls_files.key)
    assert "ssl_cert_reqs" not in options


def test_client_ca_makes_it_mutual(tmp_path: Path, tls_files: Any) -> None:
    plan = plan_tls(settings(tmp_path, tls_cert=tls_files.cert, tls_key=tls_files.key, tls_client_ca=tls_files.ca))
    assert plan is not None and plan.mode == "mutual-tls"
    options = ssl_options(plan)
    assert options["ssl_cert_reqs"] == ssl.CERT_REQUIRED and options["ssl_ca_certs"] == str(tls_files.ca)
    ctx = server_context(plan.cert, plan.key, plan.client_ca)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize("given", ["tls_cert", "tls_key"])
def test_half_a_pair_is_refused_naming_the_missing_one(tmp_path: Path, tls_files: Any, given: str) -> None:
    value = tls_files.cert if given == "tls_cert" else tls_files.key
    with pytest.raises(ConfigError) as err:
        plan_tls(settings(tmp_path, **{given: value}))
    missing = "tls_key" if given == "tls_cert" else "tls_cert"
    assert f"{missing} is not" in str(err.value)


def test_client_ca_without_a_certificate_is_refused(tmp_path: Path, tls_files: Any) -> None:
    with pytest.raises(ConfigError, match="tls_client_ca is set"):
        plan_tls(settings(tmp_path, tls_client_ca=tls_files.ca))


def test_missing_and_non_pem_files_are_named(tmp_path: Path, tls_files: Any) -> None:
    with pytest.raises(ConfigError) as err:
        plan_tls(settings(tmp_path, tls_cert=tmp_path / "nope.crt", tls_key=tls_files.key))
    assert "tls_cert" in str(err.value) and "does not exist" in str(err.value)
    der = tmp_path / "server.der"
    der.write_bytes(b"\x30\x82\x01\x0a" + b"\x00" * 64)
    with pytest.raises(ConfigError, match="not PEM"):
        plan_tls(settings(tmp_path, tls_cert=der, tls_key=tls_files.key))


def test_a_key_other_users_can_read_is_refused(tmp_path: Path, tls_files: Any) -> None:
    key = tmp_path / "open.key"
    key.write_bytes(tls_files.key.read_bytes())
    key.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        plan_tls(settings(tmp_path, tls_cert=tls_files.cert, tls_key=key))
    assert "tls_key" in str(err.value) and "0644" in str(err.value) and "chmod 0600" in str(err.value)
    key.chmod(0o640)  # the service's group may read it
    assert plan_tls(settings(tmp_path, tls_cert=tls_files.cert, tls_key=key)) is not None


def test_a_key_of_another_certificate_is_refused(tmp_path: Path, tls_files: Any) -> None:
    with pytest.raises(ConfigError, match="is not the private key of tls_cert's certificate"):
        plan_tls(settings(tmp_path, tls_cert=tls_files.cert, tls_key=tls_files.client_key))


def test_an_encrypted_key_is_refused_with_the_fix(tmp_path: Path, tls_files: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    plain = serialization.load_pem_private_key(tls_files.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        plain.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    locked.chmod(0o600)
    with pytest.raises(ConfigError, match=r"passphrase.*openssl pkey"):
        plan_tls(settings(tmp_path, tls_cert=tls_files.cert, tls_key=locked))


def test_a_client_ca_that_is_no_certificate_is_named(tmp_path: Path, tls_files: Any) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="tls_client_ca"):
        plan_tls(settings(tmp_path, tls_cert=tls_files.cert, tls_key=tls_files.key, tls_client_ca=bad))


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "inferbox.example"])
def test_plain_http_on_a_network_address_is_refused(tmp_path: Path, host: str) -> None:
    s = settings(tmp_path, host=host)
    with pytest.raises(ConfigError) as err:
        check_plaintext(s, None)
    assert "tls_cert and tls_key" in str(err.value) and "allow_plaintext" in str(err.value)
    check_plaintext(settings(tmp_path, host=host, allow_plaintext=True), None)


def test_https_on_a_network_address_is_allowed(tmp_path: Path, tls_files: Any) -> None:
    s = settings(tmp_path, host="0.0.0.0", tls_cert=tls_files.cert, tls_key=tls_files.key)
    check_plaintext(s, plan_tls(s))


def test_tls_settings_come_from_the_config_file_and_the_environment(tmp_path: Path, tls_files: Any) -> None:
    config = tmp_path / "inferbox.toml"
    config.write_text(f'[tls]\ntls_cert = "{tls_files.cert}"\ntls_key = "{tls_files.key}"\n')
    s = load_settings({"home": str(tmp_path)}, environ={}, config_file=config)
    assert s.tls_cert == tls_files.cert and s.tls_key == tls_files.key
    s = load_settings(
        {"home": str(tmp_path)},
        environ={"INFERBOX_TLS_CLIENT_CA": str(tls_files.ca), "INFERBOX_ALLOW_PLAINTEXT": "true"},
    )
    assert s.tls_client_ca == tls_files.ca and s.allow_plaintext is True


def test_serve_refuses_plain_http_on_a_network_address_before_loading(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--home", str(tmp_path / "h"), "--host", "0.0.0.0"], env={})
    assert result.exit_code == EXIT_CONFIG == 78  # the unit's RestartPreventExitStatus
    assert "clear text" in result.output and "tls_cert" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "h" / "models").exists()  # refused before building or loading anything


def test_serve_names_a_mismatched_key_before_loading(tmp_path: Path, tls_files: Any) -> None:
    result = CliRunner().invoke(
        main,
        [
            "serve",
            "--home",
            str(tmp_path / "h"),
            "--tls-cert",
            str(tls_files.cert),
            "--tls-key",
            str(tls_files.client_key),
        ],
        env={},
    )
    assert result.exit_code == EXIT_CONFIG and "tls_key" in result.output
    assert not (tmp_path / "h" / "models").exists()


def test_doctor_reports_the_certificate_and_its_expiry(tmp_path: Path, tls_factory: Any) -> None:
    soon = tls_factory(server_days=5)
    report = server_report(settings(tmp_path, host="0.0.0.0", tls_cert=soon.cert, tls_key=soon.key))
    assert report["tls"] == "tls" and report["problem"] is None
    assert "expires in" in report["warning"]
    assert report["certificate"]["names"] == ["localhost", "127.0.0.1"]
    expired = tls_factory(server_days=-0.5)
    report = server_report(settings(tmp_path, tls_cert=expired.cert, tls_key=expired.key))
    assert "expired" in report["problem"]
    report = server_report(settings(tmp_path, host="0.0.0.0"))
    assert "clear text" in report["problem"]
    json.dumps(report)  # the --json output


def test_doctor_exits_1_when_serve_would_refuse(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    result = CliRunner().invoke(main, ["doctor", "--home", str(home), "--json"], env={"INFERBOX_HOST": "0.0.0.0"})
    assert result.exit_code == 1, result.output
    out = json.loads(result.output)
    assert out["ok"] is False and "clear text" in out["server"]["problem"]


def test_a_certificate_file_holding_the_key_gets_the_keys_permission_check(tmp_path: Path, tls_files: Any) -> None:
    combined = tmp_path / "combined.pem"
    combined.write_bytes(tls_files.cert.read_bytes() + tls_files.key.read_bytes())
    combined.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        plan_tls(settings(tmp_path, tls_cert=combined, tls_key=tls_files.key))
    assert "tls_cert" in str(err.value) and "holds a private key" in str(err.value)
    combined.chmod(0o600)
    assert plan_tls(settings(tmp_path, tls_cert=combined, tls_key=tls_files.key)) is not None
    assert plan_tls(settings(tmp_path, tls_cert=combined, tls_key=combined)) is not None


def test_doctor_names_a_certificate_not_valid_yet(tmp_path: Path, tls_factory: Any) -> None:
    future = tls_factory(server_days=30, server_start_days=2)
    report = server_report(settings(tmp_path, tls_cert=future.cert, tls_key=future.key))
    assert "not valid before" in report["problem"] and "clients will refuse it" in report["problem"]
    report = server_report(settings(tmp_path, host="0.0.0.0"))
    assert report["problem"].startswith("serve would refuse to start:") and report["tls"] == "off"
    # a certificate serve refuses is not "tls: off" (read as TLS switched off)
    missing = server_report(settings(tmp_path, tls_cert=tmp_path / "gone.crt", tls_key=future.key))
    assert missing["problem"] and missing["tls"].startswith("not usable"), missing


def test_a_settings_error_at_serve_is_a_config_refusal_too(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--home", str(tmp_path / "h")], env={"INFERBOX_PORT": "70000"})
    assert result.exit_code == EXIT_CONFIG and "port" in result.output


def test_every_refusal_before_serving_exits_config_not_a_restartable_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing public_key was found only when the registry loaded (exit 2: the unit restarted it,
    and with --workers 2 uvicorn respawned crashing workers forever); a default model that did not
    build exited 2 and was rebuilt every 2 s."""
    missing = tmp_path / "nope.pub"
    result = CliRunner().invoke(
        main, ["serve", "--home", str(tmp_path / "h")], env={"INFERBOX_PUBLIC_KEY": str(missing)}
    )
    assert result.exit_code == EXIT_CONFIG and str(missing) in result.output
    assert not (tmp_path / "h").exists()  # before anything was prepared

    import appliance.server as server_mod

    def failing_prepare(settings: Any) -> Any:
        raise ConfigError("building the default model minilm failed (exit code 1)")

    monkeypatch.setattr(server_mod, "prepare", failing_prepare)
    result = CliRunner().invoke(main, ["serve", "--home", str(tmp_path / "h2")], env={})
    assert result.exit_code == EXIT_CONFIG and "building the default model" in result.output


def test_the_start_up_log_names_an_expired_certificate_and_one_near_expiry(
    tmp_path: Path, tls_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from appliance.commands.serve import _log_certificate

    log = logging.getLogger("test.serve")
    caplog.set_level(logging.INFO, logger="test.serve")
    for files, level, said in (
        (tls_factory(server_days=-1, server_start_days=-60), logging.ERROR, "expired on"),
        (tls_factory(server_days=30, server_start_days=2), logging.ERROR, "is not valid before"),
        (tls_factory(server_days=5), logging.WARNING, "expires in 5 days"),
    ):
        caplog.clear()
        plan = plan_tls(settings(tmp_path, tls_cert=files.cert, tls_key=files.key))
        assert plan is not None
        _log_certificate(log, plan)
        (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert record.levelno == level and said in record.getMessage() and str(files.cert) in record.getMessage()
    caplog.clear()
    fresh = tls_factory(server_days=90)
    plan = plan_tls(settings(tmp_path, tls_cert=fresh.cert, tls_key=fresh.key))
    assert plan is not None
    _log_certificate(log, plan)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
