"""Install the appliance on a box (or into a folder tree with ``root`` for tests and images).

``install(InstallOptions(...))`` creates, under ``root``:

* ``usr/lib/sysusers.d/inferbox.conf`` (the ``inferbox`` system user; systemd
  creates it at boot) and, on a live system as root, the user right away;
* ``var/lib/inferbox`` (0700: models, databases, keys, spool, outbox) and ``etc/inferbox``;
* ``<prefix>/venv`` with this project pip-installed (skip with ``venv=False``);
* ``etc/inferbox/inferbox.toml``: every setting, commented out, with its help,
  default and environment variable (an existing file is kept);
* the signing key ``var/lib/inferbox/keys/signing.key`` (0600) and ``.pub``;
* the units in ``etc/systemd/system`` with the paths substituted, enabled with
  ``systemctl`` on a live system or as ``.wants`` symlinks under ``root`` (the
  audit ship timer only when ``ship_dir``, an off-box folder, is given).

Every step is idempotent: running it again fixes what is missing and keeps the rest.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.settings import FIELDS, Field
from appliance.systemd import UNITS, unit_dir
from runtime.errors import ConfigError

__all__ = ["InstallOptions", "InstallReport", "config_toml", "install", "render_unit"]

log = logging.getLogger(__name__)

USER = "inferbox"
STATE_DIR = Path("/var/lib/inferbox")
CONF_DIR = Path("/etc/inferbox")
UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS = Path("/usr/lib/sysusers.d/inferbox.conf")
#: unit -> the target whose .wants it is enabled in (the batch timer is optional: not enabled by default)
ENABLE = {"inferbox-api.service": "multi-user.target", "inferbox-batch.path": "paths.target"}
#: enabled too when an off-box folder is given (``--ship-dir``)
SHIP_TIMER = "inferbox-audit-ship.timer"
#: the ship unit's folder when none is given (the timer then stays disabled)
DEFAULT_SHIP_DIR = Path("/mnt/inferbox-audit")


@dataclass(frozen=True)
class InstallOptions:
    prefix: Path = Path("/opt/inferbox")
    root: Path = Path("/")
    enable: bool = True
    venv: bool = True
    #: what pip installs into the venv: this project's folder, or a requirement
    source: str | None = None
    #: a folder of wheels for an offline install (pip --no-index --find-links)
    wheelhouse: Path | None = None
    api_memory_max: str = "8G"
    batch_memory_max: str = "8G"
    python: str = sys.executable
    #: an off-box folder (a mounted share) for ``inferbox audit ship``; given: its hourly timer is enabled
    ship_dir: Path | None = None


@dataclass
class InstallReport:
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    enabled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _under(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def render_unit(
    text: str,
    *,
    prefix: Path,
    api_memory_max: str = "8G",
    batch_memory_max: str = "8G",
    ship_dir: Path = DEFAULT_SHIP_DIR,
) -> str:
    """Substitute the install paths into a unit template."""
    out = (
        text.replace("@PREFIX@", str(prefix))
        .replace("@SHIPDIR@", str(ship_dir))
        .replace("@CONFDIR@", str(CONF_DIR))
        .replace("@STATEDIR@", str(STATE_DIR))
        .replace("@API_MEMORY_MAX@", api_memory_max)
        .replace("@BATCH_MEMORY_MAX@", batch_memory_max)
    )
    leftover = sorted(set(re.findall(r"@[A-Z_]+@", out)))
    if leftover:
        raise ConfigError(f"unit template has unknown placeholders {leftover}; update appliance/install.py")
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _shown_default(f: Field) -> Any:
    derived = {
        "home": STATE_DIR,
        "repository": STATE_DIR / "models",
        "signing_key": STATE_DIR / "keys" / "signing.key",
        "public_key": CONF_DIR / "signing.key.pub",
        "ship_dir": DEFAULT_SHIP_DIR,
    }
    return derived.get(f.name, f.default)


_UNSET = {
    "public_key": "default: unset (signatures not required)",
    "ship_dir": "default: unset (`inferbox audit ship` needs it or --to; the ship unit sets it)",
}


def config_toml() -> str:
    """The documented configuration file: every setting commented out at its default."""
    lines = [
        "# inferbox configuration (TOML). Every key is commented out at its default.",
        "# Precedence: defaults < this file < INFERBOX_* environment variables < command-line flags.",
        "# Every key is also an environment variable: INFERBOX_ + the key in upper case.",
        "# `inferbox config` shows the effective value of each setting and where it came from.",
        "",
    ]
    section = None
    for f in FIELDS:
        if f.section != section:
            section = f.section
            lines += [f"[{section}]", ""]
        lines.append(f"# {f.help}")
        facts = [f"env INFERBOX_{f.name.upper()}"]
        if f.choices:
            facts.append("one of " + ", ".join(f.choices))
        if f.minimum is not None:
            facts.append(f"minimum {f.minimum:g}")
        if f.default is None:
            facts.append(_UNSET.get(f.name, "default derived"))
        lines.append("# " + "; ".join(facts))
        lines.append(f"# {f.name} = {_toml_value(_shown_default(f))}")
        lines.append("")
    return "\n".join(lines)


def _write_new(path: Path, data: bytes, mode: int, report: InstallReport) -> None:
    if path.exists():
        report.kept.append(str(path))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    report.created.append(str(path))


def _mkdir(path: Path, mode: int, report: InstallReport) -> None:
    if not path.is_dir():
        path.mkdir(parents=True, mode=mode)
        report.created.append(str(path))
    path.chmod(mode)


def _project_source() -> str:
    here = Path(__file__).resolve().parents[1]
    return str(here) if (here / "pyproject.toml").is_file() else "inferbox"


def install(
    options: InstallOptions,
    *,
    run: Callable[[Sequence[str]], Any] | None = None,
    is_root: bool | None = None,
) -> InstallReport:
    """Install as described in the module docstring; return what was done."""
    run = run or (lambda argv: subprocess.run(list(argv), check=True))
    root = options.root
    live = root.resolve() == Path("/")
    is_root = os.geteuid() == 0 if is_root is None else is_root
    report = InstallReport()

    # 1. the user: sysusers.d always; created now only on a live system as root
    sysusers = f'u {USER} - "inferbox appliance" {STATE_DIR} /usr/sbin/nologin\n'
    _write_new(_under(root, SYSUSERS), sysusers.encode(), 0o644, report)
    if live and is_root:
        if shutil.which("systemd-sysusers"):
            run(["systemd-sysusers", str(SYSUSERS)])
        else:
            try:
                pwd.getpwnam(USER)
            except KeyError:
                run(["useradd", "--system", "--home-dir", str(STATE_DIR), "--shell", "/usr/sbin/nologin", USER])
    else:
        why = "--root is given" if not live else "not running as root"
        report.notes.append(f"did not create user {USER!r} ({why}); {SYSUSERS} creates it at boot")

    # 2. directories
    state = _under(root, STATE_DIR)
    _mkdir(state, 0o700, report)
    for sub in ("models", "keys", "spool", "spool/tmp", "spool/new", "spool/cur", "outbox", "cache"):
        _mkdir(state / sub, 0o700, report)
    _mkdir(_under(root, CONF_DIR), 0o755, report)  # holds no secret; the service user reads it

    # 3. the virtual environment
    prefix = _under(root, options.prefix)
    if options.venv:
        venv = prefix / "venv"
        if not (venv / "bin" / "python").exists():
            run([options.python, "-m", "venv", str(venv)])
            report.created.append(str(venv))
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--upgrade"]
        if options.wheelhouse is not None:
            pip += ["--no-index", "--find-links", str(options.wheelhouse)]
        run([*pip, options.source or _project_source()])
    else:
        report.notes.append(
            f"did not create {prefix / 'venv'} (--no-venv); the units run {options.prefix}/venv/bin/inferbox"
        )

    # 4. configuration
    _write_new(_under(root, CONF_DIR) / "inferbox.toml", config_toml().encode(), 0o644, report)

    # 5. signing key (0600) and its public half
    key_path = state / "keys" / "signing.key"
    if key_path.exists():
        report.kept.append(str(key_path))
    else:
        from runtime.signing import generate_private_key, public_key_pem, write_private_key

        key = generate_private_key()
        write_private_key(key, key_path)
        _write_new(key_path.with_name("signing.key.pub"), public_key_pem(key).encode(), 0o644, report)
        report.created.append(str(key_path))

    # 6. units, and the docs they point to
    units = _under(root, UNIT_DIR)
    units.mkdir(parents=True, exist_ok=True)
    for name in UNITS:
        text = render_unit(
            (unit_dir() / name).read_text(),
            prefix=options.prefix,
            api_memory_max=options.api_memory_max,
            batch_memory_max=options.batch_memory_max,
            ship_dir=options.ship_dir or DEFAULT_SHIP_DIR,
        )
        target = units / name
        target.write_text(text)
        target.chmod(0o644)
        report.created.append(str(target))
    docs = Path(__file__).resolve().parents[1] / "docs"
    for doc in ("audit.md", "batch.md", "operations.md"):
        if (docs / doc).is_file():
            dest = prefix / "share" / "doc" / "inferbox" / doc
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(docs / doc, dest)

    # 7. ownership of the state folder (live system as root, the user exists)
    if live and is_root:
        try:
            entry = pwd.getpwnam(USER)
        except KeyError:
            report.notes.append(f"user {USER!r} does not exist yet; chown {STATE_DIR} after creating it")
        else:
            for dirpath, _dirs, files in os.walk(state):
                for name in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
                    os.chown(name, entry.pw_uid, entry.pw_gid)

    # 8. enable
    enable = dict(ENABLE)
    if options.ship_dir is not None:
        enable[SHIP_TIMER] = "timers.target"
    else:
        report.notes.append(
            f"{SHIP_TIMER} is not enabled: mount a folder of another machine and run install again with "
            "--ship-dir FOLDER, so the audit log is copied off the box hourly (docs/audit.md)"
        )
    if options.enable:
        if live:
            run(["systemctl", "daemon-reload"])
            run(["systemctl", "enable", *enable])
            report.enabled = list(enable)
        else:
            for unit, wanted_by in enable.items():
                wants = units / f"{wanted_by}.wants"
                wants.mkdir(exist_ok=True)
                link = wants / unit
                if not link.is_symlink():
                    link.symlink_to(UNIT_DIR / unit)
                report.enabled.append(unit)
    return report
