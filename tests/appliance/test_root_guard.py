"""Root on a state folder another user owns: every command that touches the state says to run as
that user (``sudo inferbox keys create`` on an installed box left a root-owned journal the service
could not open), and writes nothing; commands that only read settings still run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from appliance.cli import main


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"INFERBOX_HOME": str(home)}, catch_exceptions=False)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state folder the service user ``inferbox`` owns, this process running as root."""
    home = tmp_path / "var-lib-inferbox"
    (home / "models").mkdir(parents=True)
    (home / "input.jsonl").write_text('{"id": "1", "text": "x"}\n')
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr(
        "appliance.commands.options.foreign_owner", lambda p: "inferbox" if home in (p, *p.parents) else None
    )
    return home


COMMANDS = [
    ["keys", "create", "--scope", "infer", "--name", "a"],
    ["keys", "list"],
    ["audit", "verify"],
    ["batch", "submit", "{home}/input.jsonl", "--model", "minilm"],
    ["models", "list"],
    ["backup", "create", "--to", "{tmp}", "--same-disk"],
    ["serve", "--port", "1"],
    ["doctor"],
    ["init"],
    ["signing-key", "create"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_a_command_that_touches_the_state_is_refused_with_the_line_to_run(
    served: Path, tmp_path: Path, command: list[str]
) -> None:
    before = sorted(p.relative_to(served) for p in served.rglob("*"))
    args = [a.format(home=served, tmp=tmp_path) for a in command]
    result = run(served, *args)
    assert result.exit_code == (78 if command[0] == "serve" else 2), result.output  # serve: EX_CONFIG, no restarts
    words = [w for w in command if not w.startswith("-")][:2]
    subcommand = " ".join(
        words if command[0] in ("keys", "audit", "batch", "models", "backup", "signing-key") else words[:1]
    )
    assert f"sudo -u inferbox env INFERBOX_HOME={served} " in result.stderr, result.stderr
    assert f"inferbox {subcommand} ..." in result.stderr, result.stderr
    assert sorted(p.relative_to(served) for p in served.rglob("*")) == before


def test_a_repository_another_user_owns_is_refused_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repository = tmp_path / "srv-models"
    repository.mkdir()
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("appliance.commands.options.foreign_owner", lambda p: "svc" if p == repository else None)
    result = run(tmp_path / "root-home", "models", "list", "--repository", str(repository))
    assert result.exit_code == 2 and "sudo -u svc env" in result.stderr
    result = CliRunner().invoke(
        main, ["models", "list"], env={"INFERBOX_HOME": str(tmp_path), "INFERBOX_REPOSITORY": str(repository)}
    )
    assert result.exit_code == 2 and f"INFERBOX_REPOSITORY={repository} " in result.stderr  # sudo clears env


def test_reading_the_settings_as_root_still_works(served: Path) -> None:
    result = run(served, "config")
    assert result.exit_code == 0 and str(served) in result.output
    result = run(served, "signing-key", "show")  # no key yet: the missing key is the problem, not root
    assert "sudo -u" not in result.output


def test_the_real_owner_decides_and_a_folder_not_made_yet_belongs_to_its_parents_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No stand-in for the ownership check: a folder another user owns (chowned to an unused uid when the
    tests run as root; any folder of this user's otherwise), and a home inside it that does not exist yet,
    which root would otherwise create in that user's folder."""
    import pwd

    from appliance.commands.options import foreign_owner

    service = tmp_path / "var-lib-inferbox"
    service.mkdir()
    if os.geteuid() == 0:
        os.chown(service, 4242, 4242)
    uid = service.stat().st_uid
    try:
        owner = pwd.getpwuid(uid).pw_name
        runner = f"sudo -u {owner}"
    except KeyError:
        owner = f"#{uid}"
        runner = f"sudo setpriv --reuid={uid} --regid={uid} --clear-groups"  # sudo -u refuses unknown uids
    root_home = tmp_path / "root-home"  # nothing of root's on a non-root run: only the patched euid
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert foreign_owner(service) == owner and foreign_owner(service / "sub" / "home") == owner
    result = run(service / "sub" / "home", "keys", "list")
    assert result.exit_code == 2 and f"{runner} env INFERBOX_HOME={service}/sub/home" in result.stderr
    assert not (service / "sub").exists()
    # a key written by root into that user's folder, by --out or a signing_key setting
    made = run(root_home, "signing-key", "create", "--out", str(service / "signing.key"))
    assert made.exit_code == 2, made.output  # (as root: root's state, a key into that user's folder)
    made = CliRunner().invoke(
        main,
        ["signing-key", "create"],
        env={"INFERBOX_HOME": str(root_home), "INFERBOX_SIGNING_KEY": str(service / "keys" / "k.key")},
    )
    assert made.exit_code == 2 and f"INFERBOX_SIGNING_KEY={service}/keys/k.key" in made.stderr  # sudo clears env
    assert sorted(service.iterdir()) == []
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert foreign_owner(service) is None  # not root: nothing to refuse


def test_audit_public_key_reads_the_key_as_root(served: Path) -> None:
    result = run(served, "audit", "public-key")
    assert "sudo -u" not in result.output


def _foreign(path: Path, *, link: bool = False) -> None:
    """``path`` owned by an unused uid when the tests run as root (as another user, every path of the
    test's is already that user's, so the refusals hold on both)."""
    if os.geteuid() == 0:
        os.chown(path, 4242, 4242, follow_symlinks=not link)


def test_a_folder_or_link_on_the_way_that_another_user_owns_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever owns a folder on the way can swap what is below it (a root-owned folder inside theirs), and a
    link they own can point anywhere: both count, not only the last part."""
    service = tmp_path / "svc"
    (service / "box").mkdir(parents=True)  # root's own folder, inside the service user's
    _foreign(service)
    (tmp_path / "real").mkdir()
    (tmp_path / "lnk").symlink_to(tmp_path / "real")
    _foreign(tmp_path / "lnk", link=True)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    for home in (service / "box", tmp_path / "lnk" / "home"):
        result = run(home, "keys", "list")
        assert result.exit_code == 2 and "sudo " in result.stderr, result.output
    assert list((service / "box").iterdir()) == [] and list((tmp_path / "real").iterdir()) == []


def test_the_line_to_run_survives_the_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Paths with spaces are quoted, and every INFERBOX_ variable the command read is carried (sudo clears
    them): the printed line, split as a shell splits it, runs the same command on the same files."""
    import shlex

    home = tmp_path / "state folder"
    home.mkdir()
    config = tmp_path / "conf" / "alt.toml"
    config.parent.mkdir()
    config.write_text("")
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("appliance.commands.options.foreign_owner", lambda p: "svc" if p == home else None)
    result = CliRunner().invoke(
        main, ["keys", "list"], env={"INFERBOX_HOME": str(home), "INFERBOX_CONFIG": str(config)}
    )
    assert result.exit_code == 2
    line = result.stderr.split("run it as svc: ", 1)[1].split(" ...", 1)[0]
    words = shlex.split(line)
    assert words[:4] == ["sudo", "-u", "svc", "env"]
    assert f"INFERBOX_HOME={home}" in words and f"INFERBOX_CONFIG={config}" in words
    assert words[-2:] == ["keys", "list"]


def test_an_off_box_folder_is_checked_only_by_the_commands_that_write_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A share another uid owns (NFS) as ship_dir or backup_dir does not stop commands that never write
    there; backup create --to it and audit ship are refused (root's archive or copies would land there)."""
    home, share = tmp_path / "home", tmp_path / "share"
    home.mkdir()
    share.mkdir()
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("appliance.commands.options.foreign_owner", lambda p: "svc" if p == share else None)
    env = {"INFERBOX_HOME": str(home), "INFERBOX_SHIP_DIR": str(share), "INFERBOX_BACKUP_DIR": str(share)}
    listed = CliRunner().invoke(main, ["keys", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    for command in (["backup", "create", "--same-disk"], ["backup", "create", "--to", str(share)], ["audit", "ship"]):
        result = CliRunner().invoke(main, command, env=env)
        assert result.exit_code == 2 and f"{share} belongs to svc" in result.stderr, (command, result.output)
    assert list(share.iterdir()) == []


def test_dot_dot_is_walked_as_the_kernel_walks_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``svc/sub/../../ok/state`` passes through svc: whoever owns it can swap sub for a link later."""
    service = tmp_path / "svc"
    (service / "sub").mkdir(parents=True)
    (tmp_path / "ok").mkdir()
    _foreign(service)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    from appliance.commands.options import foreign_owner

    assert foreign_owner(service / "sub" / ".." / ".." / "ok" / "state") is not None
    monkeypatch.chdir(service / "sub")
    assert foreign_owner(Path("../../ok/state")) is not None


def test_the_signing_key_itself_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's key file in a folder of root's: replaced by root, the service could not read it."""
    keys = tmp_path / "keys"
    keys.mkdir()
    key = keys / "signing.key"
    key.write_text("old")
    _foreign(key)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    made = CliRunner().invoke(
        main,
        ["signing-key", "create", "--force"],
        env={"INFERBOX_HOME": str(tmp_path / "home"), "INFERBOX_SIGNING_KEY": str(key)},
    )
    assert made.exit_code == 2 and key.read_text() == "old", made.output


def test_check_as_root_refuses_a_scratch_folder_another_user_owns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They could swap the unpack folder for a link and have the archive's keys written anywhere."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    _foreign(scratch)
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"")
    monkeypatch.setattr("os.geteuid", lambda: 0)
    result = run(tmp_path, "backup", "check", str(archive), "--scratch", str(scratch))
    assert result.exit_code == 2 and "--scratch" in result.stderr and "root owns" in result.stderr
    assert list(scratch.iterdir()) == []


def test_the_line_to_run_carries_the_arguments_typed(served: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from the installed command, the printed line is the whole command, runnable as it is."""
    import shlex

    argv = ["/usr/local/bin/inferbox", "keys", "create", "--scope", "infer", "--name", "team a"]
    monkeypatch.setattr("sys.argv", argv)
    result = run(served, *argv[1:])
    assert result.exit_code == 2
    line = result.stderr.split("run it as inferbox: ", 1)[1].strip()
    words = shlex.split(line)
    assert words[-6:] == argv[1:] and "..." not in words


def test_a_folder_of_roots_that_a_group_or_everyone_may_write_into_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root's own folder is no safer than another user's when a group (not root's) or everyone may write
    into it without the sticky bit: they can rename what root made there and put a link in its place."""
    from appliance.commands.options import open_folder

    shared = tmp_path / "shared"
    home = shared / "state"
    home.mkdir(parents=True)
    as_root = os.geteuid() == 0
    if as_root:  # root's group first: harmless while only root is in it
        os.chown(shared, -1, 0)
        shared.chmod(0o775)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("appliance.commands.options.foreign_owner", lambda p: None)  # every part is root's
    if as_root:
        assert open_folder(home) is None and run(home, "keys", "list").exit_code == 0
        monkeypatch.setattr("appliance.commands.options._root_group_shared", lambda: True)  # e.g. OpenShift's
        assert open_folder(home) == (f"group root may write into {shared}", f"chmod g-w {shared}")
        os.chown(shared, -1, 4242)  # a group not root's (as another user, the folder has that user's group)
    shared.chmod(0o755)
    assert open_folder(home) is None and run(home, "keys", "list").exit_code == 0
    shared.chmod(0o2770)  # a group's folder, as /var/local (root:staff 2775) is on Debian
    found = open_folder(home / "sub")
    assert found is not None and found[0].endswith(f"may write into {shared}") and found[1] == f"chmod g-w {shared}"
    refused = run(home, "keys", "list")
    assert refused.exit_code == 2 and f"(fix: chmod g-w {shared})" in refused.stderr, refused.output
    shared.chmod(0o757)  # everyone may write
    assert open_folder(home) == (f"everyone may write into {shared}", f"chmod o-w {shared}")
    shared.chmod(0o1777)  # as /tmp: the sticky bit keeps others from renaming root's entries
    assert open_folder(home) is None
    shared.chmod(0o755)
    assert open_folder(home) is None
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    shared.chmod(0o777)
    assert open_folder(home) is None  # not root: nothing to refuse
    shared.chmod(0o755)


def test_a_folder_whose_owner_root_cannot_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A share that maps root to nobody answers root's stat with EACCES; that let the command through."""
    from appliance.commands.options import open_folder

    share = tmp_path / "nfs"
    share.mkdir()
    real_lstat = Path.lstat

    def lstat(self: Path) -> os.stat_result:
        if self == share:
            raise PermissionError(13, "Permission denied", str(self))
        return real_lstat(self)

    monkeypatch.setattr(Path, "lstat", lstat)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("appliance.commands.options.foreign_owner", lambda p: None)
    found = open_folder(share / "state")
    assert found is not None and found[0].startswith(f"root cannot read who owns {share} (Permission denied")
    refused = run(share / "state", "keys", "list")
    assert refused.exit_code == 2 and "(fix: run the command as the user who owns the state)" in refused.stderr
    assert open_folder(tmp_path / "elsewhere" / "state") is None  # not there yet: root would make it


def test_the_line_to_run_never_repeats_a_whole_key(served: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sudo inferbox keys revoke ibx_<id>_<secret>` printed the secret back in the line to run;
    the line names the key by its id, which revoke takes as well."""
    import shlex

    key = "ibx_0123456789ab_" + "A" * 43
    argv = ["/usr/local/bin/inferbox", "keys", "revoke", key]
    monkeypatch.setattr("sys.argv", argv)
    result = run(served, *argv[1:])
    assert result.exit_code == 2 and "A" * 20 not in result.output, result.output
    line = result.stderr.split("run it as inferbox: ", 1)[1].strip()
    assert shlex.split(line)[-3:] == ["keys", "revoke", "0123456789ab"]
