"""``signing-key create --force`` retires the old key: the audit log's old checkpoints keep verifying.

Before, the old public key was thrown away: ``audit verify`` then said "bad checkpoint signature ...
names signing key X, the trusted key is Y", which reads like tampering, and prune, ship and backups
refused the log.
"""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from api.protocols import AuditEvent
from appliance.audit.canonical import AuditRecord
from appliance.audit.checkpoint import Checkpoint, load_checkpoints
from appliance.audit.exporter import export_jsonl
from appliance.audit.log import AuditLog
from appliance.audit.prune import prune_prefix
from appliance.audit.rotation import order_problems, retirement_problems
from appliance.audit.schema import connect, read_log_id
from appliance.audit.signer import Signer
from appliance.audit.trust import trusted_keys
from appliance.audit.verify import verify_db, verify_export_bytes
from appliance.settings import load_settings
from runtime.errors import AuditError
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
# which is why the verifier could not refuse it; they now read the key file again when it is replaced,
# and the rotation signs a format 3 checkpoint with the new key that retires the old ones.


def _event(action: str, event: str = "config", details: dict[str, str] | None = None) -> AuditEvent:
    now = utc_iso()
    return AuditEvent(
        event=event,
        action=action,
        actor="test",
        origin="test",
        outcome="success",
        status=0,
        started_at=now,
        ended_at=now,
        details=details or {},
    )


def _keys(home: Path) -> list[Ed25519PublicKey]:
    return trusted_keys(home / "keys" / "signing.key", home / "keys")


def _forge(home: Path, key: Ed25519PrivateKey, action: str = "forged after the rotation") -> None:
    """What a holder of ``key`` who can write the database does: append a record, sign a checkpoint."""
    with AuditLog(home / "audit.db", signing_key=key, digest_keys_dir=home / "keys" / "digest") as forger:
        forger.append(_event(action))


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


def test_the_rotation_signs_a_checkpoint_that_retires_the_old_key(tmp_path: Path) -> None:
    home, old_id = _box(tmp_path)
    assert run_cli(home, "signing-key", "create", "--force").exit_code == 0
    new_id = key_id(load_private_key(home / "keys" / "signing.key"))
    conn = connect(home / "audit.db", read_only=True)
    try:
        rotation = [cp for cp in load_checkpoints(conn) if cp.retires]
    finally:
        conn.close()
    assert len(rotation) == 1
    assert rotation[0].version == 3 and rotation[0].key_id == new_id and rotation[0].retired_ids == (old_id,)
    tail = json.loads(run_cli(home, "audit", "tail", "-n", "1", "--json").stdout.splitlines()[-1])
    assert tail["event"] == "signing_key_rotate" and tail["details"]["retired_key_ids"] == old_id
    assert rotation[0].size == tail["seq"]  # the record and its checkpoint: one transaction


def test_the_retired_key_cannot_vouch_for_records_after_its_rotation(tmp_path: Path) -> None:
    home, old_id = _box(tmp_path)
    old_key = load_private_key(home / "keys" / "signing.key")  # as a backup taken before holds it
    assert run_cli(home, "signing-key", "create", "--force").exit_code == 0
    _forge(home, old_key)
    report = verify_db(home / "audit.db", _keys(home))
    assert not report.ok
    assert any(f"signed with key {old_id}, which the rotation checkpoint" in p.what for p in report.problems)
    failed = run_cli(home, "audit", "verify")
    assert failed.exit_code == 1 and "a retired key signs nothing after its rotation" in failed.stdout
    # a window export made after it (what `audit ship` sends) holds every checkpoint, the rotation's too
    export = tmp_path / "window.jsonl"
    since = json.loads(run_cli(home, "audit", "tail", "-n", "1", "--json").stdout.splitlines()[-1])["recorded_at"]
    assert run_cli(home, "audit", "export", "--since", since, "--out", str(export)).exit_code == 0
    window = run_cli(home, "audit", "verify", "--export", str(export))
    assert window.exit_code == 1 and "a retired key signs nothing" in window.stdout


def test_an_export_signed_with_the_retired_key_is_refused(tmp_path: Path) -> None:
    """An export's trailer signed with any trusted key passed: a retired key's holder could sign a copy
    of records it wrote itself."""
    home, old_id = _box(tmp_path)
    old_key = load_private_key(home / "keys" / "signing.key")
    assert run_cli(home, "signing-key", "create", "--force").exit_code == 0
    out = io.BytesIO()
    export_jsonl(home / "audit.db", out, signing_key=old_key, now=datetime.now(UTC))
    report = verify_export_bytes(out.getvalue(), _keys(home))
    assert not report.ok
    assert any(f"the export is signed with key {old_id}, which the rotation" in p.what for p in report.problems)
    fine = io.BytesIO()
    export_jsonl(
        home / "audit.db", fine, signing_key=load_private_key(home / "keys" / "signing.key"), now=datetime.now(UTC)
    )
    assert verify_export_bytes(fine.getvalue(), _keys(home)).ok


def test_a_prune_after_the_rotation_removes_its_record_and_not_the_rule(tmp_path: Path) -> None:
    home, old_id = _box(tmp_path)
    old_key = load_private_key(home / "keys" / "signing.key")
    assert run_cli(home, "signing-key", "create", "--force").exit_code == 0
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    assert run_cli(home, "audit", "prune", "--before", tomorrow, "--force").exit_code == 0  # the rotation record too
    assert run_cli(home, "audit", "verify").exit_code == 0
    _forge(home, old_key, "forged after the prune")
    report = verify_db(home / "audit.db", _keys(home))
    assert not report.ok and f"signed with key {old_id}, which the rotation" in report.problems[0].what


def test_a_prune_signed_with_the_retired_key_is_refused(tmp_path: Path) -> None:
    """The forger removes the oldest records with the rotation among them and signs the anchor with the
    old key: the rotation's checkpoint is still there."""
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
    assert result.pruned > 0
    report = verify_db(home / "audit.db", _keys(home))
    assert not report.ok
    assert any(f"prune at size {result.last_pruned_seq}" in p.what and old_id in p.what for p in report.problems)


def test_keys_retired_before_are_retired_by_the_next_rotation(tmp_path: Path) -> None:
    """A key retired by an inferbox before this rule (its rotation signed no retiring checkpoint) stayed
    trusted for good; the next rotation retires every key in keys/retired/."""
    home, _ = _box(tmp_path)
    legacy = generate_private_key()  # retired long ago, its public half kept as the docs said
    retired = home / "keys" / "retired"
    retired.mkdir()
    (retired / "legacy.pub").write_text(public_key_pem(legacy))
    assert run_cli(home, "signing-key", "create", "--force").exit_code == 0
    tail = json.loads(run_cli(home, "audit", "tail", "-n", "1", "--json").stdout.splitlines()[-1])
    assert key_id(legacy) in tail["details"]["retired_key_ids"].split(",")
    _forge(home, legacy)
    report = verify_db(home / "audit.db", _keys(home))
    assert not report.ok and f"signed with key {key_id(legacy)}, which the rotation" in report.problems[0].what


def test_a_rotation_that_cannot_be_recorded_puts_the_old_key_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key was replaced and the old one retired before the record was written: a record that failed
    (the log locked, a full disk) left a new key and no retiring checkpoint, and a second run retired
    only the new key: the old one stayed trusted for good."""
    home, old_id = _box(tmp_path)

    def locked(self: AuditLog, *args: object) -> int:
        raise AuditError("database is locked")

    monkeypatch.setattr(AuditLog, "record_rotation", locked)
    failed = run_cli(home, "signing-key", "create", "--force")
    assert failed.exit_code == 2 and "Traceback" not in failed.output
    assert f"the old key {old_id} was put back" in failed.output and "run the command again" in failed.output
    assert key_id(load_private_key(home / "keys" / "signing.key")) == old_id
    assert key_id(load_public_key(home / "keys" / "signing.key.pub")) == old_id
    # the log was closed without a checkpoint signed with the key taken back (it closed with one, and the
    # log then held a checkpoint of a key nobody had: verify failed for good); its public half is kept,
    # for a service that signed with it meanwhile
    conn = connect(home / "audit.db", read_only=True)
    try:
        signers = {cp.key_id for cp in load_checkpoints(conn)}
    finally:
        conn.close()
    assert signers == {old_id}
    new_pub = [p for p in (home / "keys" / "retired").glob("*.pub") if key_id(load_public_key(p)) != old_id]
    assert len(new_pub) == 1 and new_pub[0].name in failed.output
    assert run_cli(home, "audit", "verify").exit_code == 0
    monkeypatch.undo()
    assert run_cli(home, "signing-key", "create", "--force").exit_code == 0  # again: both retired
    tail = json.loads(run_cli(home, "audit", "tail", "-n", "1", "--json").stdout.splitlines()[-1])
    assert sorted(tail["details"]["retired_key_ids"].split(",")) == sorted([old_id, new_pub[0].stem])


def test_a_rotation_recorded_before_this_rule_keeps_the_old_keys_checkpoints(tmp_path: Path) -> None:
    """A rotation from an inferbox before format 3 (a record, no retiring checkpoint): its services
    signed with the old key until they restarted, so the log those versions wrote verifies as it did."""
    home, old_id = _box(tmp_path)
    old_key = load_private_key(home / "keys" / "signing.key")
    new_key = generate_private_key()
    with AuditLog(home / "audit.db", signing_key=new_key, digest_keys_dir=home / "keys" / "digest") as log:
        details = {"key_id": key_id(new_key), "retired_key_id": old_id}
        log.append(_event("inferbox signing-key create --force", "signing_key_rotate", details))
    _forge(home, old_key, "the old service, before its restart")
    report = verify_db(home / "audit.db", [old_key.public_key(), new_key.public_key()])
    assert report.ok, report.problems


def _cp(kind: str, size: int, key: str = "k", version: int = 2, retires: str = "") -> Checkpoint:
    return Checkpoint(
        kind=kind,  # type: ignore[arg-type]
        log_id="log",
        size=size,
        head_hash="0" * 64,
        created_at=f"2026-12-07T00:00:{size:02d}.000000Z",
        key_id=key,
        signature="",
        version=version,
        retires=retires,
    )


def test_checkpoints_are_held_to_the_order_writers_write_them() -> None:
    """Format 1 rows have no signed place: a prune anchor forged with a retired key could be put among
    them, before the rotation's checkpoint (a retired key's holder removed records 1..9 that way, the
    rotation record among them, and wrote on under it)."""
    honest = [_cp("checkpoint", 3, version=1), _cp("prune", 2), _cp("checkpoint", 5), _cp("prune", 5)]
    assert order_problems(honest) == []
    forged_anchor = [_cp("prune", 9, version=1), _cp("checkpoint", 3, version=1), _cp("checkpoint", 6)]
    assert [seq for seq, _ in order_problems(forged_anchor)] == [3, 6]
    assert (
        "no writer goes back to format 1"
        in order_problems([_cp("checkpoint", 1), _cp("checkpoint", 2, version=1)])[0][1]
    )
    rotation = [_cp("checkpoint", 4, "a"), _cp("checkpoint", 5, "b", 3, "a"), _cp("checkpoint", 6, "a")]
    assert [seq for seq, _ in retirement_problems(rotation)] == [6]
    assert retirement_problems(rotation[:2]) == []


def test_a_replaced_key_that_cannot_be_read_leaves_the_old_one_in_use_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "signing.key"
    old = generate_private_key()
    write_private_key(old, path)
    signer = Signer.read(path)
    old = signer.current()
    assert signer.current() is old and signer.key_id == key_id(old)  # unchanged: not read again
    write_private_key(generate_private_key(), path, overwrite=True)
    path.chmod(0o644)  # the service refuses a key others can read
    with caplog.at_level(logging.ERROR, logger="appliance.audit.signer"):
        assert signer.current() is old
    assert "was replaced but cannot be loaded" in caplog.text and "chmod 600" in caplog.text
    path.chmod(0o600)
    assert signer.current() is not old and signer.key_id == key_id(load_private_key(path))


def _copy(name: str, checkpoints: list[Checkpoint], seqs: list[int], signed_by: str) -> Any:
    from appliance.audit.catch_up import _Copy
    from appliance.audit.exporter import Header

    header = Header(
        format="x",
        log_id="log",
        exported_at=name,
        since=None,
        until=None,
        first_seq=min(seqs, default=0),
        last_seq=max(seqs, default=0),
    )
    records = [msgspec.structs.replace(_RECORD, seq=s) for s in seqs]
    return _Copy(Path(name), header, records, checkpoints, signed_by)


_RECORD = AuditRecord(
    seq=1,
    log_id="log",
    prev_hash="0" * 64,
    recorded_at="2026-12-07T00:00:00.000000Z",
    event="config",
    action="a",
    actor="t",
    credential_id="",
    origin="t",
    outcome="success",
    status=0,
    started_at="2026-12-07T00:00:00.000000Z",
    ended_at="2026-12-07T00:00:00.000000Z",
    request_id="",
    model_name="",
    model_version="",
    model_sha256="",
    backend="",
    variant="",
    job_id="",
    input_digest="",
    output_digest="",
    digest_key_id="",
    details={},
    leaf_hash="",
)


def test_a_copy_dropped_in_the_share_with_a_retired_key_is_not_caught_up() -> None:
    """Each copy verified on its own: a copy signed with a retired key (from an old backup), holding the
    checkpoints before the rotation and records after the newest copy's, brought those records into the
    restored log, which then signed them with its key."""
    from appliance.audit.catch_up import _agreement_problem

    before = [_cp("checkpoint", 3, "a"), _cp("checkpoint", 6, "a")]
    rotation = [*before, _cp("checkpoint", 8, "b", 3, "a")]
    honest = [_copy("1", before, [1, 2, 3, 4, 5, 6, 7], "a"), _copy("2", rotation, [8], "b")]
    assert _agreement_problem(honest) is None
    forged = _copy("0", before, [9, 10, 11], "a")  # after all the newest covers, signed with the retired key
    assert "which the newest copy's checkpoints retire" in (_agreement_problem([forged, *honest]) or "")
    other = _copy("0", [_cp("checkpoint", 3, "a"), _cp("checkpoint", 9, "a")], [9], "a")
    assert "do not begin those of the newest copy" in (_agreement_problem([other, *honest]) or "")


def test_checkpoints_cut_back_to_before_the_rotation_are_caught_by_its_record(tmp_path: Path) -> None:
    """The retired key's holder deleted the checkpoints from the rotation's on, signed the head with the
    old key and wrote on: with the rotation's checkpoint gone the old key was trusted again, and verify
    said OK though the rotation record was still there."""
    home, old_id = _box(tmp_path)
    old_key = load_private_key(home / "keys" / "signing.key")
    assert run_cli(home, "signing-key", "create", "--force").exit_code == 0
    conn = sqlite3.connect(home / "audit.db")
    try:
        conn.execute("DROP TRIGGER checkpoints_no_delete")
        first = conn.execute("SELECT min(id) FROM checkpoints WHERE retires != ''").fetchone()[0]
        conn.execute("DELETE FROM checkpoints WHERE id >= ?", (first,))
        conn.commit()
    finally:
        conn.close()
    _forge(home, old_key)
    report = verify_db(home / "audit.db", _keys(home))
    assert not report.ok
    assert any("has no checkpoint retiring those keys" in p.what and old_id in p.what for p in report.problems)


def test_a_rotation_pins_the_format_1_checkpoints_before_it() -> None:
    from appliance.audit.checkpoint import pin_of
    from appliance.audit.rotation import pin_problems

    v1 = [msgspec.structs.replace(_cp("checkpoint", n, "a", 1), signature=f"{n:02x}" * 64) for n in (2, 4)]
    rotation = msgspec.structs.replace(_cp("checkpoint", 6, "b", 3, "a"), pinned=pin_of(c.signature for c in v1))
    honest = [*v1, _cp("checkpoint", 5, "a"), rotation]
    assert pin_problems(honest, {id(c) for c in honest}) == []
    swapped = [msgspec.structs.replace(v1[0], kind="prune", size=9, signature="ff" * 64), *honest[1:]]
    assert [seq for seq, _ in pin_problems(swapped, {id(c) for c in swapped})] == [6]
