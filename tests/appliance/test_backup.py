"""``inferbox backup create | check | restore`` on a real home: databases, keys, a package, a batch job."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import Result

from appliance.audit.log import AuditLog
from appliance.audit.verify import verify_db
from appliance.backup import restore as restore_mod
from appliance.backup.create import _older, box_name, create_backup
from appliance.backup.manifest import MANIFEST, ROOT, SIGNING_KEY, SIGNING_PUB
from appliance.keys import KeyStore
from appliance.settings import load_settings
from runtime.repository import Repository
from runtime.signing import load_public_key
from tests.runtime.conftest import publish_mlp

from . import audit_tamper as T
from .conftest import run_cli as run

pytestmark = pytest.mark.usefixtures("clean_env")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A home as a box leaves it: signing key, an API key, a package, audit records."""
    home = tmp_path_factory.mktemp("box") / "home"
    home.mkdir()
    publish_mlp(home / "models", ["ort-cpu"])
    assert run(home, "signing-key", "create").exit_code == 0
    made = run(home, "keys", "create", "--scope", "infer", "--json")
    assert made.exit_code == 0, made.output
    (home / "keys" / "first-admin.key").write_text("ibx_000000000000_secret-that-must-not-travel\n")
    return {"home": home, "key": json.loads(made.stdout)["key"]}


@pytest.fixture
def box(built: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """A private copy of the built box (tests write to it), with a finished batch job of its own."""
    home = tmp_path / "home"
    shutil.copytree(built["home"], home)
    (tmp_path / "out").mkdir()
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "x": [0.1 * i] * 8}) + "\n" for i in range(5)))
    job = run(home, "batch", "submit", str(source), "--model", "mlp")
    assert job.exit_code == 0, job.output
    ran = run(home, "batch", "run", "--once")
    assert ran.exit_code == 0, ran.output
    return {**built, "home": home, "out": tmp_path / "out", "job": job.stdout.strip().split()[-1]}


def create(box: dict[str, Any], *args: str) -> Path:
    result = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]), *args)
    assert result.exit_code == 0, result.output
    (archive,) = box["out"].glob("inferbox-backup-*.tar")
    return archive


def members(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


def test_round_trip_restores_keys_log_packages_and_batch_results(box: dict[str, Any], tmp_path: Path) -> None:
    archive = create(box)
    names = members(archive)
    assert names[-1] == f"{ROOT}/MANIFEST.json"
    assert f"{ROOT}/keys/first-admin.key" not in names  # a plaintext API key never travels
    assert f"{ROOT}/signing/signing.key" in names and f"{ROOT}/keys/signing.key" not in names

    # the backup is in the live log, with the archive's hash
    live = AuditLog.open(load_settings({"home": box["home"]}))
    try:
        last = live.tail(1)[0]
    finally:
        live.close()
    assert last.event == "backup_create" and last.details["sha256"] == sha256(archive)

    checked = run(box["home"], "backup", "check", str(archive))
    assert checked.exit_code == 0 and checked.stdout.startswith("OK:"), checked.output

    new = tmp_path / "elsewhere" / "home"
    restored = run(new, "backup", "restore", str(archive))
    assert restored.exit_code == 0, restored.output
    assert "records written after" in restored.stderr
    # no off-box copies to catch up from: said loudly, naming the keys now active (a revoked one among them?)
    warning = next(line for line in restored.stderr.splitlines() if line.startswith("WARNING: no off-box copies"))
    assert "ACTIVE again" in warning and KeyStore(new / "state.db").list()[0].id in warning, warning
    quiet = run(tmp_path / "third", "backup", "restore", str(archive), "--no-catch-up")
    assert quiet.exit_code == 0 and "WARNING: no off-box copies" not in quiet.stderr, quiet.output
    as_json = run(tmp_path / "fourth", "backup", "restore", str(archive), "--json")
    assert as_json.exit_code == 0 and "ACTIVE again" in json.loads(as_json.stdout)["warning"], as_json.output

    assert KeyStore(new / "state.db").verify(box["key"]).scopes == ("infer",)
    assert Repository(new / "models").open("mlp").manifest.name == "mlp"
    assert sha256(new / "keys" / "signing.key") == sha256(box["home"] / "keys" / "signing.key")
    assert oct((new / "keys" / "signing.key").stat().st_mode & 0o777) == "0o600"
    assert oct((new / "keys" / "signing.key.pub").stat().st_mode & 0o777) == "0o644"  # was 0600, as archived
    assert not (new / "keys" / "first-admin.key").exists()
    outbox = sorted(p.relative_to(box["home"]) for p in (box["home"] / "outbox").rglob("*") if p.is_file())
    assert outbox and all(sha256(new / p) == sha256(box["home"] / p) for p in outbox)
    assert all((new / p).stat().st_mode & 0o077 == 0 for p in outbox)

    # the restored log verifies and says it was restored, naming the archive
    settings = load_settings({"home": new})
    report = verify_db(settings.audit_db, [load_public_key(new / "keys" / "signing.key.pub")])
    assert report.ok, report.summary()
    log = AuditLog.open(settings)
    try:
        tail = log.tail(1)[0]
    finally:
        log.close()
    assert tail.event == "backup_restore"
    assert tail.details["sha256"] == sha256(archive) and tail.details["archive"] == archive.name

    # the batch job's paths follow the home (they are stored absolute)
    status = run(new, "batch", "status", box["job"], "--json")
    assert status.exit_code == 0, status.output
    (job,) = json.loads(status.stdout)["jobs"]
    assert job["state"] == "done"
    assert str(new) in json.dumps(job) and str(box["home"]) not in json.dumps(job)


def test_backup_is_consistent_while_the_log_is_written(box: dict[str, Any]) -> None:
    settings = load_settings({"home": box["home"], "checkpoint_every": 7})
    log = AuditLog.open(settings)
    log.start()
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        while not stop.is_set():
            written.append(log.append(T.event(len(written))))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 20:
            stop.wait(0.01)
        archive = create(box, "--no-models")
    finally:
        stop.set()
        thread.join()
        log.close()
    checked = run(box["home"], "backup", "check", str(archive), "--json")
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout)
    assert report["ok"] and report["audit"]["ok"] and report["audit"]["last_seq"] >= 20


def _rewrite_member(archive: Path, target: Path, change: Any) -> None:
    """Copy ``archive`` to ``target`` with ``change(name, data) -> (name, data) | None`` applied to each member."""
    with tarfile.open(archive) as src, tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            out = change(m.name, data)
            if out is None:
                continue
            name, data = out
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda n, d: (n, d[:-1] + bytes([d[-1] ^ 1])) if n.endswith("model.onnx") else (n, d), "model.onnx: differs"),
        (lambda n, d: None if n.endswith("state.db") else (n, d), "state.db: in the manifest but not in the archive"),
        (lambda n, d: None if n.endswith("MANIFEST.json") else (n, d), "has no MANIFEST.json"),
        (lambda n, d: (n.replace("models/", "models/../../"), d) if "models/" in n else (n, d), "'..'"),
        (lambda n, d: (n.replace(ROOT + "/", ""), d), "not under inferbox-backup/"),
    ],
    ids=["flipped-byte", "missing-file", "no-manifest", "dot-dot", "outside-root"],
)
def test_check_and_restore_refuse_a_damaged_archive(
    box: dict[str, Any], tmp_path: Path, change: Any, problem: str
) -> None:
    bad = tmp_path / "bad.tar"
    _rewrite_member(create(box), bad, change)
    checked = run(box["home"], "backup", "check", str(bad))
    assert checked.exit_code == 1 and problem in checked.stdout, checked.output
    target = tmp_path / "target"
    restored = run(target, "backup", "restore", str(bad))
    assert restored.exit_code == 2 and problem in restored.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path.parent / "models").exists()
    assert not target.exists()  # nothing was placed, no staging left, and no empty home made for it


def test_a_truncated_or_linked_archive_is_refused(box: dict[str, Any], tmp_path: Path) -> None:
    archive = create(box)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    checked = run(box["home"], "backup", "check", str(cut))
    assert checked.exit_code == 1 and "FAILED" in checked.stdout
    linked = tmp_path / "linked.tar"
    with tarfile.open(linked, "w") as tar:
        info = tarfile.TarInfo(f"{ROOT}/keys/evil")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    checked = run(box["home"], "backup", "check", str(linked))
    assert checked.exit_code == 1 and "is a link" in checked.stdout


def test_restore_never_overwrites_a_box_with_state(box: dict[str, Any]) -> None:
    archive = create(box)
    before = {p: sha256(p) for p in box["home"].rglob("*") if p.is_file()}
    result = run(box["home"], "backup", "restore", str(archive))
    assert result.exit_code == 2
    assert "state.db" in result.stderr and "move" in result.stderr and "nothing was changed" in result.stderr
    assert {p: sha256(p) for p in box["home"].rglob("*") if p.is_file()} == before


def test_restore_keeps_the_fresh_signing_key_of_a_new_install(box: dict[str, Any], tmp_path: Path) -> None:
    archive = create(box)
    new = tmp_path / "installed"
    assert run(new, "signing-key", "create").exit_code == 0  # what `inferbox install` leaves
    fresh = sha256(new / "keys" / "signing.key")
    result = run(new, "backup", "restore", str(archive))
    assert result.exit_code == 0, result.output
    assert sha256(new / "keys" / "signing.key") == sha256(box["home"] / "keys" / "signing.key")
    (kept,) = (new / "keys").glob("signing.key.before-restore-*")
    assert sha256(kept) == fresh


def test_a_log_that_does_not_verify_is_backed_up_with_an_alert_and_never_restored(
    box: dict[str, Any], tmp_path: Path
) -> None:
    T.change_field(box["home"] / "audit.db", 1, "actor", "someone-else")
    result = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]))
    assert result.exit_code == 1 and "ALERT" in result.stderr
    (archive,) = box["out"].glob("inferbox-backup-*.tar")  # written all the same: it is evidence
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile(f"{ROOT}/MANIFEST.json").read())  # type: ignore[union-attr]
    assert manifest["audit"]["verified"] is False and "seq 1" in manifest["audit"]["problem"]
    restored = run(tmp_path / "new", "backup", "restore", str(archive))
    assert restored.exit_code == 2 and "audit.db: FAILED at seq 1" in restored.stderr


def test_parts_can_be_left_out(box: dict[str, Any], tmp_path: Path) -> None:
    archive = create(box, "--no-models", "--no-batch")
    names = members(archive)
    assert not any("/models/" in n or "/outbox/" in n or "/spool/" in n for n in names)
    new = tmp_path / "new"
    result = run(new, "backup", "restore", str(archive))
    assert result.exit_code == 0, result.output
    assert "holds no model packages" in result.stderr
    assert KeyStore(new / "state.db").verify(box["key"]).key_id


def test_signing_key_outside_the_home_goes_where_the_target_setting_says(box: dict[str, Any], tmp_path: Path) -> None:
    outside = tmp_path / "credstore"
    outside.mkdir()
    for name in ("signing.key", "signing.key.pub"):
        shutil.move(box["home"] / "keys" / name, outside / name)
    result = run(
        box["home"],
        "backup",
        "create",
        "--same-disk",
        "--to",
        str(box["out"]),
        INFERBOX_SIGNING_KEY=str(outside / "signing.key"),
    )
    assert result.exit_code == 0, result.output
    (archive,) = box["out"].glob("*.tar")
    target_key = tmp_path / "elsewhere" / "signing.key"
    new = tmp_path / "new"
    restored = run(new, "backup", "restore", str(archive), INFERBOX_SIGNING_KEY=str(target_key))
    assert restored.exit_code == 0, restored.output
    assert sha256(target_key) == sha256(outside / "signing.key")
    assert not (new / "keys" / "signing.key").exists()


def test_the_folder_must_exist_and_be_off_the_state_folder_and_its_disk(box: dict[str, Any], tmp_path: Path) -> None:
    same = run(box["home"], "backup", "create", "--to", str(box["out"]))
    assert same.exit_code == 2 and "same filesystem" in same.stderr and "--same-disk" in same.stderr
    assert list(box["out"].iterdir()) == []
    missing = run(box["home"], "backup", "create", "--same-disk", "--to", str(tmp_path / "not-mounted"))
    assert missing.exit_code == 2 and "mount the backup disk" in missing.stderr
    assert not (tmp_path / "not-mounted").exists()
    (box["home"] / "backups").mkdir()
    inside = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["home"] / "backups"))
    assert inside.exit_code == 2 and "inside" in inside.stderr
    assert not list((box["home"] / "backups").iterdir())


def test_too_little_room_on_the_state_disk_is_said_before_anything_is_written(
    box: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the databases are snapshotted into the state folder first: its disk needs the room, not the target's
    import appliance.backup.create as create_mod

    real = shutil.disk_usage

    def tight(path: Any) -> Any:
        usage = real(path)
        if Path(path) == box["home"]:
            return usage._replace(free=1 << 20)
        return usage

    monkeypatch.setattr(create_mod.shutil, "disk_usage", tight)
    result = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]))
    assert result.exit_code == 2, result.output
    assert f"state folder {box['home']}" in result.stderr and "MB free on its disk and it has 1 MB" in result.stderr
    assert list(box["out"].iterdir()) == [] and not list(box["home"].glob(".backup-*"))


def test_a_failed_record_leaves_no_archive(box: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import appliance.commands.audit as audit_cmd

    def broken(*args: object, **kwargs: object) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(audit_cmd, "record_cli_event", broken)
    result = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]))
    assert result.exit_code == 2 and "disk full" in result.stderr
    assert list(box["out"].iterdir()) == []


def test_root_is_refused_on_a_home_another_user_owns_and_told_how_to_restore_as_that_user(
    box: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root placing files in a folder the service user can write could be led through links that user
    plants between two steps (and chowning afterwards was worse): restore runs as the owner instead."""
    archive = create(box)
    new = tmp_path / "var-lib-inferbox"
    new.mkdir()
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("appliance.commands.options.foreign_owner", lambda p: "inferbox" if p == new else None)
    result = run(new, "backup", "restore", str(archive))
    assert result.exit_code == 2
    assert f"sudo -u inferbox env INFERBOX_HOME={new} " in result.stderr and "backup restore ..." in result.stderr
    assert 'sudo chown -R inferbox: "$D"' in result.stderr  # an archive the new box's user cannot read
    assert list(new.iterdir()) == []


def test_configuration_in_the_home_is_restored_and_one_outside_is_kept_for_reference(
    box: dict[str, Any], tmp_path: Path
) -> None:
    (box["home"] / "inferbox.toml").write_text("[server]\nport = 9001\n")
    etc = tmp_path / "etc" / "inferbox.toml"
    etc.parent.mkdir()
    etc.write_text("[limits]\nmax_inputs = 64\n")
    result = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]), INFERBOX_CONFIG=str(etc))
    assert result.exit_code == 0, result.output
    (archive,) = box["out"].glob("*.tar")
    assert {f"{ROOT}/inferbox.toml", f"{ROOT}/config/inferbox.toml"} <= set(members(archive))
    new = tmp_path / "new"
    restored = run(new, "backup", "restore", str(archive))
    assert restored.exit_code == 0, restored.output
    assert (new / "inferbox.toml").read_text() == "[server]\nport = 9001\n"
    assert str(etc) in restored.stderr and "not restored" in restored.stderr
    assert not (new / "config").exists()


def _more_records(home: Path, n: int) -> None:
    log = AuditLog.open(load_settings({"home": home}))
    try:
        for i in range(n):
            log.append(T.event(i))
    finally:
        log.close()


def _ship(home: Path, folder: Path) -> Result:
    return run(home, "audit", "ship", "--to", str(folder))


def _seqs(home: Path) -> tuple[int, str]:
    log = AuditLog.open(load_settings({"home": home}))
    try:
        last = log.tail(1)[0]
    finally:
        log.close()
    return last.seq, last.event


@pytest.fixture
def shipped(box: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """copy 1, the backup, more records, copy 2, then records no copy holds (lost with the box)."""
    ship = tmp_path / "ship"
    ship.mkdir()
    assert _ship(box["home"], ship).exit_code == 0
    _more_records(box["home"], 3)
    archive = create(box)
    _more_records(box["home"], 4)
    second = _ship(box["home"], ship)
    assert second.exit_code == 0, second.output
    copies = sorted(ship.glob("audit-*.jsonl"))
    assert len(copies) == 2
    held_to = int(second.stdout.split("..")[1].split(" ")[0])
    _more_records(box["home"], 2)
    return {**box, "ship": ship, "archive": archive, "copies": copies, "held_to": held_to}


def test_restore_brings_the_log_forward_from_the_off_box_copies(shipped: dict[str, Any], tmp_path: Path) -> None:
    new = tmp_path / "new"
    result = run(new, "backup", "restore", str(shipped["archive"]), "--audit-from", str(shipped["ship"]))
    assert result.exit_code == 0, result.output
    assert f"..{shipped['held_to']} " in result.stdout and "brought back from 2 off-box copy(ies)" in result.stdout
    # the log is the log as the newest copy held it, then the restore
    assert _seqs(new) == (shipped["held_to"] + 1, "backup_restore")
    verified = run(new, "audit", "verify", "--against", str(shipped["copies"][-1]))
    assert verified.exit_code == 0, verified.output
    # so shipping goes on into the same folder without a cut back
    again = _ship(new, shipped["ship"])
    assert again.exit_code == 0 and "ALERT" not in again.stdout, again.output


def test_without_the_copies_the_next_ship_reports_the_cut_back(shipped: dict[str, Any], tmp_path: Path) -> None:
    new = tmp_path / "new"
    result = run(new, "backup", "restore", str(shipped["archive"]), INFERBOX_SHIP_DIR=str(tmp_path / "unused"))
    assert result.exit_code == 2 and "mount the ship share" in result.stderr  # ship_dir is the default source
    assert not (new / "audit.db").exists()
    result = run(new, "backup", "restore", str(shipped["archive"]), "--no-catch-up")
    assert result.exit_code == 0, result.output
    assert "reports the cut back" in result.stderr
    again = _ship(new, shipped["ship"])
    assert again.exit_code == 1 and "ALERT" in again.stdout


def test_the_ship_dir_setting_is_where_restore_looks_by_default(shipped: dict[str, Any], tmp_path: Path) -> None:
    new = tmp_path / "new"
    result = run(new, "backup", "restore", str(shipped["archive"]), INFERBOX_SHIP_DIR=str(shipped["ship"]))
    assert result.exit_code == 0, result.output
    assert _seqs(new) == (shipped["held_to"] + 1, "backup_restore")


def test_copies_that_do_not_continue_the_backup_change_nothing(shipped: dict[str, Any], tmp_path: Path) -> None:
    # a tampered copy
    bad = tmp_path / "bad-ship"
    shutil.copytree(shipped["ship"], bad)
    newest = sorted(bad.glob("*.jsonl"))[-1]
    data = bytearray(newest.read_bytes())
    at = data.index(b'"actor":"') + len(b'"actor":"')
    data[at] = ord("X") if data[at] != ord("X") else ord("Y")
    newest.write_bytes(bytes(data))
    new = tmp_path / "new"
    result = run(new, "backup", "restore", str(shipped["archive"]), "--audit-from", str(bad))
    assert result.exit_code == 2 and "does not verify" in result.stderr
    assert not (new / "audit.db").exists() and not (new / "state.db").exists()
    # a missing copy: the backup's last record is in the first, what follows it only in the second
    gap = tmp_path / "gap-ship"
    gap.mkdir()
    shutil.copy(shipped["copies"][0], gap)
    box_home = shipped["home"]
    _more_records(box_home, 1)
    third = _ship(box_home, shipped["ship"])  # a copy that starts after the missing one
    assert third.exit_code == 0, third.output
    shutil.copy(sorted(shipped["ship"].glob("*.jsonl"))[-1], gap)
    result = run(new, "backup", "restore", str(shipped["archive"]), "--audit-from", str(gap))
    assert result.exit_code == 2 and "do not continue this log" in result.stderr, result.output
    assert not (new / "audit.db").exists()


def test_a_copy_missing_between_others_is_named(box: dict[str, Any], tmp_path: Path) -> None:
    ship, gap = tmp_path / "ship", tmp_path / "gap"
    ship.mkdir()
    gap.mkdir()
    archive = create(box)
    for _ in range(3):  # copies 1 (from the start), 2 and 3, records between them
        _more_records(box["home"], 2)
        assert _ship(box["home"], ship).exit_code == 0
    first, second, third = sorted(ship.glob("*.jsonl"))
    shutil.copy(first, gap)
    shutil.copy(third, gap)
    new = tmp_path / "new"
    result = run(new, "backup", "restore", str(archive), "--audit-from", str(gap))
    assert result.exit_code == 2 and "miss seq" in result.stderr and "add the copy" in result.stderr, result.output
    shutil.copy(second, gap)
    result = run(new, "backup", "restore", str(archive), "--audit-from", str(gap))
    assert result.exit_code == 0, result.output


def test_older_archives_past_keep_are_removed_and_named_in_the_record(box: dict[str, Any]) -> None:
    out = box["out"]
    me = box_name(load_settings({"home": box["home"]}))
    old = [out / f"inferbox-backup-{me}-2026010{d}T000000Z.tar" for d in (1, 2, 3)]
    for p in old:
        p.write_bytes(b"an older backup")
    (out / "notes.txt").write_text("not an archive")
    (out / f"inferbox-backup-{me}-20250101T000000Z.tar.sig").write_text("not an archive either")
    other = out / "inferbox-backup-otherbox-20200101T000000Z.tar"  # another box sharing the folder
    other.write_bytes(b"not ours to remove")
    result = run(box["home"], "backup", "create", "--same-disk", "--keep", "2", INFERBOX_BACKUP_DIR=str(out))
    assert result.exit_code == 0, result.output
    archives = sorted(p.name for p in out.glob(f"inferbox-backup-{me}-*.tar"))
    assert len(archives) == 2 and archives[0] == old[2].name  # the newest older one and the new one
    assert (out / "notes.txt").exists() and (out / f"inferbox-backup-{me}-20250101T000000Z.tar.sig").exists()
    assert other.exists()
    assert f"removed the older {old[0].name}" in result.stdout
    last = last_record(box["home"])
    assert last.event == "backup_create" and last.details["removed"] == f"{old[0].name},{old[1].name}"
    # keep 0 keeps everything; keep 1 leaves only the new one
    assert _older(out, 0, me) == []
    assert [p.name for p in _older(out, 1, me)] == archives


def test_the_folder_comes_from_the_setting_or_the_error_names_it(box: dict[str, Any]) -> None:
    result = run(box["home"], "backup", "create")
    assert result.exit_code == 2 and "backup_dir" in result.output and "--to" in result.output


def _repack(archive: Path, target: Path, edit: Any) -> None:
    """Unpack ``archive``, let ``edit(folder)`` change files, then write a consistent manifest and archive."""
    folder = target.parent / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    root = folder / ROOT
    edit(root)
    manifest = json.loads((root / "MANIFEST.json").read_text())
    manifest["files"] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "MANIFEST.json"):
        data = path.read_bytes()
        rel = path.relative_to(root).as_posix()
        manifest["files"].append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (root / "MANIFEST.json").write_text(json.dumps(manifest))
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in manifest["files"]:
            tar.add(root / entry["path"], f"{ROOT}/{entry['path']}")
        tar.add(root / "MANIFEST.json", f"{ROOT}/MANIFEST.json")


def test_an_archive_rewritten_with_its_manifest_is_caught_by_what_vouches_for_it(
    box: dict[str, Any], tmp_path: Path
) -> None:
    archive = create(box)
    made = run(box["home"], "backup", "create", "--same-disk", "--to", str(tmp_path), "--json", "--no-models")
    sha = sha256(archive)

    def add_key(root: Path) -> None:  # another box's admin key, smuggled into the state
        import sqlite3

        conn = sqlite3.connect(root / "state.db")
        with conn:
            conn.execute(
                "INSERT INTO api_keys (id, name, scopes, key_sha256, created_at) VALUES "
                "('aaaaaaaaaaaa', 'smuggled', 'keys:admin', ?, '2026-01-01T00:00:00.000000Z')",
                ("0" * 64,),
            )
        conn.close()

    forged = tmp_path / "forged.tar"
    _repack(archive, forged, add_key)
    alone = run(box["home"], "backup", "check", str(forged))
    assert alone.exit_code == 0 and "checked against its own manifest only" in alone.stderr  # said, not hidden
    pinned = run(box["home"], "backup", "check", str(forged), "--expect-sha256", sha)
    assert pinned.exit_code == 1 and "not the expected" in pinned.stdout
    good = run(box["home"], "backup", "check", str(archive), "--expect-sha256", sha)
    assert good.exit_code == 0 and "vouched for: its SHA-256 is the one expected" in good.stdout
    restored = run(tmp_path / "new", "backup", "restore", str(forged), "--expect-sha256", sha)
    assert restored.exit_code == 2 and not (tmp_path / "new" / "state.db").exists()
    assert made.exit_code == 0

    # a backup re-keyed by whoever forged it fails against the appliance's published key
    from runtime.signing import generate_private_key, public_key_pem, write_private_key

    def rekey(root: Path) -> None:
        key = generate_private_key()
        (root / "signing" / "signing.key").unlink()
        write_private_key(key, root / "signing" / "signing.key")
        (root / "signing" / "signing.key.pub").write_text(public_key_pem(key))

    rekeyed = tmp_path / "rekeyed.tar"
    (tmp_path / "unpacked").rename(tmp_path / "unpacked-1")
    _repack(archive, rekeyed, rekey)
    published = box["home"] / "keys" / "signing.key.pub"
    result = run(box["home"], "backup", "check", str(rekeyed), "--public-key", str(published))
    assert result.exit_code == 1 and "none of the public keys given" in result.stdout
    result = run(box["home"], "backup", "check", str(archive), "--public-key", str(published))
    assert result.exit_code == 0 and "own manifest only" in result.stderr  # a key pins the log, not the files

    # a retired key planted in the archive would be trusted by the restored box: refused unless given
    def plant(root: Path) -> None:
        (root / "keys" / "retired").mkdir(parents=True, exist_ok=True)
        (root / "keys" / "retired" / "old.pub").write_text(public_key_pem(generate_private_key()))

    planted = tmp_path / "planted.tar"
    (tmp_path / "unpacked").rename(tmp_path / "unpacked-2")
    _repack(archive, planted, plant)
    result = run(box["home"], "backup", "check", str(planted), "--public-key", str(published))
    assert result.exit_code == 1 and "keys/retired/old.pub" in result.stdout


def test_restore_holds_the_archive_to_its_backup_create_record_in_the_copies(
    shipped: dict[str, Any], tmp_path: Path
) -> None:
    archive = shipped["archive"]
    new = tmp_path / "new"
    result = run(new, "backup", "restore", str(archive), "--audit-from", str(shipped["ship"]))
    assert result.exit_code == 0 and "the audit log recorded" in result.stdout, result.output
    shutil.rmtree(new)
    swapped = tmp_path / archive.name  # same name, other bytes: an older backup passed off as this one
    _rewrite_member(archive, swapped, lambda n, d: (n, d))
    assert sha256(swapped) != sha256(archive)
    result = run(new, "backup", "restore", str(swapped), "--audit-from", str(shipped["ship"]))
    assert result.exit_code == 2 and "not an archive this box wrote" in result.stderr, result.output
    assert not (new / "state.db").exists()


def test_a_job_the_worker_accepts_during_the_backup_comes_back_waiting(
    box: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import appliance.backup.create as create_mod

    source = tmp_path / "late.jsonl"
    source.write_text(json.dumps({"id": 1, "x": [0.5] * 8}) + "\n")
    job = run(box["home"], "batch", "submit", str(source), "--model", "mlp").stdout.strip().split()[-1]
    real_models = create_mod._models

    def accepted_meanwhile(settings: Any) -> Any:  # after the state snapshot, before the spool is walked
        (box["home"] / "spool" / "new" / job).rename(box["home"] / "spool" / "cur" / job)
        return real_models(settings)

    monkeypatch.setattr(create_mod, "_models", accepted_meanwhile)
    archive = create(box)
    names = members(archive)
    assert f"{ROOT}/spool/new/{job}/job.json" in names and not any(f"/cur/{job}/" in n for n in names)
    new = tmp_path / "new"
    assert run(new, "backup", "restore", str(archive)).exit_code == 0
    ran = run(new, "batch", "run", "--once")
    assert ran.exit_code == 0 and "accepted 1 job" in ran.output, ran.output
    (status,) = json.loads(run(new, "batch", "status", job, "--json").stdout)["jobs"]
    assert status["state"] == "done"


def test_a_batch_file_removed_while_it_is_copied_is_skipped(
    box: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import appliance.backup.create as create_mod

    real_add = create_mod._add
    gone: list[str] = []

    def vanish(tar: Any, arcname: str, path: Path, mtime: float | None = None) -> Any:
        if arcname.startswith("outbox/") and not gone:
            path.unlink()
            gone.append(arcname)
        return real_add(tar, arcname, path, mtime)

    monkeypatch.setattr(create_mod, "_add", vanish)
    archive = create(box)
    assert gone and f"{ROOT}/{gone[0]}" not in members(archive)
    checked = run(box["home"], "backup", "check", str(archive))
    assert checked.exit_code == 0, checked.output


def test_two_files_for_one_place_are_refused_before_anything_changes(box: dict[str, Any], tmp_path: Path) -> None:
    outside = tmp_path / "credstore"
    outside.mkdir()
    for name in ("signing.key", "signing.key.pub"):
        shutil.copy(box["home"] / "keys" / name, outside / name)  # a stale copy stays in keys/
    result = run(
        box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]),
        INFERBOX_SIGNING_KEY=str(outside / "signing.key"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (archive,) = box["out"].glob("*.tar")
    new = tmp_path / "new"
    assert run(new, "signing-key", "create").exit_code == 0
    fresh = sha256(new / "keys" / "signing.key")
    restored = run(new, "backup", "restore", str(archive))
    assert (
        restored.exit_code == 2 and "would both go to" in restored.stderr and "INFERBOX_SIGNING_KEY" in restored.stderr
    )
    assert sha256(new / "keys" / "signing.key") == fresh and not list((new / "keys").glob("*.before-restore-*"))


def test_the_restored_configuration_decides_where_files_go(box: dict[str, Any], tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    shutil.move(box["home"] / "keys" / "signing.key", secrets / "box.key")
    shutil.move(box["home"] / "keys" / "signing.key.pub", secrets / "box.key.pub")
    (box["home"] / "inferbox.toml").write_text(f'[paths]\nsigning_key = "{secrets / "box.key"}"\n')
    archive = create(box)
    secrets.rename(tmp_path / "lost-with-the-old-box")
    new = tmp_path / "new"
    # a configuration that places files outside the home is followed only for an archive vouched for
    refused = run(new, "backup", "restore", str(archive))
    assert refused.exit_code == 2 and "outside the home" in refused.stderr and "--expect-sha256" in refused.stderr
    assert not (secrets / "box.key").exists() and not (new / "state.db").exists()
    restored = run(new, "backup", "restore", str(archive), "--expect-sha256", sha256(archive))
    assert restored.exit_code == 0, restored.output
    assert (secrets / "box.key").is_file() and not (new / "keys" / "signing.key").exists()
    verified = run(new, "audit", "verify")
    assert verified.exit_code == 0, verified.output


def test_a_restore_that_fails_while_placing_takes_back_what_it_placed(
    box: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = create(box)
    new = tmp_path / "new"
    real_move = restore_mod._move

    def full(src: Path, dest: Path) -> None:
        if dest.name == "state.db":
            raise OSError(28, "No space left on device", str(dest))
        real_move(src, dest)

    monkeypatch.setattr(restore_mod, "_move", full)
    result = run(new, "backup", "restore", str(archive))
    assert result.exit_code == 2 and "No space left" in result.stderr and "taken back" in result.stderr
    assert [p for p in new.rglob("*")] == []  # nothing placed is left, and no staging
    monkeypatch.setattr(restore_mod, "_move", real_move)
    assert run(new, "backup", "restore", str(archive)).exit_code == 0  # so it can simply run again


def test_sparse_or_oversized_members_are_refused_before_they_fill_the_disk(box: dict[str, Any], tmp_path: Path) -> None:
    archive = create(box)
    big = tmp_path / "big.tar"
    with tarfile.open(big, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(f"{ROOT}/models/x/1/weights.bin")
        info.size = 10**12  # a header that claims a terabyte
        tar.addfile(info)  # no data: only the header
    checked = run(box["home"], "backup", "check", str(big))
    assert checked.exit_code == 1 and "more than the archive holds" in checked.stdout, checked.output
    assert "cut short" in checked.stdout and "use another copy" in checked.stdout  # an interrupted copy reads so
    assert sha256(archive)  # the good archive is untouched


def test_a_root_folder_entry_as_gnu_tar_writes_it_is_accepted(box: dict[str, Any], tmp_path: Path) -> None:
    archive = create(box)
    repacked = tmp_path / "gnu.tar"
    with tarfile.open(archive) as src, tarfile.open(repacked, "w", format=tarfile.GNU_FORMAT) as dst:
        root = tarfile.TarInfo(f"{ROOT}/")
        root.type = tarfile.DIRTYPE
        dst.addfile(root)
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
    checked = run(box["home"], "backup", "check", str(repacked))
    assert checked.exit_code == 0, checked.output


def test_a_dead_runs_leftovers_are_removed_and_keep_spares_the_last_good_backups_on_an_alert(
    box: dict[str, Any],
) -> None:
    stale = box["out"] / ".inferbox-backup-dead"
    stale.mkdir()
    (stale / "inferbox-backup-20260101T000000Z.tar").write_bytes(b"secrets of a killed run")
    (box["out"] / ".inferbox-backup-dead.lock").write_text("")
    old = box["out"] / f"inferbox-backup-{box_name(load_settings({'home': box['home']}))}-20200101T000000Z.tar"
    old.write_bytes(b"the last good backup")
    T.change_field(box["home"] / "audit.db", 1, "actor", "someone-else")
    result = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]), "--keep", "1")
    assert result.exit_code == 1 and "ALERT" in result.stderr
    assert not stale.exists() and old.exists()


def test_catch_up_follows_a_prune_made_after_the_backup(box: dict[str, Any], tmp_path: Path) -> None:
    from datetime import UTC, datetime

    ship = tmp_path / "ship"
    ship.mkdir()
    archive = create(box)
    _more_records(box["home"], 3)
    assert _ship(box["home"], ship).exit_code == 0
    pruned = run(
        box["home"], "audit", "prune", "--before", datetime.now(UTC).isoformat(), "--force",
        INFERBOX_MIN_RETENTION_DAYS="0",
    )  # fmt: skip
    assert pruned.exit_code == 0, pruned.output
    _more_records(box["home"], 2)
    assert _ship(box["home"], ship).exit_code == 0
    new = tmp_path / "new"
    result = run(new, "backup", "restore", str(archive), "--audit-from", str(ship))
    assert result.exit_code == 0, result.output
    verified = run(new, "audit", "verify", "--against", str(sorted(ship.glob("*.jsonl"))[-1]))
    assert verified.exit_code == 0, verified.output
    assert _ship(new, ship).exit_code == 0


def test_catch_up_refuses_copies_signed_after_a_key_rotation(box: dict[str, Any], tmp_path: Path) -> None:
    ship = tmp_path / "ship"
    ship.mkdir()
    assert _ship(box["home"], ship).exit_code == 0
    archive = create(box)
    keys = box["home"] / "keys"
    (keys / "retired").mkdir()
    shutil.copy(keys / "signing.key.pub", keys / "retired" / "old.pub")
    assert run(box["home"], "signing-key", "create", "--force").exit_code == 0
    _more_records(box["home"], 2)
    shipped = _ship(box["home"], ship)
    assert shipped.exit_code == 0, shipped.output
    new = tmp_path / "new"
    result = run(
        new, "backup", "restore", str(archive), "--audit-from", str(ship),
        "--public-key", str(keys / "signing.key.pub"), "--public-key", str(keys / "retired" / "old.pub"),
    )  # fmt: skip
    assert result.exit_code == 2 and "key rotation" in result.stderr and "--no-catch-up" in result.stderr
    assert not (new / "audit.db").exists() and not (new / "state.db").exists()


# -- review round 3: each test failed on the code before its fix

Change = Callable[[str, bytes], tuple[str, bytes] | None]


def rewrite(archive: Path, target: Path, change: Change, add: dict[str, bytes] | None = None) -> None:
    """What whoever can write the archive can do: change members, add some, and make the manifest match."""
    with tarfile.open(archive) as src:
        members = {m.name: src.extractfile(m).read() for m in src.getmembers() if m.isreg()}  # type: ignore[union-attr]
    manifest = json.loads(members.pop(f"{ROOT}/{MANIFEST}"))
    out: dict[str, bytes] = {}
    for name, data in members.items():
        changed = change(name, data)
        if changed is not None:
            out[changed[0]] = changed[1]
    out.update(add or {})
    manifest["files"] = [
        {"path": n.split("/", 1)[1], "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in out.items()
    ]
    out[f"{ROOT}/{MANIFEST}"] = json.dumps(manifest).encode()
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as dst:
        for name, data in out.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def _older_name(archive: Path) -> Path:
    """The archive renamed as if written years ago (a second backup in the same second is refused)."""
    older = archive.with_name(archive.name[: -len("20261205T000000Z.tar")] + "20200101T000000Z.tar")
    archive.rename(older)
    return older


def last_record(home: Path) -> Any:
    log = AuditLog.open(load_settings({"home": home}))
    try:
        return log.tail(1)[0]
    finally:
        log.close()


def test_a_damaged_package_is_archived_restorable_and_older_archives_are_kept(
    box: dict[str, Any], tmp_path: Path
) -> None:
    good = _older_name(create(box))
    weights = box["home"] / "models" / "mlp" / "1" / "onnx" / "model.onnx"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    later = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]), "--keep", "1")
    assert later.exit_code == 1, later.output
    assert "ALERT" in later.stderr and "mlp/1" in later.stderr and "models list --verify" in later.stderr
    assert good.exists()  # keep 1 would have removed it: the last archive with a good package stays
    (damaged,) = [p for p in box["out"].glob("inferbox-backup-*.tar") if p != good]
    checked = run(box["home"], "backup", "check", str(damaged))
    assert checked.exit_code == 0, checked.output
    new = tmp_path / "new"
    restored = run(new, "backup", "restore", str(damaged))
    assert restored.exit_code == 0, restored.output
    assert (new / "models" / "mlp" / "1" / "onnx" / "model.onnx").read_bytes() == weights.read_bytes()
    assert run(new, "models", "list", "--verify").exit_code == 1  # restored as the box held it: still broken


def test_a_verified_package_the_manifest_does_not_list_is_refused(box: dict[str, Any], tmp_path: Path) -> None:
    archive = create(box)
    other = publish_mlp(tmp_path / "other", ["ort-cpu"], name="extra")
    extra = {
        f"{ROOT}/models/{p.relative_to(other).as_posix()}": p.read_bytes()
        for p in other.rglob("*")
        if p.is_file() and ".staging" not in p.parts
    }
    evil = tmp_path / "evil.tar"
    rewrite(archive, evil, lambda n, d: (n, d), add=extra)
    checked = run(box["home"], "backup", "check", str(evil))
    assert checked.exit_code == 1
    assert "models/extra/1" in checked.output and "not in its manifest's packages" in checked.output


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}  # type: ignore[union-attr]


def test_a_backslash_in_a_job_name_backs_up_and_restores(box: dict[str, Any], tmp_path: Path) -> None:
    odd = box["home"] / "spool" / "bad" / "C:\\Users\\ops\\job1"
    odd.mkdir(parents=True)
    (odd / "REASON").write_text("not a job\n")
    archive = create(box)
    assert run(box["home"], "backup", "check", str(archive)).exit_code == 0
    new = tmp_path / "new"
    assert run(new, "backup", "restore", str(archive)).exit_code == 0
    assert (new / "spool" / "bad" / "C:\\Users\\ops\\job1" / "REASON").read_text() == "not a job\n"


def test_a_file_name_that_is_not_utf8_is_left_out_with_its_reason(box: dict[str, Any]) -> None:
    bad = box["home"] / "spool" / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    with open(os.path.join(os.fsencode(bad), b"job-\xff.jsonl"), "wb") as f:
        f.write(b"x\n")
    result = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]))
    assert result.exit_code == 0, result.output
    assert "job-\\xff.jsonl: a file name that is not UTF-8" in result.stdout


def test_an_unvouched_configuration_cannot_place_files_outside_the_home(box: dict[str, Any], tmp_path: Path) -> None:
    archive = create(box)
    outside = tmp_path / "outside" / "profile.d"
    evil = tmp_path / "evil.tar"
    toml = f'[paths]\nrepository = "{outside}"\n'.encode()
    add = {f"{ROOT}/inferbox.toml": toml, f"{ROOT}/models/zz-evil.sh": b"echo pwned\n"}
    rewrite(archive, evil, lambda n, d: (n, d), add=add)
    new = tmp_path / "new"
    restored = run(new, "backup", "restore", str(evil))
    assert restored.exit_code == 2
    assert "outside the home" in restored.stderr
    assert not (tmp_path / "outside").exists() and not (new / "state.db").exists()


def test_only_a_key_is_set_aside_where_the_signing_key_goes(box: dict[str, Any], tmp_path: Path) -> None:
    archive = create(box)
    victim = tmp_path / "etc" / "passwd"
    victim.parent.mkdir()
    victim.write_text("root:x:0:0:root:/root:/bin/bash\n")
    config = tmp_path / "operator.toml"  # the operator's own configuration, naming a wrong file
    config.write_text(f'[paths]\nsigning_key = "{victim}"\n')
    restored = run(tmp_path / "new", "backup", "restore", str(archive), INFERBOX_CONFIG=str(config))
    assert restored.exit_code == 2 and "would overwrite" in restored.stderr and str(victim) in restored.stderr
    assert victim.read_text().startswith("root:") and sorted(p.name for p in victim.parent.iterdir()) == ["passwd"]


@pytest.mark.parametrize("how", ["no audit log", "a log of another id"])
def test_copies_of_a_log_the_archive_does_not_hold_refuse_the_restore(
    box: dict[str, Any], tmp_path: Path, how: str
) -> None:
    archive = create(box)
    ship = tmp_path / "ship"
    ship.mkdir()
    assert run(box["home"], "audit", "ship", "--to", str(ship)).exit_code == 0

    def admin_scopes(data: bytes) -> bytes:
        db = tmp_path / "s.db"
        db.write_bytes(data)
        conn = sqlite3.connect(db)
        conn.execute("UPDATE api_keys SET scopes = 'admin'")
        conn.commit()
        conn.close()
        return db.read_bytes()

    other = tmp_path / "other"  # another box's log, with its own key: a log that verifies, of another id
    assert run(other, "signing-key", "create").exit_code == 0
    assert run(other, "keys", "create", "--scope", "infer").exit_code == 0
    snapshot = tmp_path / "other-audit.db"
    source, target = sqlite3.connect(other / "audit.db"), sqlite3.connect(snapshot)
    source.backup(target)
    target.execute("PRAGMA journal_mode=DELETE")
    source.close()
    target.close()
    replaced = {
        "/audit.db": snapshot.read_bytes(),
        f"/{SIGNING_KEY}": (other / "keys" / "signing.key").read_bytes(),
        f"/{SIGNING_PUB}": (other / "keys" / "signing.key.pub").read_bytes(),
    }

    def change(name: str, data: bytes) -> tuple[str, bytes] | None:
        if name.endswith("/state.db"):
            return name, admin_scopes(data)
        for suffix, data_there in replaced.items():
            if name.endswith(suffix):
                return None if how == "no audit log" and suffix == "/audit.db" else (name, data_there)
        return name, data

    evil = tmp_path / "evil.tar"
    rewrite(archive, evil, change)
    new = tmp_path / "new"
    restored = run(new, "backup", "restore", str(evil), "--audit-from", str(ship))
    assert restored.exit_code == 2, restored.output
    assert "--expect-sha256" in restored.stderr and "--no-catch-up" in restored.stderr
    assert not (new / "state.db").exists()


def test_a_folder_without_hard_links_gets_the_archive_and_a_failure_is_recorded(
    box: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))

    monkeypatch.setattr("runtime.durable.os.link", no_links)
    archive = _older_name(create(box))  # a vfat / exFAT disk, some SMB shares
    record = last_record(box["home"])
    assert record.event == "backup_create" and record.outcome == "success"
    assert record.details["sha256"] == sha256(archive)

    def disk_gone(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "Input/output error", str(src))

    monkeypatch.setattr("appliance.backup.create.publish_new", disk_gone)
    failed = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]))
    assert failed.exit_code == 2
    record = last_record(box["home"])
    assert record.event == "backup_create" and record.outcome == "failure"
    assert "did not appear" in record.details["error"]
    assert sorted(box["out"].glob("inferbox-backup-*.tar")) == [archive]


def test_boxes_with_one_host_name_keep_each_others_archives(box: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "clone"
    assert run(other, "signing-key", "create").exit_code == 0
    assert run(other, "keys", "create", "--scope", "infer").exit_code == 0
    shared = box["out"]
    t0 = datetime.now(UTC)
    first = create_backup(load_settings({"home": box["home"]}), shared, same_disk=True, keep=2, clock=lambda: t0)
    for day in (1, 2):
        later = create_backup(
            load_settings({"home": other}),
            shared,
            same_disk=True,
            keep=2,
            clock=lambda day=day: t0 + timedelta(days=day),
        )
    assert first.path.exists()
    assert len([p for p in shared.glob("*.tar") if p != first.path]) == 2 and later.path.exists()


def test_a_key_that_does_not_load_is_a_problem_not_a_crash(box: dict[str, Any], tmp_path: Path) -> None:
    archive = create(box)
    evil = tmp_path / "evil.tar"
    rewrite(archive, evil, lambda n, d: (n, b"not a key\n") if n.endswith("/signing.key") else (n, d))
    checked = run(box["home"], "backup", "check", str(evil), "--json")
    assert checked.exit_code == 1, checked.output
    problems = json.loads(checked.stdout)["problems"]
    assert any("signing" in p for p in problems), problems


# -- review round 4


def test_an_archive_configuration_naming_another_home_is_refused(box: dict[str, Any], tmp_path: Path) -> None:
    archive = create(box)
    evil = tmp_path / "evil.tar"
    toml = f'[paths]\nhome = "{tmp_path / "attacker-chosen"}"\n'.encode()
    rewrite(archive, evil, lambda n, d: (n, d), add={f"{ROOT}/inferbox.toml": toml})
    restored = run(tmp_path / "new", "backup", "restore", str(evil))
    assert restored.exit_code == 2 and "sets home" in restored.stderr
    assert not (tmp_path / "new" / "state.db").exists() and not (tmp_path / "attacker-chosen").exists()


def test_paths_the_operator_chose_are_not_blamed_on_the_archive(box: dict[str, Any], tmp_path: Path) -> None:
    (box["home"] / "inferbox.toml").write_text("[server]\nport = 9001\n")
    archive = create(box)
    new, models = tmp_path / "new", tmp_path / "bigdisk-models"
    restored = run(new, "backup", "restore", str(archive), "--repository", str(models))
    assert restored.exit_code == 0, restored.output
    assert Repository(models).open("mlp").manifest.name == "mlp"


def test_without_an_audit_log_keep_removes_nothing_a_clone_could_own(box: dict[str, Any], tmp_path: Path) -> None:
    shared = box["out"]
    clones = []
    for name in ("a", "b"):
        home = tmp_path / name
        assert run(home, "signing-key", "create").exit_code == 0
        (home / "inferbox.toml").write_text("[audit]\naudit = false\n")
        clones.append(home)
    t0 = datetime.now(UTC)
    first = create_backup(load_settings({"home": clones[0]}), shared, same_disk=True, keep=1, clock=lambda: t0)
    later = create_backup(
        load_settings({"home": clones[1]}), shared, same_disk=True, keep=1, clock=lambda: t0 + timedelta(days=1)
    )
    assert first.path.exists() and later.removed == ()
    assert any("not removed" in p for p in later.problems)


def test_a_failed_publish_on_a_box_without_an_audit_log_writes_none(
    box: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "quiet"
    assert run(home, "signing-key", "create").exit_code == 0
    (home / "inferbox.toml").write_text("[audit]\naudit = false\n")

    def disk_gone(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "Input/output error", str(src))

    monkeypatch.setattr("appliance.backup.create.publish_new", disk_gone)
    failed = run(home, "backup", "create", "--same-disk", "--to", str(box["out"]))
    assert failed.exit_code == 2 and "Input/output error" in failed.stderr
    assert not (home / "audit.db").exists()


def _key(home: Path, *args: str) -> str:
    made = run(home, "keys", "create", "--scope", "infer", "--json", *args)
    assert made.exit_code == 0, made.output
    return str(json.loads(made.stdout)["id"])


def _keys(home: Path) -> dict[str, Any]:
    listed = run(home, "keys", "list", "--json")
    assert listed.exit_code == 0, listed.output
    return {k["id"]: k for k in json.loads(listed.stdout)}


def test_a_key_revoked_after_the_backup_stays_revoked_when_the_log_is_brought_forward(
    box: dict[str, Any], tmp_path: Path
) -> None:
    """The archive's key store predates the revocation: restored as it was, a leaked key revoked after the
    backup answered 200 again, while the log brought forward said it was revoked.  Now the restore revokes
    it again (dated as it was revoked), names the keys created since (not on the box) and records both."""
    ship = tmp_path / "ship"
    ship.mkdir()
    leaked, kept = _key(box["home"]), _key(box["home"])
    archive = create(box)
    assert run(box["home"], "keys", "revoke", leaked).exit_code == 0
    later = _key(box["home"])
    assert _ship(box["home"], ship).exit_code == 0
    revoked_at = _keys(box["home"])[leaked]["revoked_at"]
    new = tmp_path / "new"
    result = run(new, "backup", "restore", str(archive), "--audit-from", str(ship))
    assert result.exit_code == 0, result.output
    keys = _keys(new)
    # dated by the revocation's audit record (written just after it), not by the restore
    again = datetime.fromisoformat(keys[leaked]["revoked_at"]) - datetime.fromisoformat(revoked_at)
    assert timedelta(0) <= again < timedelta(seconds=5) and keys[kept]["revoked_at"] is None
    assert later not in keys
    assert f"key {leaked} was revoked (audit seq" in result.output
    assert f"key {later} was created after the backup" in result.output
    log = AuditLog.open(load_settings({"home": new}))
    try:
        restore = log.tail(1)[0]
    finally:
        log.close()
    assert restore.event == "backup_restore" and restore.details["keys_revoked_again"] == leaked
    assert run(new, "audit", "verify").exit_code == 0


def test_without_the_copies_the_restore_says_revoked_keys_are_active_again(box: dict[str, Any], tmp_path: Path) -> None:
    archive = create(box)
    result = run(tmp_path / "new", "backup", "restore", str(archive), "--no-catch-up")
    assert result.exit_code == 0, result.output
    assert "a key revoked since is active again" in result.output


def test_a_key_revoked_while_the_backup_ran_is_revoked_on_the_restored_box(tmp_path: Path) -> None:
    """The key store is snapshotted before the log: a key revoked between the two snapshots is active in
    the archive while its key_revoke record is in the archive's own log (before the backup's last seq)."""
    from api.protocols import AuditEvent
    from appliance.backup.restore import _key_changes_since_backup
    from appliance.keys import KeyStore
    from runtime.signing import generate_private_key, write_private_key

    settings = load_settings({"home": tmp_path}, environ={})
    write_private_key(generate_private_key(), settings.signing_key)
    store = KeyStore(settings.state_db)
    record, _ = store.create(["infer"])
    store.close()
    log = AuditLog.open(settings)
    try:
        log.append(
            msgspec.convert(
                {**msgspec.to_builtins(T.event(0)), "event": "key_revoke", "credential_id": record.id}, AuditEvent
            )
        )
        last = log.tail(1)[0].seq
    finally:
        log.close()
    revoked, notes = _key_changes_since_backup(settings, backup_last_seq=last)  # the revoke is not after it
    assert revoked == [record.id] and any(record.id in n for n in notes)
    store = KeyStore(settings.state_db)
    try:
        assert store.get(record.id).revoked_at is not None
    finally:
        store.close()


def test_a_second_backup_while_one_runs_is_refused_before_it_records_anything(box: dict[str, Any]) -> None:
    """The timer and an operator in the same second wrote two archives of one name, both recorded as
    made, the second then refused: one backup of a box runs at a time."""
    import fcntl

    from tests.appliance.test_audit_cli import _events

    before = _events(box["home"]).count("backup_create")
    with (box["home"] / ".backup.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        refused = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]))
    assert refused.exit_code == 2 and "another `inferbox backup create` of this box is running" in refused.stderr
    assert list(box["out"].iterdir()) == [] and _events(box["home"]).count("backup_create") == before
    assert create(box).is_file()  # once it has ended


def test_a_restore_gives_back_the_old_boxs_leases_and_names_jobs_submitted_after_the_backup(
    box: dict[str, Any], tmp_path: Path
) -> None:
    """A restored mid-job state said "a worker is at it now" for a lease no worker here holds; a job
    submitted after the backup (its record brought back from the copies) was lost without a word."""
    import sqlite3

    ship = tmp_path / "ship"
    ship.mkdir()
    with sqlite3.connect(box["home"] / "state.db") as db:  # a chunk the old box's worker was running
        db.execute("UPDATE batch_chunks SET state = 'leased', lease_until = 9e12, worker = 'old:1', attempts = 2")
    archive = create(box)
    late = tmp_path / "late.jsonl"
    late.write_text(json.dumps({"id": 1, "x": [0.5] * 8}) + "\n")
    job = run(box["home"], "batch", "submit", str(late), "--model", "mlp").stdout.strip()
    assert _ship(box["home"], ship).exit_code == 0
    new = tmp_path / "new"
    result = run(new, "backup", "restore", str(archive), "--audit-from", str(ship))
    assert result.exit_code == 0, result.output
    assert "batch chunk(s) the backed-up box's workers held were given back" in result.stdout, result.stdout
    assert "submitted after the backup are not on this box" in result.stdout and job in result.stdout
    with sqlite3.connect(new / "state.db") as db:
        assert db.execute("SELECT DISTINCT state, attempts FROM batch_chunks").fetchall() == [("pending", 1)]


def test_leases_are_given_back_in_a_state_database_of_an_older_inferbox(tmp_path: Path) -> None:
    """A state database from before finishing claims (no claim_worker column) stopped the restore
    after its files were placed ("no such column"), and running it again refused the box."""
    import sqlite3

    from appliance.backup.restore import _release_leases

    db = tmp_path / "state.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE batch_chunks (job_id TEXT, idx INT, state TEXT, lease_until REAL, attempts INT)")
        conn.execute("CREATE TABLE batch_jobs (job_id TEXT, state TEXT)")
        conn.execute("INSERT INTO batch_chunks VALUES ('j', 0, 'leased', 9e12, 2)")
    assert _release_leases(db) == 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT state, attempts FROM batch_chunks").fetchall() == [("pending", 1)]
    assert _release_leases(tmp_path / "none.db") == 0  # no batch tables at all


def test_a_restore_that_reads_another_configuration_keeps_the_archives_aside(
    box: dict[str, Any], tmp_path: Path
) -> None:
    """With INFERBOX_CONFIG the archive's inferbox.toml was placed in the home, unvouched: any later
    command run without that variable followed it (a repository outside the home, say)."""
    (box["home"] / "inferbox.toml").write_text("[server]\nport = 8123\n")
    archive = create(box)
    config = tmp_path / "operator.toml"
    config.write_text("[server]\nport = 9000\n")
    new = tmp_path / "new"
    restored = run(new, "backup", "restore", str(archive), "--no-catch-up", INFERBOX_CONFIG=str(config))
    assert restored.exit_code == 0, restored.output
    assert not (new / "inferbox.toml").exists()
    assert (new / "inferbox.toml.from-backup").read_text() == "[server]\nport = 8123\n"
    assert "not in effect" in restored.stdout and str(config) in restored.stdout, restored.stdout
