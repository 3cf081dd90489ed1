"""``inferbox audit ...`` end to end through the click group, on a real home folder."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import sys
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit.verify import verify_export
from appliance.cli import COMMANDS, main


def _load_tamper() -> ModuleType:
    if "audit_tamper" not in sys.modules:
        spec = importlib.util.spec_from_file_location("audit_tamper", Path(__file__).with_name("audit_tamper.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["audit_tamper"] = module
        spec.loader.exec_module(module)
    return sys.modules["audit_tamper"]


T = _load_tamper()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("INFERBOX_"):
            monkeypatch.delenv(name)
    return T.cli_home(tmp_path / "home", Ed25519PrivateKey.generate())


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["audit", *args], catch_exceptions=False)
    return result.exit_code, result.output


def _events(home: Path) -> list[str]:
    conn = sqlite3.connect(home / "audit.db")
    try:
        return [r[0] for r in conn.execute("SELECT event FROM records ORDER BY seq")]
    finally:
        conn.close()


def test_audit_is_registered_with_every_subcommand() -> None:
    assert COMMANDS["audit"] == "appliance.commands.audit:audit"
    code, out = _run("--help")
    assert code == 0
    for name in ("verify", "export", "tail", "prune", "report", "public-key"):
        assert name in out


def test_verify_ok_then_tampered_exits_non_zero_naming_the_seq(home: Path) -> None:
    code, out = _run("verify", "--home", str(home))
    assert code == 0 and out.startswith("OK"), out
    code, out = _run("verify", "--home", str(home), "--public-key", str(home / "keys" / "signing.key.pub"), "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    T.change_field(home / "audit.db", 4, "actor", "mallory")
    code, out = _run("verify", "--home", str(home))
    assert code == 1
    assert "FAILED at seq 4" in out


def test_export_is_verifiable_and_recorded(home: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "export.jsonl"
    code, out = _run("export", "--home", str(home), "--out", str(out_file))
    assert code == 0, out
    report = verify_export(out_file, Ed25519PrivateKey.generate().public_key())
    assert not report.ok  # another key
    pub = home / "keys" / "signing.key.pub"
    code, out = _run("verify", "--home", str(home), "--export", str(out_file), "--public-key", str(pub))
    assert code == 0, out
    assert _events(home)[-1] == "audit_export"
    code, out = _run("export", "--home", str(home), "--since", "2999-01-01", "--until", "2999-02-01T00:00:00Z")
    assert code == 0
    assert out.splitlines()[0].startswith('{"exported_at"')


def test_tail_prints_records_and_is_recorded(home: Path) -> None:
    code, out = _run("tail", "--home", str(home), "-n", "3", "--json")
    assert code == 0, out
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["seq"] for r in rows] == [5, 6, 7]
    assert _events(home)[-1] == "audit_read"
    code, out = _run("tail", "--home", str(home), "-n", "2")
    assert code == 0 and "audit_read" in out


def test_prune_refuses_recent_records_then_forced_prune_verifies(home: Path) -> None:
    code, out = _run("prune", "--home", str(home), "--before", "2999-01-01")
    assert code == 2 and "min_retention_days" in out
    code, out = _run("prune", "--home", str(home), "--before", "2000-01-01")
    assert code == 0 and "pruned 0 records" in out
    code, out = _run("prune", "--home", str(home), "--before", "2999-01-01", "--force")
    # 7 + the audit_prune records of the first two runs (the refused one is recorded too, as a failure)
    assert code == 0 and "pruned 9 records" in out, out
    assert _events(home) == ["audit_prune"]
    code, out = _run("verify", "--home", str(home))
    assert code == 0, out


def test_report_and_public_key(home: Path) -> None:
    code, out = _run("report", "--home", str(home), "--json")
    assert code == 0
    facts = json.loads(out)
    assert facts["retention"]["audit_retention_days"] == 365
    assert facts["retention"]["audit_log"]["records"] == 7
    assert facts["recipients"].startswith("none off the box")
    code, out = _run("report", "--home", str(home))
    assert code == 0 and "technical measures" in out
    assert "plain HTTP" in json.dumps(facts["technical_measures"])


def test_report_names_every_folder_data_leaves_the_box_for(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Art. 30 record said nothing left the box but `audit export`, with the hourly ship and the daily
    backups set; and it advised a TLS proxy on a box that serves HTTPS itself."""
    monkeypatch.setenv("INFERBOX_SHIP_DIR", "/mnt/audit-share")
    monkeypatch.setenv("INFERBOX_BACKUP_DIR", "/mnt/backups")
    code, out = _run("report", "--home", str(home), "--json")
    assert code == 0, out
    recipients = json.loads(out)["recipients"]
    assert "/mnt/audit-share" in recipients and "/mnt/backups" in recipients and "NOT encrypted" in recipients
    monkeypatch.setenv("INFERBOX_BACKUP_ENCRYPT_TO", "/etc/inferbox/backup.pub")
    code, out = _run("report", "--home", str(home), "--json")
    assert "encrypted to the key /etc/inferbox/backup.pub" in json.loads(out)["recipients"], out
    code, out = _run("public-key", "--home", str(home))
    assert code == 0 and out == (home / "keys" / "signing.key.pub").read_text()


def test_verify_off_the_box_without_a_key_names_public_key(home: Path, tmp_path: Path) -> None:
    """An auditor's machine has no signing key: the hint is --public-key, not a new (useless) key."""
    out_file = tmp_path / "export.jsonl"
    assert _run("export", "--home", str(home), "--out", str(out_file))[0] == 0
    auditor = tmp_path / "auditor-home"
    result = CliRunner().invoke(main, ["audit", "verify", "--home", str(auditor), "--export", str(out_file)])
    assert result.exit_code == 2
    assert "--public-key" in result.output and "signing-key create" not in result.output


def test_a_closed_pipe_is_not_reported_as_a_file_problem(home: Path) -> None:
    """`inferbox audit tail --json | head`: the reader leaving is no error worth a message."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBOX_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "audit", "tail", "--home", str(home), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command writes its first line
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode == 141  # 128 + SIGPIPE: not 1, which audit verify uses for "failed"
    assert "error:" not in err and "Traceback" not in err and "Broken pipe" not in err, err


def test_legacy_start_with_an_export_is_refused_not_ignored(home: Path, tmp_path: Path) -> None:
    """The flag did nothing for --export, though a truncated export's message pointed to it."""
    out_file = tmp_path / "export.jsonl"
    assert _run("export", "--home", str(home), "--out", str(out_file))[0] == 0
    code, out = _run("verify", "--home", str(home), "--export", str(out_file), "--legacy-start")
    assert code == 2 and "--legacy-start is for a database" in out, out


def test_a_database_changed_by_hand_is_called_damaged_not_a_permissions_problem(home: Path) -> None:
    """A text column that is not UTF-8 (edited in) made `audit tail` advise checking who owns the files."""
    conn = sqlite3.connect(home / "audit.db")
    conn.execute("DROP TRIGGER records_no_update")
    conn.execute("UPDATE records SET actor = CAST(x'ff' AS TEXT) WHERE seq = 3")
    conn.commit()
    conn.close()
    result = CliRunner().invoke(main, ["audit", "tail", "--home", str(home)])
    assert result.exit_code == 2, result.output
    assert "damaged, or was changed by hand" in result.output and "belong to the user" not in result.output


def test_a_file_that_is_no_export_cannot_be_verified_exit_2_not_tampered(home: Path, tmp_path: Path) -> None:
    """`verify --export /etc/passwd` said FAILED once per line and exited 1, the tampered export's
    code; a file with no export line at all is the wrong file (2, as an unreadable one), named once."""
    key = str(home / "keys" / "signing.key.pub")
    wrong = tmp_path / "passwd"
    wrong.write_text("root:x:0:0:root:/root:/bin/bash\n" * 25)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    for path, said in ((wrong, "is not an inferbox audit export: none of its 25 lines is one"), (empty, "is empty")):
        code, out = _run("verify", "--export", str(path), "--public-key", key)
        assert code == 2 and f"{path} {said}" in out and out.count("\n") == 1, out
    # an export with one line left intact is an export that was changed: 1, with its problems
    good = tmp_path / "export.jsonl"
    assert _run("export", "--home", str(home), "--out", str(good))[0] == 0
    lines = good.read_bytes().splitlines(keepends=True)
    good.write_bytes(lines[0] + b"".join(b"x" + line for line in lines[1:]))
    code, out = _run("verify", "--export", str(good), "--public-key", key)
    assert code == 1 and "FAILED" in out, out


def test_an_export_never_replaces_an_earlier_one_unless_forced(home: Path, tmp_path: Path) -> None:
    """`audit export --out` silently replaced the file there: perhaps the copy kept for --against."""
    kept = tmp_path / "kept.jsonl"
    assert _run("export", "--home", str(home), "--out", str(kept))[0] == 0
    before = kept.read_bytes()
    code, out = _run("export", "--home", str(home), "--out", str(kept))
    assert code == 2 and "exists" in out and "--force" in out, out
    assert kept.read_bytes() == before
    assert _run("export", "--home", str(home), "--out", str(kept), "--force")[0] == 0
    assert kept.read_bytes() != before  # the second export holds the first one's audit_export record


def test_verify_on_a_box_that_keeps_no_log_is_not_an_alert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daily verify timer is enabled on every box: with audit = false it failed every night."""
    for name in list(os.environ):
        if name.startswith("INFERBOX_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("INFERBOX_AUDIT", "false")
    code, out = _run("verify", "--home", str(home))
    assert code == 0 and "audit is off (env INFERBOX_AUDIT) and there is no log: nothing to verify" in out, out
    code, out = _run("verify", "--home", str(tmp_path / "mistyped"))
    assert code == 2, out  # a home that is not there is still an error
    monkeypatch.delenv("INFERBOX_AUDIT")
    code, out = _run("verify", "--home", str(home))
    assert code == 2 and "nothing to verify" not in out, out  # audit on and no log: the log is missing


def test_digest_tells_whether_a_candidate_body_is_a_records_input(home: Path, tmp_path: Path) -> None:
    """The docs promised an auditor could check a candidate input; the keys stay on the box and no
    command did it.  The operator runs this with the auditor's candidate; the check is recorded."""
    from appliance.audit.log import AuditLog

    body = b'{"model": "minilm", "input": "John Smith IBAN DE89"}'
    from runtime.signing import load_private_key

    key = load_private_key(home / "keys" / "signing.key")
    log = AuditLog(home / "audit.db", signing_key=key, digest_keys_dir=home / "keys" / "digest")
    digest = log.keyring.digest(body)
    seq = log.append(T.event(99, input_digest=digest.hexdigest, digest_key_id=digest.key_id))
    log.close()
    same, other = tmp_path / "same.json", tmp_path / "other.json"
    same.write_bytes(body)
    other.write_bytes(body.replace(b": ", b":"))  # the same text, another spelling: another body
    code, out = _run("digest", "--home", str(home), "--seq", str(seq), str(same))
    assert code == 0 and out.startswith(f"match: {same} is the input of record {seq}"), out
    code, out = _run("digest", "--home", str(home), "--seq", str(seq), str(other))
    assert code == 1 and out.startswith("no match"), out
    code, out = _run("digest", "--home", str(home), "--key-id", digest.key_id, str(same))
    assert code == 0 and out.strip() == digest.hexdigest
    code, out = _run("digest", "--home", str(home), "--seq", "1", str(same))
    assert code == 1 and "record 1 has no input digest" in out, out
    code, out = _run("digest", "--home", str(home), str(same))
    assert code == 2 and "--seq" in out and "--key-id" in out
    assert _run("verify", "--home", str(home))[0] == 0
    reads = [r for r in T.records(home / "audit.db") if r.action == "inferbox audit digest"]
    assert [r.details.get("matches") for r in reads] == ["true", "false", None, None]


def test_digest_records_the_read_also_when_the_key_is_not_there(home: Path, tmp_path: Path) -> None:
    candidate = tmp_path / "body.json"
    candidate.write_bytes(b"{}")
    code, out = _run("digest", "--home", str(home), "--key-id", "20200101T000000Z", str(candidate))
    assert code == 2 and "digest key 20200101T000000Z is not in" in out, out
    reads = [r for r in T.records(home / "audit.db") if r.action == "inferbox audit digest"]
    assert [r.details["key_id"] for r in reads] == ["20200101T000000Z"]


def test_report_names_the_backups_and_exports_the_log_records_whatever_the_shells_settings(
    home: Path, tmp_path: Path
) -> None:
    """On an installed box the units set ship_dir and backup_dir in their own environment: the report,
    run from a shell, said "none off the box" beside a log of plain backups."""
    (tmp_path / "bk").mkdir()
    made = CliRunner().invoke(
        main, ["backup", "create", "--home", str(home), "--to", str(tmp_path / "bk"), "--same-disk", "--no-models"]
    )
    assert made.exit_code == 0, made.output
    assert _run("export", "--home", str(home), "--out", str(tmp_path / "export.jsonl"))[0] == 0
    code, out = _run("report", "--home", str(home), "--json")
    assert code == 0, out
    recipients = json.loads(out)["recipients"]
    assert f"per the audit log: 1 backup(s) written to {tmp_path / 'bk'}" in recipients, recipients
    assert "1 of them NOT encrypted" in recipients and "1 audit export(s)" in recipients, recipients


def test_a_start_with_the_audit_log_off_is_recorded_and_the_report_says_so(home: Path, tmp_path: Path) -> None:
    """`serve --no-audit` on a box that keeps a log answered with no trace at all, and the report said
    "authentication required" and nothing of the log being off; a prune, and the shipped copies, were
    not in it either."""
    from appliance.audit.report import art30_facts
    from appliance.server import _record_unaudited_start
    from appliance.settings import load_settings

    assert _run("prune", "--home", str(home), "--before", "2999-01-01", "--force")[0] == 0
    off = load_settings({"home": home, "audit": False, "auth": False}, environ={})
    _record_unaudited_start(off)
    assert _events(home)[-2:] == ["service_start", "config"]
    (ship := tmp_path / "ship").mkdir()
    assert _run("ship", "--home", str(home), "--to", str(ship))[0] == 0
    facts = art30_facts(load_settings({"home": home}, environ={}))
    measures = " ".join(facts["technical_measures"])
    assert "authentication required (these settings); DISABLED (auth = false) when the API last started" in measures
    assert "the audit log on (these settings); OFF (audit = false)" in measures, measures
    (pruned,) = facts["retention"]["audit_log"]["pruned"]
    assert "removed at" in pruned and "with --force" in pruned, pruned
    assert f"copy(ies) of the log shipped to {ship}" in facts["recipients"], facts["recipients"]
