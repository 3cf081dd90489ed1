"""Options shared by every command that touches the appliance's state."""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance.settings import Settings, load_settings

__all__ = [
    "EXIT_CONFIG",
    "build_settings",
    "existing_home",
    "foreign_owner",
    "open_folder",
    "refusal",
    "refuse_root_in_foreign_state",
    "state_options",
    "state_paths",
]

F = TypeVar("F", bound=Callable[..., Any])

#: exit status of a refused configuration (sysexits' EX_CONFIG): the units do not restart on it
EXIT_CONFIG = 78


@contextlib.contextmanager
def refusal() -> Iterator[None]:
    """A :class:`ConfigError` (what a service command refuses: its settings, files they name, a
    repository it cannot serve) ends the command with :data:`EXIT_CONFIG`, which the units do not
    restart (``RestartPreventExitStatus=78``): a restart cannot mend a configuration."""
    from runtime.errors import ConfigError

    try:
        yield
    except ConfigError as exc:
        from runtime.logs import error_prefix

        click.echo(f"{error_prefix()}error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


def state_options(func: F) -> F:
    """Add ``--home`` and ``--repository`` (override INFERBOX_HOME / INFERBOX_REPOSITORY)."""
    func = click.option(
        "--repository",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        help="Model repository [env INFERBOX_REPOSITORY; default <home>/models].",
    )(func)
    func = click.option(
        "--home",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        help="State directory [env INFERBOX_HOME; default ~/.inferbox].",
    )(func)
    return func


def build_settings(*, root_ok: bool = False, **overrides: Any) -> Settings:
    """Settings from defaults < file < env < these CLI values (None = not given).

    Run as root on a state folder (or repository) another user owns, the command is refused
    (:func:`refuse_root_in_foreign_state`) unless ``root_ok`` (it only reads settings)."""
    settings = load_settings(overrides)
    if not root_ok:
        refuse_root_in_foreign_state(settings)
    return settings


def foreign_owner(path: Path) -> str | None:
    """Run as root, a user other than root who owns ``path`` or a folder or link on the way to it (from
    ``/`` down, links not followed, then the real path's folders): whoever owns one of them can swap
    what lies below it; where ``path`` does not exist yet, what root would create lands under the
    last part that does.  Their name, or ``#uid`` without a passwd entry; None when not root, or
    root owns every part."""
    import pwd

    if os.geteuid() != 0:
        return None
    uid = next((u for walked in _both_ways(path) if (u := _first_foreign_uid(walked)) is not None), None)
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


def _both_ways(path: Path) -> tuple[Path, Path]:
    """``path`` as the kernel walks it, every part and ".." included (abspath would drop the folder
    before a ".."), and its real path (the folders its links lead through)."""
    return path if path.is_absolute() else Path.cwd() / path, Path(os.path.realpath(path))


def _walk(path: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every existing part of absolute ``path`` from ``/`` down, as the kernel walks it (links not
    followed), with its ``lstat``; it stops at the first part that is not there (root would make it
    under the parts walked). Another error (a share that maps root to nobody) is raised."""
    current = Path(path.anchor)
    for part in path.parts[1:]:
        current = current / part
        try:
            info = current.lstat()
        except (FileNotFoundError, NotADirectoryError):
            return
        yield current, info


def _first_foreign_uid(path: Path) -> int | None:
    try:
        return next((info.st_uid for _, info in _walk(path) if info.st_uid != 0), None)
    except OSError:  # not reachable: open_folder says so
        return None


def open_folder(path: Path) -> tuple[str, str] | None:
    """Run as root, what lets another user change a folder on the way to ``path`` that root owns
    (walked as :func:`foreign_owner` walks it), and its fix: a group, or everyone, may write into
    it without the sticky bit (so they can rename what root made there and put a link in its
    place), or its owner cannot be read at all. Root's own group counts only when a user other
    than root is in it. None when not root, or when there is none."""
    import grp

    if os.geteuid() != 0:
        return None
    for walked in _both_ways(path):
        try:
            for part, info in _walk(walked):
                if not stat.S_ISDIR(info.st_mode) or info.st_mode & stat.S_ISVTX:
                    continue
                quoted = shlex.quote(str(part))
                if info.st_mode & stat.S_IWOTH:
                    return f"everyone may write into {part}", f"chmod o-w {quoted}"
                if info.st_mode & stat.S_IWGRP and (info.st_gid != 0 or _root_group_shared()):
                    try:
                        group = grp.getgrgid(info.st_gid).gr_name
                    except KeyError:
                        group = f"#{info.st_gid}"
                    return f"group {group} may write into {part}", f"chmod g-w {quoted}"
        except OSError as exc:
            return (
                f"root cannot read who owns {exc.filename or walked} ({exc.strerror or exc}; a network share "
                "that maps root to nobody?)",
                "run the command as the user who owns the state",
            )
    return None


def _root_group_shared() -> bool:
    """A user other than root is in group 0 (as a member, or as their primary group)."""
    import grp
    import pwd

    try:
        if any(member != "root" for member in grp.getgrgid(0).gr_mem):
            return True
    except KeyError:
        pass
    return any(user.pw_gid == 0 and user.pw_uid != 0 for user in pwd.getpwall())


def state_paths(settings: Settings) -> list[Path]:
    """Where every command may write for this box: the state folder, the repository and the key folders
    (the folders of backups and audit copies are checked by the commands that write there)."""
    return [settings.home, settings.repository, settings.keys_dir, settings.signing_key]


def refuse_root_in_foreign_state(settings: Settings, *, also: str = "", extra: tuple[Path, ...] = ()) -> None:
    """Refuse (ConfigError naming the line to run instead) a command run as root where another user
    owns the state (:func:`state_paths`, and ``extra``: where this command writes besides), as
    ``sudo inferbox keys create`` on an installed box would be.

    Root writing there leaves databases, their journals, keys and caches the service cannot open
    (mode 0600, owned by root: the next start fails), and whoever runs as that user can replace
    the folders root works in with links to anywhere between two of its steps.  ``also``: what
    else the user must do for the command to work as the owner (``{owner}`` is filled in)."""
    from runtime.errors import ConfigError

    for path in (*state_paths(settings), *extra):
        owner = foreign_owner(path)
        if owner is not None:
            break
    else:
        for path in (*state_paths(settings), *extra):
            found = open_folder(path)
            if found is not None:
                raise ConfigError(
                    f"{found[0]}: this command runs as root and writes under {path}, and whoever can change a "
                    f"folder on the way could swap what root writes there for links (fix: {found[1]})"
                )
        return
    if path not in state_paths(settings):  # the state is root's; only where this command writes besides is not
        raise ConfigError(
            f"{path} belongs to {owner} (or a folder on the way to it does), and this command runs as root on "
            f"root's state: {owner} could swap what root writes there for links; write to a folder root owns, or "
            f"make {path} root's"
        )
    env = [f"INFERBOX_HOME={settings.home}"]
    config = settings.config_file
    if config is not None and config != settings.home / "inferbox.toml":
        env.append(f"INFERBOX_CONFIG={config}")
    for name, source in sorted(settings.sources.items()):
        if source.startswith("env INFERBOX_") and name != "home":  # sudo starts with a clean environment
            env.append(f"{source.removeprefix('env ')}={getattr(settings, name)}")
    if owner.startswith("#"):  # no passwd entry: sudo -u refuses an unknown uid by default
        uid = owner[1:]
        runner = f"sudo setpriv --reuid={uid} --regid={uid} --clear-groups"
        chown = f"{uid}:{uid}"
    else:
        runner, chown = f"sudo -u {shlex.quote(owner)}", f"{shlex.quote(owner)}:"
    line = " ".join([runner, "env", *(shlex.quote(e) for e in env), _this_command()])
    raise ConfigError(
        f"{path} belongs to {owner} (or a folder on the way to it does), and this command runs as root: what root "
        f"writes there (databases and their journals, keys, caches) the service cannot open, and folders {owner} "
        f"can write are no place for root to work in; run it as {owner}: {line}" + also.replace("{chown}", chown)
    )


def _masked(arg: str) -> str:
    """An argument with a whole API key (``keys revoke ibx_<id>_<secret>``) as its id alone: the id
    names the key to the command as well, and the line is printed for anyone to read and run."""
    from api.protocols import without_secrets

    return without_secrets(arg)


def _this_command() -> str:
    """``<venv>/bin/inferbox`` and the arguments this process was run with, quoted, so that the line runs
    as printed; where they are not known (the CLI called in-process, ``python -m appliance``), the
    subcommand and ``...`` for its arguments."""

    exe = Path(sys.executable).parent / "inferbox"
    program = str(exe) if exe.is_file() else "inferbox"
    if len(sys.argv) > 1 and Path(sys.argv[0]).name == "inferbox":
        return shlex.join([program, *(_masked(a) for a in sys.argv[1:])])
    ctx = click.get_current_context(silent=True)
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(shlex.quote(w) for w in [program, *reversed([n for n in names if n])]) + " ..."


def existing_home(settings: Settings, command: str, why: str) -> Settings:
    """``settings``, refusing a state folder that does not exist (a mistyped home, or the default
    ``~/.inferbox`` of a user who is not the service): ``why`` says where the command's data belongs."""
    from runtime.errors import ConfigError

    if not settings.home.is_dir():
        raise ConfigError(
            f"home ({settings.sources.get('home', 'default')}): there is no state folder at {settings.home}; "
            f"{why}: pass --home or set INFERBOX_HOME (on an installed box: sudo -u inferbox env "
            "INFERBOX_HOME=/var/lib/inferbox INFERBOX_CONFIG=/etc/inferbox/inferbox.toml "
            f"/opt/inferbox/venv/bin/inferbox {command} ...), or create it first with `inferbox serve` or "
            "`inferbox install`"
        )
    return settings
