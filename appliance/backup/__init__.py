"""Backups of the appliance's state, and restoring them on an empty box (``docs/operations.md``, *Backup*).

:mod:`~appliance.backup.manifest` (the archive's layout and manifest),
:mod:`~appliance.backup.create` (``inferbox backup create``),
:mod:`~appliance.backup.restore` (``inferbox backup check`` / ``restore``).
"""

from __future__ import annotations

from appliance.backup.create import BackupResult, create_backup
from appliance.backup.manifest import BackupManifest
from appliance.backup.restore import Checked, RestoreResult, check_archive, restore_backup

__all__ = [
    "BackupManifest",
    "BackupResult",
    "Checked",
    "RestoreResult",
    "check_archive",
    "create_backup",
    "restore_backup",
]
