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

The state folder belongs to the service user, who could plant links in it, so a
second run (as root) never follows a link there: every folder is opened with
``O_NOFOLLOW`` relative to its parent's descriptor, and modes and owners are set
on the open descriptor (``fchmod`` / ``fchown``); only the folders and key files
install itself manages are chowned, never a walk of what the service wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.settings import FIELDS, Field
from appliance.systemd import UNITS, unit_dir
from runtime.errors import ConfigError

__all__ = ["InstallError", "InstallOptions", "InstallReport", "config_toml", "install", "project_source", "render_unit"]

log = logging.getLogger(__name__)

USER = "inferbox"
STATE_DIR = Path("/var/lib/inferbox")
CONF_DIR = Path("/etc/inferbox")
#: the public key backups are encrypted to (``--backup-encrypt-to``)
BACKUP_PUB = CONF_DIR / "backup.pub"
UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS = Path("/usr/lib/sysusers.d/inferbox.conf")
#: unit -> the target whose .wants it is enabled in (the batch timer resumes a job a shutdown stopped:
#: the path unit starts the worker only for a new submission)
ENABLE = {
    "inferbox-api.service": "multi-user.target",
    "inferbox-batch.path": "paths.target",
    "inferbox-batch.timer": "timers.target",
    # the whole audit log verified daily: the hourly ship holds the log only to the copy it made last
    "inferbox-audit-verify.timer": "timers.target",
}
#: enabled too when an off-box folder is given (``--ship-dir``)
SHIP_TIMER = "inferbox-audit-ship.timer"
#: the ship unit's folder when none is given (the timer then stays disabled)
DEFAULT_SHIP_DIR = Path("/mnt/inferbox-audit")
#: enabled too when a backup folder is given (``--backup-dir``)
BACKUP_TIMER = "inferbox-backup.timer"
#: the backup unit's folder when none is given (the timer then stays disabled)
DEFAULT_BACKUP_DIR = Path("/mnt/inferbox-backup")
#: the state folder's sub-folders install creates (0700, owned by the service user)
STATE_SUBDIRS = ("models", "keys", "spool", "spool/tmp", "spool/new", "spool/cur", "outbox", "cache")
#: a systemd memory size (MemoryMax=): bytes with an optional K/M/G/T/P/E suffix, a percentage, or infinity
_MEMORY_SIZE = re.compile(r"(?:\d+(?:\.\d+)?[KMGTPE]?|\d+(?:\.\d+)?%|infinity)")
#: characters a path substituted into a unit must not hold (word splitting, specifiers, quoting)
_UNIT_UNSAFE = re.compile(r"[\s%$\\\"';]")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class InstallError(ConfigError):
    """``inferbox install`` cannot go on; the message names the path or option and the fix."""

    def __init__(self, message: str) -> None:
        self.problems = [message]
        Exception.__init__(self, message)


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
    #: a folder on another disk or machine for ``inferbox backup create``; given: its daily timer is enabled
    backup_dir: Path | None = None
    #: the public key (``inferbox backup keygen``'s .pub) backups are encrypted to: copied to
    #: ``/etc/inferbox/backup.pub`` and set as ``backup_encrypt_to`` in a new configuration file
    backup_encrypt_to: Path | None = None


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
    backup_dir: Path = DEFAULT_BACKUP_DIR,
) -> str:
    """Substitute the install paths into a unit template."""
    out = (
        text.replace("@PREFIX@", str(prefix))
        .replace("@SHIPDIR@", str(ship_dir))
        .replace("@BACKUPDIR@", str(backup_dir))
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


_FIELD = {f.name: f for f in FIELDS}


def _shown_default(f: Field) -> Any:
    derived = {
        "home": STATE_DIR,
        "repository": STATE_DIR / "models",
        "signing_key": STATE_DIR / "keys" / "signing.key",
        "public_key": STATE_DIR / "keys" / "signing.key.pub",
        "ship_dir": DEFAULT_SHIP_DIR,
        "backup_dir": DEFAULT_BACKUP_DIR,
        "backup_encrypt_to": BACKUP_PUB,
        "tls_cert": CONF_DIR / "tls" / "server.crt",
        "tls_key": CONF_DIR / "tls" / "server.key",
        "tls_client_ca": CONF_DIR / "tls" / "clients-ca.crt",
        "trusted_proxies": "127.0.0.1",
    }
    return derived.get(f.name, f.default)


_UNSET = {
    "public_key": "default: unset (signatures not required)",
    "ship_dir": "default: unset (`inferbox audit ship` needs it or --to; `install --ship-dir` sets it)",
    "backup_dir": "default: unset (`inferbox backup create` needs it or --to; `install --backup-dir` sets it)",
    "backup_encrypt_to": "default: unset (plain archives; `inferbox backup keygen` makes a key, "
    "`install --backup-encrypt-to` sets it)",
    "tls_cert": "default: unset (plain HTTP, refused on a non-loopback host without allow_plaintext)",
    "tls_key": "default: unset (root:inferbox, mode 0640; docs/operations.md)",
    "tls_client_ca": "default: unset (no client certificates asked for)",
    "trusted_proxies": "default: unset (no X-Forwarded-For is believed; 127.0.0.1 for a proxy on this box)",
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
        if f.maximum is not None:
            facts.append(f"maximum {f.maximum:g}")
        if f.default is None:
            facts.append(_UNSET.get(f.name, "default derived"))
        lines.append("# " + "; ".join(facts))
        lines.append(f"# {f.name} = {_toml_value(_shown_default(f))}")
        lines.append("")
    return "\n".join(lines)


#: the configuration file could not be read or parsed (:func:`_setting`)
_UNREADABLE = object()


def _setting(config: Path, section: str, key: str) -> object:
    """What the TOML file ``config`` sets ``key`` to (in ``[section]`` or at the top, as the settings
    loader reads both), None when it does not, ``_UNREADABLE`` when the file cannot be read."""
    import tomllib

    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return _UNREADABLE
    table = data.get(section, {})
    if isinstance(table, dict) and key in table:
        return table[key]
    return data.get(key)


def _backup_key_problem(source: Path, dest: Path) -> str | None:
    """Why the key at ``source`` cannot become ``dest`` (it is not a key, or ``dest`` holds another): the
    backups would go on to a key the operator meant to replace."""
    from appliance.backup.crypt import load_recipient, recipient_id
    from runtime.errors import BackupError

    try:
        given = recipient_id(load_recipient(source))
    except BackupError as exc:
        return str(exc)
    if dest.exists() or dest.is_symlink():
        try:
            there = recipient_id(load_recipient(dest))
        except BackupError:
            there = "no key it can read"
        if there != given:
            return (
                f"{dest} holds {there if there.startswith('no ') else 'the key ' + there}, not the key {given} of "
                f"{source}: remove it (sudo rm {dest}) and run install again"
            )
    return None


def _write_new(path: Path, data: bytes, mode: int, report: InstallReport) -> None:
    if path.exists():
        report.kept.append(str(path))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover (or a planted link: unlink removes the link, never its target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    report.created.append(str(path))


def _open_dir(name: str, shown: Path, mode: int, report: InstallReport, *, dir_fd: int | None = None) -> int:
    """Open the folder ``name`` (relative to ``dir_fd``), creating it with ``mode``; never through a link."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        os.mkdir(name, mode, dir_fd=dir_fd)
        report.created.append(str(shown))
        fd = _open_dir(name, shown, mode, report, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        what = "a symbolic link" if os.path.islink(shown) else "not a folder"
        raise InstallError(
            f"{shown} is {what}, where install expects a folder; install never follows links there. "
            "Check who made it (the service user can write the state folder), move it away, and run install again"
        ) from None
    return fd


def _mkdir(path: Path, mode: int, report: InstallReport, owner: tuple[int, int] | None = None) -> None:
    """``path`` as a real folder with ``mode`` (and ``owner``): a link there is refused, never followed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    parent = _parent_fd(path)
    try:
        fd = _open_dir(path.name, path, mode, report, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        _own(fd, mode, owner)
    finally:
        os.close(fd)


def _parent_fd(path: Path) -> int:
    # the folders above the state folder (/var/lib) belong to root; they are opened as they are
    return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _state_tree(state: Path, report: InstallReport, owner: tuple[int, int] | None) -> None:
    """The state folder and its sub-folders, 0700 (and owned by ``owner``), walked by descriptor, no links."""
    state.parent.mkdir(parents=True, exist_ok=True)
    parent = _parent_fd(state)
    try:
        top = _open_dir(state.name, state, 0o700, report, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        _own(top, 0o700, owner)
        for sub in STATE_SUBDIRS:
            fds = [top]
            try:
                for depth, part in enumerate(sub.split("/"), start=1):
                    shown = state.joinpath(*sub.split("/")[:depth])
                    fds.append(_open_dir(part, shown, 0o700, report, dir_fd=fds[-1]))
                _own(fds[-1], 0o700, owner)
            finally:
                for fd in fds[1:]:
                    os.close(fd)
        if owner is not None:
            for name in ("signing.key", "signing.key.pub"):
                _own_key_file(top, state, name, owner)
    finally:
        os.close(top)


def _own(fd: int, mode: int, owner: tuple[int, int] | None) -> None:
    os.fchmod(fd, mode)
    if owner is not None:
        os.fchown(fd, *owner)


def _own_key_file(top: int, state: Path, name: str, owner: tuple[int, int]) -> None:
    """Give ``keys/name`` to the service user: only a plain file with one link (not a link to elsewhere)."""
    keys = os.open("keys", _DIR_FLAGS, dir_fd=top)
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=keys)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise InstallError(
                f"{state / 'keys' / name} is a symbolic link; install never follows links in the state folder. "
                "Check who made it, move it away, and run install again"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise InstallError(
                    f"{state / 'keys' / name} is not a plain file with one link; install does not give it to "
                    f"{USER!r}. Check who made it, move it away, and run install again"
                )
            os.fchown(fd, *owner)
        finally:
            os.close(fd)
    finally:
        os.close(keys)


def _unit_lines(path: Path) -> list[str]:
    """A unit file's logical lines (a trailing backslash continues a line), comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith(("#", ";")):  # also inside a continued line, as systemd reads it
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        lines.append((pending + raw).strip())
        pending = ""
    if pending:
        lines.append(pending.strip())
    return lines


def _env_file(root: Path, spec: str) -> dict[str, str]:
    optional = spec.startswith("-")
    path = Path(spec.removeprefix("-"))
    target = _under(root, path) if path.is_absolute() else path
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        if optional:
            return {}
        raise
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        name, eq, value = line.partition("=")
        if eq:
            words = shlex.split(value) or [""]
            env[name.strip()] = words[0]
    return env


def _service_environment(root: Path, unit: str) -> tuple[dict[str, str], set[str]]:
    """The environment systemd gives ``unit``: its own and its drop-ins' ``Environment=`` lines in
    order (an empty one resets them), then its ``EnvironmentFile=`` files, which win; and the
    names whose value came from an ``Environment=`` line (systemd expands specifiers only there)."""
    units = _under(root, UNIT_DIR)
    files = [units / unit]
    folder = units / f"{unit}.d"
    if folder.is_dir():
        files += sorted(folder.glob("*.conf"))
    env: dict[str, str] = {}
    env_files: list[str] = []
    for path in files:
        if not path.is_file():
            continue
        for line in _unit_lines(path):
            key, eq, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if not eq:
                continue
            if key == "Environment":
                if not value:
                    env.clear()
                for word in shlex.split(value):
                    name, has, val = word.partition("=")
                    if has:
                        env[name] = val
            elif key == "EnvironmentFile":
                if not value:
                    env_files.clear()
                else:
                    env_files.append(value)
    from_lines = set(env)
    for spec in env_files:
        from_file = _env_file(root, spec)
        env.update(from_file)
        from_lines -= set(from_file)
    return env, from_lines


def serving_problem(root: Path) -> str | None:
    """Why ``inferbox serve`` would refuse the configuration installed under ``root`` (the API
    unit's environment, drop-ins included, and the configuration file it names), or None.  An
    upgrade that adds a refusal (plain HTTP on a network address) must say so before the service
    restarts into it.  Only what serve refuses counts: an expiring certificate is doctor's news."""
    from appliance.exposure import check_exposure
    from appliance.settings import load_settings

    def here(path: Path | None) -> Path | None:  # the files as this install sees them (--root)
        return _under(root, path) if path is not None and path.is_absolute() else path

    try:
        service_env, expanded = _service_environment(root, "inferbox-api.service")
        env = {k: v for k, v in service_env.items() if k.startswith("INFERBOX_")}
        unresolved = sorted(k for k, v in env.items() if k in expanded and "%" in v.replace("%%", ""))
        if unresolved:  # systemd specifiers (%E, %d, %h ...): what they expand to is systemd's to say
            return (
                f"install could not check the API service's configuration: {', '.join(unresolved)} use systemd "
                "specifiers; run `inferbox doctor` with the service's environment"
            )
        env = {k: v.replace("%%", "%") if k in expanded else v for k, v in env.items()}
        # the unit's StateDirectory= gives serve $STATE_DIRECTORY as its home; here, under --root
        home = here(Path(env.get("INFERBOX_HOME", str(STATE_DIR))))
        env["INFERBOX_HOME"] = str(home)
        named = env.pop("INFERBOX_CONFIG", None)
        # a file the environment names is read (a missing one is serve's refusal too); else <home>'s
        config = here(Path(named)) if named else (home / "inferbox.toml" if home is not None else None)
        if not named and config is not None and not config.is_file():
            config = None
        settings = load_settings(environ=env, config_file=config)
        settings = dataclasses.replace(
            settings,
            tls_cert=here(settings.tls_cert),
            tls_key=here(settings.tls_key),
            tls_client_ca=here(settings.tls_client_ca),
        )
        check_exposure(settings)
    except ConfigError as exc:
        return f"inferbox-api would refuse to start with this box's configuration: {exc}"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.debug("could not read the service's configuration", exc_info=True)
        return f"install could not read the API service's configuration to check it ({exc}); run `inferbox doctor`"
    return None


def project_source() -> str:
    """What pip installs when no ``--source`` is given: this source tree, else exactly this version."""
    here = Path(__file__).resolve().parents[1]
    if (here / "pyproject.toml").is_file():
        return str(here)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"inferbox=={version('inferbox')}"
    except PackageNotFoundError:
        raise InstallError(
            "cannot tell which inferbox to install into the venv (no source tree and no installed version); "
            "pass --source (a folder or a pinned requirement such as inferbox==1.2.3) or --wheelhouse DIR"
        ) from None


def _check_options(options: InstallOptions) -> None:
    if options.backup_encrypt_to is not None:  # before anything is written
        problem = _backup_key_problem(options.backup_encrypt_to, _under(options.root, BACKUP_PUB))
        if problem is not None:
            raise InstallError(f"--backup-encrypt-to: {problem}")
    for flag, value in (("--api-memory-max", options.api_memory_max), ("--batch-memory-max", options.batch_memory_max)):
        if not _MEMORY_SIZE.fullmatch(value):
            raise InstallError(
                f"{flag}: {value!r} is not a systemd memory size (MemoryMax=); use bytes with an optional "
                "K, M, G or T suffix (8G, 512M), a percentage of the RAM (50%) or infinity"
            )
    for flag, path in (
        ("--prefix", options.prefix),
        ("--ship-dir", options.ship_dir),
        ("--backup-dir", options.backup_dir),
    ):
        if path is not None and _UNIT_UNSAFE.search(str(path)):
            raise InstallError(
                f"{flag}: {str(path)!r} holds a space or one of % $ \\ \" ' ; which the systemd units "
                "cannot take in a path (ExecStart=, ReadWritePaths=); choose a path without them"
            )


def booted_with_systemd() -> bool:
    """Whether systemd runs this system (sd_booted(3): /run/systemd/system is a folder)."""
    return os.path.isdir("/run/systemd/system")


def install(
    options: InstallOptions,
    *,
    run: Callable[[Sequence[str]], Any] | None = None,
    is_root: bool | None = None,
    say: Callable[[str], None] = log.info,
) -> InstallReport:
    """Install as described in the module docstring; return what was done (``say`` tells what pip gets)."""
    run = run or (lambda argv: subprocess.run(list(argv), check=True))
    _check_options(options)
    root = options.root
    live = root.resolve() == Path("/")
    is_root = os.geteuid() == 0 if is_root is None else is_root
    if live and not is_root:
        raise InstallError(
            "installing on this system needs root: run it as root (sudo inferbox install ...), "
            "or pass --root DIR to install into a folder tree (images, tests)"
        )
    if live and options.enable and not booted_with_systemd():
        # checked before anything is written: it created the user, the folders and every unit, then
        # stopped at `systemctl daemon-reload` ("Failed to connect to bus"), half installed
        raise InstallError(
            "this system was not started by systemd (no /run/systemd/system: a container?), so the units "
            "cannot be enabled: pass --no-enable to write them without enabling, or --root DIR to install "
            "into a folder tree"
        )
    report = InstallReport()
    options = _keep_installed_folders(options, report)
    previous_umask = os.umask(0o022)  # the venv and the units must be readable by the service user
    try:
        _install(options, run, root, live, is_root, report, say)
    finally:
        os.umask(previous_umask)
    return report


#: (option, its unit, the variable the unit sets, the folder used when none is given)
_FOLDERS = (
    ("ship_dir", "inferbox-audit-ship.service", "INFERBOX_SHIP_DIR", DEFAULT_SHIP_DIR, SHIP_TIMER),
    ("backup_dir", "inferbox-backup.service", "INFERBOX_BACKUP_DIR", DEFAULT_BACKUP_DIR, BACKUP_TIMER),
)


def _keep_installed_folders(options: InstallOptions, report: InstallReport) -> InstallOptions:
    """``options`` with the ship and backup folders the installed units already name, where not given
    again: running install again (an upgrade) without ``--ship-dir`` / ``--backup-dir`` rewrote the
    units to the default folders while their timers stayed enabled."""
    kept: dict[str, Path] = {}
    for name, unit, variable, default, timer in _FOLDERS:
        if getattr(options, name) is not None:
            continue
        try:
            installed = _service_environment(options.root, unit)[0].get(variable)
        except OSError:
            continue
        enabled = (_under(options.root, UNIT_DIR) / "timers.target.wants" / timer).is_symlink()
        if installed and (Path(installed) != default or enabled):  # the default folder, given on purpose
            kept[name] = Path(installed)
            report.notes.append(
                f"kept --{name.replace('_', '-')} {installed} from the installed {unit} (give the option to change it)"
            )
    return dataclasses.replace(options, **kept) if kept else options  # type: ignore[arg-type]


def _service_owner(report: InstallReport) -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        report.notes.append(f"user {USER!r} does not exist yet; chown {STATE_DIR} after creating it")
        return None
    return entry.pw_uid, entry.pw_gid


def _off_box_note(flag: str, folder: Path, root: Path) -> str | None:
    """A warning when ``folder`` (under ``root``) is missing or on the state folder's disk: `audit
    ship` refuses a folder that is not there and `backup create` one on the box's own disk (neither
    creates it: an unmounted share must not fill the box), so the timer would fail every run."""
    where = root / folder.relative_to("/")
    if not where.is_dir():
        return (
            f"WARNING: {flag} {folder} does not exist (yet): its timer fails until a disk or share of "
            "another machine is mounted there"
        )
    state = root / STATE_DIR.relative_to("/")
    beside = state if state.exists() else root
    if os.stat(where).st_dev == os.stat(beside).st_dev:
        return (
            f"WARNING: {flag} {folder} is on the same filesystem as {STATE_DIR if state.exists() else '/'}: "
            "mount the other machine's disk or share there first; a copy on the box's own disk is lost with it "
            "(backup create refuses one)"
        )
    return None


def _install(
    options: InstallOptions,
    run: Callable[[Sequence[str]], Any],
    root: Path,
    live: bool,
    is_root: bool,
    report: InstallReport,
    say: Callable[[str], None],
) -> None:
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
        report.notes.append(f"did not create user {USER!r} (--root is given); {SYSUSERS} creates it at boot")

    # 2. directories (the state folder's owner is set in step 7, once the key is there)
    state = _under(root, STATE_DIR)
    _state_tree(state, report, None)
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
        what = options.source or project_source()
        origin = f"the wheels in {options.wheelhouse}" if options.wheelhouse is not None else "pip's configured index"
        say(f"installing {what} into {venv} from {origin}")
        run([*pip, what])
    else:
        report.notes.append(
            f"did not create {prefix / 'venv'} (--no-venv); the units run {options.prefix}/venv/bin/inferbox"
        )

    # 4. configuration (and the key backups are encrypted to: public, read by the backup unit)
    config = _under(root, CONF_DIR) / "inferbox.toml"
    text = config_toml()
    configured = _setting(config, "backup", "backup_encrypt_to") if config.exists() else None
    if options.backup_encrypt_to is not None:
        shown = f"# backup_encrypt_to = {_toml_value(BACKUP_PUB)}"
        if shown not in text:  # never a backup left plain because the template changed
            raise InstallError(f"the configuration template has no line {shown!r}: a bug in this inferbox")
        text = text.replace(shown, shown[2:])
        _write_new(_under(root, BACKUP_PUB), options.backup_encrypt_to.read_bytes(), 0o644, report)
        if configured is _UNREADABLE:
            report.notes.append(f'{config} cannot be read as TOML: fix it, and set backup_encrypt_to = "{BACKUP_PUB}"')
        elif configured != str(BACKUP_PUB) and config.exists():
            now = "sets no backup_encrypt_to" if configured is None else f"sets backup_encrypt_to = {configured!r}"
            report.notes.append(
                f'{config} is kept as it is and {now}: set backup_encrypt_to = "{BACKUP_PUB}" in its [backup] '
                "table, so that every backup (the timer's and one run by hand) is encrypted to the new key"
            )
    elif options.backup_dir is not None and configured in (None, _UNREADABLE):
        report.notes.append(
            "backups will be plain tars holding the signing key and the digest keys: make a key off the box "
            "(`inferbox backup keygen --out backup.key`) and run install again with --backup-encrypt-to backup.key.pub"
        )
    # the off-box folders in the file too, not only in their units' environment: a restore run by hand
    # caught up from no copies (revoked keys active again), and `audit report` said nothing left the box
    for name, section, folder in (
        ("ship_dir", "audit", options.ship_dir),
        ("backup_dir", "backup", options.backup_dir),
    ):
        if folder is None:
            continue
        shown = f"# {name} = {_toml_value(_shown_default(_FIELD[name]))}"
        if shown not in text:
            raise InstallError(f"the configuration template has no line {shown!r}: a bug in this inferbox")
        text = text.replace(shown, f"{name} = {_toml_value(folder)}")
        current = _setting(config, section, name) if config.exists() else None
        if config.exists() and current != str(folder):
            now = f"sets {name} = {current!r}" if isinstance(current, str) else f"sets no {name}"
            if current is _UNREADABLE:
                now = "cannot be read as TOML"
            report.notes.append(
                f'{config} is kept as it is and {now}: set {name} = "{folder}" in its [{section}] table, so '
                "that the commands run by hand (audit report, backup restore) know that folder too"
            )
    _write_new(config, text.encode(), 0o644, report)

    # 5. signing key (0600) and its public half
    key_path = state / "keys" / "signing.key"
    if key_path.is_symlink():  # a link (dangling too) is never the box's key, nor written through
        raise InstallError(
            f"{key_path} is a link (to {os.readlink(key_path)}), where the signing key belongs: move it away "
            "(a key kept elsewhere: set signing_key in inferbox.toml instead) and run install again"
        )
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
            backup_dir=options.backup_dir or DEFAULT_BACKUP_DIR,
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

    # 7. ownership of the state folder (live system as root, the user exists): the folders install
    # manages and the key files, by descriptor and never through a link (the service user writes
    # there); what the service writes is its own already. systemd's StateDirectory= does the same
    # for the folder itself at each start.
    if live and is_root:
        owner = _service_owner(report)
        if owner is not None:
            _state_tree(state, report, owner)

    # 8. the off-box folders the timers write to: said now, not by a failed timer run tonight
    for flag, folder in (("--ship-dir", options.ship_dir), ("--backup-dir", options.backup_dir)):
        if folder is not None:
            note = _off_box_note(flag, folder, root)
            if note is not None:
                report.notes.append(note)

    # 9. would the API start with the configuration already on this box (an upgrade)?
    problem = serving_problem(root)
    if problem is not None:
        report.notes.append(
            f"WARNING: {problem}; fix it before the service restarts (docs/operations.md, 'Serving the network')"
        )

    # 10. enable
    enable = dict(ENABLE)
    if options.ship_dir is not None:
        enable[SHIP_TIMER] = "timers.target"
    else:
        report.notes.append(
            f"{SHIP_TIMER} is not enabled: mount a folder of another machine and run install again with "
            "--ship-dir FOLDER, so the audit log is copied off the box hourly (docs/audit.md)"
        )
    if options.backup_dir is not None:
        enable[BACKUP_TIMER] = "timers.target"
    else:
        report.notes.append(
            f"{BACKUP_TIMER} is not enabled: mount another disk or a share and run install again with "
            "--backup-dir FOLDER, so the state is backed up daily (docs/operations.md, 'Backup and restore')"
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
