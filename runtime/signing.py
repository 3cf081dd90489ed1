"""Ed25519 keys and detached signatures (model manifests, audit checkpoints).

A private key is a PKCS#8 PEM file readable by its owner only (mode 0600); a
public key is a SubjectPublicKeyInfo PEM.  A signature is the raw 64 bytes of
Ed25519 over the exact bytes signed, so it can be checked without inferbox::

    openssl pkeyutl -verify -pubin -inkey signing.key.pub -rawin \\
        -in manifest.json -sigfile manifest.sig

Key problems (missing file, loose permissions, not an Ed25519 PEM) raise
:class:`~runtime.errors.ConfigError`; a signature that does not verify raises
:class:`~runtime.errors.SignatureError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime.durable import fsync_dir, write_all
from runtime.errors import ConfigError, SignatureError

__all__ = [
    "SIGNATURE_BYTES",
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "generate_private_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_public_keys",
    "private_key_pem",
    "public_key_path",
    "public_key_pem",
    "sign",
    "verify",
    "write_private_key",
    "write_public_key",
]

SIGNATURE_BYTES = 64
_CREATE_HINT = "create one with `inferbox signing-key create`"


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the appliance signs unattended; the file is 0600)."""
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def write_private_key(key: Ed25519PrivateKey, path: Path, *, overwrite: bool = False) -> None:
    """Write ``key`` to ``path`` with mode 0600, atomically.

    The PEM goes to a fresh temporary file (``O_CREAT | O_EXCL``, mode 0600) in
    the same folder, is fsynced, then linked to ``path`` (refusing an existing
    key) or, with ``overwrite=True``, renamed over it.  A missing parent folder
    is created with mode 0700.
    """
    path = Path(path)
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o700)
        parent.chmod(0o700)  # mkdir's mode is filtered by the umask
    if not overwrite and (path.exists() or path.is_symlink()):
        raise ConfigError(f"signing key {path} already exists; keep it, or pass --force to replace it")
    tmp = parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            write_all(fd, private_key_pem(key))
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never clobber a key
            except FileExistsError:
                raise ConfigError(
                    f"signing key {path} already exists; keep it, or pass --force to replace it"
                ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(parent)


#: a PEM Ed25519 private key is ~120 bytes: a file far larger is not one
_MAX_KEY_BYTES = 1 << 14


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM private key; refuse one that group or others can read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(f"signing key {path} does not exist; {_CREATE_HINT}") from None
    except OSError as exc:
        raise ConfigError(f"signing key {path}: cannot open it: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"signing key {path} is not a regular file")
        data = f.read(_MAX_KEY_BYTES + 1)
    # what the file is comes first: "chmod 600" is the wrong fix for a public key or /etc/passwd
    if b"-----BEGIN PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise ConfigError(
            f"signing key {path} is a public key; give the private key (signing.key): its public half is what "
            "`inferbox signing-key show` and `inferbox audit public-key` print"
        )
    if len(data) > _MAX_KEY_BYTES or b"PRIVATE KEY-----" not in data:
        raise ConfigError(f"signing key {path} is not a PEM private key; {_CREATE_HINT}")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"signing key {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"signing key {path} is not an unencrypted PEM private key ({exc}); {_CREATE_HINT}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is a {type(key).__name__}, not Ed25519; {_CREATE_HINT}")
    return key


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    ).decode("ascii")


def public_key_path(private_key_path: Path) -> Path:
    """Where the public half of a private key file is kept: ``<key>.pub``."""
    return private_key_path.with_name(private_key_path.name + ".pub")


def write_public_key(key: Ed25519PrivateKey, private_key_path: Path) -> Path:
    """Write ``<key>.pub`` (PEM, mode 0644: auditors and serving machines get it) atomically; return its path."""
    pub = public_key_path(private_key_path)
    tmp = pub.with_name(f".{pub.name}.{secrets.token_hex(6)}.tmp")
    tmp.write_text(public_key_pem(key), encoding="ascii")
    tmp.chmod(0o644)
    os.replace(tmp, pub)
    return pub


def load_public_key(path_or_pem: Path | str | bytes) -> Ed25519PublicKey:
    """A public key from PEM bytes, a PEM string, or the path of a PEM file."""
    where = "public key"
    if isinstance(path_or_pem, bytes):
        data = path_or_pem
    elif isinstance(path_or_pem, str) and path_or_pem.lstrip().startswith("-----BEGIN"):
        data = path_or_pem.encode("ascii", "replace")
    else:
        where = f"public key {path_or_pem}"
        try:
            data = Path(path_or_pem).read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"{where} does not exist; copy the signing machine's `<signing key>.pub` here "
                "(`inferbox signing-key show` prints it)"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read it: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where} is not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{where} is a {type(key).__name__}, not Ed25519")
    return key


_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", re.DOTALL)


def load_public_keys(path: Path) -> list[Ed25519PublicKey]:
    """Every public key in the PEM file ``path``: one, or a bundle of several (``inferbox audit
    public-key --all``: the signing key and the retired ones, each block after a comment line)."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return [load_public_key(path)]  # its own message
    except OSError as exc:
        raise ConfigError(f"public key {path}: cannot read it: {exc.strerror}") from exc
    blocks = _PEM_BLOCK.findall(data)
    if len(blocks) <= 1:
        return [load_public_key(path)]
    keys = []
    for n, block in enumerate(blocks, start=1):
        try:
            keys.append(load_public_key(block))
        except ConfigError as exc:
            raise ConfigError(f"public key {path}, key {n} of {len(blocks)}: {exc}") from None
    return keys


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex digits of SHA-256 over the raw 32-byte public key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``data``."""
    return private_key.sign(data)


def verify(public_key: Ed25519PublicKey, data: bytes, signature: bytes, *, what: str = "signature") -> None:
    """Raise :class:`SignatureError` unless ``signature`` is ``public_key``'s over ``data``."""
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(
            f"{what} is {len(signature)} bytes, an Ed25519 signature is {SIGNATURE_BYTES} "
            "(truncated or not a signature); sign again",
            path=what,
        )
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        raise SignatureError(
            f"{what} does not verify with key {key_id(public_key)}: the data changed after signing, "
            "or it was signed by another key; re-sign with the trusted key or check which public key is configured",
            path=what,
        ) from None
