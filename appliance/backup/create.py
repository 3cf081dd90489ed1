"""``inferbox backup create``: one archive of everything the appliance would lose with its disk.

The databases are copied with SQLite's online backup (one read transaction each:
a consistent snapshot while the server and the batch worker keep writing), the
state database first and the files after it, so a batch job that moves on meanwhile
is restored a step behind, never ahead, and the worker redoes that step.  The archive
is written under a hidden name, fsynced, and renamed into place only once the
``backup_create`` audit record that names it is durable (when the caller records one).
"""

from __future__ import annotations

import dataclasses
import fcntl
import io
import os
import re
import shutil
import socket
import sqlite3
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from appliance.audit.checkpoint import Pace
from appliance.audit.trust import settings_pace
from appliance.backup.crypt import EncryptingWriter, recipient_id
from appliance.backup.manifest import (
    DAMAGED_NOTE,
    FORMAT,
    MANIFEST,
    ROOT,
    SIGNING_KEY,
    SIGNING_PUB,
    AuditFacts,
    BackupManifest,
    FileEntry,
    ModelEntry,
)
from appliance.hashio import HashingReader, HashingWriter
from appliance.settings import Settings
from appliance.sqlite import open_read_only
from runtime.durable import fsync_dir, publish_new
from runtime.errors import BackupError, InferboxError
from runtime.times import utc_iso

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

__all__ = ["BackupResult", "archive_name", "create_backup"]

CHUNK = 1 << 20
#: never copied: a plaintext API key meant to be read once and deleted
SECRET_NAMES = frozenset({"first-admin.key"})


@dataclass(frozen=True)
class BackupResult:
    path: Path
    sha256: str
    size: int
    manifest: BackupManifest
    #: older archives of the folder past ``keep``, removed once this one is in place
    removed: tuple[Path, ...] = ()
    #: removals that failed, each with its reason (the archive itself is in place)
    problems: tuple[str, ...] = ()
    #: the key id of the recipient the archive is encrypted to (:mod:`appliance.backup.crypt`); None: plain
    encrypted_to: str | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def box_name(settings: Settings | None = None) -> str:
    """This box in archive names: its host name, cut to letters, digits, ``.`` and ``-``, then the first 8
    hex digits of its audit log's id when it has one (clones of one image share a host name, never a log)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:63] or "box"
    if settings is None or not settings.audit_db.is_file():
        return host
    from appliance.audit.schema import read_log_id

    try:
        conn = open_read_only(settings.audit_db, timeout_s=30.0)
        try:
            log_id = read_log_id(conn)
        finally:
            conn.close()
    except (sqlite3.Error, InferboxError):
        return host
    return f"{host}-{log_id.replace('-', '')[:8]}"


def archive_name(moment: datetime, box: str | None = None, *, encrypted: bool = False) -> str:
    """``inferbox-backup-<box>-<UTC time>.tar`` (``.tar.enc`` encrypted): boxes that share a backup folder
    never touch each other's."""
    suffix = ".tar.enc" if encrypted else ".tar"
    return f"inferbox-backup-{box or box_name()}-{moment.astimezone(UTC):%Y%m%dT%H%M%SZ}{suffix}"


def _older(folder: Path, keep: int, box: str | None = None) -> list[Path]:
    """This box's archives in ``folder`` to remove so that ``keep`` remain with the new one (0: none removed)."""
    if keep <= 0:
        return []
    pattern = re.compile(rf"inferbox-backup-{re.escape(box or box_name())}-\d{{8}}T\d{{6}}Z\.tar(\.enc)?")
    found = sorted(
        p for p in folder.iterdir() if pattern.fullmatch(p.name) and stat.S_ISREG(p.lstat().st_mode)
    )  # the UTC time in the name sorts them oldest first
    return found[: max(0, len(found) - (keep - 1))]


def _claim(parent: Path, prefix: str) -> tuple[Path, int]:
    """A new private folder ``<parent>/<prefix>XXXX`` and the held lock that says its owner lives.

    The lock file (``<folder>.lock``) is made and locked before the folder exists; folders of
    earlier runs whose lock anyone can take (killed, power lost) are removed first, so a backup
    that died leaves neither a copy of the secrets nor a full disk behind for long.
    """
    for lock in parent.glob(f"{prefix}*.lock"):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live run's
        try:
            stale = lock.with_suffix("")
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    for _ in range(10):
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".lock", dir=parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(name).st_ino
        except FileNotFoundError:  # another run's cleanup took it between mkstemp and flock
            same = False
        if same:
            folder = Path(name).with_suffix("")
            folder.mkdir(mode=0o700)
            return folder, fd
        os.close(fd)
    raise BackupError(f"could not make a private folder in {parent}: another run keeps removing it")


def _release(folder: Path, fd: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.with_suffix(".lock").unlink(missing_ok=True)
    os.close(fd)


#: room left on the state disk after the snapshots (the service keeps writing meanwhile)
SNAPSHOT_MARGIN = 64 << 20


def _check_snapshot_space(settings: Settings) -> None:
    """The databases are copied into the state folder first (SQLite on a share is not reliable): its
    disk needs room for them, whatever room the backup folder has.  Said before anything is written
    (it read "a database could not be copied (database or disk is full)" once the log outgrew the
    free space, and every nightly backup failed without naming the disk)."""
    databases = [settings.state_db, settings.audit_db]
    need = sum(p.stat().st_size for db in databases for p in (db, db.with_name(db.name + "-wal")) if p.is_file())
    need += SNAPSHOT_MARGIN
    free = shutil.disk_usage(settings.home).free
    if free < need:
        raise BackupError(
            f"the backup first copies the databases into the state folder {settings.home}: that needs "
            f"{need / 1e6:.0f} MB free on its disk and it has {free / 1e6:.0f} MB; free space there "
            "(a prune does not shrink the audit database: the space must come from elsewhere on that disk) "
            "and run the backup again"
        )


def _snapshot(source: Path, target: Path) -> None:
    """A consistent copy of the SQLite database ``source`` (the live one keeps being written)."""
    src = open_read_only(source, timeout_s=30.0)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file (the appliance turns WAL back on)
            problem = dst.execute("PRAGMA integrity_check").fetchone()
            if problem is None or problem[0] != "ok":
                raise BackupError(
                    f"{source} does not pass SQLite's integrity check ({problem[0] if problem else 'no answer'}); "
                    "nothing was written: copy the file aside and investigate before backing it up"
                )
        finally:
            dst.close()
    finally:
        src.close()


def _table_counts(db: Path, sql: str, params: tuple[str, ...] = ()) -> dict[str, int]:
    conn = open_read_only(db)
    try:
        return {str(state): int(n) for state, n in conn.execute(sql, params).fetchall()}
    except sqlite3.OperationalError:  # the table was never created (no key made, no job submitted)
        return {}
    finally:
        conn.close()


def _api_key_states(db: Path, now: str) -> dict[str, int]:
    return _table_counts(
        db,
        "SELECT CASE WHEN revoked_at IS NOT NULL THEN 'revoked' "
        "WHEN expires_at IS NOT NULL AND expires_at <= ? THEN 'expired' ELSE 'active' END AS s, "
        "count(*) FROM api_keys GROUP BY s",
        (now,),
    )


def _audit_facts(db: Path, keys: Sequence[Ed25519PublicKey] | None, pace: Pace) -> AuditFacts:
    from appliance.audit.schema import connect, read_log_id
    from appliance.audit.store import head, table_stats
    from appliance.audit.verify import verify_db

    conn = connect(db, read_only=True)
    try:
        log_id = read_log_id(conn)
        rows, lo, hi = table_stats(conn)
        size, head_hash = head(conn, log_id)
    finally:
        conn.close()
    if keys is None:
        verified, problem = False, "not verified: no signing key on this box to take the public key from"
    else:
        report = verify_db(db, keys, legacy_pace=pace)
        verified, problem = report.ok, "" if report.ok else report.summary()
    return AuditFacts(
        log_id=log_id,
        records=rows,
        first_seq=lo or 0,
        last_seq=hi or size,
        head_hash=head_hash,
        verified=verified,
        problem=problem,
    )


def _utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(path: Path) -> str:
    """``path`` as text any JSON writer takes (bytes that are not UTF-8 as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _walk(
    root: Path, prefix: str, skipped: list[str], *, skip_top: frozenset[str] = frozenset()
) -> Iterator[tuple[str, Path]]:
    """(archive path, file) for every regular file under ``root``; links and the like are skipped and listed."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        rel_folder = here.relative_to(root)
        if rel_folder == Path("."):
            dirs[:] = [d for d in dirs if d not in skip_top and not d.startswith(".")]
        for d in list(dirs):
            if (here / d).is_symlink():
                dirs.remove(d)
                skipped.append(f"{_shown(here / d)}: a link to a folder (not followed)")
            elif not _utf8(d):
                dirs.remove(d)
                skipped.append(f"{_shown(here / d)}: a folder name that is not UTF-8 (rename it to back it up)")
        dirs.sort()
        for name in sorted(files):
            path = here / name
            if rel_folder == Path(".") and name in skip_top:
                continue
            if not _utf8(name) or not _utf8(str(here)):
                skipped.append(f"{_shown(path)}: a file name that is not UTF-8 (rename it to back it up)")
                continue
            if name in SECRET_NAMES:
                skipped.append(f"{path}: a plaintext API key (never backed up; the key itself is in state.db)")
                continue
            mode = path.lstat().st_mode
            if not stat.S_ISREG(mode):
                skipped.append(f"{path}: not a plain file ({'a link' if stat.S_ISLNK(mode) else 'special'})")
                continue
            yield (f"{prefix}/{(rel_folder / name).as_posix()}".replace("/./", "/"), path)


def _files(settings: Settings, *, models: bool, skipped: list[str]) -> list[tuple[str, Path]]:
    """Every file the archive copies as it is, batch files aside (the databases are snapshots, added apart)."""
    out: list[tuple[str, Path]] = []
    home_config = settings.home / "inferbox.toml"
    if home_config.is_file():
        out.append(("inferbox.toml", home_config))
    config = settings.config_file
    if config is not None and config.is_file() and config.resolve() != home_config.resolve():
        out.append(("config/inferbox.toml", config))
    if settings.signing_key.exists():
        out.append((SIGNING_KEY, settings.signing_key))
        pub = settings.signing_key.with_name(settings.signing_key.name + ".pub")
        if pub.exists():
            out.append((SIGNING_PUB, pub))
    if settings.keys_dir.is_dir():
        own = {settings.signing_key.name, settings.signing_key.name + ".pub"}
        in_keys = settings.signing_key.parent.resolve() == settings.keys_dir.resolve()
        out.extend(_walk(settings.keys_dir, "keys", skipped, skip_top=frozenset(own) if in_keys else frozenset()))
    if models and settings.repository.is_dir():
        out.extend(_walk(settings.repository, "models", skipped))
    elif not models:
        skipped.append(f"{settings.repository}: the model repository (--no-models)")
    return out


def _batch_files(settings: Settings, known_jobs: set[str], skipped: list[str]) -> Iterator[tuple[str, Path]]:
    """The spool and outbox as the state snapshot knows them, listed lazily while the worker runs.

    ``new`` is walked before ``cur``: a job the worker accepts meanwhile is found in one of them.
    A job in ``cur`` that the snapshot does not know (accepted after it) is archived as waiting in
    ``new``, so the restored worker accepts it again; the outbox of such a job is left out (it is
    written again).  ``tmp`` (submissions still being written) never is.
    """
    for sub in ("new", "cur", "bad"):
        folder = settings.spool / sub
        if not folder.is_dir() or folder.is_symlink():
            continue
        for found, path in _walk(folder, f"spool/{sub}", skipped):
            job = found.split("/")[2]
            accepted_later = sub == "cur" and job not in known_jobs
            yield ("spool/new/" + found.split("/", 2)[2] if accepted_later else found), path
    if settings.outbox.is_dir() and not settings.outbox.is_symlink():
        for arcname, path in _walk(settings.outbox, "outbox", skipped):
            if arcname.split("/")[1] in known_jobs:
                yield arcname, path


def _known_jobs(state_db: Path | None) -> set[str]:
    if state_db is None:
        return set()
    conn = open_read_only(state_db)
    try:
        return {str(r[0]) for r in conn.execute("SELECT job_id FROM batch_jobs")}
    except sqlite3.OperationalError:  # no job was ever submitted
        return set()
    finally:
        conn.close()


def _add(tar: tarfile.TarFile, arcname: str, path: Path, mtime: float | None = None) -> FileEntry | None:
    """Add the file at ``path`` (a link is followed only for the signing key, the caller's choice).

    None: a batch file the worker moved or removed since it was listed (the job moved on).
    """
    flags = os.O_RDONLY | (0 if arcname.startswith("signing/") else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if arcname.startswith(("spool/", "outbox/")):
            return None
        raise BackupError(f"{path} disappeared while the backup ran; nothing was written: run it again") from None
    except OSError as exc:
        raise BackupError(f"cannot read {path} ({exc.strerror}); nothing was written") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BackupError(f"{path} is not a plain file; nothing was written")
        info = tarfile.TarInfo(f"{ROOT}/{arcname}")
        info.size = st.st_size
        info.mode = 0o600
        info.mtime = int(st.st_mtime if mtime is None else mtime)
        reader = HashingReader(f, st.st_size)
        try:
            tar.addfile(info, reader)
        except OSError as exc:
            raise BackupError(
                f"{path} changed size while it was copied ({exc}); nothing was written: run the backup again"
            ) from exc
        return FileEntry(arcname, st.st_size, reader.hash.hexdigest())


def _models(settings: Settings) -> tuple[list[ModelEntry], list[str], list[str]]:
    """(packages that verify, problems, ``name/version`` of those that do not: archived as they are)."""
    from runtime.repository import Repository

    entries, problems, damaged = [], [], []
    for e in Repository(settings.repository).entries(verify_hashes=True):
        if e.ok and e.sha256 is not None:
            entries.append(ModelEntry(e.name, e.version, e.sha256))
        else:
            problems.append(f"{_shown(e.path)}: the package does not verify ({e.error}){DAMAGED_NOTE}")
            damaged.append(f"{e.name}/{e.version}")
    return entries, problems, damaged


def _one_at_a_time(home: Path) -> int:
    """The held lock (``<home>/.backup.lock``, a file descriptor) that makes this the box's one backup
    in progress: two started together (the timer and an operator) wrote two archives of one name, each
    recorded as made, the second then refused."""
    fd = os.open(home / ".backup.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BackupError(
            "another `inferbox backup create` of this box is running (the backup timer?); run this one again "
            "when it has ended"
        ) from None
    return fd


def create_backup(
    settings: Settings,
    folder: Path,
    *,
    models: bool = True,
    batch: bool = True,
    trusted_keys: Sequence[Ed25519PublicKey] | None = None,
    record: Callable[[BackupResult], None] | None = None,
    record_failed: Callable[[BackupResult, BaseException], None] | None = None,
    keep: int = 0,
    same_disk: bool = False,
    recipient: X25519PublicKey | None = None,
    clock: Callable[[], datetime] = _now,
) -> BackupResult:
    """Write ``<folder>/inferbox-backup-<box>-<UTC time>.tar``; ``record`` is called before it appears,
    ``record_failed`` when it then could not appear.  With ``recipient``, the archive is encrypted to
    that key (``.tar.enc``, :mod:`appliance.backup.crypt`): only its private key opens it.

    ``keep`` > 0: once it is in place, remove the oldest archives of the folder so that ``keep`` remain
    (the result and the record name them; only files named as this function names archives).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BackupError(
            f"there is no folder {folder} to write the backup to; mount the backup disk or share, or create "
            "the folder (backup never creates it: a share that is not mounted must not fill the box's own disk)"
        )
    real = folder.resolve()
    for inside in (settings.home, settings.repository):
        if real == inside.resolve() or inside.resolve() in real.parents:
            raise BackupError(
                f"{folder} is inside {inside}: a backup must go where the box's disk is not "
                "(another disk, a mounted share), and would copy itself; pick another folder"
            )
    if not settings.home.is_dir():
        raise BackupError(
            f"there is no state folder at {settings.home} to back up; pass --home or set INFERBOX_HOME "
            "(on an installed box: /var/lib/inferbox)"
        )
    device = os.stat(folder).st_dev
    if not same_disk and device in (os.stat(settings.home).st_dev, os.stat("/").st_dev):
        where = "the state folder " + str(settings.home) if device == os.stat(settings.home).st_dev else "/"
        raise BackupError(
            f"{folder} is on the same filesystem as {where}: a backup there is lost with the disk it should "
            "outlive, and the mount point of a share that is not mounted looks just like it; mount the backup "
            "disk or share there, or pass --same-disk to write there all the same"
        )
    held = _one_at_a_time(settings.home)
    try:
        return _create(settings, folder, models, batch, trusted_keys, record, record_failed, keep, recipient, clock)
    finally:
        os.close(held)


def _create(
    settings: Settings,
    folder: Path,
    models: bool,
    batch: bool,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    record: Callable[[BackupResult], None] | None,
    record_failed: Callable[[BackupResult, BaseException], None] | None,
    keep: int,
    recipient: X25519PublicKey | None,
    clock: Callable[[], datetime],
) -> BackupResult:
    """:func:`create_backup` once its checks passed, as the box's one backup in progress."""
    moment = clock()
    created_at = utc_iso(moment)
    box = box_name(settings)
    final = folder / archive_name(moment, box, encrypted=recipient is not None)
    if final.exists():
        raise BackupError(f"{final} already exists; wait a second and run the backup again")
    skipped: list[str] = []
    _check_snapshot_space(settings)
    # the snapshots on the box's own disk (SQLite on a network share is not reliable), the archive
    # on the target folder (renamed into place there)
    local, local_lock = _claim(settings.home, ".backup-")
    try:
        remote, remote_lock = _claim(folder, ".inferbox-backup-")
    except BaseException:
        _release(local, local_lock)
        raise
    partial = remote / final.name
    try:
        snapshots: list[tuple[str, Path]] = []
        api_keys: dict[str, int] = {}
        jobs: dict[str, int] = {}
        audit: AuditFacts | None = None
        state: Path | None = None
        if settings.state_db.is_file():
            state = local / "state.db"
            _snapshot(settings.state_db, state)
            snapshots.append(("state.db", state))
            api_keys = _api_key_states(state, created_at)
            jobs = _table_counts(state, "SELECT state, count(*) FROM batch_jobs GROUP BY state")
        if settings.audit_db.is_file():
            _snapshot(settings.audit_db, local / "audit.db")
            snapshots.append(("audit.db", local / "audit.db"))
            audit = _audit_facts(local / "audit.db", trusted_keys, settings_pace(settings))
        files = _files(settings, models=models, skipped=skipped)
        packages: list[ModelEntry] = []
        damaged: list[str] = []
        if models:
            packages, problems, damaged = _models(settings)
            skipped.extend(problems)
        batch_files = _batch_files(settings, _known_jobs(state), skipped) if batch else iter(())
        if not batch:
            skipped.append(f"{settings.spool}, {settings.outbox}: batch inputs and results (--no-batch)")
        entries: list[FileEntry] = []
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as raw:
            out = HashingWriter(raw)  # the stored bytes: encrypted ones, when encrypted
            sealed = EncryptingWriter(out, recipient) if recipient is not None else None
            with tarfile.open(fileobj=sealed or out, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                added: set[str] = set()
                for arcname, path in [(a, p) for a, p in snapshots] + files:
                    entry = _add(tar, arcname, path, mtime=moment.timestamp() if path.parent == local else None)
                    assert entry is not None  # only batch files may vanish
                    entries.append(entry)
                for arcname, path in batch_files:
                    if arcname in added:  # a job moved from new to cur while it was copied: once is enough
                        continue
                    entry = _add(tar, arcname, path)
                    if entry is None:
                        continue
                    added.add(arcname)
                    entries.append(entry)
                manifest = BackupManifest(
                    format=FORMAT,
                    created_at=created_at,
                    inferbox_version=_version(),
                    host=socket.gethostname(),
                    home=str(settings.home),
                    parts=_parts(entries),
                    files=entries,
                    audit=audit,
                    models=packages,
                    api_keys=api_keys,
                    batch_jobs=jobs,
                    config_file=str(settings.config_file) if any(e.path.startswith("config/") for e in entries) else "",
                    skipped=skipped,
                    damaged=damaged,
                )
                data = msgspec.json.format(msgspec.json.encode(manifest), indent=2)
                info = tarfile.TarInfo(f"{ROOT}/{MANIFEST}")
                info.size, info.mode, info.mtime = len(data), 0o600, int(moment.timestamp())
                tar.addfile(info, io.BytesIO(data))
            if sealed is not None:
                sealed.finish()
            raw.flush()
            os.fsync(raw.fileno())
        # never remove older archives next to one whose audit log did not verify: they may be the last good ones
        alert = audit is not None and not audit.verified and trusted_keys is not None
        anonymous = keep > 0 and box == box_name()  # no audit log id: a clone's archives carry the same name
        older = () if alert or damaged or anonymous else tuple(_older(folder, keep, box))
        result = BackupResult(
            final,
            out.hash.hexdigest(),
            out.size,
            manifest,
            older,
            encrypted_to=recipient_id(recipient) if recipient is not None else None,
        )
        if record is not None:
            record(result)
        try:
            publish_new(partial, final)  # never over an archive another run of the same second recorded
            fsync_dir(folder)
        except BaseException as exc:
            if record_failed is not None and record is not None:
                record_failed(result, exc)  # the record above named an archive that did not appear
            if isinstance(exc, FileExistsError):
                raise BackupError(f"{final} appeared while this backup was written; run it again") from None
            raise
    except sqlite3.Error as exc:
        raise BackupError(f"a database could not be copied ({exc}); nothing was written") from exc
    except OSError as exc:
        raise BackupError(f"the backup could not be written to {folder} ({exc}); nothing was kept") from exc
    finally:
        _release(remote, remote_lock)
        _release(local, local_lock)
    problems = []
    if anonymous:
        problems.append(
            f"older archives were not removed: without an audit log this box's archives are named by its host "
            f"alone ({box}), as a clone's would be; remove old ones by hand"
        )
    for old in result.removed:
        try:
            old.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"{old}: not removed ({exc.strerror})")
    if result.removed:
        fsync_dir(folder)
    return dataclasses.replace(result, problems=tuple(problems))


def _parts(entries: list[FileEntry]) -> list[str]:
    tops = {e.path.split("/")[0] for e in entries}
    named = (
        ("state", "state.db"),
        ("audit", "audit.db"),
        ("keys", "keys"),
        ("signing_key", "signing"),
        ("config", "inferbox.toml"),
        ("models", "models"),
    )
    parts = [part for part, top in named if top in tops]
    return parts + (["batch"] if tops & {"spool", "outbox"} else [])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("inferbox")
    except PackageNotFoundError:
        return "unknown"
