"""``inferbox install --root``: the tree, modes, configuration file, key, units, .wants links."""

from __future__ import annotations

import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.install import _UNSET, InstallOptions, config_toml, install
from appliance.settings import FIELDS, load_settings
from appliance.systemd import UNITS
from runtime.signing import load_private_key


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_install_under_root_builds_the_whole_tree(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["install", "--root", str(tmp_path), "--no-venv", "--prefix", "/opt/ib"])
    assert result.exit_code == 0, result.output
    assert "did not create user 'inferbox' (--root is given)" in result.output

    sysusers = tmp_path / "usr/lib/sysusers.d/inferbox.conf"
    assert sysusers.read_text() == 'u inferbox - "inferbox appliance" /var/lib/inferbox /usr/sbin/nologin\n'
    state = tmp_path / "var/lib/inferbox"
    assert _mode(state) == 0o700
    for sub in ("spool/new", "spool/tmp", "spool/cur", "outbox", "keys", "models"):
        assert (state / sub).is_dir()
    key = state / "keys/signing.key"
    assert _mode(key) == 0o600
    load_private_key(key)
    assert (state / "keys/signing.key.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")

    config = tmp_path / "etc/inferbox/inferbox.toml"
    assert _mode(config) == 0o644 and _mode(config.parent) == 0o755  # the service user must read it; no secrets
    units = tmp_path / "etc/systemd/system"
    for name in UNITS:
        text = (units / name).read_text()
        assert "@PREFIX@" not in text and "@STATEDIR@" not in text and "@CONFDIR@" not in text
    api = (units / "inferbox-api.service").read_text()
    assert "ExecStart=/opt/ib/venv/bin/inferbox serve" in api
    assert "Environment=INFERBOX_CONFIG=/etc/inferbox/inferbox.toml" in api
    assert "DirectoryNotEmpty=/var/lib/inferbox/spool/new" in (units / "inferbox-batch.path").read_text()
    wants = units / "multi-user.target.wants/inferbox-api.service"
    assert wants.is_symlink() and str(wants.readlink()) == "/etc/systemd/system/inferbox-api.service"
    assert (units / "paths.target.wants/inferbox-batch.path").is_symlink()
    # the batch timer resumes a job a shutdown stopped; the ship and backup timers need their folders
    assert sorted(p.name for p in (units / "timers.target.wants").iterdir()) == [
        "inferbox-audit-verify.timer",
        "inferbox-batch.timer",
    ]
    assert "OnBootSec=2min" in (units / "inferbox-batch.timer").read_text()
    assert "not enabled: mount a folder of another machine" in result.output

    # a second run keeps the key and the configuration
    before = key.read_bytes()
    report = install(InstallOptions(root=tmp_path, venv=False, prefix=Path("/opt/ib")))
    assert key.read_bytes() == before
    assert str(tmp_path / "etc/inferbox/inferbox.toml") in report.kept


def test_config_file_documents_every_setting_and_each_line_is_valid(tmp_path: Path) -> None:
    text = config_toml()
    assert tomllib.loads(text) == {f.section: {} for f in FIELDS}  # all commented out
    for f in FIELDS:
        assert f"# env INFERBOX_{f.name.upper()}" in text
        assert f"# {f.help}" in text
        assert f"\n# {f.name} = " in text
    # uncommenting every setting gives a file the settings loader accepts, at the defaults
    keys = tuple(f"# {f.name} = " for f in FIELDS)
    live = "\n".join(line[2:] if line.startswith(keys) else line for line in text.splitlines())
    path = tmp_path / "inferbox.toml"
    path.write_text(live)
    settings = load_settings(environ={}, config_file=path)
    defaults = load_settings(environ={"HOME": "/nonexistent"}, overrides={"home": Path("/var/lib/inferbox")})
    for f in FIELDS:
        if f.name not in _UNSET:  # unset by default; the file shows an example
            assert getattr(settings, f.name) == getattr(defaults, f.name), f.name
        assert settings.sources[f.name].startswith("file")


def test_install_live_runs_the_commands_it_should(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    # root "/" would touch the real system: point every path of a live install into tmp via a fake root check
    import appliance.install as mod

    monkeypatch.setattr(mod, "_under", lambda root, path: tmp_path / path.relative_to("/"))
    monkeypatch.setattr(mod.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(mod.os, "fchown", lambda *a: None)
    monkeypatch.setattr(mod, "booted_with_systemd", lambda: True)
    report = install(
        InstallOptions(root=Path("/"), venv=True, source="/src/inferbox", python="/usr/bin/python3"),
        run=lambda argv: calls.append(list(argv)),
        is_root=True,
    )
    venv = tmp_path / "opt/inferbox/venv"
    assert calls == [
        ["systemd-sysusers", "/usr/lib/sysusers.d/inferbox.conf"],
        ["/usr/bin/python3", "-m", "venv", str(venv)],
        [str(venv / "bin/python"), "-m", "pip", "install", "--upgrade", "/src/inferbox"],
        ["systemctl", "daemon-reload"],
        [
            "systemctl",
            "enable",
            "inferbox-api.service",
            "inferbox-batch.path",
            "inferbox-batch.timer",
            "inferbox-audit-verify.timer",
        ],
    ]
    assert report.enabled == [
        "inferbox-api.service",
        "inferbox-batch.path",
        "inferbox-batch.timer",
        "inferbox-audit-verify.timer",
    ]


def test_ship_dir_enables_the_hourly_ship_timer_and_is_the_one_folder_it_writes(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["install", "--root", str(tmp_path), "--no-venv", "--prefix", "/opt/ib", "--ship-dir", "/srv/offbox"]
    )
    assert result.exit_code == 0, result.output
    units = tmp_path / "etc/systemd/system"
    ship = (units / "inferbox-audit-ship.service").read_text()
    assert "ReadWritePaths=/srv/offbox\n" in ship and "Environment=INFERBOX_SHIP_DIR=/srv/offbox\n" in ship
    assert "RequiresMountsFor=/srv/offbox\n" in ship
    assert (units / "timers.target.wants/inferbox-audit-ship.timer").is_symlink()
    assert (units / "timers.target.wants/inferbox-batch.timer").is_symlink()
    assert (tmp_path / "opt/ib/share/doc/inferbox/audit.md").is_file()  # the unit's Documentation=
    # in the configuration too: a restore or `audit report` run by hand knows the folder (the unit's
    # environment alone left them catching up from nothing and saying nothing left the box)
    configured = load_settings({"home": tmp_path / "h"}, config_file=tmp_path / "etc/inferbox/inferbox.toml")
    assert configured.ship_dir == Path("/srv/offbox") and configured.backup_dir is None
    relative = CliRunner().invoke(main, ["install", "--root", str(tmp_path), "--no-venv", "--ship-dir", "offbox"])
    assert relative.exit_code == 2 and "--ship-dir" in relative.output and "absolute" in relative.output


def test_an_upgrade_warns_when_the_api_would_refuse_the_boxs_configuration(tmp_path: Path, tls_files: Any) -> None:
    """The docs used to serve the network with a drop-in setting INFERBOX_HOST=0.0.0.0 and no TLS;
    serve now refuses that, so a reinstall (upgrade) must say it before the service restarts."""
    options = InstallOptions(root=tmp_path, venv=False, prefix=Path("/opt/ib"))
    report = install(options)
    assert not [n for n in report.notes if n.startswith("WARNING")]  # defaults: loopback
    dropin = tmp_path / "etc/systemd/system/inferbox-api.service.d"
    dropin.mkdir(parents=True)
    (dropin / "override.conf").write_text(
        '[Service]\nEnvironment=INFERBOX_HOST=0.0.0.0 "INFERBOX_LOG_LEVEL=info"\nIPAddressAllow=10.0.0.0/8\n'
    )
    warnings = [n for n in install(options).notes if n.startswith("WARNING")]
    assert len(warnings) == 1 and "clear text" in warnings[0] and "would refuse to start" in warnings[0]
    # with the certificate configured (paths as on the box, files under the install root) it is quiet
    tls_dir = tmp_path / "etc/inferbox/tls"
    tls_dir.mkdir(parents=True)
    for src, name in ((tls_files.cert, "server.crt"), (tls_files.key, "server.key")):
        (tls_dir / name).write_bytes(src.read_bytes())
    (tls_dir / "server.key").chmod(0o600)
    config = tmp_path / "etc/inferbox/inferbox.toml"
    config.write_text('[tls]\ntls_cert = "/etc/inferbox/tls/server.crt"\ntls_key = "/etc/inferbox/tls/server.key"\n')
    assert not [n for n in install(options).notes if n.startswith("WARNING")]


def test_the_api_unit_does_not_restart_into_a_refused_configuration() -> None:
    from appliance.systemd import unit_dir

    text = (unit_dir() / "inferbox-api.service").read_text()
    assert "Restart=on-failure" in text and "RestartPreventExitStatus=78" in text


def _installed_with_dropins(root: Path) -> tuple[Path, Callable[[], list[str]]]:
    """An install under ``root``, the API unit's drop-in folder, and install run again -> its WARNINGs."""
    options = InstallOptions(root=root, venv=False, prefix=Path("/opt/ib"))
    install(options)
    dropins = root / "etc/systemd/system/inferbox-api.service.d"
    dropins.mkdir(parents=True)

    def warnings() -> list[str]:
        return [n for n in install(options).notes if n.startswith("WARNING")]

    return dropins, warnings


def test_the_upgrade_check_reads_the_environment_as_systemd_does(tmp_path: Path, tls_factory: Any) -> None:
    dropins, warnings = _installed_with_dropins(tmp_path)

    # a later empty Environment= resets the earlier assignments: nothing to warn about
    (dropins / "10-host.conf").write_text("[Service]\nEnvironment=INFERBOX_HOST=0.0.0.0\n")
    (dropins / "20-reset.conf").write_text("[Service]\nEnvironment=\n")
    assert warnings() == []
    # an EnvironmentFile= sets it (and wins over Environment=), a continued line too
    (dropins / "20-reset.conf").unlink()
    (dropins / "10-host.conf").write_text(
        "[Service]\nEnvironment=INFERBOX_HOST=127.0.0.1\nEnvironmentFile=/etc/ib.env\n"
    )
    (tmp_path / "etc/ib.env").write_text("# site\nINFERBOX_HOST=10.1.2.3\n")
    assert len(warnings()) == 1
    (dropins / "10-host.conf").write_text(
        "[Service]\nEnvironment=INFERBOX_LOG_LEVEL=info \\\n  INFERBOX_HOST=0.0.0.0\n"
    )
    assert len(warnings()) == 1
    # a certificate near or past its end is doctor's news, not a refusal
    old = tls_factory(server_days=-1)
    tls_dir = tmp_path / "etc/inferbox/tls"
    tls_dir.mkdir(parents=True)
    (tls_dir / "s.crt").write_bytes(old.cert.read_bytes())
    (tls_dir / "s.key").write_bytes(old.key.read_bytes())
    (tls_dir / "s.key").chmod(0o600)
    config = tmp_path / "etc/inferbox/inferbox.toml"
    config.write_text('[tls]\ntls_cert = "/etc/inferbox/tls/s.crt"\ntls_key = "/etc/inferbox/tls/s.key"\n')
    assert warnings() == []
    # a configuration that is no UTF-8 is named (serve refuses it too), and install goes on
    config.write_bytes(b'[server]\nhost = "\xff\xfe"\n')
    notes = warnings()
    assert len(notes) == 1 and "not UTF-8" in notes[0]


def test_the_upgrade_check_names_what_it_cannot_see_and_stays_under_root(tmp_path: Path) -> None:
    dropins, warnings = _installed_with_dropins(tmp_path)

    # a configuration file the environment names but that is missing: serve refuses it, so does the check
    (dropins / "10.conf").write_text("[Service]\nEnvironment=INFERBOX_CONFIG=/etc/inferbox/net.toml\n")
    notes = warnings()
    assert len(notes) == 1 and "net.toml" in notes[0] and "would refuse" in notes[0]
    # systemd specifiers are not guessed at
    (dropins / "10.conf").write_text("[Service]\nEnvironment=INFERBOX_CONFIG=%E/inferbox/net.toml\n")
    notes = warnings()
    assert len(notes) == 1 and "specifiers" in notes[0] and "INFERBOX_CONFIG" in notes[0]
    # a % in an EnvironmentFile= value is literal there (systemd expands specifiers only in Environment=)
    (tmp_path / "etc/ib.env").write_text("INFERBOX_REPOSITORY=/srv/models%2024\n")
    (dropins / "10.conf").write_text("[Service]\nEnvironmentFile=/etc/ib.env\n")
    assert warnings() == []
    # a comment inside a continued line is dropped, as systemd drops it
    (dropins / "10.conf").write_text(
        "[Service]\nEnvironment=INFERBOX_LOG_LEVEL=info \\\n# INFERBOX_HOST=0.0.0.0 \\\n  INFERBOX_PORT=8081\n"
    )
    assert warnings() == []
    # a home named in a drop-in is read under the install root, never outside it
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    (outside / "h").mkdir(parents=True)
    (outside / "h" / "inferbox.toml").write_text('[server]\nhost = "0.0.0.0"\n')
    (dropins / "10.conf").write_text(f"[Service]\nEnvironment=\nEnvironment=INFERBOX_HOME={outside / 'h'}\n")
    assert warnings() == []


def test_backup_dir_enables_the_daily_backup_timer_and_is_the_one_folder_it_writes(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["install", "--root", str(tmp_path), "--no-venv", "--prefix", "/opt/ib", "--backup-dir", "/srv/bk"]
    )
    assert result.exit_code == 0, result.output
    units = tmp_path / "etc/systemd/system"
    unit = (units / "inferbox-backup.service").read_text()
    assert "ExecStart=/opt/ib/venv/bin/inferbox backup create\n" in unit
    assert "ReadWritePaths=/srv/bk\n" in unit and "Environment=INFERBOX_BACKUP_DIR=/srv/bk\n" in unit
    assert "RequiresMountsFor=/srv/bk\n" in unit
    assert (units / "timers.target.wants/inferbox-backup.timer").is_symlink()
    config = (tmp_path / "etc/inferbox/inferbox.toml").read_text()
    assert "[backup]" in config and "backup_keep" in config

    without = tmp_path / "plain"
    plain = CliRunner().invoke(main, ["install", "--root", str(without), "--no-venv"])
    assert plain.exit_code == 0 and "inferbox-backup.timer is not enabled" in plain.output
    assert not (without / "etc/systemd/system/timers.target.wants/inferbox-backup.timer").exists()

    relative = CliRunner().invoke(main, ["install", "--root", str(tmp_path), "--no-venv", "--backup-dir", "bk"])
    assert relative.exit_code == 2 and "--backup-dir" in relative.output and "absolute" in relative.output


def test_backup_encrypt_to_installs_the_public_key_and_sets_it_for_every_backup(tmp_path: Path) -> None:
    from appliance.backup.crypt import generate_identity, load_recipient, recipient_id

    off_box = tmp_path / "usb"
    off_box.mkdir()
    pub, rid = generate_identity(off_box / "backup.key")
    root = tmp_path / "root"
    args = ["install", "--root", str(root), "--no-venv", "--backup-dir", "/srv/bk"]
    result = CliRunner().invoke(main, [*args, "--backup-encrypt-to", str(pub)])
    assert result.exit_code == 0, result.output
    installed = root / "etc/inferbox/backup.pub"
    assert _mode(installed) == 0o644 and recipient_id(load_recipient(installed)) == rid  # the unit's user reads it
    config = root / "etc/inferbox/inferbox.toml"
    assert tomllib.loads(config.read_text())["backup"] == {
        "backup_encrypt_to": "/etc/inferbox/backup.pub",
        "backup_dir": "/srv/bk",
    }
    settings = load_settings(environ={}, config_file=config)
    assert settings.backup_encrypt_to == Path("/etc/inferbox/backup.pub")
    assert "plain tars" not in result.output

    # an upgrade with the same key keeps everything; a configuration that names another key is named
    config.write_text('[backup]\nbackup_encrypt_to = "/etc/inferbox/old.pub"\n')
    again = CliRunner().invoke(main, [*args, "--backup-encrypt-to", str(pub)])
    assert again.exit_code == 0, again.output
    assert "sets backup_encrypt_to = '/etc/inferbox/old.pub'" in again.output
    config.write_text('backup_encrypt_to = "/etc/inferbox/backup.pub"\n')  # at the top: the loader reads it too
    again = CliRunner().invoke(main, [*args, "--backup-encrypt-to", str(pub)])
    notes = [line for line in again.output.splitlines() if line.startswith("note:")]
    assert again.exit_code == 0 and not [n for n in notes if "set backup_encrypt_to" in n], notes

    # a new key where another is installed: refused before anything changes (backups would go on to the old)
    other, _ = generate_identity(off_box / "other.key")
    before = installed.read_bytes()
    refused = CliRunner().invoke(main, [*args, "--backup-encrypt-to", str(other)])
    assert refused.exit_code == 2 and f"sudo rm {installed}" in refused.output, refused.output
    assert installed.read_bytes() == before

    # without it, install says backups will be plain; a private key given by mistake installs nothing
    plain = CliRunner().invoke(main, ["install", "--root", str(tmp_path / "p"), "--no-venv", "--backup-dir", "/bk"])
    assert plain.exit_code == 0 and "plain tars" in plain.output
    wrong = tmp_path / "w"
    bad = CliRunner().invoke(
        main, ["install", "--root", str(wrong), "--no-venv", "--backup-encrypt-to", str(off_box / "backup.key")]
    )
    assert bad.exit_code == 2 and "--backup-encrypt-to" in bad.output and not wrong.exists()


def test_installing_again_keeps_the_ship_and_backup_folders_the_units_name(tmp_path: Path) -> None:
    """An upgrade (install run again without --ship-dir / --backup-dir) rewrote the units to the default
    folders, left their timers enabled, and said the timers were not enabled."""
    first = install(
        InstallOptions(
            root=tmp_path,
            venv=False,
            prefix=Path("/opt/ib"),
            ship_dir=Path("/srv/offbox"),
            backup_dir=Path("/srv/backups"),
        )
    )
    assert not [n for n in first.notes if "kept --" in n]
    again = install(InstallOptions(root=tmp_path, venv=False, prefix=Path("/opt/ib")))
    units = tmp_path / "etc/systemd/system"
    ship = (units / "inferbox-audit-ship.service").read_text()
    backup = (units / "inferbox-backup.service").read_text()
    assert "Environment=INFERBOX_SHIP_DIR=/srv/offbox\n" in ship and "ReadWritePaths=/srv/offbox\n" in ship
    assert "Environment=INFERBOX_BACKUP_DIR=/srv/backups\n" in backup and "RequiresMountsFor=/srv/backups\n" in backup
    assert (units / "timers.target.wants/inferbox-audit-ship.timer").is_symlink()
    assert (units / "timers.target.wants/inferbox-backup.timer").is_symlink()
    assert not [n for n in again.notes if "is not enabled" in n], again.notes
    assert any("kept --ship-dir /srv/offbox" in n for n in again.notes)
    moved = install(InstallOptions(root=tmp_path, venv=False, prefix=Path("/opt/ib"), ship_dir=Path("/srv/other")))
    assert "INFERBOX_SHIP_DIR=/srv/other\n" in (units / "inferbox-audit-ship.service").read_text()
    assert any("kept --backup-dir /srv/backups" in n for n in moved.notes)


def test_a_link_where_the_signing_key_belongs_is_named_not_told_to_force(tmp_path: Path) -> None:
    """A dangling link at keys/signing.key made install say "already exists; pass --force", a flag install
    does not have."""
    key = tmp_path / "var/lib/inferbox/keys/signing.key"
    key.parent.mkdir(parents=True)
    key.symlink_to(tmp_path / "nowhere.key")
    result = CliRunner().invoke(main, ["install", "--root", str(tmp_path), "--no-venv", "--prefix", "/opt/ib"])
    assert result.exit_code != 0 and "is a link" in result.output and "--force" not in result.output, result.output
    assert not (tmp_path / "nowhere.key").exists()


def test_installing_again_keeps_the_default_folders_when_they_were_given(tmp_path: Path) -> None:
    """--ship-dir /mnt/inferbox-audit (the default folder, given on purpose) enabled the timer; a second
    run without it then said the timers were not enabled while they were."""
    install(
        InstallOptions(
            root=tmp_path,
            venv=False,
            prefix=Path("/opt/ib"),
            ship_dir=Path("/mnt/inferbox-audit"),
            backup_dir=Path("/mnt/inferbox-backup"),
        )
    )
    again = install(InstallOptions(root=tmp_path, venv=False, prefix=Path("/opt/ib")))
    assert not [n for n in again.notes if "is not enabled" in n], again.notes
    units = tmp_path / "etc/systemd/system"
    assert (units / "timers.target.wants/inferbox-audit-ship.timer").is_symlink()
    fresh = install(InstallOptions(root=tmp_path / "other", venv=False, prefix=Path("/opt/ib")))
    assert len([n for n in fresh.notes if "is not enabled" in n]) == 2  # never given: still said


def test_a_ship_or_backup_folder_that_is_missing_or_on_the_boxs_disk_is_warned_of(tmp_path: Path) -> None:
    """The reviewer's box: --backup-dir to a folder not yet mounted passed silently, and the nightly
    backup failed every run (backup create refuses a missing folder and one on the box's disk)."""
    args = ["install", "--root", str(tmp_path), "--no-venv", "--prefix", "/opt/ib"]
    missing = CliRunner().invoke(main, [*args, "--backup-dir", "/srv/bk", "--ship-dir", "/srv/ship"])
    assert missing.exit_code == 0, missing.output
    assert "WARNING: --backup-dir /srv/bk does not exist (yet)" in missing.output
    assert "WARNING: --ship-dir /srv/ship does not exist (yet)" in missing.output
    (tmp_path / "srv/bk").mkdir(parents=True)
    same = CliRunner().invoke(main, [*args, "--backup-dir", "/srv/bk"])
    assert same.exit_code == 0 and "WARNING: --backup-dir /srv/bk is on the same filesystem as" in same.output


def test_a_folder_on_another_filesystem_gets_no_warning() -> None:
    from appliance.install import _off_box_note

    other = Path("/dev/shm")
    assert Path("/").stat().st_dev != other.stat().st_dev  # tmpfs: what a mounted share looks like
    assert _off_box_note("--backup-dir", other, Path("/")) is None
