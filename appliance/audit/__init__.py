"""The tamper-evident audit log: hash chain, signed checkpoints, offline verifier.

See ``docs/audit.md``.  Modules: :mod:`~appliance.audit.canonical` (records and
their canonical bytes), :mod:`~appliance.audit.schema` (SQLite schema and
triggers), :mod:`~appliance.audit.log` (the writer), :mod:`~appliance.audit.digest`
(HMAC digest keys), :mod:`~appliance.audit.checkpoint`, :mod:`~appliance.audit.prune`,
:mod:`~appliance.audit.exporter`, :mod:`~appliance.audit.verify`,
:mod:`~appliance.audit.compare` (a log against earlier off-box exports),
:mod:`~appliance.audit.merkle`, :mod:`~appliance.audit.report`.
"""

from __future__ import annotations

from appliance.audit.canonical import AuditRecord, canonical_bytes, leaf_hash
from appliance.audit.checkpoint import Checkpoint
from appliance.audit.exporter import ExportSummary, export_jsonl
from appliance.audit.log import AuditLog
from appliance.audit.merkle import merkle_proof, merkle_root, verify_proof
from appliance.audit.prune import PruneResult
from appliance.audit.verify import VerifyReport, verify_db, verify_export

__all__ = [
    "AuditLog",
    "AuditRecord",
    "Checkpoint",
    "ExportSummary",
    "PruneResult",
    "VerifyReport",
    "canonical_bytes",
    "export_jsonl",
    "leaf_hash",
    "merkle_proof",
    "merkle_root",
    "verify_db",
    "verify_export",
    "verify_proof",
]
