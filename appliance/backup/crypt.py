"""Backup archives encrypted to a key the box does not hold.

An archive holds the signing key (whoever has it can re-sign a rewritten audit
log and sign packages this box serves), the audit digest keys and the API
keys' hashes.  ``backup create --encrypt-to RECIPIENT.pub`` (or the
``backup_encrypt_to`` setting) writes it so that only the holder of the
recipient's private key, kept off the box, can read it: the share or disk that
stores the archives never sees those secrets, and neither does a thief of the
box's backup folder.

Format (``inferbox-backup-encrypted-1``), streamed (no temporary plaintext):

- the magic line ``inferbox-backup-encrypted-1\\n``;
- a 2-byte big-endian length and a JSON header: the recipient's key id, an
  ephemeral X25519 public key, a 16-byte salt and the chunk size;
- the tar in chunks of ``CHUNK`` bytes, each sealed with AES-256-GCM (16-byte
  tag) under a key derived by HKDF-SHA256 from the X25519 exchange of the
  ephemeral key with the recipient's, the salt and both public keys; the
  nonce is the chunk's index (11 bytes) and a last-chunk flag (1 byte), and the
  header is each chunk's associated data.  So a chunk changed, moved, dropped
  or added, a stream cut at a chunk boundary, a header swapped: each fails to
  open (the construction of age's and Tink's streaming AEAD).

The archive's SHA-256 (in the ``backup_create`` record, ``--expect-sha256``)
is of the encrypted file: what is stored is what is vouched for.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from runtime.errors import BackupError

__all__ = [
    "CHUNK",
    "MAGIC",
    "DecryptingReader",
    "EncryptingWriter",
    "encrypted_to",
    "generate_identity",
    "load_identity",
    "load_recipient",
    "recipient_id",
]

MAGIC = b"inferbox-backup-encrypted-1\n"
#: plaintext bytes per sealed chunk
CHUNK = 64 * 1024
TAG = 16
_INFO = b"inferbox-backup-encrypted-1"
_MAX_HEADER = 4096
_LAST_INDEX = (1 << 88) - 1
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...
    def flush(self) -> None: ...


class Source(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def recipient_id(public: X25519PublicKey) -> str:
    """The first 16 hex digits of the SHA-256 of the recipient's raw public key."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def generate_identity(private_path: Path) -> tuple[Path, str]:
    """Write a new X25519 private key (PEM, mode 0600, never over a file) and ``<name>.pub``;
    (public key path, recipient id)."""
    key = X25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key()
    pub_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not private_path.name or private_path.name in (".", ".."):
        raise BackupError(f"--out {str(private_path)!r} names no file; give a file name, e.g. backup.key")
    pub_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, pub_path):
        if path.exists() or path.is_symlink():
            raise BackupError(f"{path} exists; choose another --out (a key is never overwritten)")
    # the .pub first: a half-written pair is only ever a public key, and the box's backup unit (another
    # user) must read it whatever the umask
    _write_new(pub_path, pub_pem, 0o644)
    try:
        _write_new(private_path, pem, 0o600)
    except BaseException:
        pub_path.unlink(missing_ok=True)  # a .pub without its private key would block the next try
        raise
    return pub_path, recipient_id(public)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """``data`` in a temporary file next to ``path``, then published as ``path`` (never over a file;
    renamed where the filesystem has no hard links, a vfat or exFAT USB stick): a failure leaves no
    partial key to block the next try."""
    from runtime.durable import fsync_dir, publish_new

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(PermissionError):  # vfat: modes are the mount's, not the file's
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish_new(tmp, path)
    except OSError as exc:
        raise BackupError(f"cannot write {path} ({exc.strerror or exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def load_recipient(path: Path) -> X25519PublicKey:
    """The X25519 public key in ``path`` (PEM, as ``backup keygen`` writes it)."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise BackupError(f"cannot read the recipient key {path} ({exc.strerror})") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BackupError(f"{path} is not a PEM public key ({exc}); give the .pub that `backup keygen` wrote") from exc
    if not isinstance(key, X25519PublicKey):
        raise BackupError(f"{path} is not an X25519 key (backups are encrypted to keys from `inferbox backup keygen`)")
    return key


def load_identity(path: Path) -> X25519PrivateKey:
    """The X25519 private key in ``path`` (PEM, unencrypted, as ``backup keygen`` writes it)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise BackupError(f"cannot read the identity {path} ({exc.strerror})") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise BackupError(f"{path} is not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, X25519PrivateKey):
        raise BackupError(f"{path} is not an X25519 private key (the one `inferbox backup keygen` wrote)")
    return key


@dataclass(frozen=True)
class Header:
    """What an encrypted archive's header says (checked: types, sizes, the key id's form)."""

    raw: bytes
    recipient: str
    ephemeral: bytes
    salt: bytes


def parse_header(raw: bytes) -> Header:
    """The header's fields, or BackupError: the header is whoever wrote the file's, so nothing in it
    is trusted before it is checked (a deep JSON nesting, an infinite chunk size, a key of the wrong size)."""
    try:
        fields = json.loads(raw)
        if not isinstance(fields, dict):
            raise ValueError("not an object")
        recipient, chunk = fields["recipient"], fields["chunk"]
        ephemeral = base64.b64decode(fields["ephemeral"], validate=True)
        salt = base64.b64decode(fields["salt"], validate=True)
    except (ValueError, KeyError, TypeError, RecursionError, binascii.Error) as exc:
        raise BackupError(f"its encryption header is damaged ({type(exc).__name__})") from None
    if not isinstance(recipient, str) or not _KEY_ID.fullmatch(recipient):
        raise BackupError("its encryption header names no backup key: damaged, or not a backup")
    if type(chunk) is not int or chunk != CHUNK or len(ephemeral) != 32 or len(salt) != 16:
        raise BackupError("its encryption header is not one this version of inferbox reads")
    return Header(raw, recipient, ephemeral, salt)


def encrypted_to(path: Path) -> str | None:
    """The recipient key id an encrypted archive at ``path`` names, "" when its header is damaged, or
    None when the file does not start as an encrypted archive does (or cannot be read)."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
            length = f.read(2)
            header = f.read(min(struct.unpack(">H", length)[0], _MAX_HEADER)) if len(length) == 2 else b""
    except OSError:
        return None
    try:
        return parse_header(header).recipient
    except BackupError:
        return ""


def _key(shared: bytes, salt: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO + ephemeral + recipient)
    return hkdf.derive(shared)


def _nonce(index: int, last: bool) -> bytes:
    if index > _LAST_INDEX:
        raise BackupError("the archive is too large to encrypt (over 2^88 chunks)")
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class EncryptingWriter:
    """A write-only file object: what is written goes to ``raw`` sealed for ``recipient``.
    :meth:`finish` seals the last chunk (the stream is not whole without it)."""

    def __init__(self, raw: Sink, recipient: X25519PublicKey) -> None:
        ephemeral = X25519PrivateKey.generate()
        eph_raw = _raw(ephemeral.public_key())
        try:
            shared = ephemeral.exchange(recipient)
        except ValueError as exc:  # a low-order point: no key to encrypt to
            raise BackupError(f"the backup key {recipient_id(recipient)} is not usable ({exc})") from exc
        salt = os.urandom(16)
        header = json.dumps(
            {
                "recipient": recipient_id(recipient),
                "ephemeral": base64.b64encode(eph_raw).decode(),
                "salt": base64.b64encode(salt).decode(),
                "chunk": CHUNK,
            },
            sort_keys=True,
        ).encode()
        self._aad = header
        self._aead = AESGCM(_key(shared, salt, eph_raw, _raw(recipient)))
        self._raw = raw
        self._buffer = bytearray()
        self._index = 0
        self._finished = False
        raw.write(MAGIC + struct.pack(">H", len(header)) + header)

    def write(self, data: bytes) -> int:
        if self._finished:
            raise ValueError("write after finish()")
        self._buffer += data
        # keep at least one byte back: the last chunk is sealed as the last only in finish()
        while len(self._buffer) > CHUNK:
            self._seal(bytes(self._buffer[:CHUNK]), last=False)
            del self._buffer[:CHUNK]
        return len(data)

    def _seal(self, plain: bytes, *, last: bool) -> None:
        self._raw.write(self._aead.encrypt(_nonce(self._index, last), plain, self._aad))
        self._index += 1

    def flush(self) -> None:
        self._raw.flush()

    def finish(self) -> None:
        """Seal what is left as the last chunk (possibly empty)."""
        if not self._finished:
            self._seal(bytes(self._buffer), last=True)
            self._buffer.clear()
            self._finished = True
            self._raw.flush()


class DecryptingReader:
    """A read-only file object over an encrypted archive in ``raw``, opened with ``identity``.

    Every chunk is authenticated before its bytes are returned; a stream that ends without its
    last chunk, or goes on after it, raises :class:`BackupError`."""

    def __init__(self, raw: Source, identity: X25519PrivateKey, *, name: str = "the archive") -> None:
        self._name = name
        if raw.read(len(MAGIC)) != MAGIC:
            raise BackupError(f"{name} is not an encrypted inferbox backup")
        (size,) = struct.unpack(">H", self._exactly(raw, 2))
        if size > _MAX_HEADER:
            raise BackupError(f"{name}: its encryption header is {size} bytes: damaged, or not a backup")
        header = self._exactly(raw, size)
        try:
            parsed = parse_header(header)
        except BackupError as exc:
            raise BackupError(f"{name}: {exc}") from None
        mine = identity.public_key()
        if recipient_id(mine) != parsed.recipient:
            raise BackupError(
                f"{name} is encrypted to the backup key {parsed.recipient}, and --identity is the key "
                f"{recipient_id(mine)}; give the private key whose .pub the box encrypts to (backup_encrypt_to)"
            )
        try:
            shared = identity.exchange(X25519PublicKey.from_public_bytes(parsed.ephemeral))
        except ValueError:  # a low-order point: an archive made to fail
            raise BackupError(f"{name}: its encryption header is damaged (no shared key)") from None
        self._aead = AESGCM(_key(shared, parsed.salt, parsed.ephemeral, _raw(mine)))
        self._aad = parsed.raw
        self._raw = raw
        self._index = 0
        self._plain = b""
        self._pos = 0
        self._done = False
        self._next = raw.read(CHUNK + TAG)

    def _exactly(self, raw: Source, n: int) -> bytes:
        data = raw.read(n)
        if len(data) != n:
            raise BackupError(f"{self._name} ends inside its encryption header: truncated")
        return data

    def _open_next(self) -> None:
        sealed = self._next
        if not sealed:
            raise BackupError(f"{self._name} ends before its last chunk: it is truncated; use another copy")
        self._next = self._raw.read(CHUNK + TAG)
        last = not self._next
        try:
            self._plain = self._aead.decrypt(_nonce(self._index, last), sealed, self._aad)
            self._pos = 0
        except InvalidTag:
            where = "it is truncated or was changed" if last else "it was changed"
            raise BackupError(
                f"{self._name}: chunk {self._index} does not authenticate: {where}, or it is damaged; use another copy"
            ) from None
        self._index += 1
        self._done = last

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            left = len(self._plain) - self._pos
            if not left:
                if self._done:
                    break
                self._open_next()
                continue
            take = left if n < 0 else min(n - len(out), left)
            out += self._plain[self._pos : self._pos + take]
            self._pos += take
        return bytes(out)
