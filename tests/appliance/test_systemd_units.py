"""The shipped units: ``systemd-analyze verify`` is clean and the services score exposure <= 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.install import InstallOptions, install, render_unit
from appliance.systemd import UNITS, unit_dir
from runtime.errors import ConfigError

ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Units installed under a temp root, ExecStart pointing at a real inferbox executable."""
    assert ANALYZE, "systemd-analyze is needed (apt-get install systemd)"
    base = tmp_path_factory.mktemp("units")
    prefix = base / "prefix"
    (prefix / "venv/bin").mkdir(parents=True)
    (prefix / "venv/bin/inferbox").symlink_to(Path(sys.executable).with_name("inferbox"))
    install(InstallOptions(root=base / "root", prefix=prefix, venv=False))
    return base / "root/etc/systemd/system"


def test_systemd_analyze_verify_is_clean_for_every_unit(installed: Path) -> None:
    files = [str(installed / u) for u in UNITS]
    proc = subprocess.run([ANALYZE, "verify", "--man=no", *files], capture_output=True, text=True, cwd=installed)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == ""  # no warnings either (unknown keys, bad values)


def test_verify_catches_a_broken_unit(installed: Path, tmp_path: Path) -> None:
    broken = tmp_path / "inferbox-api.service"
    text = (installed / "inferbox-api.service").read_text()
    broken.write_text(text.replace("Type=notify", "Type=notifyy"))
    proc = subprocess.run([ANALYZE, "verify", "--man=no", str(broken)], capture_output=True, text=True)
    assert "Failed to parse service type" in proc.stderr


@pytest.mark.parametrize(
    "unit",
    [
        "inferbox-api.service",
        "inferbox-batch.service",
        "inferbox-audit-ship.service",
        "inferbox-audit-verify.service",
        "inferbox-backup.service",
    ],
)
def test_security_exposure_is_at_most_2(installed: Path, unit: str) -> None:
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(installed / unit)], capture_output=True, text=True
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout


def test_units_carry_the_required_settings() -> None:
    api = (unit_dir() / "inferbox-api.service").read_text()
    batch = (unit_dir() / "inferbox-batch.service").read_text()
    for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StartLimitIntervalSec=", "StartLimitBurst="):
        assert key in api
    assert "\nExecReload=/bin/kill -HUP $MAINPID\n" in api  # systemctl reload: a renewed certificate
    assert "\nLimitNOFILE=65536\n" in api  # a connection is a file descriptor: 1024 is a thousand clients
    for unit in sorted(unit_dir().glob("*.service")):  # every service holds keys in memory: no core dumps
        assert "\nLimitCORE=0\n" in unit.read_text(), unit.name
    ship = (unit_dir() / "inferbox-audit-ship.service").read_text()
    assert "ExecStart=@PREFIX@/venv/bin/inferbox batch run --once" in batch
    assert "ExecStart=@PREFIX@/venv/bin/inferbox audit ship\n" in ship
    # the off-box folder is the one path outside the state directory it may write, and the one it ships to
    assert "ReadWritePaths=@SHIPDIR@" in ship and "Environment=INFERBOX_SHIP_DIR=@SHIPDIR@" in ship
    assert "\nMemoryDenyWriteExecute=yes" in ship  # it loads no model: nothing generates code
    backup = (unit_dir() / "inferbox-backup.service").read_text()
    assert "ExecStart=@PREFIX@/venv/bin/inferbox backup create\n" in backup
    assert "ReadWritePaths=@BACKUPDIR@" in backup and "Environment=INFERBOX_BACKUP_DIR=@BACKUPDIR@" in backup
    assert "\nMemoryDenyWriteExecute=yes" in backup
    verify = (unit_dir() / "inferbox-audit-verify.service").read_text()
    assert "ExecStart=@PREFIX@/venv/bin/inferbox audit verify\n" in verify
    assert "\nMemoryDenyWriteExecute=yes" in verify and "ReadWritePaths=" not in verify  # reads the log only
    for text in (api, batch, ship, backup, verify):
        for key in (
            "User=inferbox",
            "StateDirectory=inferbox",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=\n",
            "SystemCallFilter=@system-service",
            "UMask=0077",
            "MemoryMax=",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "IPAddressDeny=any",
        ):
            assert key in text, key
        if text not in (ship, backup, verify):
            assert "\nMemoryDenyWriteExecute=" not in text  # OpenVINO's JIT breaks under it (see the unit's comment)


def test_render_refuses_unknown_placeholders() -> None:
    with pytest.raises(ConfigError, match="@NEW_THING@"):
        render_unit("[Service]\nExecStart=@NEW_THING@/x\n", prefix=Path("/opt/inferbox"))
