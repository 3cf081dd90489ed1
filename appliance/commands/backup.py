"""``inferbox backup create | check | restore``: the appliance's state in one archive, and back."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import msgspec

from appliance.commands.options import build_settings, refuse_root_in_foreign_state, state_options
from appliance.settings import Settings
from runtime.errors import BackupError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from appliance.audit.catch_up import CatchUp
    from appliance.backup.manifest import BackupManifest
    from appliance.backup.restore import Checked

F = TypeVar("F", bound=Callable[..., Any])

#: what root must do first for restore to run as the owner of the state folder ({chown}: the owner as chown takes it)
ROOT_RESTORE = (
    "; first put the archive, the off-box copies and the keys where that user can read them (the old box's uid "
    'wrote them): D=$(sudo mktemp -d) && sudo cp -r ARCHIVE COPIES PUBLIC-KEYS IDENTITY "$D" && sudo chown -R '
    '{chown} "$D", then pass their paths in "$D" (--identity "$D/IDENTITY" for an encrypted archive), and '
    'sudo rm -rf "$D" afterwards: it holds the backup key'
)

__all__ = ["backup"]


def _now() -> datetime:
    return datetime.now(UTC)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"


def _describe(m: BackupManifest) -> list[str]:
    from appliance.backup.manifest import DAMAGED_NOTE

    lines = [
        f"  taken {m.created_at} on {m.host} from {m.home} (inferbox {m.inferbox_version}); holds: {', '.join(m.parts)}"
    ]
    if "state" in m.parts:
        lines.append(f"  API keys: {_counts(m.api_keys)}; batch jobs: {_counts(m.batch_jobs)}")
    if m.audit is not None:
        a = m.audit
        state = "verified when taken" if a.verified else f"NOT verified when taken ({a.problem})"
        lines.append(f"  audit log {a.log_id}: records {a.first_seq}..{a.last_seq} ({a.records}), {state}")
    for model in m.models:
        lines.append(f"  model {model.name} version {model.version} (package {model.sha256[:16]}...)")
    lines += [f"  left out: {s}" for s in m.skipped if not s.endswith(DAMAGED_NOTE)]
    lines += [f"  damaged: {s}" for s in m.skipped if s.endswith(DAMAGED_NOTE)]
    return lines


def _trust_options(func: F) -> F:
    func = click.option(
        "--identity",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        default=None,
        help="The private key an encrypted archive (.tar.enc) is encrypted to (`inferbox backup keygen`'s).",
    )(func)
    func = click.option(
        "--public-key",
        "public_keys",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        multiple=True,
        help="This appliance's published public key (`inferbox audit public-key`; repeatable): the backup's "
        "signing key must be one of them, and the audit log must verify with them.",
    )(func)
    func = click.option(
        "--expect-sha256",
        default=None,
        help="The archive's SHA-256 as `backup create` printed it and its backup_create audit record holds.",
    )(func)
    return func


def _load_identity(archive: Path, path: Path | None) -> X25519PrivateKey | None:
    """The private key ``--identity`` names; an encrypted archive without one is a usage error (exit 2)."""
    from appliance.backup.crypt import encrypted_to, load_identity

    if path is None:
        recipient = encrypted_to(archive)
        if recipient is not None:
            raise click.UsageError(
                f"{archive} is encrypted to the backup key {recipient or '(unreadable header)'}: pass --identity "
                "FILE, the private key `inferbox backup keygen` wrote (kept off the box)"
            )
        return None
    return load_identity(path)


def _load_keys(paths: tuple[Path, ...]) -> list[Ed25519PublicKey]:
    from runtime import signing

    return [key for p in paths for key in signing.load_public_keys(p)]  # a file may hold several (--all)


def _integrity(integrity: list[str]) -> None:
    if integrity:
        click.echo(f"  vouched for: {'; '.join(integrity)}")
    else:
        click.echo(
            "WARNING: the archive was checked against its own manifest only, which whoever could change the "
            "archive could rewrite too; pass --expect-sha256 (printed by `backup create`, and in its "
            "backup_create audit record), or restore with --audit-from the off-box copies that hold that "
            "record, to prove it is the archive that was written",
            err=True,
        )


@click.group()
def backup() -> None:
    """One archive of the appliance's state (databases, keys, models, batch jobs), and restoring it."""


@backup.command()
@state_options
@click.option(
    "--to",
    "folder",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder to write inferbox-backup-<host>-<log id>-<UTC time>.tar into (another disk or a mounted share; "
    "never created) [default: the backup_dir setting].",
)
@click.option(
    "--keep",
    type=click.IntRange(min=0),
    default=None,
    help="Then remove the folder's oldest archives so that this many remain; 0 keeps all "
    "[default: the backup_keep setting, 7].",
)
@click.option(
    "--encrypt-to",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Encrypt the archive (.tar.enc) to this public key (`inferbox backup keygen`'s .pub), whose private key "
    "stays off the box [default: the backup_encrypt_to setting; none: a plain tar].",
)
@click.option("--no-models", is_flag=True, help="Leave the model repository out (packages can be exported again).")
@click.option("--no-batch", is_flag=True, help="Leave the batch spool and outbox (inputs and results) out.")
@click.option(
    "--same-disk",
    is_flag=True,
    help="Write to a folder on the state folder's own disk all the same (lost with that disk).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def create(
    home: Path | None,
    repository: Path | None,
    folder: Path | None,
    keep: int | None,
    encrypt_to: Path | None,
    no_models: bool,
    no_batch: bool,
    same_disk: bool,
    as_json: bool,
) -> None:
    """Write a consistent backup while the services run; recorded in the audit log.

    Exit 1 when the backup was written but its audit log did not verify.
    """
    from appliance.audit.trust import trusted_keys
    from appliance.backup.create import BackupResult, create_backup
    from appliance.backup.crypt import load_recipient
    from appliance.commands.audit import record_cli_event

    settings = build_settings(home=home, repository=repository)
    recipient_path = encrypt_to or settings.backup_encrypt_to
    try:
        recipient = load_recipient(recipient_path) if recipient_path is not None else None
    except BackupError as exc:  # say where the path came from: the flag, or the setting and its source
        where = "--encrypt-to" if encrypt_to else f"backup_encrypt_to ({settings.sources.get('backup_encrypt_to')})"
        raise BackupError(f"{where}: {exc}") from None
    target = folder or settings.backup_dir
    if target is None:
        raise click.UsageError(
            "say where to write the backup: --to FOLDER, or set backup_dir in [backup] of inferbox.toml "
            "(INFERBOX_BACKUP_DIR): a folder on another disk or a mounted share"
        )
    refuse_root_in_foreign_state(settings, extra=(target,))  # the archive root writes there
    started = _now()
    trusted = trusted_keys(settings.signing_key, settings.keys_dir) if settings.signing_key.exists() else None

    recorded: list[BackupResult] = []

    def record(result: BackupResult) -> None:
        if not (settings.audit and settings.audit_db.exists()):
            return
        details = {
            "archive": result.path.name,
            "folder": os.path.abspath(result.path.parent),
            "sha256": result.sha256,
            "bytes": str(result.size),
            "parts": ",".join(result.manifest.parts),
        }
        if result.encrypted_to is not None:
            details["encrypted_to"] = result.encrypted_to
        if result.manifest.audit is not None:
            details["audit_last_seq"] = str(result.manifest.audit.last_seq)
        if result.removed:
            details["removed"] = ",".join(p.name for p in result.removed)
        record_cli_event(settings, "backup_create", "inferbox backup create", started, details)
        recorded.append(result)

    def record_failed(result: BackupResult, exc: BaseException) -> None:
        if not recorded:  # nothing was recorded (audit off, no log yet): nothing to take back
            return
        details = {"archive": result.path.name, "folder": os.path.abspath(result.path.parent), "sha256": result.sha256}
        details["error"] = f"the archive did not appear: {exc}"[:500]
        record_cli_event(settings, "backup_create", "inferbox backup create", started, details, ok=False)

    result = create_backup(
        settings,
        target,
        models=not no_models,
        batch=not no_batch,
        trusted_keys=trusted,
        record=record,
        record_failed=record_failed,
        keep=settings.backup_keep if keep is None else keep,
        same_disk=same_disk,
        recipient=recipient,
    )
    audit = result.manifest.audit
    if as_json:
        out = {
            "path": str(result.path),
            "sha256": result.sha256,
            "bytes": result.size,
            "manifest": result.manifest,
            "removed": [str(p) for p in result.removed],
            "problems": list(result.problems),
            "encrypted_to": result.encrypted_to,
        }
        click.echo(msgspec.json.encode(out).decode())
    else:
        click.echo(f"wrote {result.path} ({_mb(result.size)}, sha256 {result.sha256})")
        for line in _describe(result.manifest):
            click.echo(line)
        for old in result.removed:
            click.echo(f"  removed the older {old.name}")
        if result.encrypted_to is not None:
            click.echo(
                f"Encrypted to the backup key {result.encrypted_to}: only its private key opens the archive (keep "
                "it, and a second copy of it, off this box: without it no archive can be restored). `inferbox "
                "backup check FILE --identity KEY` proves a copy whole.",
                err=True,
            )
        else:
            click.echo(
                "The archive holds the signing key, the digest keys and the API keys' hashes in the clear: keep it "
                "as you keep the box's disk, or encrypt it to a key kept off the box (`inferbox backup keygen`, "
                "then --encrypt-to or backup_encrypt_to). `inferbox backup check FILE` proves a copy whole.",
                err=True,
            )
    for problem in result.problems:
        click.echo(f"WARNING: {problem}", err=True)
    alert = False
    if result.manifest.damaged:
        click.echo(
            f"ALERT: {len(result.manifest.damaged)} model package(s) do not verify and were archived as they are "
            f"({', '.join(result.manifest.damaged)}); older archives were kept. `inferbox models list --verify` "
            "names what changed; export or import a good copy, or `inferbox models remove` the version",
            err=True,
        )
        alert = True
    if audit is not None and not audit.verified and trusted is not None:
        click.echo(f"ALERT: the audit log in this backup does not verify: {audit.problem}", err=True)
        alert = True
    if alert:
        sys.exit(1)


@backup.command()
@click.argument("archive", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--scratch",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Folder to unpack into while checking (needs the archive's size free) [default: the system's temp folder].",
)
@_trust_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check(
    archive: Path,
    scratch: Path | None,
    expect_sha256: str | None,
    public_keys: tuple[Path, ...],
    identity: Path | None,
    as_json: bool,
) -> None:
    """Prove an archive whole: every file's hash, its audit log, its state database, its model packages.

    Exit 1 when anything fails; nothing on the box is read or changed.
    """
    from appliance.audit.trust import settings_pace
    from appliance.backup.restore import check_archive
    from appliance.commands.options import foreign_owner, open_folder

    under = scratch or Path(tempfile.gettempdir())
    owner = foreign_owner(under)
    if owner is not None:  # root unpacking secrets where another user can swap the folder for a link
        raise click.UsageError(
            f"--scratch {under} belongs to {owner} (or a folder on the way to it does), and check runs as root: "
            f"{owner} could swap the unpacked folder for a link and have the archive's keys written anywhere; "
            "pass --scratch with a folder root owns"
        )
    found = open_folder(under)
    if found is not None:
        raise click.UsageError(
            f"--scratch {under}: {found[0]}; check runs as root, and whoever can change a folder on the way could "
            "swap the unpacked folder for a link and have the archive's keys written anywhere; pass --scratch with "
            "a folder root owns that only root may change"
        )
    try:
        key = _load_identity(archive, identity)
    except (click.UsageError, BackupError) as exc:
        if not as_json:
            raise
        message = exc.message if isinstance(exc, click.UsageError) else str(exc)
        click.echo(msgspec.json.encode({"ok": False, "problems": [message]}).decode())
        sys.exit(2)
    folder = Path(tempfile.mkdtemp(prefix="inferbox-backup-check-", dir=scratch))
    try:
        try:
            checked = check_archive(
                archive,
                folder,
                expect_sha256=expect_sha256,
                public_keys=_load_keys(public_keys),
                legacy_pace=settings_pace(build_settings(root_ok=True)),  # the archive only
                identity=key,
            )
        except BackupError as exc:
            if as_json:
                click.echo(msgspec.json.encode({"ok": False, "problems": [str(exc)]}).decode())
            else:
                click.echo(f"FAILED: {exc}")
            sys.exit(1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ok = not checked.problems
    if as_json:
        payload = {
            "ok": ok,
            "sha256": checked.sha256,
            "bytes": checked.size,
            "problems": checked.problems,
            "manifest": checked.manifest,
            "audit": checked.audit,
            "integrity": checked.integrity,
        }
        click.echo(msgspec.json.encode(payload).decode())
    else:
        click.echo(f"{'OK' if ok else 'FAILED'}: {archive} ({_mb(checked.size)}, sha256 {checked.sha256})")
        for line in _describe(checked.manifest):
            click.echo(line)
        if checked.audit is not None:
            click.echo(f"  audit log now: {checked.audit.summary()}")
        for p in checked.problems[:20]:
            click.echo(f"  problem: {p}")
        if ok:
            _integrity(checked.integrity)
    if not ok:
        sys.exit(1)


@backup.command()
@state_options
@click.argument("archive", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--audit-from",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder of off-box copies of the audit log (`audit ship`'s) to bring the restored log forward from "
    "[default: the ship_dir setting, when set].",
)
@click.option("--no-catch-up", is_flag=True, help="Restore the audit log as the backup holds it, ignoring ship_dir.")
@_trust_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def restore(
    home: Path | None,
    repository: Path | None,
    archive: Path,
    audit_from: Path | None,
    no_catch_up: bool,
    expect_sha256: str | None,
    public_keys: tuple[Path, ...],
    identity: Path | None,
    as_json: bool,
) -> None:
    """Check ARCHIVE, then put it back on a box without state (stop the services first).

    Writes the state folder, the model repository and the signing key where this box's settings
    put them; refuses a box that already holds state, and never overwrites a file. With off-box
    copies of the audit log (--audit-from, or the ship_dir setting), the records written after
    the backup that they hold are put back too.
    """
    from appliance.audit.trust import settings_pace
    from appliance.backup.restore import restore_backup

    settings = build_settings(home=home, repository=repository, root_ok=True)
    refuse_root_in_foreign_state(settings, also=ROOT_RESTORE)
    if no_catch_up and audit_from is not None:
        raise click.UsageError("give --audit-from or --no-catch-up, not both")
    copies = None if no_catch_up else (audit_from or settings.ship_dir)
    started = _now()

    def record(checked: Checked, caught_up: CatchUp | None, placed_by: Settings) -> None:
        if not (placed_by.audit and placed_by.audit_db.exists()):
            return
        _record_restore(placed_by, archive, checked, started, caught_up)

    def reload(config_file: Path) -> Settings:
        from appliance.settings import load_settings

        restored = load_settings({"home": settings.home, "repository": repository}, config_file=config_file)
        refuse_root_in_foreign_state(restored, also=ROOT_RESTORE)
        return restored

    result = restore_backup(
        settings,
        archive,
        record=record,
        audit_from=copies,
        expect_sha256=expect_sha256,
        public_keys=_load_keys(public_keys),
        legacy_pace=settings_pace(settings),
        reload=reload,
        identity=_load_identity(archive, identity),
    )
    settings = result.settings or settings
    m = result.checked.manifest
    uncaught = (
        _uncaught_keys_warning(settings, m.created_at)
        if copies is None and not no_catch_up and m.audit is not None
        else None
    )
    if as_json:
        payload = {
            "archive": str(archive),
            "sha256": result.checked.sha256,
            "placed": result.placed,
            "manifest": m,
            "audit": result.audit,
            "notes": result.notes,
            **({"warning": uncaught} if uncaught is not None else {}),
            "caught_up": result.caught_up,
            "integrity": result.checked.integrity,
        }
        click.echo(msgspec.json.encode(payload).decode())
    else:
        click.echo(f"restored {archive} into {settings.home} ({result.placed} files)")
        for line in _describe(m):
            click.echo(line)
        if result.audit is not None:
            click.echo(f"  audit log now: {result.audit.summary()}")
        c = result.caught_up
        if c is not None and c.records:
            click.echo(
                f"  audit: seq {c.first_seq}..{c.last_seq} ({c.records} records, {c.checkpoints} checkpoints) "
                f"brought back from {len(c.copies)} off-box copy(ies) in {c.folder}, the newest made {c.exported_at}"
            )
            if c.missing_digest_keys:
                click.echo(
                    f"  note: digest key(s) {', '.join(c.missing_digest_keys)} named by those records are not in "
                    "the backup: their digests cannot be recomputed here"
                )
        for note in result.notes:
            click.echo(f"  note: {note}")
        _integrity(result.checked.integrity)
        if uncaught is not None:
            click.echo(uncaught, err=True)
        for line in _next_steps(settings, m, c):
            click.echo(line, err=True)
    if result.audit is not None and not result.audit.ok:
        sys.exit(1)


def _record_restore(
    settings: Settings, archive: Path, checked: Checked, started: datetime, caught_up: CatchUp | None
) -> None:
    from appliance.commands.audit import record_cli_event

    m = checked.manifest
    details = {
        "archive": archive.name,
        "sha256": checked.sha256,
        "backup_created_at": m.created_at,
        "backup_host": m.host,
        "parts": ",".join(m.parts),
    }
    if m.audit is not None:
        details["backup_last_seq"] = str(m.audit.last_seq)
    if caught_up is not None and caught_up.records:
        details["caught_up_to_seq"] = str(caught_up.last_seq)
        details["caught_up_from"] = caught_up.folder
        if caught_up.keys_revoked_again:
            details["keys_revoked_again"] = ",".join(caught_up.keys_revoked_again)
    record_cli_event(settings, "backup_restore", "inferbox backup restore", started, details)


def _uncaught_keys_warning(settings: Settings, created_at: str) -> str:
    """A restore with no off-box copies to catch up from (none given, no ship_dir here): every key
    revoked since the backup is active again, named by the keys now active.  It passed with a line
    among the next steps, and an installed box sets ship_dir only in the ship unit's environment."""
    from appliance.keys import KeyStore

    active: list[str] = []
    if settings.state_db.exists():
        store = KeyStore(settings.state_db)
        try:
            now = datetime.now(UTC)
            active = [f"{r.id} ({r.name})" if r.name else r.id for r in store.list() if r.state(now) == "active"]
        finally:
            store.close()
    shown = ", ".join(active[:20]) + (", ..." if len(active) > 20 else "") if active else "none"
    return (
        f"WARNING: no off-box copies to catch up from (--audit-from FOLDER; ship_dir is not set here), so the "
        f"log and the API keys are as they were at {created_at}: a key revoked since is ACTIVE again. Active "
        f"now: {shown}. Restore again with --audit-from the ship folder, or revoke those that must not be "
        "(`inferbox keys revoke ID`); --no-catch-up says a restore without the copies is meant"
    )


def _next_steps(settings: Settings, manifest: BackupManifest, caught_up: CatchUp | None) -> list[str]:
    out = ["next:"]
    if caught_up is not None and caught_up.records:
        out.append(
            f"  - the log holds what the newest off-box copy held (seq {caught_up.last_seq}, made "
            f"{caught_up.exported_at}), then this restore: only records written after that copy are lost. "
            "`inferbox audit ship` goes on into the same folder."
        )
    elif caught_up is not None and caught_up.copies:
        out.append(
            f"  - the off-box copies in {caught_up.folder} hold nothing after the backup: `inferbox audit ship` "
            "goes on into the same folder."
        )
    elif manifest.audit is not None:
        out.append(
            f"  - records written after {manifest.created_at} (after seq {manifest.audit.last_seq}) are not in this "
            "backup; the log records this restore. Off-box copies (`audit ship`) made since hold the later records, "
            "and the next `inferbox audit ship` into that folder reports the cut back (ALERT) as it must: keep "
            "those copies, move them to a subfolder, and `inferbox audit ship --new-series` starts a new series from "
            "the restored log."
        )
        out.append(
            f"  - API keys are as they were at {manifest.created_at}: a key revoked since is active again, so "
            "revoke it again (`inferbox keys list`, `inferbox keys revoke ID`); restoring with --audit-from the "
            "off-box copies does that itself"
        )
    if manifest.config_file:
        out.append(
            f"  - the configuration file {manifest.config_file} was backed up, not restored: compare it with this "
            "box's (tar -xOf ARCHIVE inferbox-backup/config/inferbox.toml)"
        )
    if "models" not in manifest.parts:
        out.append("  - the backup holds no model packages: `inferbox init` (the default) or `inferbox export` again")
    unfinished = sum(n for s, n in manifest.batch_jobs.items() if s in ("queued", "running"))
    if unfinished:
        out.append(
            f"  - {unfinished} batch job(s) were not finished when the backup was taken: the worker runs them again"
        )
    out.append(
        "  - keys/first-admin.key is never backed up; the API keys themselves are restored. "
        "Start the services: systemctl start inferbox-api inferbox-batch.path"
    )
    return out


@backup.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Where to write the private key (mode 0600; <out>.pub next to it). Never over an existing file.",
)
def keygen(out: Path) -> None:
    """Make a key pair that backups are encrypted to: the .pub goes to the box, the private key stays off it."""
    from appliance.backup.crypt import generate_identity

    pub, rid = generate_identity(out)
    click.echo(f"private key: {out} (mode 0600): keep it, and a second copy, OFF the box; restore needs it")
    click.echo(f"public key:  {pub}")
    click.echo(f"key id:      {rid}")
    click.echo(
        f"on the box: copy {pub.name} there and set backup_encrypt_to = '<its path>' in [backup] of inferbox.toml "
        "(or pass --encrypt-to to `inferbox backup create`)"
    )
