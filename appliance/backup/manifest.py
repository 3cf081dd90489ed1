"""What a backup archive holds: its layout, its manifest, and which member names are allowed.

An archive is a plain POSIX tar (``tar -tf`` lists it, ``tar -xOf`` reads one
file) whose members all sit under ``inferbox-backup/``:

==========================  =====================================================
``state.db``, ``audit.db``  consistent snapshots (SQLite's online backup), not the live files
``inferbox.toml``           the home's configuration file, when it has one
``keys/...``                the key folder (digest keys, retired public keys), without
                            ``first-admin.key`` (a plaintext API key) and the signing key
``signing/signing.key``     the signing key and its ``.pub``, wherever the setting puts them
``models/<name>/<v>/...``   the model repository (``--no-models`` leaves it out)
``spool/...``, ``outbox/``  batch jobs' inputs and results (``--no-batch`` leaves them out)
``config/inferbox.toml``    a configuration file outside the home (never restored; for reference)
``MANIFEST.json``           last: every file's size and SHA-256, and what the backup holds
==========================  =====================================================
"""

from __future__ import annotations

from pathlib import PurePosixPath

import msgspec

from runtime.errors import BackupError

__all__ = [
    "DAMAGED_NOTE",
    "FORMAT",
    "MANIFEST",
    "ROOT",
    "AuditFacts",
    "BackupManifest",
    "FileEntry",
    "ModelEntry",
    "decode_manifest",
    "member_path",
]

FORMAT = "inferbox-backup/1"
ROOT = "inferbox-backup"
MANIFEST = "MANIFEST.json"
#: the first component of every file's path in an archive
TOP_LEVEL = frozenset(
    {"state.db", "audit.db", "inferbox.toml", "keys", "signing", "models", "spool", "outbox", "config"}
)
SIGNING_KEY = "signing/signing.key"
SIGNING_PUB = "signing/signing.key.pub"


class FileEntry(msgspec.Struct, frozen=True):
    path: str  #: relative to ``inferbox-backup/``
    size: int
    sha256: str


class AuditFacts(msgspec.Struct, frozen=True, kw_only=True):
    """The audit log in the backup, as the snapshot held it."""

    log_id: str
    records: int
    first_seq: int
    last_seq: int
    head_hash: str
    #: the snapshot verified with the box's trusted keys when the backup was made
    verified: bool
    problem: str = ""


class ModelEntry(msgspec.Struct, frozen=True):
    name: str
    version: int
    sha256: str


class BackupManifest(msgspec.Struct, frozen=True, kw_only=True):
    format: str
    created_at: str
    inferbox_version: str
    host: str
    home: str
    #: state, audit, keys, signing_key, config, models, batch: what this backup holds
    parts: list[str]
    files: list[FileEntry]
    audit: AuditFacts | None = None
    models: list[ModelEntry] = []
    #: API keys in the state database by state (active, revoked, expired)
    api_keys: dict[str, int] = {}
    #: batch jobs by state (queued, running, done, failed)
    batch_jobs: dict[str, int] = {}
    #: the configuration file outside the home that the backup copied to ``config/`` ("" for none)
    config_file: str = ""
    #: what was left out, each with its reason
    skipped: list[str] = []
    #: packages (``name/version``) that did not verify when the backup was taken, archived as they were
    damaged: list[str] = []


#: how ``skipped`` ends for a package that did not verify when the backup was taken (it is archived all the same)
DAMAGED_NOTE = "; archived as it was, listed as damaged"


def decode_manifest(data: bytes) -> BackupManifest:
    try:
        manifest = msgspec.json.decode(data, type=BackupManifest)
    except msgspec.ValidationError as exc:
        raise BackupError(f"the archive's {MANIFEST} is not an inferbox backup manifest ({exc})") from exc
    except msgspec.DecodeError as exc:
        raise BackupError(f"the archive's {MANIFEST} is not JSON ({exc})") from exc
    if manifest.format != FORMAT:
        raise BackupError(
            f"the archive is a backup of format {manifest.format!r}; this inferbox reads {FORMAT!r} "
            "(restore it with the inferbox version that made it)"
        )
    return manifest


def member_path(name: str) -> str:
    """The path under ``inferbox-backup/`` of an archive member named ``name``, or BackupError.

    Refuses what could write outside the folder being restored: an absolute name, ``..``,
    an empty or ``.`` component, a NUL, and anything outside the known layout.
    """
    if "\x00" in name:  # a backslash is an ordinary character in a Linux file name (a job named C:\x)
        raise BackupError(f"archive member {name!r} has a NUL in its name: not an inferbox backup")
    parts = PurePosixPath(name).parts
    if len(parts) < 2 or parts[0] != ROOT or name.startswith("/"):
        raise BackupError(f"archive member {name!r} is not under {ROOT}/: not an inferbox backup")
    rest = name.split("/")[1:]
    if any(p in ("", ".", "..") for p in rest):
        raise BackupError(f"archive member {name!r} has an empty, '.' or '..' component: not an inferbox backup")
    relative = "/".join(rest)
    if relative != MANIFEST and rest[0] not in TOP_LEVEL:
        raise BackupError(f"archive member {name!r} is outside an inferbox backup's layout")
    return relative
