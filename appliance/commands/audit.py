"""``inferbox audit ...``: verify, export, ship, tail, prune, report, public-key.

Reading, exporting and pruning the log are themselves recorded
(``audit_read`` / ``audit_export`` / ``audit_prune``), never after the fact:
a prune and its record commit in one transaction, and an export file appears
(is renamed into place, or copied to stdout) only once its record is durable.
A refused prune or a failed export is recorded too (outcome ``failure``).
``verify`` only reads (it may run on another machine, on a copy, with the
public key(s) alone).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, TypeVar

import click
import msgspec

from appliance.commands.options import build_settings, existing_home, refuse_root_in_foreign_state, state_options

if TYPE_CHECKING:
    from api.protocols import AuditEvent
    from appliance.audit.checkpoint import Pace
    from appliance.audit.compare import Held, LogView
    from appliance.audit.exporter import ExportSummary
    from appliance.audit.verify import VerifyReport
    from appliance.settings import Settings
    from runtime.signing import Ed25519PublicKey

__all__ = ["audit", "cli_event", "printable", "record_cli_event"]

F = TypeVar("F", bound=Callable[..., Any])


def _existing(settings: Settings) -> Settings:
    """``settings``, refusing a home that does not exist: a mistyped home is not an empty audit log."""
    return existing_home(settings, "audit", "the audit log lives in the state folder the server uses")


def _now() -> datetime:
    return datetime.now(UTC)


def _date(value: str | None) -> datetime | None:
    from appliance.audit.canonical import parse_time

    return None if value is None else parse_time(value)


def cli_event(
    event: str,
    action: str,
    started: datetime,
    details: dict[str, str],
    *,
    ok: bool = True,
    model: tuple[str, int, str] | None = None,
    actor: str | None = None,
) -> AuditEvent:
    """A CLI command's record; ``model`` (name, version, package sha256) names the package it concerns."""
    from api.protocols import AuditEvent
    from appliance.audit.canonical import format_time
    from appliance.commands.keys import cli_user

    name, version, sha256 = model if model is not None else ("", "", "")
    return AuditEvent(
        event=event,
        action=action,
        actor=actor or f"cli:{cli_user()}",
        origin=f"{socket.gethostname()} pid {os.getpid()}",
        outcome="success" if ok else "failure",
        status=0 if ok else 1,
        started_at=format_time(started),
        ended_at=format_time(_now()),
        model_name=name,
        model_version=str(version),
        model_sha256=sha256,
        details=details,
    )


def record_cli_event(
    settings: Any,
    event: str,
    action: str,
    started: datetime,
    details: dict[str, str],
    *,
    ok: bool = True,
    model: tuple[str, int, str] | None = None,
    actor: str | None = None,
) -> int:
    """Append one record durably (the command goes on only once it is committed)."""
    from appliance.audit.log import AuditLog

    with AuditLog.open(settings) as log:
        return log.append(cli_event(event, action, started, details, ok=ok, model=model, actor=actor))


def _error_text(exc: BaseException) -> str:
    return str(exc)[:500]


def _trusted_keys(settings: Settings, paths: Sequence[Path]) -> list[Ed25519PublicKey]:
    """The public keys given (``--public-key``), else the signing key's and those in ``<home>/keys/retired/``."""
    from appliance.audit.trust import trusted_keys

    return trusted_keys(settings.signing_key, settings.keys_dir, paths)


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` safe for one terminal line: control, format and separator characters escaped.

    A stored value (a client's model name, say) can hold a newline or an
    escape sequence; printed raw it would forge lines of ``audit tail`` or
    drive the terminal.  Backslashes are escaped too, so the output is unambiguous.
    """
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def _public_keys_option(help: str) -> Callable[[F], F]:
    """``--public-key PEM`` (repeatable) as ``public_keys``: the trusted keys of verify, ship and prune."""
    return click.option(
        "--public-key",
        "public_keys",
        type=click.Path(path_type=Path, dir_okay=False),
        multiple=True,
        help=help,
    )


@click.group()
def audit() -> None:
    """The tamper-evident audit log: verify it, export it, read it, prune it."""


@audit.command()
@state_options
@click.option("--db", "db_path", type=click.Path(path_type=Path, dir_okay=False), help="Audit database to verify.")
@click.option(
    "--export", "export_path", type=click.Path(path_type=Path, dir_okay=False), help="JSONL export to verify."
)
@_public_keys_option(
    "Ed25519 public key PEM; repeat it for a log signed before and after a key rotation "
    "[default: the signing key's, plus <home>/keys/retired/*.pub]."
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=None,
    help="Pace for checkpoints that do not sign their own (written before format 2) [default: the setting].",
)
@click.option(
    "--checkpoint-minutes",
    type=click.FloatRange(min=0.01),
    default=None,
    help="Interval for checkpoints that do not sign their own pace [default: the setting].",
)
@click.option(
    "--max-age",
    type=click.FloatRange(min=0.01),
    default=None,
    help="Also fail when the newest signed checkpoint is older than this many minutes (for a log whose "
    "service runs: it signs one every checkpoint_minutes).",
)
@click.option(
    "--legacy-start",
    is_flag=True,
    help="The log was started by an inferbox before checkpoint format 2 and its writer stopped before "
    "signing a first checkpoint: hold its records to that writer's rule (a checkpoint every "
    "checkpoint_every records) instead of failing them.",
)
@click.option(
    "--against",
    "against",
    type=click.Path(path_type=Path, dir_okay=False),
    multiple=True,
    help="An earlier export kept off the box (repeatable): also fail unless the log still holds every "
    "record and signed checkpoint of it (catches a cut back to an earlier checkpoint).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(
    home: Path | None,
    repository: Path | None,
    db_path: Path | None,
    export_path: Path | None,
    public_keys: tuple[Path, ...],
    checkpoint_every: int | None,
    checkpoint_minutes: float | None,
    max_age: float | None,
    legacy_start: bool,
    against: tuple[Path, ...],
    as_json: bool,
) -> None:
    """Check the hash chain, every signed checkpoint and the checkpoint pace; exit 1 at the first failure.

    With ``--against``, also hold the log to earlier exports kept off the box.
    """
    from appliance.audit.trust import settings_pace
    from appliance.audit.verify import verify_db, verify_export

    if db_path and export_path:
        raise click.UsageError("give --db or --export, not both")
    if max_age is not None and export_path:
        raise click.UsageError("--max-age checks a live database, not an export")
    if legacy_start and export_path:
        raise click.UsageError(
            "--legacy-start is for a database (--db, or the home's audit.db); an export says itself how its log began"
        )
    settings = build_settings(home=home, repository=repository)
    own_log = db_path is None and export_path is None
    if own_log and not settings.audit and settings.home.is_dir() and not settings.audit_db.exists():
        # a box that keeps no log (audit = false): the daily verify timer has nothing to check, no alert
        click.echo(f"audit is off ({settings.sources.get('audit')}) and there is no log: nothing to verify")
        return
    if own_log:  # the home's own log: a mistyped home is not an empty log
        _existing(settings)
    keys = _trusted_keys(settings, public_keys)
    pace = settings_pace(settings, checkpoint_every, checkpoint_minutes)
    if export_path:
        report = verify_export(export_path, keys, legacy_pace=pace)
    else:
        report = verify_db(
            db_path or settings.audit_db,
            keys,
            legacy_pace=pace,
            legacy_start=legacy_start,
            now=_now(),
            max_age=None if max_age is None else timedelta(minutes=max_age),
        )
    if against:
        report = _hold_to_copies(report, against, keys, pace, export_path, db_path or settings.audit_db)
    if as_json:
        click.echo(msgspec.json.encode(report).decode())
    else:
        click.echo(printable(report.summary()))
        for p in report.problems[:20]:
            click.echo(f"  seq {p.seq if p.seq is not None else '-'}: {printable(p.what)}")
    if not report.ok:
        sys.exit(1)


def _hold_to_copies(
    report: VerifyReport,
    against: Sequence[Path],
    keys: Sequence[Ed25519PublicKey],
    pace: Pace,
    export_path: Path | None,
    db_path: Path,
) -> VerifyReport:
    """``report`` with every way the log disagrees with the earlier exports ``against``.

    Each copy is verified and compared as it is streamed (:func:`appliance.audit.compare.hold_to`):
    memory does not grow with the copies' records."""
    from appliance.audit.compare import db_view, export_file_view

    view = export_file_view(export_path) if export_path else db_view(db_path)
    held: list[str] = []
    unverified: list[tuple[int | None, str]] = []
    problems: list[tuple[int | None, str]] = []
    for path in against:
        check = _hold_to_copy(view, path, keys, pace, what="the off-box copy")
        if not check.report.ok:
            unverified.append((None, f"the off-box copy {path} does not verify on its own: {check.report.summary()}"))
            continue
        held.append(check.name)
        problems.extend(check.problems)
    return report.compared(held, [*unverified, *problems])


def _hold_to_copy(view: LogView, path: Path, keys: Sequence[Ed25519PublicKey], pace: Pace, *, what: str) -> Held:
    """Verify the copy at ``path`` and hold ``view`` to it (streamed); an unreadable copy is a clear error."""
    from appliance.audit.compare import hold_to

    try:
        with path.open("rb") as f:
            return hold_to(view, f, str(path), keys, legacy_pace=pace)
    except OSError as exc:
        raise click.ClickException(f"cannot read {what} {path}: {exc.strerror}") from exc


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished export into place, durably."""
    from runtime.durable import fsync_dir

    os.replace(tmp, out)
    fsync_dir(out.parent)


@audit.command()
@state_options
@click.option("--since", help="ISO 8601 date/time: first record written at or after it [default: the start].")
@click.option("--until", help="ISO 8601 date/time: records written before it [default: the head].")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Output file [default: stdout].")
@click.option("--force", is_flag=True, help="Replace an existing --out file (an earlier export is kept otherwise).")
def export(
    home: Path | None, repository: Path | None, since: str | None, until: str | None, out: Path | None, force: bool
) -> None:
    """Write records and signed checkpoints as JSONL (for an off-box copy); recorded as audit_export.

    The export is written to a temporary file first; it is renamed to --out
    (or copied to stdout) only once its audit_export record is durable.
    An existing --out file is refused unless --force: it may be the copy
    `audit verify --against` holds the log to.
    """
    settings = build_settings(home=home, repository=repository)
    _existing(settings)
    if out is not None and not force and (out.exists() or out.is_symlink()):
        raise click.UsageError(
            f"{out} exists (an earlier export, perhaps the copy `audit verify --against` holds the log to): "
            "give another --out, or --force to replace it"
        )
    started = _now()
    window = {"since": since or "", "until": until or "", "out": str(out) if out else "-"}
    summary = _export_to(settings, "inferbox audit export", started, window, _date(since), _date(until), out)
    if out is not None:
        click.echo(f"exported {summary.records} records (seq {summary.first_seq}..{summary.last_seq}) to {out}")


def _export_to(
    settings: Settings,
    action: str,
    started: datetime,
    window: dict[str, str],
    lo: datetime | None,
    hi: datetime | None,
    out: Path | None,
) -> ExportSummary:
    """Export ``[lo, hi)`` to ``out`` (stdout when None) once its audit_export record is durable."""
    from appliance.audit.exporter import export_jsonl
    from runtime.errors import AuditError, InferboxError
    from runtime.signing import load_private_key

    tmp: Path | None = None
    sink: IO[bytes]
    try:
        load_private_key(settings.signing_key)  # a missing or unreadable key refused before anything is written
        if out is not None:
            tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
            try:
                sink = tmp.open("xb")
            except OSError as exc:
                tmp = None
                raise AuditError(
                    f"cannot write the export next to {out}: {exc.strerror}; pick a writable folder"
                ) from exc
        else:
            sink = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
        with sink:
            # the key file read again once the snapshot is taken (a rotation in between: its new key)
            summary = export_jsonl(
                settings.audit_db,
                sink,
                signing_key=lambda: load_private_key(settings.signing_key),
                since=lo,
                until=hi,
                now=started,
            )
            details = {
                **window,
                "records": str(summary.records),
                "first_seq": str(summary.first_seq),
                "last_seq": str(summary.last_seq),
                "sha256": summary.sha256,
            }
            record_cli_event(settings, "audit_export", action, started, details)  # durable before anything is released
            if out is None:
                sink.seek(0)
                shutil.copyfileobj(sink, sys.stdout.buffer)
                sys.stdout.buffer.flush()
        if tmp is not None and out is not None:
            try:
                _publish(tmp, out)
            except OSError as exc:
                raise AuditError(f"cannot move the export to {out}: {exc.strerror}") from exc
            tmp = None
    except InferboxError as exc:
        with contextlib.suppress(InferboxError):
            record_cli_event(settings, "audit_export", action, started, {**window, "error": _error_text(exc)}, ok=False)
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return summary


def _refuse_lost_copies(settings: Settings, folder: Path, previous: Path | None, new_series: bool) -> None:
    """Exit 1 (an alert) when the newest copy this log recorded shipping to ``folder`` is not there: a
    copy deleted from the share was shipped again from the one before it, silently, and a folder
    emptied of them started again from the first record."""
    from appliance.sqlite import open_read_only

    if new_series:
        return
    conn = open_read_only(settings.audit_db)
    try:
        rows = conn.execute(
            "SELECT seq, recorded_at, details, outcome FROM records WHERE event = 'audit_export' "
            "AND action = 'inferbox audit ship' ORDER BY seq DESC"
        ).fetchall()
    finally:
        conn.close()
    here = os.path.abspath(folder)
    failed: set[str] = set()  # copies whose ship failed after its record (the file never appeared)
    for seq, at, raw, outcome in rows:
        try:
            details = json.loads(raw)
        except ValueError:
            continue
        out = str(details.get("out", ""))
        if outcome != "success":
            failed.add(out)
            continue
        shipped = Path(out)
        if os.path.abspath(shipped.parent) != here or out in failed:
            continue
        if shipped.is_file():
            return  # the newest copy recorded for this folder is there
        held = f"{details.get('first_seq', '?')}..{details.get('last_seq', '?')}"
        click.echo(
            f"ALERT: the off-box copy {shipped.name} (records {held}, shipped at {at}, audit_export seq {seq}) "
            f"is not in {folder}: deleted or moved?"
        )
        left = (
            "no copy of this log is left there" if previous is None else "the copies before it do not hold its records"
        )
        click.echo(
            f"{left}: restore it from the share's own backup; if it was moved aside on purpose, or never arrived "
            "(a ship cut short), ship again with --new-series"
        )
        click.echo("nothing was shipped; see docs/audit.md (On a failed verify)")
        sys.exit(1)


@audit.command()
@state_options
@click.option(
    "--to",
    "to",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder on another machine (a mounted share) [default: the ship_dir setting].",
)
@_public_keys_option("Trusted public key(s) for the copies already there [default: as for verify].")
@click.option(
    "--new-series",
    is_flag=True,
    help="Ship although the newest copy this log recorded shipping to the folder is not there (moved aside on "
    "purpose, say after a restore, or a ship cut short before it arrived): without it that is an alert.",
)
def ship(
    home: Path | None, repository: Path | None, to: Path | None, public_keys: tuple[Path, ...], new_series: bool
) -> None:
    """Copy what the log gained since the last copy to an off-box folder, after checking the log still holds it.

    Each run first verifies the newest copy of this log in the folder and holds
    the log to it (every record and signed checkpoint of it still there,
    unchanged: ``verify --against``); if the log no longer holds it, nothing is
    shipped and the command exits 1 (an alert: a cut back or a rewrite). Then
    it exports the records from the copy's last one to the head, as
    ``audit-<log id>-<UTC time>.jsonl``. Recorded as audit_export. The first
    run (no copy yet) verifies the whole log first, and ships nothing if it
    does not verify (exit 1). The copy is read as a stream: memory does not
    grow with its records.
    """
    from appliance.audit.compare import db_view, newest_copy
    from appliance.audit.trust import settings_pace

    settings = build_settings(home=home, repository=repository)
    _existing(settings)
    folder = to or settings.ship_dir
    if folder is not None:
        refuse_root_in_foreign_state(settings, extra=(folder,))  # the copies root writes there
    if folder is None:
        raise click.UsageError(
            "say where to ship: --to FOLDER, or set ship_dir in [audit] of inferbox.toml (INFERBOX_SHIP_DIR): "
            "a folder on another machine (a mounted share), not on this box's disks"
        )
    if not folder.is_dir():
        raise click.ClickException(
            f"the ship folder {folder} does not exist or is not a folder: is the off-box share mounted? "
            "(ship never creates it, so a missing mount is not mistaken for an empty copy)"
        )
    keys = _trusted_keys(settings, public_keys)
    pace = settings_pace(settings)
    view = db_view(settings.audit_db)
    since: datetime | None = None
    previous = newest_copy(folder, view.log_id)
    _refuse_lost_copies(settings, folder, previous, new_series)
    if previous is None:
        _refuse_a_replaced_log(folder, view.log_id, keys)
        _refuse_a_log_that_does_not_verify(settings, keys, pace)
    if previous is not None:
        check = _hold_to_copy(view, previous, keys, pace, what="the newest off-box copy")
        if not check.report.ok:
            click.echo(
                f"ALERT: the newest off-box copy {previous} does not verify: {printable(check.report.summary())}"
            )
            click.echo("nothing was shipped; see docs/audit.md (On a failed verify)")
            sys.exit(1)
        if check.problems:
            click.echo(f"ALERT: the log no longer holds the off-box copy {previous}:")
            for seq, what in check.problems[:20]:
                click.echo(f"  seq {seq if seq is not None else '-'}: {printable(what)}")
            click.echo("nothing was shipped; see docs/audit.md (On a failed verify)")
            sys.exit(1)
        since = _date(check.last_recorded_at) if check.last_recorded_at else None
    started = _now()
    out = folder / f"audit-{view.log_id}-{started.strftime('%Y%m%dT%H%M%S%fZ')}.jsonl"
    window = {"since": "" if since is None else since.isoformat(), "until": "", "out": str(out)}
    summary = _export_to(settings, "inferbox audit ship", started, window, since, None, out)
    held = f"; the log holds the previous copy {previous.name}" if previous is not None else " (the first copy)"
    click.echo(f"shipped records {summary.first_seq}..{summary.last_seq} ({summary.records}) to {out}{held}")


def _refuse_a_replaced_log(folder: Path, log_id: str, keys: Sequence[Ed25519PublicKey]) -> None:
    """Before a log's first copy: the folder must hold no copy of another log that this box's keys signed.

    Such a copy means this box kept a log before the one it holds now: its database was deleted,
    emptied or swapped, and the box started a new one without a word.  Shipping the new log's first
    copy beside the old ones would hide that; so it is an ALERT (exit 1), as a cut back is.  Copies of
    other boxes' logs (signed by keys this box does not trust) may share the folder."""
    from appliance.audit.compare import other_logs
    from appliance.audit.verify import verify_export
    from runtime.errors import AuditError

    for other, path in other_logs(folder, log_id).items():
        try:
            ours = verify_export(path, keys).ok
        except (OSError, AuditError):
            ours = False
        if ours:
            click.echo(
                f"ALERT: {folder} holds copies of the log {other} (the newest: {path.name}), signed by this box's "
                f"key, but none of the log the box holds now ({log_id}): the box's audit log was deleted, emptied "
                "or replaced, and a new one was started"
            )
            click.echo(
                "nothing was shipped. Restore the old log from a backup (docs/operations.md, 'Backup and restore') "
                "if it was lost; if the box was set up anew on purpose, move the old copies to another folder "
                "(keep them) and run ship again; see docs/audit.md (On a failed verify)"
            )
            sys.exit(1)


def _refuse_a_log_that_does_not_verify(settings: Settings, keys: Sequence[Ed25519PublicKey], pace: Pace) -> None:
    """Before a log's first copy: the log must verify (as ``audit verify`` checks it), or nothing is shipped.

    The first copy is the whole log, and every later run holds the log to it: a log already broken
    would be shipped, and the next run would then raise an ALERT about its own copy."""
    from appliance.audit.verify import verify_db

    report = verify_db(settings.audit_db, keys, legacy_pace=pace)
    if not report.ok:
        click.echo(f"ALERT: the audit log {settings.audit_db} does not verify: {printable(report.summary())}")
        for p in report.problems[:20]:
            click.echo(f"  seq {p.seq if p.seq is not None else '-'}: {printable(p.what)}")
        click.echo(
            "nothing was shipped (a first copy of a broken log would only move the alarm to the next run); "
            "see docs/audit.md (On a failed verify)"
        )
        sys.exit(1)


@audit.command()
@state_options
@click.argument("candidate", type=click.File("rb"))
@click.option("--seq", type=click.IntRange(min=1), default=None, help="Check CANDIDATE against this record's input.")
@click.option("--key-id", default=None, help="Print CANDIDATE's digest under this digest key (e.g. 20261128T141000Z).")
def digest(
    home: Path | None, repository: Path | None, candidate: BinaryIO, seq: int | None, key_id: str | None
) -> None:
    """Whether CANDIDATE (a request body, byte for byte; - for stdin) is a record's input.

    With --seq N: exit 0 when its digest under record N's digest key is the
    record's input digest, 1 when not. With --key-id: print its digest under
    that key. The digest keys stay on the box: an auditor brings the
    candidate, the operator runs this. Recorded as audit_read.
    """
    from appliance.audit.log import AuditLog

    if (seq is None) == (key_id is None):
        raise click.UsageError("give --seq N (check against record N) or --key-id ID (print the digest), one of them")
    settings = build_settings(home=home, repository=repository)
    _existing(settings)
    started = _now()
    data = candidate.read()
    with AuditLog.open(settings) as log:  # one log: read, digested with its keyring, the read recorded

        def recorded(facts: dict[str, str]) -> None:
            log.append(cli_event("audit_read", "inferbox audit digest", started, facts))

        if key_id is not None:
            try:
                shown = log.keyring.digest_with(key_id, data).hexdigest
            finally:  # recorded, also when the key is not there
                recorded({"key_id": key_id[:64]})
            click.echo(shown)
            return
        assert seq is not None
        found = log.query(after_seq=seq - 1, limit=1)
        record = found[0] if found and found[0].seq == seq else None
        facts = {"seq": str(seq), "records": "1" if record is not None else "0"}
        if record is None or not record.input_digest:
            recorded(facts)
            what = "is not in the log (pruned, or not written yet)" if record is None else "has no input digest"
            raise click.ClickException(f"record {seq} {what}")
        try:
            same = log.keyring.digest_with(record.digest_key_id, data).hexdigest == record.input_digest
            facts["matches"] = str(same).lower()
        finally:  # record N was read: recorded, also when its digest key is not on the box
            recorded(facts)
    if same:
        click.echo(
            f"match: {candidate.name} is the input of record {seq} ({printable(record.action)}, {record.recorded_at})"
        )
        return
    click.echo(
        f"no match: {candidate.name} is not the input of record {seq} (the body byte for byte, as the application "
        "sent it before any gzip, is what was digested)"
    )
    sys.exit(1)


@audit.command()
@state_options
@click.option("-n", "count", type=click.IntRange(min=1), default=20, show_default=True, help="How many records.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def tail(home: Path | None, repository: Path | None, count: int, as_json: bool) -> None:
    """Print the newest records; recorded as audit_read (control characters in values are escaped)."""
    from appliance.audit.log import AuditLog

    settings = build_settings(home=home, repository=repository)
    _existing(settings)
    started = _now()
    with AuditLog.open(settings) as log:
        records = log.tail(count)
    record_cli_event(settings, "audit_read", "inferbox audit tail", started, {"records": str(len(records))})
    for r in records:
        if as_json:
            click.echo(msgspec.json.encode(r).decode())
        else:
            model = f" {printable(r.model_name)}/{printable(r.model_version)}" if r.model_name else ""
            click.echo(
                f"{r.seq:>8} {printable(r.recorded_at)} {printable(r.event):<13} {printable(r.outcome):<7} "
                f"{r.status:>3} {printable(r.actor)} {printable(r.origin)} {printable(r.action)}{model}"
            )


@audit.command()
@state_options
@click.option("--before", required=True, help="ISO 8601 date/time: remove records written before it.")
@click.option("--force", is_flag=True, help="Allow cutting inside the minimum retention (min_retention_days).")
@_public_keys_option(
    "Public key of an earlier signing key that signed checkpoints (after a rotation); repeatable "
    "[default: those in <home>/keys/retired/]."
)
def prune(home: Path | None, repository: Path | None, before: str, force: bool, public_keys: tuple[Path, ...]) -> None:
    """Remove the oldest records (a prefix only) and sign a prune checkpoint; recorded as audit_prune.

    The prefix must verify first; the prune and its audit_prune record commit together.
    """
    from appliance.audit.log import AuditLog
    from appliance.audit.prune import PruneResult
    from runtime.errors import InferboxError

    settings = build_settings(home=home, repository=repository)
    _existing(settings)
    started = _now()
    action = "inferbox audit prune"
    asked = {"before": before, "force": str(force).lower()}

    def recorded(result: PruneResult) -> AuditEvent:
        details = {
            **asked,
            "pruned": str(result.pruned),
            "last_pruned_seq": str(result.last_pruned_seq),
            "anchor": result.checkpoint.head_hash if result.checkpoint else "",
        }
        return cli_event("audit_prune", action, started, details)

    with AuditLog.open(settings) as log:
        try:
            cutoff = _date(before)
            assert cutoff is not None
            trusted = _trusted_keys(settings, public_keys)
            result = log.prune(
                cutoff,
                min_retention_days=settings.min_retention_days,
                force=force,
                trusted_keys=trusted,
                record=recorded,
            )
        except InferboxError as exc:
            with contextlib.suppress(InferboxError):
                log.append(cli_event("audit_prune", action, started, {**asked, "error": _error_text(exc)}, ok=False))
            raise
    click.echo(f"pruned {result.pruned} records (through seq {result.last_pruned_seq})")


@audit.command()
@state_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def report(home: Path | None, repository: Path | None, as_json: bool) -> None:
    """Print the GDPR Art. 30 facts the appliance knows (processing, retention, measures)."""
    from appliance.audit.report import art30_facts, format_facts

    # a mistyped home (or root's ~/.inferbox on an installed box) reported an empty box, exit 0
    facts = art30_facts(_existing(build_settings(home=home, repository=repository)))
    click.echo(json.dumps(facts, indent=2) if as_json else format_facts(facts))


@audit.command("public-key")
@state_options
@click.option(
    "--all",
    "every",
    is_flag=True,
    help="Also the retired keys (<home>/keys/retired/): one file that verifies a log signed before and after "
    "a rotation (--public-key takes it whole).",
)
def public_key(home: Path | None, repository: Path | None, every: bool) -> None:
    """Print the public key (PEM) that verifies checkpoints: give it to auditors."""
    from runtime.signing import key_id, load_private_key, load_public_key, public_key_pem

    settings = build_settings(home=home, repository=repository, root_ok=True)  # only reads the key
    current = load_private_key(settings.signing_key).public_key()
    if not every:
        click.echo(public_key_pem(current), nl=False)
        return
    click.echo(f"# key id {key_id(current)}: the signing key ({settings.signing_key})")
    click.echo(public_key_pem(current), nl=False)
    for path in sorted((settings.keys_dir / "retired").glob("*.pub")):
        retired = load_public_key(path)
        click.echo(f"# key id {key_id(retired)}: retired ({path.name})")
        click.echo(public_key_pem(retired), nl=False)
