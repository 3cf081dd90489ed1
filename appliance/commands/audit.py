"""``inferbox audit ...``: verify, export, tail, prune, report, public-key.

Reading, exporting and pruning the log are themselves recorded
(``audit_read`` / ``audit_export`` / ``audit_prune``).  ``verify`` only reads
(it may run on another machine, on a copy, with the public key alone).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import msgspec

from appliance.commands.options import build_settings, state_options

__all__ = ["audit"]


def _now() -> datetime:
    return datetime.now(UTC)


def _date(value: str | None) -> datetime | None:
    from appliance.audit.canonical import parse_time

    return None if value is None else parse_time(value)


def _record(settings: Any, event: str, action: str, started: datetime, details: dict[str, str]) -> int:
    from api.protocols import AuditEvent
    from appliance.audit.canonical import format_time
    from appliance.audit.log import AuditLog

    with AuditLog.open(settings) as log:
        return log.append(
            AuditEvent(
                event=event,
                action=action,
                actor=f"cli:{getpass.getuser()}",
                origin=f"{socket.gethostname()} pid {os.getpid()}",
                outcome="success",
                status=0,
                started_at=format_time(started),
                ended_at=format_time(_now()),
                details=details,
            )
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
@click.option(
    "--public-key",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Ed25519 public key PEM [default: derived from the signing key].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(
    home: Path | None,
    repository: Path | None,
    db_path: Path | None,
    export_path: Path | None,
    public_key: Path | None,
    as_json: bool,
) -> None:
    """Check the hash chain and every signed checkpoint; exit 1 at the first failure."""
    from appliance.audit.verify import verify_db, verify_export
    from runtime import signing

    if db_path and export_path:
        raise click.UsageError("give --db or --export, not both")
    settings = build_settings(home=home, repository=repository)
    if public_key is not None:
        pub = signing.load_public_key(public_key)
    else:
        pub = signing.load_private_key(settings.signing_key).public_key()
    report = verify_export(export_path, pub) if export_path else verify_db(db_path or settings.audit_db, pub)
    if as_json:
        click.echo(msgspec.json.encode(report).decode())
    else:
        click.echo(report.summary())
        for p in report.problems[:20]:
            click.echo(f"  seq {p.seq if p.seq is not None else '-'}: {p.what}")
    if not report.ok:
        sys.exit(1)


@audit.command()
@state_options
@click.option("--since", help="ISO 8601 date/time: first record written at or after it [default: the start].")
@click.option("--until", help="ISO 8601 date/time: records written before it [default: the head].")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Output file [default: stdout].")
def export(home: Path | None, repository: Path | None, since: str | None, until: str | None, out: Path | None) -> None:
    """Write records and signed checkpoints as JSONL (for an off-box copy); recorded as audit_export."""
    from appliance.audit.exporter import export_jsonl
    from runtime.signing import load_private_key

    settings = build_settings(home=home, repository=repository)
    started = _now()
    key = load_private_key(settings.signing_key)
    lo, hi = _date(since), _date(until)
    if out is None:
        summary = export_jsonl(settings.audit_db, sys.stdout.buffer, signing_key=key, since=lo, until=hi, now=started)
    else:
        with out.open("wb") as f:
            summary = export_jsonl(settings.audit_db, f, signing_key=key, since=lo, until=hi, now=started)
    details = {
        "records": str(summary.records),
        "first_seq": str(summary.first_seq),
        "last_seq": str(summary.last_seq),
        "sha256": summary.sha256,
        "since": since or "",
        "until": until or "",
        "out": str(out) if out else "-",
    }
    _record(settings, "audit_export", "inferbox audit export", started, details)
    if out is not None:
        click.echo(f"exported {summary.records} records (seq {summary.first_seq}..{summary.last_seq}) to {out}")


@audit.command()
@state_options
@click.option("-n", "count", type=click.IntRange(min=1), default=20, show_default=True, help="How many records.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def tail(home: Path | None, repository: Path | None, count: int, as_json: bool) -> None:
    """Print the newest records; recorded as audit_read."""
    from appliance.audit.log import AuditLog

    settings = build_settings(home=home, repository=repository)
    started = _now()
    with AuditLog.open(settings) as log:
        records = log.tail(count)
    _record(settings, "audit_read", "inferbox audit tail", started, {"records": str(len(records))})
    for r in records:
        if as_json:
            click.echo(msgspec.json.encode(r).decode())
        else:
            model = f" {r.model_name}/{r.model_version}" if r.model_name else ""
            click.echo(
                f"{r.seq:>8} {r.recorded_at} {r.event:<13} {r.outcome:<7} {r.status:>3} "
                f"{r.actor} {r.origin} {r.action}{model}"
            )


@audit.command()
@state_options
@click.option("--before", required=True, help="ISO 8601 date/time: remove records written before it.")
@click.option("--force", is_flag=True, help="Allow cutting inside the minimum retention (min_retention_days).")
def prune(home: Path | None, repository: Path | None, before: str, force: bool) -> None:
    """Remove the oldest records (a prefix only) and sign a prune checkpoint; recorded as audit_prune."""
    from appliance.audit.log import AuditLog

    settings = build_settings(home=home, repository=repository)
    started = _now()
    cutoff = _date(before)
    assert cutoff is not None
    with AuditLog.open(settings) as log:
        result = log.prune(cutoff, min_retention_days=settings.min_retention_days, force=force)
    details = {
        "before": before,
        "force": str(force).lower(),
        "pruned": str(result.pruned),
        "last_pruned_seq": str(result.last_pruned_seq),
        "anchor": result.checkpoint.head_hash if result.checkpoint else "",
    }
    _record(settings, "audit_prune", "inferbox audit prune", started, details)
    click.echo(f"pruned {result.pruned} records (through seq {result.last_pruned_seq})")


@audit.command()
@state_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def report(home: Path | None, repository: Path | None, as_json: bool) -> None:
    """Print the GDPR Art. 30 facts the appliance knows (processing, retention, measures)."""
    from appliance.audit.report import art30_facts, format_facts

    facts = art30_facts(build_settings(home=home, repository=repository))
    click.echo(json.dumps(facts, indent=2) if as_json else format_facts(facts))


@audit.command("public-key")
@state_options
def public_key(home: Path | None, repository: Path | None) -> None:
    """Print the public key (PEM) that verifies checkpoints: give it to auditors."""
    from runtime.signing import load_private_key, public_key_pem

    settings = build_settings(home=home, repository=repository)
    click.echo(public_key_pem(load_private_key(settings.signing_key)), nl=False)
