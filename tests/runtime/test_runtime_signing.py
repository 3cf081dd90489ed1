"""Ed25519 keys and signatures, and the ``inferbox signing-key`` command."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.cli import COMMANDS, main
from runtime.errors import ConfigError, SignatureError
from runtime.signing import (
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_key_pem,
    sign,
    verify,
    write_private_key,
    write_public_key,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The key file must be 0600 and its folder 0700 whatever the umask says."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_write_and_load_round_trip(tmp_path: Path, loose_umask: None) -> None:
    key = generate_private_key()
    path = tmp_path / "keys" / "deep" / "signing.key"
    write_private_key(key, path)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_private_key(path)
    assert private_key_pem(loaded) == private_key_pem(key)
    assert [p.name for p in path.parent.iterdir()] == ["signing.key"]  # no temp file left


def test_existing_key_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    first = generate_private_key()
    write_private_key(first, path)
    with pytest.raises(ConfigError, match=r"already exists.*--force"):
        write_private_key(generate_private_key(), path)
    assert key_id(load_private_key(path)) == key_id(first)
    second = generate_private_key()
    write_private_key(second, path, overwrite=True)
    assert key_id(load_private_key(path)) == key_id(second)
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing.key"]


def test_dangling_symlink_at_key_path_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.key"
    (tmp_path / "signing.key").symlink_to(target)
    with pytest.raises(ConfigError, match="already exists"):
        write_private_key(generate_private_key(), tmp_path / "signing.key")
    assert not target.exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_load_refuses_a_key_others_can_read(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "signing.key"
    write_private_key(generate_private_key(), path)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=rf"mode {mode:04o}.*chmod 600 {re.escape(str(path))}"):
        load_private_key(path)


def test_a_public_key_or_another_file_is_named_before_its_mode(tmp_path: Path) -> None:
    """A public key given where the private one belongs (mode 0644, as public keys are) was told to
    `chmod 600` it, then that it was no private key; /etc/passwd got the same chmod advice."""
    private = tmp_path / "signing.key"
    write_private_key(generate_private_key(), private)
    public = write_public_key(load_private_key(private), private)
    assert public.stat().st_mode & 0o077
    with pytest.raises(ConfigError, match="is a public key; give the private key") as caught:
        load_private_key(public)
    assert "chmod" not in str(caught.value)
    other = tmp_path / "passwd"
    other.write_text("root:x:0:0:root:/root:/bin/bash\n")
    other.chmod(0o644)
    with pytest.raises(ConfigError, match="is not a PEM private key") as caught:
        load_private_key(other)
    assert "chmod" not in str(caught.value)


def test_a_file_holding_the_private_key_and_its_public_half_still_loads(tmp_path: Path) -> None:
    """Only a file with no private block is "a public key": one holding both (cat key pub > file) loaded
    before and must still."""
    private = tmp_path / "signing.key"
    key = generate_private_key()
    write_private_key(key, private)
    both = tmp_path / "both.key"
    both.write_bytes(private.read_bytes() + public_key_pem(key).encode())
    both.chmod(0o600)
    assert key_id(load_private_key(both)) == key_id(key)


def test_load_missing_key_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inferbox signing-key create"):
        load_private_key(tmp_path / "nope.key")


def test_load_refuses_a_non_ed25519_key(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / "ec.key"
    path.write_bytes(pem)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not Ed25519"):
        load_private_key(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        load_private_key(path)
    with pytest.raises(ConfigError, match="not Ed25519"):
        load_public_key(
            ec_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def test_load_public_key_from_every_form(tmp_path: Path) -> None:
    key = generate_private_key()
    pem = public_key_pem(key)
    path = tmp_path / "k.pub"
    path.write_text(pem)
    forms: list[Path | str | bytes] = [path, str(path), pem, pem.encode()]
    for form in forms:
        assert key_id(load_public_key(form)) == key_id(key)
    with pytest.raises(ConfigError, match="does not exist"):
        load_public_key(tmp_path / "missing.pub")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


def test_key_id_is_sha256_of_raw_public_bytes() -> None:
    key = generate_private_key()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(key) == key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()[:16]
    assert len(key_id(key)) == 16
    assert key_id(generate_private_key()) != key_id(key)


def test_sign_and_verify() -> None:
    key = generate_private_key()
    data = b"log-id|size=1000|head=abc|2026-11-28T00:00:00Z"
    sig = sign(key, data)
    assert len(sig) == 64
    verify(key.public_key(), data, sig)
    with pytest.raises(SignatureError, match="does not verify"):
        verify(key.public_key(), data + b"!", sig)
    with pytest.raises(SignatureError, match=f"with key {key_id(key)}"):
        verify(key.public_key(), data, bytes([sig[0] ^ 1]) + sig[1:])
    with pytest.raises(SignatureError, match="does not verify"):
        verify(generate_private_key().public_key(), data, sig)
    with pytest.raises(SignatureError, match="checkpoint 7 is 63 bytes"):
        verify(key.public_key(), data, sig[:63], what="checkpoint 7")


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("INFERBOX_") or name == "STATE_DIRECTORY":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "user-home"))
    return tmp_path / "home"


def test_cli_is_registered() -> None:
    assert COMMANDS["signing-key"] == "appliance.commands.signing_key:signing_key"


def test_cli_create_and_show(cli_env: Path) -> None:
    runner = CliRunner()
    home = cli_env
    result = runner.invoke(main, ["signing-key", "create", "--home", str(home)])
    assert result.exit_code == 0, result.output
    key_path = home / "keys" / "signing.key"
    pub_path = home / "keys" / "signing.key.pub"
    assert _mode(key_path) == 0o600
    key = load_private_key(key_path)
    assert pub_path.read_text() == public_key_pem(key)
    assert public_key_pem(key) in result.output
    assert key_id(key) in result.output
    assert key_id(load_public_key(pub_path)) == key_id(key)

    again = runner.invoke(main, ["signing-key", "create", "--home", str(home)])
    assert again.exit_code == 2
    assert "already exists" in again.output and "--force" in again.output
    assert key_id(load_private_key(key_path)) == key_id(key)

    shown = runner.invoke(main, ["signing-key", "show", "--home", str(home)])
    assert shown.exit_code == 0, shown.output
    assert f"key id: {key_id(key)}" in shown.output
    assert public_key_pem(key) in shown.output

    forced = runner.invoke(main, ["signing-key", "create", "--home", str(home), "--force"])
    assert forced.exit_code == 0, forced.output
    new = load_private_key(key_path)
    assert key_id(new) != key_id(key)
    assert key_id(load_public_key(pub_path)) == key_id(new)


def test_cli_create_out_and_show_key(cli_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "pkg.key"
    runner = CliRunner()
    result = runner.invoke(main, ["signing-key", "create", "--home", str(cli_env), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _mode(out) == 0o600
    assert (tmp_path / "elsewhere" / "pkg.key.pub").is_file()
    assert not (cli_env / "keys" / "signing.key").exists()
    # a key for another machine: this box does not sign with it, so the advice names where it must be set
    assert f"this box signs with {cli_env / 'keys' / 'signing.key'}, not this key" in result.output
    assert f"set signing_key = '{out}' in [paths] of inferbox.toml where they are made" in result.output
    assert f"set public_key = '{out}.pub' in [paths] of inferbox.toml where they are served" in result.output
    assert "this box signs with" not in runner.invoke(main, ["signing-key", "create", "--home", str(cli_env)]).output
    # a relative --out is advised as an absolute path (the services do not run in this folder)
    with runner.isolated_filesystem(temp_dir=tmp_path) as here:
        made = runner.invoke(main, ["signing-key", "create", "--home", str(cli_env), "--out", "build.key"])
        assert f"set signing_key = '{Path(here) / 'build.key'}'" in made.output, made.output
    shown = runner.invoke(main, ["signing-key", "show", "--key", str(out)])
    assert shown.exit_code == 0, shown.output
    assert key_id(load_private_key(out)) in shown.output


def test_cli_show_without_key_names_the_fix(cli_env: Path) -> None:
    result = CliRunner().invoke(main, ["signing-key", "show", "--home", str(cli_env)])
    assert result.exit_code == 2
    assert "inferbox signing-key create" in result.output


@pytest.mark.parametrize("signer", ["none", "other"])
def test_load_model_refuses_a_package_the_key_did_not_sign(tmp_path: Path, signer: str) -> None:
    # what serve and the batch worker call: the key must reach it, not only read_package
    from runtime.loader import LoaderOptions, load_model
    from tests.runtime.conftest import publish_mlp

    trusted = generate_private_key()
    key = None if signer == "none" else generate_private_key()
    publish_mlp(tmp_path / "repo", ["ort-cpu"], "mlp", signing_key=key)
    options = LoaderOptions(backend="ort-cpu", public_key=trusted.public_key())
    with pytest.raises(SignatureError):
        load_model(tmp_path / "repo", "mlp", options=options)


def test_load_model_takes_a_package_the_key_signed(tmp_path: Path) -> None:
    from runtime.loader import LoaderOptions, load_model
    from tests.runtime.conftest import publish_mlp

    trusted = generate_private_key()
    publish_mlp(tmp_path / "repo", ["ort-cpu"], "mlp", signing_key=trusted)
    model = load_model(
        tmp_path / "repo", "mlp", options=LoaderOptions(backend="ort-cpu", public_key=trusted.public_key())
    )
    try:
        assert model.name == "mlp"
    finally:
        model.close()


def test_a_bundle_of_public_keys_is_read_whole_where_keys_are_taken(tmp_path: Path) -> None:
    """`audit public-key --all` writes the signing key and the retired ones in one file; backup's
    --public-key read its first block only, and restore after a rotation was refused."""
    from appliance.commands.backup import _load_keys
    from runtime.signing import load_public_keys

    keys = [generate_private_key().public_key() for _ in range(2)]
    bundle = tmp_path / "keys.pem"
    bundle.write_text("".join(f"# key id {key_id(k)}\n{public_key_pem(k)}" for k in keys))
    assert [key_id(k) for k in load_public_keys(bundle)] == [key_id(k) for k in keys]
    assert [key_id(k) for k in _load_keys((bundle,))] == [key_id(k) for k in keys]
    one = tmp_path / "one.pem"
    one.write_text(public_key_pem(keys[0]))
    assert [key_id(k) for k in load_public_keys(one)] == [key_id(keys[0])]


def test_a_short_write_is_carried_on_to_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The signing key and the digest keys were written with one os.write: a short write (a full disk's
    edge) published a truncated key."""
    import os

    from runtime import durable

    real = os.write
    monkeypatch.setattr(durable.os, "write", lambda fd, data: real(fd, bytes(data[:7])))  # 7 bytes a call
    key = generate_private_key()
    write_private_key(key, tmp_path / "keys" / "signing.key")
    monkeypatch.undo()
    assert load_private_key(tmp_path / "keys" / "signing.key").public_key().public_bytes_raw() == (
        key.public_key().public_bytes_raw()
    )
