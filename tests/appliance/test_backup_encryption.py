"""Backups encrypted to a key kept off the box: ``backup keygen``, ``create --encrypt-to``, ``check`` and
``restore --identity``; the stream format refuses every change, cut and swap."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from appliance.backup import crypt
from appliance.keys import KeyStore
from appliance.settings import load_settings
from runtime.errors import BackupError
from runtime.repository import Repository

# the fixtures of a real box, shared with test_backup (the tests take them by name: F811)
# ruff: noqa: F811
from tests.appliance.test_backup import box, built, last_record, run  # noqa: F401

pytestmark = pytest.mark.usefixtures("clean_env")

HEADER = len(crypt.MAGIC)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("off-box")
    made = run(folder, "backup", "keygen", "--out", str(folder / "backup.key"))
    assert made.exit_code == 0, made.output
    other = folder / "other.key"
    crypt.generate_identity(other)
    return {"private": folder / "backup.key", "public": folder / "backup.key.pub", "other": other}


def seal(data: bytes, recipient: Any, write: int = 10_000) -> bytes:
    buf = io.BytesIO()
    w = crypt.EncryptingWriter(buf, recipient)
    for i in range(0, len(data), write):
        w.write(data[i : i + write])
    w.finish()
    return buf.getvalue()


def header_size(sealed: bytes) -> int:
    return HEADER + 2 + int.from_bytes(sealed[HEADER : HEADER + 2], "big")


@pytest.mark.parametrize("size", [0, 1, crypt.CHUNK - 1, crypt.CHUNK, crypt.CHUNK + 1, 3 * crypt.CHUNK + 7])
def test_the_stream_opens_to_what_was_written(keys: dict[str, Path], size: int) -> None:
    data = os.urandom(size)
    sealed = seal(data, crypt.load_recipient(keys["public"]))
    assert size < 32 or data[:32] not in sealed  # (a byte or two may occur anywhere)
    reader = crypt.DecryptingReader(io.BytesIO(sealed), crypt.load_identity(keys["private"]))
    assert b"".join(iter(lambda: reader.read(7_000), b"")) == data
    # the key id in the header names the key it is for
    assert crypt.recipient_id(crypt.load_recipient(keys["public"])) in sealed[:300].decode("latin-1")


def _opens(sealed: bytes, identity: Any) -> bytes:
    reader = crypt.DecryptingReader(io.BytesIO(sealed), identity)
    return reader.read()


def test_every_change_cut_and_swap_is_refused(keys: dict[str, Path]) -> None:
    recipient, identity = crypt.load_recipient(keys["public"]), crypt.load_identity(keys["private"])
    data = os.urandom(3 * crypt.CHUNK + 100)
    sealed = seal(data, recipient)
    start = header_size(sealed)
    step = crypt.CHUNK + crypt.TAG
    flipped = bytearray(sealed)
    flipped[start + step + 5] ^= 1
    second = seal(data, recipient)  # another archive to the same key: its chunks under another key
    cases = {
        "a flipped byte": bytes(flipped),
        "cut at a chunk boundary": sealed[: start + 2 * step],
        "cut inside a chunk": sealed[:-9],
        "the last chunk dropped": sealed[: start + 3 * step],
        "bytes after the end": sealed + b"\0" * 16,
        "two chunks swapped": sealed[:start]
        + sealed[start + step : start + 2 * step]
        + sealed[start : start + step]
        + sealed[start + 2 * step :],
        "a chunk of another archive": sealed[: start + step] + second[header_size(second) + step :],
        "the header of another archive": second[: header_size(second)] + sealed[start:],
    }
    for case, bad in cases.items():
        with pytest.raises(BackupError):
            _opens(bad, identity)
            pytest.fail(case)
    assert _opens(sealed, identity) == data
    with pytest.raises(BackupError, match="encrypted to the backup key"):
        _opens(sealed, crypt.load_identity(keys["other"]))


@pytest.mark.parametrize(
    "fields",
    [
        b"[" * 2000 + b"]" * 2000,  # nesting deep enough to exhaust the parser's recursion
        b'{"recipient": "0123456789abcdef", "ephemeral": "AAAA", "salt": "AAAA", "chunk": Infinity}',
        b'{"recipient": "\\u001b[2J0123456789abcdef", "ephemeral": "", "salt": "", "chunk": 65536}',
        b'{"recipient": "0123456789abcdef", "ephemeral": "!!", "salt": "", "chunk": 65536}',
        b"null",
    ],
    ids=["deep-nesting", "infinite-chunk", "escape-in-key-id", "bad-base64", "not-an-object"],
)
def test_a_crafted_header_is_a_clear_refusal_never_a_crash(
    keys: dict[str, Path], tmp_path: Path, fields: bytes
) -> None:
    crafted = crypt.MAGIC + len(fields).to_bytes(2, "big") + fields + b"\0" * 64
    with pytest.raises(BackupError, match="encryption header"):
        crypt.DecryptingReader(io.BytesIO(crafted), crypt.load_identity(keys["private"]))
    path = tmp_path / "crafted.tar.enc"
    path.write_bytes(crafted)
    assert crypt.encrypted_to(path) == ""  # printed as "(unreadable header)", never the raw field
    result = run(tmp_path, "backup", "check", str(path))
    assert result.exit_code == 2 and "(unreadable header)" in result.stderr and "\x1b" not in result.stderr


def test_an_ephemeral_key_without_a_shared_secret_is_refused(keys: dict[str, Path]) -> None:
    import base64
    import json

    fields = json.dumps(
        {
            "recipient": crypt.recipient_id(crypt.load_recipient(keys["public"])),
            "ephemeral": base64.b64encode(bytes(32)).decode(),  # the zero point: no key agreement
            "salt": base64.b64encode(bytes(16)).decode(),
            "chunk": crypt.CHUNK,
        }
    ).encode()
    crafted = crypt.MAGIC + len(fields).to_bytes(2, "big") + fields + b"\0" * 64
    with pytest.raises(BackupError, match="no shared key"):
        crypt.DecryptingReader(io.BytesIO(crafted), crypt.load_identity(keys["private"]))


def test_keygen_never_overwrites_and_keeps_the_private_key_private(keys: dict[str, Path]) -> None:
    assert keys["private"].stat().st_mode & 0o777 == 0o600
    # the box's backup unit runs as another user: the .pub is readable whatever the CLI's umask (0077)
    assert keys["public"].stat().st_mode & 0o777 == 0o644
    assert not [p for p in keys["private"].parent.iterdir() if p.name.startswith(".")]  # no temporary left
    again = run(keys["private"].parent, "backup", "keygen", "--out", str(keys["private"]))
    assert again.exit_code == 2 and "exists" in again.stderr
    with pytest.raises(BackupError, match="not a PEM public key"):
        crypt.load_recipient(Path(__file__))  # not a key at all: a clear error, not a traceback
    empty = run(keys["private"].parent, "backup", "keygen", "--out", "")
    assert empty.exit_code == 2 and "names no file" in empty.stderr


def test_keygen_writes_where_there_are_no_hard_links_and_a_failure_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vfat / exFAT USB stick (the documented place for the key) has no hard links; a full disk while
    writing the private key must not leave a .pub that blocks the next try."""
    import errno

    real_link = os.link

    def no_links(src: object, dst: object, **kw: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    pub, _ = crypt.generate_identity(tmp_path / "usb.key")
    assert pub.is_file() and (tmp_path / "usb.key").is_file()
    monkeypatch.setattr(os, "link", real_link)

    real_write = crypt._write_new

    def full(path: Path, data: bytes, mode: int) -> None:
        if not path.name.endswith(".pub"):
            raise BackupError(f"cannot write {path} (No space left on device)")
        real_write(path, data, mode)

    monkeypatch.setattr(crypt, "_write_new", full)
    with pytest.raises(BackupError, match="No space"):
        crypt.generate_identity(tmp_path / "k2.key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usb.key", "usb.key.pub"]
    monkeypatch.setattr(crypt, "_write_new", real_write)
    crypt.generate_identity(tmp_path / "k2.key")  # the retry works


def create_encrypted(box: dict[str, Any], keys: dict[str, Path]) -> tuple[Path, Any]:
    """``backup create --encrypt-to`` the test key: (the archive, the command's result)."""
    made = run(
        box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]), "--encrypt-to", str(keys["public"])
    )
    assert made.exit_code == 0, made.output
    (archive,) = box["out"].glob("inferbox-backup-*.tar.enc")
    return archive, made


def test_an_encrypted_backup_holds_no_secret_in_the_clear_and_restores_with_its_key(
    box: dict[str, Any], keys: dict[str, Path], tmp_path: Path
) -> None:
    archive, made = create_encrypted(box, keys)
    stored = archive.read_bytes()
    signing = (box["home"] / "keys" / "signing.key").read_bytes()
    assert signing[30:60] not in stored and b"MANIFEST.json" not in stored and b"state.db" not in stored
    with pytest.raises(tarfile.TarError):
        tarfile.open(archive).close()
    rid = crypt.recipient_id(crypt.load_recipient(keys["public"]))
    assert f"Encrypted to the backup key {rid}" in made.stderr

    # the box recorded the stored (encrypted) bytes' hash and the key they are for
    record = last_record(box["home"])
    assert record.event == "backup_create"
    assert record.details["sha256"] == hashlib.sha256(stored).hexdigest() and record.details["encrypted_to"] == rid

    missing = run(box["home"], "backup", "check", str(archive))
    assert missing.exit_code == 2 and f"encrypted to the backup key {rid}" in missing.stderr
    assert "--identity" in missing.stderr
    as_json = run(box["home"], "backup", "check", str(archive), "--json")
    assert as_json.exit_code == 2 and json.loads(as_json.stdout)["ok"] is False
    as_json = run(box["home"], "backup", "check", str(archive), "--json", "--identity", str(keys["public"]))
    assert as_json.exit_code == 2 and "private key" in json.loads(as_json.stdout)["problems"][0]
    wrong = run(box["home"], "backup", "check", str(archive), "--identity", str(keys["other"]))
    assert wrong.exit_code == 1 and "encrypted to the backup key" in wrong.output
    checked = run(
        box["home"],
        "backup",
        "check",
        str(archive),
        "--identity",
        str(keys["private"]),
        "--expect-sha256",
        record.details["sha256"],
    )
    assert checked.exit_code == 0 and checked.stdout.startswith("OK:"), checked.output

    new = tmp_path / "new" / "home"
    refused = run(new, "backup", "restore", str(archive))
    assert refused.exit_code == 2 and "--identity" in refused.stderr and not new.exists()
    restored = run(new, "backup", "restore", str(archive), "--identity", str(keys["private"]))
    assert restored.exit_code == 0, restored.output
    assert KeyStore(new / "state.db").verify(box["key"]).scopes == ("infer",)
    assert Repository(new / "models").open("mlp").manifest.name == "mlp"
    assert (new / "keys" / "signing.key").read_bytes() == signing


def test_an_identity_with_a_plain_archive_is_refused(
    box: dict[str, Any], keys: dict[str, Path], tmp_path: Path
) -> None:
    """A plain tar where the box writes encrypted ones was swapped in: whoever holds the .pub could
    encrypt a forged archive too, but nobody can make the box's encrypted archive plain."""
    made = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]))
    assert made.exit_code == 0 and "in the clear" in made.stderr, made.output
    (archive,) = box["out"].glob("inferbox-backup-*.tar")
    new = tmp_path / "new" / "home"
    restored = run(new, "backup", "restore", str(archive), "--identity", str(keys["private"]))
    assert restored.exit_code == 2 and "plain archive" in restored.stderr
    assert not (new / "state.db").exists()
    checked = run(box["home"], "backup", "check", str(archive), "--identity", str(keys["private"]))
    assert checked.exit_code == 1 and "plain archive" in checked.output


def test_a_damaged_encrypted_archive_is_refused_whole(
    box: dict[str, Any], keys: dict[str, Path], tmp_path: Path
) -> None:
    archive, _ = create_encrypted(box, keys)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x40
    archive.write_bytes(bytes(data))
    checked = run(box["home"], "backup", "check", str(archive), "--identity", str(keys["private"]))
    assert checked.exit_code == 1 and "does not authenticate" in checked.output
    new = tmp_path / "new" / "home"
    restored = run(new, "backup", "restore", str(archive), "--identity", str(keys["private"]))
    assert restored.exit_code == 2 and "does not authenticate" in restored.stderr
    assert not (new / "state.db").exists()


def test_the_setting_encrypts_the_scheduled_backups_and_keep_prunes_plain_and_encrypted_alike(
    box: dict[str, Any], keys: dict[str, Path]
) -> None:
    from appliance.backup.create import box_name

    (box["home"] / "inferbox.toml").write_text(f"[backup]\nbackup_encrypt_to = {str(keys['public'])!r}\n")
    name = box_name(load_settings({"home": box["home"]}))
    older = [
        box["out"] / f"inferbox-backup-{name}-20200101T000000Z.tar",
        box["out"] / f"inferbox-backup-{name}-20200102T000000Z.tar.enc",
    ]
    for path in older:
        path.write_bytes(b"old")
    made = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]), "--keep", "2")
    assert made.exit_code == 0, made.output
    (archive,) = [p for p in box["out"].glob("inferbox-backup-*.tar.enc") if p not in older]
    assert crypt.encrypted_to(archive) == crypt.recipient_id(crypt.load_recipient(keys["public"]))
    assert sorted(box["out"].iterdir()) == [older[1], archive]  # the oldest went, plain or not


def test_a_missing_recipient_key_names_the_setting_it_came_from(box: dict[str, Any], tmp_path: Path) -> None:
    """A missing key file ("cannot read the recipient key /x.pub") did not say it came from backup_encrypt_to."""
    missing = tmp_path / "gone.pub"
    (box["home"] / "inferbox.toml").write_text(f"[backup]\nbackup_encrypt_to = {str(missing)!r}\n")
    made = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]))
    assert made.exit_code == 2 and "backup_encrypt_to (file" in made.output and str(missing) in made.output
    flag = run(box["home"], "backup", "create", "--same-disk", "--to", str(box["out"]), "--encrypt-to", str(missing))
    assert flag.exit_code == 2 and "--encrypt-to" in flag.output and "does not exist" in flag.output
    assert not list(box["out"].iterdir())
