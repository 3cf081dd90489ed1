"""``signing-key create --force`` retires the old key: the audit log's old checkpoints keep verifying.

Before, the old public key was thrown away: ``audit verify`` then said "bad checkpoint signature ...
names signing key X, the trusted key is Y", which reads like tampering, and prune, ship and backups
refused the log.
"""

from __future__ import annotations

import json
import logging
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from api.protocols import AuditEvent
from appliance.audit.log import AuditLog
from appliance.audit.prune import prune_prefix
from appliance.audit.schema import connect, read_log_id
from appliance.audit.signer import Signer
from appliance.audit.trust import trusted_keys
from appliance.audit.verify import verify_db
from appliance.settings import load_settings
from runtime.signing import (
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_pem,
    write_private_key,
)
from runtime.times import utc_iso

from .conftest import run_cli


def _box(tmp_path: Path) -> tuple[Path, str]:
    """A box with a signing key and audit records it signed (through the CLI); the key's id."""
    home = tmp_path / "home"
    home.mkdir()
    assert run_cli(home, "signing-key", "create").exit_code == 0
    made = run_cli(home, "keys", "create", "--scope", "infer", "--json")  # recorded in the audit log
    assert made.exit_code == 0, made.output
    verified = run_cli(home, "audit", "verify")
    assert verified.exit_code == 0 and verified.stdout.startswith("OK"), verified.output
    return home, key_id(load_private_key(home / "keys" / "signing.key"))


def test_force_retires_the_old_key_and_the_log_keeps_verifying(tmp_path: Path) -> None:
    home, old_id = _box(tmp_path)
    old_pem = (home / "keys" / "signing.key.pub").read_text()
    rotated = run_cli(home, "signing-key", "create", "--force")
    assert rotated.exit_code == 0, rotated.output
    retired = home / "keys" / "retired" / f"{old_id}.pub"
    assert f"retired key: {retired} (key id {old_id})" in rotated.stdout
    assert retired.read_text() == old_pem and stat.S_IMODE(retired.stat().st_mode) == 0o644
    new_id = key_id(load_private_key(home / "keys" / "signing.key"))
    assert new_id != old_id

    # records signed after the rotation: the log holds checkpoints of both keys
    assert run_cli(home, "keys", "create", "--scope", "infer", "--json").exit_code == 0
    verified = run_cli(home, "audit", "verify", "--json")
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.stdout)
    assert report["ok"] is True and sorted(report["key_ids"]) == sorted([old_id, new_id])

    # the retired key taken away: the failure says where the missing key belongs, not only "bad signature"
    retired.unlink()
    failed = run_cli(home, "audit", "verify")
    assert failed.exit_code == 1
    assert f"names signing key '{old_id}'" in failed.stdout
    assert "keys/retired/" in failed.stdout and f"{old_id}.pub" in failed.stdout and "--public-key" in failed.stdout


def test_a_key_retired_by_hand_before_is_not_written_twice(tmp_path: Path) -> None:
    """The docs' old first step (`cp signing.key.pub retired/old.pub`) already kept it."""
    home, _ = _box(tmp_path)
    retired = home / "keys" / "retired"
    retired.mkdir()
    (retired / "old.pub").write_text((home / "keys" / "signing.key.pub").read_text())
    rotated = run_cli(home, "signing-key", "create", "--force")
    assert rotated.exit_code == 0, rotated.output
    assert f"retired key: {retired / 'old.pub'}" in rotated.stdout
    assert sorted(p.name for p in retired.iterdir()) == ["old.pub"]
    assert run_cli(home, "audit", "verify").exit_code == 0


def test_an_unreadable_old_key_is_retired_from_its_public_half_or_refused(tmp_path: Path) -> None:
    home, old_id = _box(tmp_path)
    key = home / "keys" / "signing.key"
    key.write_text("damaged\n")  # the private key lost; its .pub still names it
    assert run_cli(home, "signing-key", "create", "--force").exit_code == 0
    assert key_id(load_public_key(home / "keys" / "retired" / f"{old_id}.pub")) == old_id
    assert run_cli(home, "audit", "verify").exit_code == 0

    current = key.read_bytes()
    key.write_text("damaged\n")
    (home / "keys" / "signing.key.pub").write_text("damaged too\n")
    refused = run_cli(home, "signing-key", "create", "--force")
    assert refused.exit_code != 0
    assert "cannot be retired" in refused.output and str(home / "keys" / "retired") in refused.output
    assert "Traceback" not in refused.output
    assert key.read_text() == "damaged\n"  # nothing replaced: the operator decides
    key.write_bytes(current)


def test_a_key_written_elsewhere_is_not_retired_into_the_box(tmp_path: Path) -> None:
    """A build box's package key (--out) is none of this box's audit keys: retiring it would make
    the box trust it."""
    home, _ = _box(tmp_path)
    other = tmp_path / "build" / "package.key"
    assert run_cli(home, "signing-key", "create", "--out", str(other)).exit_code == 0
    again = run_cli(home, "signing-key", "create", "--out", str(other), "--force")
    assert again.exit_code == 0 and "retired key" not in again.stdout
    assert not (home / "keys" / "retired").exists()


def test_a_link_to_the_box_key_given_as_out_retires_nothing(tmp_path: Path) -> None:
    # --out a link to the key: the link is replaced, the box's key is not, so nothing is retired
    # (before: "retired key ..." printed, the box's own key put among the retired ones)
    home, old_id = _box(tmp_path)
    link = tmp_path / "link.key"
    link.symlink_to(home / "keys" / "signing.key")
    made = run_cli(home, "signing-key", "create", "--out", str(link), "--force")
    assert made.exit_code == 0 and "retired key" not in made.stdout, made.output
    assert not (home / "keys" / "retired").exists()
    assert key_id(load_private_key(home / "keys" / "signing.key")) == old_id


def test_a_foreign_file_under_the_retired_name_is_not_overwritten(tmp_path: Path) -> None:
    home, old_id = _box(tmp_path)
    retired = home / "keys" / "retired"
    retired.mkdir()
    squatter = retired / f"{old_id}.pub"
    squatter.write_text(public_key_pem(generate_private_key()))
    before = (home / "keys" / "signing.key").read_bytes()
    refused = run_cli(home, "signing-key", "create", "--force")
    assert refused.exit_code != 0 and "move it aside" in refused.output
    assert (home / "keys" / "signing.key").read_bytes() == before  # the old key stays until it is retired
    assert verify_db(home / "audit.db", [load_private_key(home / "keys" / "signing.key").public_key()]).ok


def test_a_rotation_is_recorded_and_one_bundle_of_public_keys_verifies_an_export_off_the_box(tmp_path: Path) -> None:
    """The key that vouches for the log changed without a record of it; after it, `audit public-key`
    printed the new key only, which does not verify the checkpoints signed before."""
    home, old_id = _box(tmp_path)
    assert run_cli(home, "signing-key", "create", "--force").exit_code == 0
    new_id = key_id(load_private_key(home / "keys" / "signing.key"))
    tail = run_cli(home, "audit", "tail", "-n", "5", "--json")
    rotations = [r for r in map(json.loads, tail.stdout.splitlines()) if r["event"] == "signing_key_rotate"]
    assert len(rotations) == 1 and rotations[0]["details"]["key_id"] == new_id
    assert rotations[0]["details"]["retired_key_id"] == old_id
    export = tmp_path / "export.jsonl"
    assert run_cli(home, "audit", "export", "--out", str(export)).exit_code == 0
    bundle = run_cli(home, "audit", "public-key", "--all")
    assert bundle.exit_code == 0 and f"# key id {new_id}: the signing key" in bundle.stdout
    assert f"# key id {old_id}: retired ({old_id}.pub)" in bundle.stdout
    keys = tmp_path / "keys.pem"
    keys.write_text(bundle.stdout)
    auditor = tmp_path / "auditor"
    only_new = tmp_path / "new.pem"
    only_new.write_text(run_cli(home, "audit", "public-key").stdout)
    assert run_cli(auditor, "audit", "verify", "--export", str(export), "--public-key", str(only_new)).exit_code == 1
    verified = run_cli(auditor, "audit", "verify", "--export", str(export), "--public-key", str(keys))
    assert verified.exit_code == 0 and verified.stdout.startswith("OK"), verified.output


# -- a retired key signs nothing after its rotation ------------------------------------------------
# Before: a retired key stayed trusted for every checkpoint, so whoever held its private key (every
# backup taken before the rotation holds it) could append records after the rotation, sign them with
# it, and `audit verify` said OK.  The running services kept signing with the old key until restarted,
# which is why the verifier could not refuse it; they now read the key file again when it is replaced.


def _event(action: str) -> AuditEvent:
    now = utc_iso()
    return AuditEvent(
        event="config",
        action=action,
        actor="test",
        origin="test",
        outcome="success",
        status=0,
        started_at=now,
        ended_at=now,
    )


def _keys(home: Path) -> list[Ed25519PublicKey]:
    return trusted_keys(home / "keys" / "signing.key", home / "keys")


def test_a_running_writer_signs_with_the_new_key_from_its_next_checkpoint(tmp_path: Path) -> None:
    home, old_id = _box(tmp_path)
    running = AuditLog.open(load_settings({"home": home}))  # a service started before the rotation
    try:
        running.append(_event("before the rotation"))
        assert running.signing_key_id == old_id
        assert run_cli(home, "signing-key", "create", "--force").exit_code == 0
        new_id = key_id(load_private_key(home / "keys" / "signing.key"))
        running.append(_event("after the rotation"))
        assert running.checkpoint().key_id == new_id and running.signing_key_id == new_id
    finally:
        running.close()
    report = verify_db(home / "audit.db", _keys(home))
    assert report.ok, report.problems
    assert sorted(report.key_ids) == sorted([old_id, new_id])


def test_the_retired_key_cannot_vouch_for_records_after_its_rotation(tmp_path: Path) -> None:
    home, old_id = _box(tmp_path)
    old_key = load_private_key(home / "keys" / "signing.key")  # as a backup taken before holds it
    assert run_cli(home, "signing-key", "create", "--force").exit_code == 0
    tail = json.loads(run_cli(home, "audit", "tail", "-n", "1", "--json").stdout.splitlines()[-1])
    assert tail["event"] == "signing_key_rotate" and tail["details"]["retired_key_rule"]
    rotate_seq = tail["seq"]
    forger = AuditLog(home / "audit.db", signing_key=old_key, digest_keys_dir=home / "keys" / "digest")
    with forger:
        forger.append(_event("forged after the rotation"))
    report = verify_db(home / "audit.db", _keys(home))
    assert not report.ok
    assert report.first_bad_seq == rotate_seq
    assert f"signed with key {old_id}, which record {rotate_seq} retired" in report.problems[0].what
    failed = run_cli(home, "audit", "verify")
    assert failed.exit_code == 1 and "a retired key signs nothing after its rotation" in failed.stdout


def test_a_prune_signed_with_the_retired_key_after_its_rotation_is_refused(tmp_path: Path) -> None:
    """The forger removes the oldest records with the rotation among them (its record gone, the first rule
    has nothing to go by) and signs the anchor with the old key."""
    home, old_id = _box(tmp_path)
    old_key = load_private_key(home / "keys" / "signing.key")
    assert run_cli(home, "signing-key", "create", "--force").exit_code == 0
    conn = connect(home / "audit.db")
    try:
        result = prune_prefix(
            conn,
            log_id=read_log_id(conn),
            key=old_key,
            before=datetime.now(UTC),
            now=datetime.now(UTC),
            min_retention_days=0,
            public_keys=_keys(home),
        )
    finally:
        conn.close()
    assert result.pruned > 0 and result.retired_keys  # the rotation record went with them
    report = verify_db(home / "audit.db", _keys(home))
    assert not report.ok
    assert any(
        f"prune at size {result.last_pruned_seq}" in p.what and f"signed with key {old_id}, which key" in p.what
        for p in report.problems
    ), report.problems


def test_a_prune_carries_the_rotations_it_removes_on_in_its_record(tmp_path: Path) -> None:
    home, old_id = _box(tmp_path)
    old_key = load_private_key(home / "keys" / "signing.key")
    assert run_cli(home, "signing-key", "create", "--force").exit_code == 0
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    pruned = run_cli(home, "audit", "prune", "--before", tomorrow, "--force")
    assert pruned.exit_code == 0, pruned.output
    tail = json.loads(run_cli(home, "audit", "tail", "-n", "2", "--json").stdout.splitlines()[0])
    assert tail["event"] == "audit_prune" and old_id in json.loads(tail["details"]["retired_keys"])
    assert run_cli(home, "audit", "verify").exit_code == 0
    # the rotation record is gone; the prune's record still says the old key was retired
    with AuditLog(home / "audit.db", signing_key=old_key, digest_keys_dir=home / "keys" / "digest") as forger:
        forger.append(_event("forged after the prune"))
    report = verify_db(home / "audit.db", _keys(home))
    assert not report.ok and f"signed with key {old_id}, which record" in report.problems[0].what


def test_a_rotation_recorded_before_the_rule_keeps_the_old_keys_checkpoints(tmp_path: Path) -> None:
    """A rotation from an inferbox before the rule: its services signed with the old key until they
    restarted, so the log those versions wrote verifies as it did."""
    home, old_id = _box(tmp_path)
    old_key = load_private_key(home / "keys" / "signing.key")
    new_key = generate_private_key()
    with AuditLog(home / "audit.db", signing_key=new_key, digest_keys_dir=home / "keys" / "digest") as log:
        now = utc_iso()
        log.append(
            AuditEvent(
                event="signing_key_rotate",
                action="inferbox signing-key create --force",
                actor="cli:test",
                origin="test",
                outcome="success",
                status=0,
                started_at=now,
                ended_at=now,
                details={"key_id": key_id(new_key), "retired_key_id": old_id},
            )
        )
    with AuditLog(home / "audit.db", signing_key=old_key, digest_keys_dir=home / "keys" / "digest") as old:
        old.append(_event("the old service, before its restart"))
    report = verify_db(home / "audit.db", [old_key.public_key(), new_key.public_key()])
    assert report.ok, report.problems


def test_a_replaced_key_that_cannot_be_read_leaves_the_old_one_in_use_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "signing.key"
    old = generate_private_key()
    write_private_key(old, path)
    signer = Signer(old, path)
    assert signer.current() is old  # unchanged: not read again
    write_private_key(generate_private_key(), path, overwrite=True)
    path.chmod(0o644)  # the service refuses a key others can read
    with caplog.at_level(logging.ERROR, logger="appliance.audit.signer"):
        assert signer.current() is old
    assert "was replaced but cannot be loaded" in caplog.text and "chmod 600" in caplog.text
    path.chmod(0o600)
    assert signer.current() is not old and signer.key_id == key_id(load_private_key(path))
