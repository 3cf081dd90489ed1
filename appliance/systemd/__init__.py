"""systemd integration: the unit files (``*.service``, ``*.path``, ``*.timer``) and sd_notify.

The unit files are package data; :mod:`appliance.install` substitutes the
install prefix into them.  :mod:`.notify` speaks the sd_notify protocol.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["UNITS", "unit_dir"]

#: the units inferbox ships, in the order they are installed
UNITS: tuple[str, ...] = (
    "inferbox-api.service",
    "inferbox-batch.service",
    "inferbox-batch.path",
    "inferbox-batch.timer",
    "inferbox-audit-ship.service",
    "inferbox-audit-ship.timer",
    "inferbox-audit-verify.service",
    "inferbox-audit-verify.timer",
    "inferbox-backup.service",
    "inferbox-backup.timer",
)


def unit_dir() -> Path:
    """The folder holding the unit templates (``@PREFIX@`` etc. not yet substituted): package data."""
    return Path(__file__).parent
