"""``inferbox backup check | restore``: prove an archive whole, then put it back on an empty box.

An archive is unpacked into a private folder first, every file checked against the
manifest (size and SHA-256; no file missing, none extra, no link, no path outside
the layout), the audit log verified with the keys the backup holds, the state
database checked by SQLite and every model package verified.  Only then does
restore move the files into place, the databases last, into a home that holds no
state of its own: restore never overwrites anything.  The restored log then records
the restore itself (``backup_restore``), so the log says where its history was cut
back to the backup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

from appliance.backup.crypt import DecryptingReader, Source, encrypted_to
from appliance.backup.manifest import (
    MANIFEST,
    ROOT,
    SIGNING_KEY,
    SIGNING_PUB,
    BackupManifest,
    FileEntry,
    decode_manifest,
    member_path,
)
from appliance.hashio import HashingReader, write_new
from appliance.settings import Settings
from appliance.sqlite import open_read_only
from appliance.tarlimits import SmallHeaders
from runtime.durable import fsync_dir
from runtime.errors import BackupError, InferboxError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from appliance.audit.catch_up import CatchUp
    from appliance.audit.checkpoint import Pace
    from appliance.audit.verify import VerifyReport

__all__ = ["Checked", "RestoreResult", "check_archive", "destination", "restore_backup", "unpack"]

CHUNK = 1 << 20
#: a manifest larger than this is not one inferbox wrote
MAX_MANIFEST_BYTES = 256 << 20


@dataclass(frozen=True)
class Checked:
    """An archive unpacked into ``folder`` and checked; ``problems`` empty when it can be restored."""

    manifest: BackupManifest
    sha256: str  #: of the whole archive file
    size: int
    folder: Path
    problems: list[str]
    audit: VerifyReport | None = None
    #: what vouches for the archive beyond its own manifest (empty: nothing did)
    integrity: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RestoreResult:
    checked: Checked
    placed: int  #: files written into the home, the repository and the signing key's place
    audit: VerifyReport | None  #: the restored log, after its restore record
    notes: list[str] = field(default_factory=list)
    #: what the off-box copies added to the log after the backup's last record (``audit_from``)
    caught_up: CatchUp | None = None
    #: the settings the files were placed by (the archive's inferbox.toml when the box read none)
    settings: Settings | None = None


def _copy_member(source: IO[bytes], dest: Path, size: int) -> str:
    try:
        return write_new(source, dest, size)
    except EOFError:
        raise BackupError(f"the archive ends inside {dest.name}: it is truncated; use another copy") from None


def unpack(
    archive: Path, folder: Path, identity: X25519PrivateKey | None = None
) -> tuple[BackupManifest, list[FileEntry], str, int]:
    """Extract ``archive`` into the empty ``folder``: (manifest, files as found, archive sha256, size).

    An encrypted archive (:mod:`appliance.backup.crypt`) needs ``identity``, the private key it is
    encrypted to; the SHA-256 and size are of the stored (encrypted) bytes."""
    recipient = encrypted_to(archive)
    if recipient is None and identity is not None:
        raise BackupError(
            f"{archive} is a plain archive, not an encrypted one, though --identity was given: one the box "
            "encrypted cannot have become plain (it may have been swapped); check it with --expect-sha256 (its "
            "backup_create record's), or leave out --identity for an archive written plain"
        )
    if recipient is not None and identity is None:
        raise BackupError(
            f"{archive} is encrypted to the backup key {recipient or '(unreadable header)'}: pass --identity FILE, "
            "the private key `inferbox backup keygen` wrote (kept off the box)"
        )
    try:
        raw = open(archive, "rb")  # noqa: SIM115 - closed below, after the trailing blocks are hashed
    except OSError as exc:
        raise BackupError(f"cannot read the archive {archive} ({exc.strerror})") from exc
    found: list[FileEntry] = []
    manifest_bytes: bytes | None = None
    with raw:
        budget = os.fstat(raw.fileno()).st_size  # no member can unpack to more than the archive holds
        free = shutil.disk_usage(folder).free
        if free < budget:
            raise BackupError(
                f"unpacking {archive} needs {budget / 1e6:.0f} MB free in {folder} and has {free / 1e6:.0f} MB; "
                "free space there (for check: --scratch DIR, a folder with room)"
            )
        reader = HashingReader(raw)  # the stored bytes
        try:
            plain: Source = reader
            if recipient is not None and identity is not None:
                plain = DecryptingReader(reader, identity, name=str(archive))
            with tarfile.open(fileobj=plain, mode="r|", tarinfo=SmallHeaders) as tar:  # type: ignore[call-overload]
                for member in tar:
                    if manifest_bytes is not None:
                        raise BackupError(f"archive member {member.name!r} comes after {MANIFEST}: not a backup")
                    if member.isdir():
                        if member.name.rstrip("/") != ROOT:
                            member_path(member.name.rstrip("/") + "/x")  # a folder must sit inside the layout too
                        continue
                    if member.issparse():
                        raise BackupError(f"archive member {member.name!r} is a sparse file: not an inferbox backup")
                    if not member.isreg():
                        kind = "link" if member.issym() or member.islnk() else "special file"
                        raise BackupError(f"archive member {member.name!r} is a {kind}: not an inferbox backup")
                    rel = member_path(member.name)
                    budget -= member.size
                    if budget < 0:
                        raise BackupError(
                            f"archive member {member.name!r} says it is {member.size} bytes, more than the archive "
                            "holds: the archive is cut short (an interrupted copy?) or damaged; use another copy"
                        )
                    source = tar.extractfile(member)
                    assert source is not None  # a regular member always has data
                    if rel == MANIFEST:
                        if member.size > MAX_MANIFEST_BYTES:
                            raise BackupError(f"the archive's {MANIFEST} is {member.size} bytes: not a backup")
                        manifest_bytes = source.read()
                        continue
                    dest = folder / rel
                    try:
                        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                        sha = _copy_member(source, dest, member.size)
                    except FileExistsError as exc:
                        raise BackupError(f"archive member {member.name!r} appears twice: not a backup") from exc
                    except (NotADirectoryError, IsADirectoryError) as exc:
                        raise BackupError(f"archive member {member.name!r} clashes with another member's path") from exc
                    found.append(FileEntry(rel, member.size, sha))
            while plain.read(CHUNK):  # the end-of-archive blocks count in the archive's hash (and seal the stream)
                pass
            while reader.read(CHUNK):
                pass
        except (tarfile.TarError, EOFError, ValueError) as exc:  # a damaged header can raise ValueError
            raise BackupError(
                f"{archive} is not a whole tar archive ({exc}): it is damaged or truncated; use another copy"
            ) from exc
    if manifest_bytes is None:
        raise BackupError(f"{archive} has no {MANIFEST}: it is truncated, or not an inferbox backup")
    return decode_manifest(manifest_bytes), found, reader.hash.hexdigest(), reader.size


def _mismatches(manifest: BackupManifest, found: list[FileEntry]) -> list[str]:
    listed = {f.path: f for f in manifest.files}
    problems = []
    for f in found:
        want = listed.pop(f.path, None)
        if want is None:
            problems.append(f"{f.path}: in the archive but not in its manifest")
        elif (want.size, want.sha256) != (f.size, f.sha256):
            problems.append(
                f"{f.path}: differs from the manifest (sha256 {f.sha256[:16]}..., expected {want.sha256[:16]}...)"
            )
    problems += [f"{path}: in the manifest but not in the archive" for path in sorted(listed)]
    return problems


def _backup_keys(folder: Path) -> list[Ed25519PublicKey]:
    """The public keys the backup's own checkpoints must be signed with: its signing key's and retired keys."""
    from runtime import signing

    keys: list[Ed25519PublicKey] = []
    if (folder / SIGNING_KEY).is_file():
        keys.append(signing.load_private_key(folder / SIGNING_KEY).public_key())
    elif (folder / SIGNING_PUB).is_file():
        keys.append(signing.load_public_key(folder / SIGNING_PUB))
    retired = folder / "keys" / "retired"
    if retired.is_dir():
        keys.extend(signing.load_public_key(p) for p in sorted(retired.glob("*.pub")))
    return keys


def _trust_problems(folder: Path, public_keys: Sequence[Ed25519PublicKey]) -> list[str]:
    """The backup's signing key against the public keys the operator trusts, and against its own ``.pub``."""
    from runtime import signing

    problems = []
    if not (folder / SIGNING_KEY).is_file():
        return ["the backup holds no signing key"] if public_keys else []
    own = signing.key_id(signing.load_private_key(folder / SIGNING_KEY))
    if (folder / SIGNING_PUB).is_file() and signing.key_id(signing.load_public_key(folder / SIGNING_PUB)) != own:
        problems.append(f"{SIGNING_PUB} is not the public half of {SIGNING_KEY} (key {own})")
    given = {signing.key_id(k) for k in public_keys}
    if public_keys and own not in given:
        problems.append(
            f"the backup's signing key ({own}) is none of the public keys given ({', '.join(sorted(given))}): "
            "it is not this appliance's backup, or its key was replaced"
        )
    retired = folder / "keys" / "retired"
    if public_keys and retired.is_dir():
        for pub in sorted(retired.glob("*.pub")):
            kid = signing.key_id(signing.load_public_key(pub))
            if kid not in given:
                problems.append(
                    f"keys/retired/{pub.name} ({kid}) is none of the public keys given: a restored box would trust "
                    "it; pass every retired key's public half too, or remove it from the archive"
                )
    return problems


def _content_problems(
    folder: Path, manifest: BackupManifest, public_keys: Sequence[Ed25519PublicKey], legacy_pace: Pace | None
) -> tuple[list[str], VerifyReport | None]:
    from appliance.audit.verify import verify_db
    from runtime.repository import RepoEntry, Repository

    problems: list[str] = []
    audit: VerifyReport | None = None
    if (folder / "state.db").is_file():
        conn = open_read_only(folder / "state.db")
        try:
            row = conn.execute("PRAGMA integrity_check").fetchone()
        except sqlite3.DatabaseError as exc:
            row = (str(exc),)
        finally:
            conn.close()
        if row is None or row[0] != "ok":
            problems.append(f"state.db: fails SQLite's integrity check ({row[0] if row else 'no answer'})")
    if (folder / "audit.db").is_file():
        try:
            keys = list(public_keys) or _backup_keys(folder)
            if not keys:
                problems.append("audit.db: the backup holds no signing key to verify its checkpoints with")
            else:
                audit = verify_db(folder / "audit.db", keys, legacy_pace=legacy_pace)
                if not audit.ok:
                    problems.append(f"audit.db: {audit.summary()}")
        except InferboxError as exc:
            problems.append(f"audit.db: {exc}")
    if (folder / "models").is_dir():
        entries = Repository(folder / "models").entries(verify_hashes=True)
        have: dict[tuple[str, int], RepoEntry] = {(e.name, e.version): e for e in entries}
        listed = {(m.name, m.version) for m in manifest.models}
        damaged = set(manifest.damaged)
        for e in entries:
            if f"{e.name}/{e.version}" in damaged and (e.name, e.version) not in listed:
                continue  # did not verify when the backup was taken: restored as it was, as the box held it
            if not e.ok:
                problems.append(f"models/{e.name}/{e.version}: {e.error}")
            elif (e.name, e.version) not in listed:
                problems.append(f"models/{e.name}/{e.version}: in the archive but not in its manifest's packages")
        for m in manifest.models:
            found = have.get((m.name, m.version))
            if found is None:
                problems.append(f"models/{m.name}/{m.version}: in the manifest but not in the archive")
            elif found.ok and found.sha256 != m.sha256:
                problems.append(f"models/{m.name}/{m.version}: not the package that was backed up")
    return problems, audit


def check_archive(
    archive: Path,
    folder: Path,
    *,
    expect_sha256: str | None = None,
    public_keys: Sequence[Ed25519PublicKey] = (),
    legacy_pace: Pace | None = None,
    identity: X25519PrivateKey | None = None,
) -> Checked:
    """Unpack ``archive`` into the empty ``folder`` and check everything in it (raises only if unreadable).

    Without ``expect_sha256`` (the ``backup_create`` record's) the archive is checked against itself
    only: anyone who could rewrite it could also rewrite its manifest (``integrity`` says what held).
    ``public_keys`` (this appliance's published keys) are the keys its log must verify with, and
    its signing key and retired keys must be among them.  ``identity``: the private key an encrypted
    archive is encrypted to.
    """
    manifest, found, sha, size = unpack(archive, folder, identity)
    problems = []
    integrity = []
    if expect_sha256 is not None:
        if sha != expect_sha256.lower():
            problems.append(f"the archive's SHA-256 is {sha}, not the expected {expect_sha256}")
        else:
            integrity.append("its SHA-256 is the one expected")
    problems += _mismatches(manifest, found)
    audit = None
    if not problems:
        # the public keys pin which keys the log must verify with; they say nothing of the other files
        # (the archive holds the private key: whoever rewrites it can keep it)
        try:
            problems += _trust_problems(folder, public_keys)
            more, audit = _content_problems(folder, manifest, public_keys, legacy_pace)
        except InferboxError as exc:  # a key file in the archive that does not load, say
            more = [str(exc)]
        problems += more
    return Checked(manifest, sha, size, folder, problems, audit, integrity)


def _refuse_foreign_copies(staging: Path, folder: Path) -> None:
    """Copies of a log in ``folder`` that the archive does not hold: nothing could check the archive against them.

    An archive rewritten without its audit log, or with a log of a new id, would otherwise pass
    the check that off-box copies reaching past a backup hold its ``backup_create`` record.
    """
    from appliance.audit.schema import connect, read_log_id

    logs = sorted({m.group(1) for p in folder.glob("audit-*.jsonl") if (m := _COPY_NAME.fullmatch(p.name))})
    if not logs:
        return
    if not (staging / "audit.db").is_file():
        raise BackupError(
            f"{folder} holds off-box copies of the audit log ({', '.join(logs)}) but the archive holds no audit "
            "log to check against them: pass --expect-sha256 (its backup_create record's) to restore it, or "
            "--no-catch-up; nothing was changed"
        )
    conn = connect(staging / "audit.db")
    try:
        log_id = read_log_id(conn)
    finally:
        conn.close()
    if log_id not in logs:
        raise BackupError(
            f"{folder} holds off-box copies of the audit log {', '.join(logs)}, the archive's log is {log_id}: "
            "it is another box's archive, or one rewritten; pass --expect-sha256 (its backup_create record's) "
            "or --audit-from the folder of its own log's copies, or --no-catch-up; nothing was changed"
        )


#: ``audit ship``'s file names: ``audit-<log id>-<UTC time>.jsonl``
_COPY_NAME = re.compile(r"audit-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-.+\.jsonl")


def _outside_home(settings: Settings) -> list[str]:
    """The settings the archive's file sets that would place restored files outside the home (``name = path``);
    what the operator set (flags, environment) is the operator's to decide."""
    home = settings.home.resolve()
    places = {"repository": settings.repository, "signing_key": settings.signing_key}
    return [
        f"{name} = {path}"
        for name, path in places.items()
        if settings.sources.get(name, "").startswith("file ") and home not in path.resolve().parents
    ]


def _refuse_another_home(config: Path, home: Path) -> None:
    """The archive's ``inferbox.toml`` naming another home: the box would start there, not where the files go."""
    import tomllib

    try:
        named = tomllib.loads(config.read_text(encoding="utf-8")).get("paths", {}).get("home")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
        return  # reload read the same file and said what is wrong with it
    if named is not None and Path(str(named)).expanduser().resolve() != home.resolve():
        raise BackupError(
            f"the archive's inferbox.toml sets home = {named}, but the files go to {home}: the box would start in "
            f"{named}, without them; restore with --home {named}, or with INFERBOX_CONFIG set to the configuration "
            "the box should use; nothing was changed"
        )


def _is_key(path: Path) -> bool:
    """``path`` is a regular file holding an Ed25519 key (private, or a ``.pub``), so it may be set aside."""
    from runtime import signing

    if path.is_symlink() or not path.is_file():
        return False
    try:
        if path.name.endswith(".pub"):
            signing.load_public_key(path)
        else:
            signing.load_private_key(path)
    except (InferboxError, OSError, ValueError):
        return False
    return True


def destination(settings: Settings, rel: str) -> Path | None:
    """Where the archive's file ``rel`` goes on this box (None: kept in the archive only)."""
    top, _, rest = rel.partition("/")
    if (
        rel == "inferbox.toml"
        and settings.config_file is not None
        and settings.home not in settings.config_file.parents
    ):
        # this box reads another configuration (INFERBOX_CONFIG): the archive's goes beside it under a
        # name no command reads, not where a later command run without that variable would follow it
        return settings.home / "inferbox.toml.from-backup"
    if rel in ("state.db", "audit.db", "inferbox.toml"):
        return settings.home / rel
    if rel == SIGNING_KEY:
        return settings.signing_key
    if rel == SIGNING_PUB:
        return settings.signing_key.with_name(settings.signing_key.name + ".pub")
    if top == "keys":
        return settings.keys_dir / rest
    if top == "models":
        return settings.repository / rest
    if top in ("spool", "outbox"):
        return settings.home / rel
    return None  # config/: the configuration outside the home, for the operator to compare


def occupied(settings: Settings) -> list[str]:
    """What in the target says it already holds an appliance's state (restore writes only into none)."""
    found = [str(p) for p in (settings.state_db, settings.audit_db) if p.exists() or p.is_symlink()]
    digest = settings.keys_dir / "digest"
    if digest.is_dir() and any(digest.iterdir()):
        found.append(f"{digest} (digest keys)")
    if settings.repository.is_dir() and any(not p.name.startswith(".") for p in settings.repository.iterdir()):
        found.append(f"{settings.repository} (model packages)")
    for folder in (settings.spool / "new", settings.spool / "cur", settings.outbox):
        if folder.is_dir() and any(folder.iterdir()):
            found.append(f"{folder} (batch jobs)")
    return found


def _move(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``, failing (FileExistsError) rather than replacing anything there."""
    try:
        os.link(src, dest)  # unlike rename, link never replaces an existing file
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP):
            raise
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                shutil.copyfileobj(f, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
    src.unlink()


def _relocate_jobs(state_db: Path, old_home: str, new_home: Path) -> int:
    """Point batch jobs' input and output paths at the new home (they are stored absolute)."""
    old, new = old_home.rstrip("/") + "/", str(new_home).rstrip("/") + "/"
    conn = sqlite3.connect(state_db)
    try:
        with conn:
            cur = conn.execute(
                "UPDATE batch_jobs SET input_path = ? || substr(input_path, ?), out_dir = ? || substr(out_dir, ?) "
                "WHERE substr(input_path, 1, ?) = ? AND substr(out_dir, 1, ?) = ?",
                (new, len(old) + 1, new, len(old) + 1, len(old), old, len(old), old),
            )
            return cur.rowcount
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # no batch job was ever submitted on the backed-up box
            return 0
        raise
    finally:
        conn.close()


def _release_leases(state_db: Path) -> int:
    """Give back, unspent, the chunks (and finishing claims) the backed-up box's workers held: none of
    them runs here, and `batch status` said "a worker is at it now" until each lease ran out."""
    conn = sqlite3.connect(state_db)
    released = 0
    try:
        for chunks, statement in enumerate(
            (
                "UPDATE batch_chunks SET state = 'pending', lease_until = NULL, attempts = MAX(attempts - 1, 0) "
                "WHERE state = 'leased'",
                "UPDATE batch_jobs SET claim_worker = NULL, claim_until = NULL WHERE claim_worker IS NOT NULL",
            )
        ):
            try:
                with conn:
                    cur = conn.execute(statement)
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc) or "no such column" in str(exc):  # an older inferbox's database
                    continue
                raise
            if chunks == 0:  # the first statement: the chunks (the claims are not counted)
                released = cur.rowcount
    finally:
        conn.close()
    return released


def _jobs_after_backup(settings: Settings, backup_last_seq: int) -> list[str]:
    """The jobs the restored log says were submitted after the backup and the restored state does not
    hold (their input was never backed up): their ids."""
    audit = sqlite3.connect(f"file:{settings.audit_db}?mode=ro", uri=True)
    try:
        submitted = [
            r[0]
            for r in audit.execute(
                "SELECT job_id FROM records WHERE event = 'batch_submit' AND outcome = 'success' AND seq > ? "
                "AND job_id NOT IN (SELECT job_id FROM records WHERE event = 'batch_purge' AND seq > ?) "
                "ORDER BY seq",
                (backup_last_seq, backup_last_seq),
            )
        ]
    finally:
        audit.close()
    if not submitted:
        return []
    state = sqlite3.connect(f"file:{settings.state_db}?mode=ro", uri=True)
    try:
        try:
            known = {r[0] for r in state.execute("SELECT job_id FROM batch_jobs")}
        except sqlite3.OperationalError:
            known = set()
    finally:
        state.close()
    spooled = settings.spool / "new"
    return [j for j in dict.fromkeys(submitted) if j and j not in known and not (spooled / j).is_dir()]


def _refuse_occupied(settings: Settings) -> None:
    taken = occupied(settings)
    if taken:
        aside = [settings.home] + [
            p for p in (settings.repository,) if p.exists() and settings.home not in p.parents and p != settings.home
        ]
        moves = "; ".join(f"mv {p} {p}.before-restore" for p in aside)
        raise BackupError(
            "restore writes only into a box without state, and this one holds: " + "; ".join(taken) + ". "
            "Stop the services (systemctl stop inferbox-api inferbox-batch.path inferbox-batch), move the state "
            f"aside ({moves}), then run restore again; nothing was changed"
        )


def _place(placed: list[tuple[Path, Path]], settings: Settings) -> None:
    """Move every (staged, destination) pair, the databases last, never replacing a file; undo all on failure."""
    databases = [(s, d) for s, d in placed if d in (settings.state_db, settings.audit_db)]
    done: list[tuple[Path, Path]] = []
    made: list[Path] = []
    try:
        for src, dest in [m for m in placed if m not in databases] + databases:
            made += _mkdirs(dest.parent)
            if dest.suffix == ".pub":  # a public key (the signing key's, a retired one's) is for anyone to read,
                os.chmod(src, 0o644)  # as the first start wrote it; it came out of the archive 0600
            _move(src, dest)
            done.append((src, dest))
        for folder in {d.parent for _, d in placed}:
            fsync_dir(folder)
    except BaseException as exc:  # a full disk, or Ctrl-C / SIGTERM half-way: take it all back
        left = []
        for src, dest in reversed(done):
            try:
                _move(dest, src)
            except OSError:
                left.append(str(dest))
        for d in sorted(made, key=lambda p: len(p.parts), reverse=True):  # the deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        if not isinstance(exc, OSError):
            raise
        where = f"; could not take back {', '.join(left[:5])}: remove them before running restore again" if left else ""
        raise BackupError(
            f"restore stopped writing {exc.filename or ''} ({exc.strerror or exc}){where}; what it had placed "
            "was taken back: free space (the home needs the archive's size twice while restoring) and run it again"
        ) from exc


def restore_backup(
    settings: Settings,
    archive: Path,
    *,
    record: Callable[[Checked, CatchUp | None, Settings], None] | None = None,
    audit_from: Path | None = None,
    expect_sha256: str | None = None,
    public_keys: Sequence[Ed25519PublicKey] = (),
    legacy_pace: Pace | None = None,
    reload: Callable[[Path], Settings] | None = None,
    identity: X25519PrivateKey | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> RestoreResult:
    """Check ``archive`` and put it back into ``settings``' home, repository and signing-key place.

    ``audit_from``: a folder of off-box copies of the log (``audit ship``'s) to bring the restored log
    forward from, before anything is placed (:func:`appliance.audit.catch_up.catch_up`).
    ``reload(config_file)``: the settings with the archive's ``inferbox.toml`` as the configuration
    file, used when the target reads none of its own (the restored file decides where things go).
    """
    _refuse_occupied(settings)
    home, made_home = settings.home, not settings.home.exists()
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=settings.home))
    try:
        checked = check_archive(
            archive,
            staging,
            expect_sha256=expect_sha256,
            public_keys=public_keys,
            legacy_pace=legacy_pace,
            identity=identity,
        )
        if checked.problems:
            raise BackupError(
                f"{archive} cannot be restored, nothing was changed: "
                + "; ".join(checked.problems[:5])
                + (f" (and {len(checked.problems) - 5} more)" if len(checked.problems) > 5 else "")
            )
        notes: list[str] = []
        caught_up = None
        if audit_from is not None and not checked.integrity:
            _refuse_foreign_copies(staging, audit_from)
        if audit_from is not None and (staging / "audit.db").is_file():
            from appliance.audit.catch_up import catch_up
            from runtime import signing

            keys = list(public_keys) or _backup_keys(staging)
            own = staging / SIGNING_KEY
            caught_up = catch_up(
                staging / "audit.db",
                audit_from,
                keys,
                digest_dir=staging / "keys" / "digest",
                signing_key_id=signing.key_id(signing.load_private_key(own)) if own.is_file() else None,
                legacy_pace=legacy_pace,
            )
            seq = caught_up.backups.get(checked.sha256)
            if seq is not None:
                checked.integrity.append(f"its SHA-256 is the one the audit log recorded (seq {seq})")
            elif caught_up.copies_last_seq > caught_up.backup_last_seq:
                # the box recorded each archive right after its snapshot: copies that reach past the
                # archive's own log must hold that record
                raise BackupError(
                    f"the off-box copies in {audit_from} reach past this backup's last record (seq "
                    f"{caught_up.backup_last_seq}) but hold no backup_create record with its SHA-256 "
                    f"{checked.sha256}: it is not an archive this box wrote, or not as it was written; "
                    "nothing was changed"
                )
        if reload is not None and settings.config_file is None and (staging / "inferbox.toml").is_file():
            reloaded = reload(staging / "inferbox.toml")
            _refuse_another_home(staging / "inferbox.toml", settings.home)
            outside = _outside_home(reloaded)
            if outside and not checked.integrity:
                raise BackupError(
                    f"the archive's inferbox.toml puts {'; '.join(outside)} outside the home {reloaded.home}, and "
                    "nothing vouches for the archive: pass --expect-sha256 (its backup_create record's), or "
                    "restore with INFERBOX_CONFIG set to the configuration the box should use; nothing was changed"
                )
            settings = reloaded
            _refuse_occupied(settings)  # the restored configuration may name another repository
        placed = [(staging / f.path, destination(settings, f.path)) for f in checked.manifest.files]
        if any(dest is not None and dest.name == "inferbox.toml.from-backup" for _, dest in placed):
            notes.append(
                f"the backed-up inferbox.toml is kept as {settings.home / 'inferbox.toml.from-backup'}, not in effect: "
                f"this restore read {settings.config_file}; compare the two"
            )
        pairs = [(src, dest) for src, dest in placed if dest is not None]
        targets: dict[Path, str] = {}
        for src, dest in pairs:
            other = targets.setdefault(dest, src.relative_to(staging).as_posix())
            if other != src.relative_to(staging).as_posix():
                raise BackupError(
                    f"the archive's {other} and {src.relative_to(staging).as_posix()} would both go to {dest} with "
                    "this box's settings (a signing key kept outside the key folder when the backup was taken?); "
                    "set INFERBOX_SIGNING_KEY to another path for the restore; nothing was changed"
                )
        signing_pair = (settings.signing_key, settings.signing_key.with_name(settings.signing_key.name + ".pub"))
        clash = [
            str(d) for d in targets if (d.exists() or d.is_symlink()) and (d not in signing_pair or not _is_key(d))
        ]
        if clash:
            raise BackupError(
                f"restore would overwrite {', '.join(clash[:5])}; move them aside and run it again; nothing was changed"
            )
        stamp = clock().astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        set_aside: list[tuple[Path, Path]] = []
        if settings.signing_key in targets:
            for key in signing_pair:
                if key.exists():  # the fresh key `inferbox install` made: kept, not overwritten
                    aside = key.with_name(f"{key.name}.before-restore-{stamp}")
                    os.rename(key, aside)
                    set_aside.append((key, aside))
                    notes.append(f"the signing key that was here is kept as {aside}")
        try:
            _place(pairs, settings)
        except BaseException:
            for key, aside in set_aside:
                with contextlib.suppress(OSError):
                    _move(aside, key)  # never over a restored key that could not be taken back
            raise
        try:
            return _after_placing(settings, checked, caught_up, record, notes, len(pairs))
        except (InferboxError, OSError, sqlite3.Error) as exc:
            raise BackupError(
                f"the files of {archive} are in place, but the restore did not finish: {exc}. Fix that, then check "
                f"the box with `inferbox audit verify` and `inferbox doctor`; running restore again would refuse "
                "the box it now holds"
            ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made_home:  # a restore refused before anything was placed leaves no empty home behind
            with contextlib.suppress(OSError):
                home.rmdir()


def _after_placing(
    settings: Settings,
    checked: Checked,
    caught_up: CatchUp | None,
    record: Callable[[Checked, CatchUp | None, Settings], None] | None,
    notes: list[str],
    placed: int,
) -> RestoreResult:
    """Relocate batch jobs, bring the keys forward, record the restore, verify the log."""
    if checked.manifest.home != str(settings.home) and settings.state_db.exists():
        moved = _relocate_jobs(settings.state_db, checked.manifest.home, settings.home)
        if moved:
            notes.append(f"{moved} batch job(s) now point at {settings.home} instead of {checked.manifest.home}")
    if settings.state_db.exists() and (released := _release_leases(settings.state_db)):
        notes.append(
            f"{released} batch chunk(s) the backed-up box's workers held were given back, attempts unspent: "
            "the next `inferbox batch run` takes them"
        )
    if settings.state_db.exists() and settings.audit_db.exists():
        last = caught_up.backup_last_seq if caught_up is not None else _backup_last_seq(checked)
        revoked, key_notes = _key_changes_since_backup(settings, last)
        notes.extend(key_notes)
        lost = _jobs_after_backup(settings, last)
        if lost:
            notes.append(
                f"{len(lost)} batch job(s) submitted after the backup are not on this box (their input was not "
                f"backed up): submit their files again ({', '.join(lost[:10])}{', ...' if len(lost) > 10 else ''})"
            )
        if caught_up is not None:
            caught_up = dataclasses.replace(caught_up, keys_revoked_again=revoked)
    if record is not None:
        record(checked, caught_up, settings)
    audit = None
    if settings.audit_db.exists():
        from appliance.audit.trust import trusted_keys
        from appliance.audit.verify import verify_db

        audit = verify_db(settings.audit_db, trusted_keys(settings.signing_key, settings.keys_dir))
    return RestoreResult(checked, placed, audit, notes, caught_up, settings)


def _backup_last_seq(checked: Checked) -> int:
    audit = checked.manifest.audit
    return audit.last_seq if audit is not None else 0


def _key_changes_since_backup(settings: Settings, backup_last_seq: int) -> tuple[list[str], list[str]]:
    """The key changes the restored log holds, made true of the restored key store: every ``key_revoke``
    (the key store's snapshot is taken before the log's, so a key revoked while the backup ran, or after
    it, is active in it; a revocation is never undone, so applying all of them is safe) is applied again,
    dated when it was made; a key created after the backup's last record (brought forward from the
    off-box copies) is not here (only its hash was kept, in a state database newer than the backup) and
    is named.  (The keys revoked again, notes for the operator.)"""
    from appliance.audit.canonical import parse_time
    from appliance.audit.schema import connect
    from appliance.keys import KeyStore

    conn = connect(settings.audit_db, read_only=True)
    try:
        rows = conn.execute(
            "SELECT seq, event, credential_id, recorded_at FROM records WHERE outcome = 'success' "
            "AND (event = 'key_revoke' OR (event = 'key_create' AND seq > ?)) ORDER BY seq",
            (backup_last_seq,),
        ).fetchall()
    finally:
        conn.close()
    revoked: list[str] = []
    notes: list[str] = []
    created: dict[str, int] = {}
    when = [datetime.now(UTC)]  # a revocation is dated when it was made, not when it is restored
    store = KeyStore(settings.state_db, clock=lambda: when[0])
    try:
        keys = store.list()
        active = {k.id for k in keys if k.revoked_at is None}
        known = {k.id for k in keys}
        for seq, event, key_id, recorded_at in rows:
            if event == "key_create":
                created[str(key_id)] = int(seq)
            elif key_id in active:
                when[0] = parse_time(str(recorded_at))
                store.revoke(str(key_id))
                active.discard(key_id)
                revoked.append(str(key_id))
                notes.append(
                    f"key {key_id} was revoked (audit seq {seq}, {recorded_at}) after the backup's key store was "
                    "taken: revoked here too"
                )
            else:
                created.pop(str(key_id), None)  # created and revoked after the backup: nothing to do
    finally:
        store.close()
    for key_id, seq in created.items():
        if key_id not in known:
            notes.append(
                f"key {key_id} was created after the backup (audit seq {seq}) and is not on this box (the backup "
                "holds the key hashes of its own time): give its user a new key with `inferbox keys create`"
            )
    return revoked, notes


def _mkdirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents (0700); the ones it made."""
    made: list[Path] = []
    p = folder
    while not p.exists():
        made.append(p)
        p = p.parent
    for d in reversed(made):
        d.mkdir(mode=0o700)
    return made
