"""The GDPR Art. 30 record-of-processing facts the appliance itself knows.

``inferbox audit report`` prints these; the controller adds what only it knows
(its name, the data subjects, the legal basis).  Nothing here reads payloads:
the appliance never stores them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.sqlite import open_read_only

if TYPE_CHECKING:
    from appliance.settings import Settings

__all__ = ["art30_facts", "format_facts"]


def _models(repository: Path) -> list[dict[str, Any]]:
    if not repository.is_dir():
        return []
    from runtime.repository import Repository

    out: list[dict[str, Any]] = []
    for entry in Repository(repository).entries(verify_hashes=False):
        out.append({"name": entry.name, "version": entry.version, "package_sha256": entry.sha256 or "", "ok": entry.ok})
    return out


def _log_facts(db_path: Path) -> dict[str, Any]:
    if not db_path.is_file():
        return {"records": 0, "oldest": None, "newest": None, "checkpoints": 0}
    conn = open_read_only(db_path)
    try:
        count, oldest, newest, first = conn.execute(
            "SELECT count(*), min(recorded_at), max(recorded_at), min(seq) FROM records"
        ).fetchone()
        cps = conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0]
        prunes = conn.execute(
            "SELECT seq, recorded_at, actor, details FROM records WHERE event = 'audit_prune' AND outcome = 'success' "
            "ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    facts: dict[str, Any] = {
        "records": count,
        "first_seq": first,
        "oldest": oldest,
        "newest": newest,
        "checkpoints": cps,
    }
    removed = []
    for seq, at, actor, raw in prunes:  # what is gone, and who took it (a prefix: the records before first_seq)
        try:
            details = json.loads(raw)
        except ValueError:
            continue
        forced = " with --force (inside min_retention_days)" if details.get("force") == "true" else ""
        removed.append(
            f"records 1..{details.get('last_pruned_seq', '?')} ({details.get('pruned', '?')}) removed at {at} by "
            f"{actor}{forced}, before {details.get('before', '?')} (audit_prune, seq {seq})"
        )
    if removed:
        facts["pruned"] = removed
    return facts


def art30_facts(settings: Settings) -> dict[str, Any]:
    """Facts for a GDPR Art. 30(1) record of processing activities, as plain data."""
    from appliance.settings import retention_problem

    started = _last_start(settings.audit_db)  # the API's newest `config` record: read once
    return {
        "purposes": [
            "inference (embeddings, classification, other model outputs) on data the customer's own "
            "applications submit, on the customer's premises",
            "security and accountability logging of that processing (this audit log)",
        ],
        "categories_of_data": {
            "processed": "whatever the customer's applications submit (texts, tensors): an API request's held in "
            f"memory for the duration of the request only; a batch job's input file kept in {settings.spool}/cur/"
            f"<job>/ and its results and rejects (a rejected record's raw text) in {settings.outbox}/<job>/ until "
            + _batch_retention(settings),
            "stored_in_audit_log": [
                "who: API key id / credential id / service unit (never key secrets)",
                "what: event, action, model name, version and package sha256, backend and variant, job id",
                "when: UTC start and end; where from: client address or unit",
                "outcome and status code; request id",
                "HMAC-SHA256 digests of inputs and outputs under a rotating secret key (never payloads)",
            ],
            "never_stored": ["request bodies", "texts", "tensors", "Authorization headers", "API-key secrets"],
            "stored_as_the_client_sent_it": [
                "names a client chooses: a model name, an X-Request-Id, a path, a batch file's name (each at most "
                "512 characters); an application that puts personal data there puts it in this log",
            ],
        },
        "recipients": "; ".join([_recipients(settings), *_written_off(settings.audit_db)]),
        "retention": {
            "audit_retention_days": settings.retention_days,
            "min_retention_days": settings.min_retention_days,
            **({"warning": problem} if (problem := retention_problem(settings)) is not None else {}),
            "digest_key_rotation_days": settings.digest_key_days,
            "audit_log": _log_facts(settings.audit_db),
        },
        "technical_measures": [
            "hash-chained audit records (SHA-256 over length-prefixed canonical fields)",
            f"Ed25519-signed checkpoints every {settings.checkpoint_every} records and every "
            f"{settings.checkpoint_minutes:g} minutes; private key outside the database (mode 0600)",
            "HMAC-SHA256 pseudonymised digests (GDPR Art. 32(1)(a)); keys rotated every "
            f"{settings.digest_key_days} days and never deleted by a prune (a digest in a shipped copy or a backup "
            "can still be checked against a candidate text: delete a key under keys/digest/ to end that)",
            "per-key API scopes; reading or exporting the audit log needs its own scope and is itself logged",
            "offline verifier (`inferbox audit verify`) with the public key only",
            _transport(settings, started),
            _switched(settings, started, "auth", "authentication", "required", "DISABLED (auth = false)"),
            _switched(
                settings, started, "audit", "the audit log", "on", "OFF (audit = false): requests leave no record"
            ),
        ],
        "models": _models(settings.repository),
    }


def _batch_retention(settings: Settings) -> str:
    if settings.batch_retention_days > 0:
        return f"{settings.batch_retention_days:g} days after the job ended (batch_retention_days)"
    return "an operator removes them (`inferbox batch purge`; batch_retention_days is 0: nothing deletes them)"


def _recipients(settings: Settings) -> str:
    """Where data of the box goes off it: nothing is sent anywhere, but the operator may have set folders."""
    out = [
        "none off the box: no telemetry, no cloud calls; exports are written only when an operator runs "
        "`inferbox audit export`"
    ]
    if settings.ship_dir is not None:
        out.append(
            f"audit log copies (records, never payloads) to {settings.ship_dir} by `inferbox audit ship` "
            "(ship_dir; hourly with the ship timer)"
        )
    if settings.backup_dir is not None:
        held = (
            f"encrypted to the key {settings.backup_encrypt_to}"
            if settings.backup_encrypt_to is not None
            else "NOT encrypted (backup_encrypt_to unset): they hold the signing and digest keys"
        )
        out.append(
            f"backups of the state (audit log, key hashes, models, batch jobs and their outputs) to "
            f"{settings.backup_dir} by `inferbox backup create` (backup_dir), {held}"
        )
    return "; ".join(out)


def _written_off(db_path: Path) -> list[str]:
    """What the log says was written for taking off the box (backups, audit exports), whatever the
    settings of the shell the report runs in say: an installed box's units set their folders in their
    own environment, and the report read "none off the box" beside a log of plain backups."""
    if not db_path.is_file():
        return []
    conn = open_read_only(db_path)
    try:
        rows = conn.execute(
            "SELECT event, recorded_at, details, action FROM records WHERE event IN ('backup_create', 'audit_export') "
            "AND outcome = 'success' ORDER BY seq"
        ).fetchall()
    except Exception:  # an older or damaged database: the configured settings alone are reported
        return []
    finally:
        conn.close()
    backups: dict[str, list[Any]] = {}  # folder: [count, plain, last]
    copies: dict[str, list[Any]] = {}  # audit ship's folder: [count, last]
    exported, last_export = 0, ""
    for event, at, raw, action in rows:
        try:
            details = json.loads(raw)
        except ValueError:
            continue
        if event == "audit_export" and action == "inferbox audit ship":
            written = str(details.get("out", "?"))
            seen_copy = copies.setdefault(os.path.dirname(written) or written, [0, ""])
            seen_copy[0], seen_copy[1] = seen_copy[0] + 1, str(at)
            continue
        if event == "audit_export":
            exported, last_export = exported + 1, str(at)
            continue
        seen = backups.setdefault(str(details.get("folder", "?")), [0, 0, ""])
        seen[0] += 1
        seen[1] += 0 if str(details.get("archive", "")).endswith(".enc") else 1
        seen[2] = at
    out = [
        f"per the audit log: {n} backup(s) written to {folder} (the last at {last}), "
        + (f"{plain} of them NOT encrypted" if plain else "all encrypted")
        for folder, (n, plain, last) in backups.items()
    ]
    out += [
        f"per the audit log: {n} copy(ies) of the log shipped to {folder} by `inferbox audit ship` (the last at {last})"
        for folder, (n, last) in copies.items()
    ]
    if exported:
        out.append(f"per the audit log: {exported} audit export(s) written by an operator (the last at {last_export})")
    return out


def _last_start(db_path: Path) -> dict[str, Any] | None:
    """The settings the API last started with (its newest ``config`` record), or None."""
    if not db_path.is_file():
        return None
    conn = open_read_only(db_path)
    try:
        row = conn.execute(
            "SELECT seq, recorded_at, details FROM records WHERE event = 'config' ORDER BY seq DESC LIMIT 1"
        ).fetchone()
    except Exception:  # an older or damaged database: the configured settings alone are reported
        return None
    finally:
        conn.close()
    if row is None:
        return None
    try:
        details = json.loads(row[2])
    except ValueError:
        return None
    return {"seq": row[0], "at": row[1], **details} if isinstance(details, dict) else None


def _switched(settings: Settings, started: dict[str, Any] | None, name: str, what: str, on: str, off: str) -> str:
    """``what`` on or off as the settings say, and as the API last started (its ``config`` record):
    a server started with ``--no-auth`` read "authentication required" from the shell's settings."""
    said = f"{what} {on if getattr(settings, name) else off} (these settings)"
    if started is None or name not in started:
        return said
    ran = str(started[name]) == "True"
    return f"{said}; {on if ran else off} when the API last started, at {started['at']} (seq {started['seq']})"


def _transport(settings: Settings, started: dict[str, Any] | None) -> str:
    where = f"the settings say the API listens on {settings.host}:{settings.port}"
    if started is not None:
        tls = "HTTPS" if started.get("tls_cert") not in (None, "None", "") else "plain HTTP"
        ran = f"{started.get('host')}:{started.get('port')}, {tls}"
        where += f"; it last started with {ran} at {started['at']} (audit record seq {started['seq']})"
    if settings.tls_cert is None:
        return (
            f"plain HTTP ({where}): refused on a network address unless allow_plaintext; terminate TLS in front "
            "of the appliance or set tls_cert and tls_key"
        )
    clients = (
        "client certificates required (tls_client_ca)"
        if settings.tls_client_ca is not None
        else "no client certificates"
    )
    return f"HTTPS ({where}; certificate {settings.tls_cert}), {clients}"


def format_facts(facts: dict[str, Any], indent: int = 0) -> str:
    """Plain-text rendering of :func:`art30_facts`."""
    lines: list[str] = []
    pad = "  " * indent
    for key, value in facts.items():
        title = key.replace("_", " ")
        if isinstance(value, dict):
            lines.append(f"{pad}{title}:")
            lines.append(format_facts(value, indent + 1))
        elif isinstance(value, list):
            lines.append(f"{pad}{title}:" + ("" if value else " none"))
            for item in value:
                text = ", ".join(f"{k}={v}" for k, v in item.items()) if isinstance(item, dict) else str(item)
                lines.append(f"{pad}  - {text}")
        else:
            lines.append(f"{pad}{title}: {value}")
    return "\n".join(lines)
