"""`inferbox install`: a second run never follows links the service user planted, the pip source is
pinned, a missing root and failing commands end in one `error:` line, unit values systemd rejects."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import appliance.install as mod
from appliance.cli import main
from appliance.install import InstallError, InstallOptions, install

ANALYZE = shutil.which("systemd-analyze")


def _run(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


# -- 1. a second install never follows a link the service user planted in the state folder ------------


class _Live:
    """A live install (root "/") redirected into ``tmp``; every chown recorded by the inode it reaches."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = tmp / "live"
        self.state = self.root / "var/lib/inferbox"
        self.owned: list[int] = []  # inodes handed to the service user
        monkeypatch.setattr(mod, "_under", lambda root, path: self.root / path.relative_to("/"))
        monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
        entry = type("Entry", (), {"pw_uid": 4242, "pw_gid": 4242})
        monkeypatch.setattr(pwd, "getpwnam", lambda name: entry)

        def chown(path: Any, uid: int, gid: int, **kw: Any) -> None:  # what the real call would reach
            follow = kw.get("follow_symlinks", True)
            self.owned.append((os.stat if follow else os.lstat)(path, dir_fd=kw.get("dir_fd")).st_ino)

        monkeypatch.setattr(os, "chown", chown)
        monkeypatch.setattr(os, "lchown", lambda p, u, g: self.owned.append(os.lstat(p).st_ino))
        monkeypatch.setattr(os, "fchown", lambda fd, u, g: self.owned.append(os.fstat(fd).st_ino))

    def install(self) -> mod.InstallReport:
        options = InstallOptions(root=Path("/"), prefix=Path("/opt/ib"), enable=False, venv=False)
        return install(options, run=lambda argv: None, is_root=True)


def test_reinstall_gives_the_service_user_its_folders_and_key_but_never_a_link_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = _Live(tmp_path, monkeypatch)
    live.install()
    assert os.stat(live.state).st_ino in live.owned  # first start: the service user owns its folder
    assert os.stat(live.state / "spool/new").st_ino in live.owned
    assert os.stat(live.state / "keys/signing.key").st_ino in live.owned

    victim = tmp_path / "root-owned-file"
    victim.write_text("root's\n")
    (live.state / "spool/new/evil").symlink_to(victim)  # planted by the service user
    (live.state / "keys/signing.key").unlink()  # so that install writes the key and its .pub again
    (live.state / "keys/signing.key.pub").unlink()
    (live.state / "keys/signing.key.pub.tmp").symlink_to(victim)
    live.owned.clear()
    live.install()
    assert os.stat(victim).st_ino not in live.owned
    assert victim.read_text() == "root's\n"  # the .pub's temporary link was replaced, not written through
    assert os.stat(live.state / "keys/signing.key").st_ino in live.owned
    assert (live.state / "keys/signing.key.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_reinstall_refuses_a_link_where_a_state_folder_belongs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    live = _Live(tmp_path, monkeypatch)
    live.install()
    system_dir = tmp_path / "system-dir"
    system_dir.mkdir()
    system_dir.chmod(0o755)
    shutil.rmtree(live.state / "cache")
    (live.state / "cache").symlink_to(system_dir)
    live.owned.clear()
    with pytest.raises(InstallError, match=r"inferbox/cache is a symbolic link.*never follows links"):
        live.install()
    assert stat.S_IMODE(system_dir.stat().st_mode) == 0o755
    assert os.stat(system_dir).st_ino not in live.owned


def test_reinstall_refuses_a_key_file_that_is_a_hard_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    live = _Live(tmp_path, monkeypatch)
    live.install()
    victim = tmp_path / "root-owned-file"
    victim.write_text("root's\n")
    (live.state / "keys/signing.key.pub").unlink()
    os.link(victim, live.state / "keys/signing.key.pub")
    live.owned.clear()
    with pytest.raises(InstallError, match=r"signing.key.pub is not a plain file with one link"):
        live.install()
    assert os.stat(victim).st_ino not in live.owned


# -- 5. install pins what it pip-installs ---------------------------------------------------------------


def test_install_from_a_wheel_pins_this_version_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mod, "__file__", str(tmp_path / "site-packages/appliance/install.py"))  # no pyproject
    assert mod.project_source() == f"inferbox=={version('inferbox')}"
    calls: list[list[str]] = []
    said: list[str] = []
    install(
        InstallOptions(root=tmp_path / "img", prefix=Path("/opt/ib"), enable=False, python="/usr/bin/python3"),
        run=lambda argv: calls.append(list(argv)),
        say=said.append,
    )
    assert calls[-1][-1] == f"inferbox=={version('inferbox')}"
    assert said == [
        f"installing inferbox=={version('inferbox')} into {tmp_path}/img/opt/ib/venv from pip's configured index"
    ]


# -- 7. install: a failing command and a missing root end in one `error:` line ---------------------------


def test_a_failing_pip_or_systemctl_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(options: InstallOptions, **kw: Any) -> None:
        raise subprocess.CalledProcessError(1, ["systemctl", "enable", "inferbox-api.service"])

    monkeypatch.setattr(mod, "install", failing)
    r = CliRunner().invoke(main, ["install", "--root", str(tmp_path), "--no-venv"])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: `systemctl enable inferbox-api.service` failed with exit code 1")


def test_install_on_the_live_system_needs_root_before_it_touches_anything() -> None:
    calls: list[Any] = []
    with pytest.raises(InstallError, match=r"needs root: run it as root \(sudo.*or pass --root DIR"):
        install(InstallOptions(root=Path("/")), run=calls.append, is_root=False)
    assert calls == []


# -- 8. values systemd would reject or ignore -----------------------------------------------------------


@pytest.mark.parametrize("value", ["8GB", "8g", "8 G", "-1", "lots", ""])
def test_install_refuses_memory_sizes_systemd_rejects(tmp_path: Path, value: str) -> None:
    r = _run("install", "--root", str(tmp_path), "--no-venv", "--api-memory-max", value)
    assert r.exit_code == 2 and "--api-memory-max" in r.stderr and "systemd memory size" in r.stderr
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize(
    ("flag", "value"), [("--prefix", "/opt/my box"), ("--ship-dir", "/mnt/audit share"), ("--prefix", "/opt/100%")]
)
def test_install_refuses_paths_the_units_cannot_hold(tmp_path: Path, flag: str, value: str) -> None:
    r = _run("install", "--root", str(tmp_path), "--no-venv", flag, value)
    assert r.exit_code == 2 and flag in r.stderr
    assert not (tmp_path / "etc").exists()


def test_every_memory_size_install_accepts_systemd_accepts(tmp_path: Path) -> None:
    assert ANALYZE, "systemd-analyze is needed (apt-get install systemd)"
    values = ["8G", "512M", "1.5G", "50%", "12.5%", "infinity", "1073741824", "2T"]
    for i, value in enumerate(values):
        mod._check_options(InstallOptions(api_memory_max=value))
        (tmp_path / f"m{i}.service").write_text(f"[Service]\nExecStart=/bin/true\nMemoryMax={value}\n")
    files = [str(tmp_path / f"m{i}.service") for i in range(len(values))]
    proc = subprocess.run([ANALYZE, "verify", "--man=no", *files], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout + proc.stderr == ""


def test_a_live_install_on_a_system_systemd_did_not_start_refuses_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root in a container, install created the user, the folders and every unit, then stopped at
    `systemctl daemon-reload` ("Failed to connect to bus"), half installed."""
    live = _Live(tmp_path, monkeypatch)
    ran: list[Any] = []
    monkeypatch.setattr(mod, "booted_with_systemd", lambda: False)
    options = InstallOptions(root=Path("/"), prefix=Path("/opt/ib"), enable=True, venv=False)
    with pytest.raises(InstallError, match=r"not started by systemd.*--no-enable"):
        install(options, run=ran.append, is_root=True)
    assert ran == [] and not live.root.exists()
    assert live.install().created  # --no-enable: written, nothing enabled
