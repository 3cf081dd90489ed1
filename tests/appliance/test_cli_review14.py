"""Regression tests for the 14th review of the CLI (/tmp/review14): ``batch run --once --watch`` is
refused, a second ``keys revoke`` changes and records nothing, ``models pack`` of an unsigned
package prints an import line that works, and a short CSV row is rejected under its id.

Real homes, real SQLite (the audit log included), real files; the CLI in process.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from appliance.audit.log import AuditLog
from appliance.batch.readers import plan_chunks, read_chunk, record_id
from appliance.keys import KeyStore
from appliance.settings import load_settings
from tests.runtime.conftest import publish_mlp

from .conftest import run_cli

pytestmark = pytest.mark.usefixtures("clean_env")

FAKE = "appliance.batch.fake:settings_loader"


def _events(home: Path, event: str) -> list[object]:
    with AuditLog.open(load_settings({"home": home})) as log:
        return [r for r in log.tail(1000) if r.event == event]


# -- 1. batch run --once --watch -------------------------------------------------------------------


@pytest.mark.parametrize("order", [["--once", "--watch"], ["--watch", "--once"]])
def test_batch_run_refuses_once_with_watch_before_touching_anything(tmp_path: Path, order: list[str]) -> None:
    home = tmp_path / "home"
    # a loader that cannot be imported: a run that got as far as loading fails on it instead
    result = run_cli(home, "batch", "run", *order, "--loader", "no.such.module:loader")
    assert result.exit_code == 2, result.output  # old code: --watch won (a run until SIGTERM)
    assert "--once" in result.output and "--watch" in result.output and "give one" in result.output
    assert "cannot be imported" not in result.output
    assert not home.exists()  # refused before the state folder was made


def test_batch_run_once_alone_still_runs_and_exits(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "text": "hello"}\n')
    assert run_cli(home, "batch", "submit", str(src), "--model", "fake-embed").exit_code == 0
    for args in (["--once"], []):  # --once is the default
        result = run_cli(home, "batch", "run", *args, "--loader", FAKE)
        assert result.exit_code == 0, result.output
        assert result.output.startswith("accepted "), result.output


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"INFERBOX_NO_SUCH_SETTING": "1"}, "INFERBOX_NO_SUCH_SETTING"),
        ({"INFERBOX_PORT": "http"}, "port"),
        # found after the settings load (own review 14: it exited 2, after making the signing key)
        ({"INFERBOX_PUBLIC_KEY": "/nonexistent/pub.pem"}, "/nonexistent/pub.pem"),
    ],
)
def test_batch_run_refuses_its_configuration_with_the_exit_the_unit_does_not_restart(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    """A bad setting exited 2, which inferbox-batch.service restarts (a machine error) every 20 s
    until the start limit left it and its .path unit failed (review 14)."""
    from appliance.commands.options import EXIT_CONFIG

    (tmp_path / "home").mkdir()
    result = run_cli(tmp_path / "home", "batch", "run", "--once", "--loader", FAKE, **env)
    assert result.exit_code == EXIT_CONFIG == 78, result.output
    assert result.output.startswith("error: ") and named in result.output
    assert not (tmp_path / "home" / "keys" / "signing.key").exists()  # refused before anything was made
    unit = (Path(__file__).resolve().parents[2] / "appliance/systemd/inferbox-batch.service").read_text()
    assert "78" in re.findall(r"^RestartPreventExitStatus=(.*)$", unit, re.MULTILINE)[0].split()


# -- 2. keys revoke of a revoked key ---------------------------------------------------------------


def test_revoking_a_revoked_key_says_so_and_records_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert run_cli(home, "signing-key", "create").exit_code == 0
    made = json.loads(run_cli(home, "keys", "create", "--scope", "infer", "--json").stdout)
    first = run_cli(home, "keys", "revoke", made["id"])
    assert first.exit_code == 0 and first.stdout.strip() == f"revoked key {made['id']}"
    store = KeyStore(home / "state.db")
    revoked_at = store.get(made["id"]).revoked_at
    store.close()
    assert revoked_at is not None

    again = run_cli(home, "keys", "revoke", made["id"])
    assert again.exit_code == 0, again.output
    # old code: "revoked key <id>" and a second key_revoke success record
    assert again.stdout.strip() == f"key {made['id']} was already revoked at {revoked_at}; nothing changed"
    assert len(_events(home, "key_revoke")) == 1
    store = KeyStore(home / "state.db")
    assert store.get(made["id"]).revoked_at == revoked_at
    store.close()


def test_revoke_once_tells_whether_this_call_revoked(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "state.db")
    rec, _ = store.create(["infer"])
    first, changed = store.revoke_once(rec.id)
    assert changed and first.revoked_at is not None
    second, changed_again = store.revoke_once(rec.id)
    assert not changed_again and second.revoked_at == first.revoked_at
    store.close()


# -- 3. models pack of an unsigned package ---------------------------------------------------------


def _import_line(output: str) -> list[str]:
    prefix = "on the serving box: inferbox "
    (line,) = [line for line in output.splitlines() if line.startswith(prefix)]
    return shlex.split(line.removeprefix(prefix))  # old code: "<this box's ...>" is not even shell words


def test_pack_of_an_unsigned_package_prints_an_import_line_that_works(tmp_path: Path) -> None:
    build, serving = tmp_path / "build", tmp_path / "serving"
    for home in (build, serving):
        home.mkdir()
        assert run_cli(home, "signing-key", "create").exit_code == 0
    publish_mlp(build / "models", ["ort-cpu"], "raw", version=1, seed=0, signing_key=None)
    out = tmp_path / "raw-1.tar"
    packed = run_cli(build, "models", "pack", "raw", "--out", str(out))
    assert packed.exit_code == 0, packed.output
    assert "NOT signed: the serving box takes it only with --allow-unsigned" in packed.output
    args = _import_line(packed.output)
    assert args[:3] == ["models", "import", out.name] and "--allow-unsigned" in args
    assert "--publisher-key" not in args
    args[2] = str(out)  # the line names the file as it is carried: here it stays where it was written
    imported = run_cli(serving, *args)
    assert imported.exit_code == 0, imported.output
    assert "imported raw version 1" in imported.output


def test_pack_of_a_signed_package_still_names_the_publisher_key(tmp_path: Path) -> None:
    build = tmp_path / "build"
    build.mkdir()
    assert run_cli(build, "signing-key", "create").exit_code == 0
    from runtime.signing import load_private_key

    key = load_private_key(build / "keys" / "signing.key")
    publish_mlp(build / "models", ["ort-cpu"], "mlp", version=1, seed=0, signing_key=key)
    packed = run_cli(build, "models", "pack", "mlp", "--out", str(tmp_path / "mlp-1.tar"))
    assert packed.exit_code == 0, packed.output
    (line,) = [line for line in packed.output.splitlines() if line.startswith("on the serving box:")]
    assert "--publisher-key <this box's public key>" in line and "--allow-unsigned" not in line


# -- 4. a short CSV row is rejected under its id ---------------------------------------------------


def test_a_short_csv_row_is_rejected_under_its_id(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    src = tmp_path / "in.csv"
    src.write_text('id,text\n1,hello\n2,"quoted, text"\n3\n')
    job_id = run_cli(home, "batch", "submit", str(src), "--model", "fake-embed").stdout.strip()
    result = run_cli(home, "batch", "run", "--once", "--loader", FAKE)
    assert result.exit_code == 0 and "finished 1" in result.output, result.output
    rejects = [json.loads(line) for line in (home / "outbox" / job_id / "rejects.jsonl").read_text().splitlines()]
    # old code: {"index": 2, "id": 2, ...}, the index, beside the output's id "2"
    assert rejects == [
        {"index": 2, "id": "3", "reason": "row has 1 fields, the header has 2", "record": "3"},
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("id,text,extra\n7,hi\n", "7"),  # short, reaches the id column
        ("text,id\nhi\n", 0),  # short, stops before the id column: the index
        ("id,text\n7,hi,there\n", 0),  # a field too many: no column is known, the index
        ("text,label\nhi\n", 0),  # no id column at all
        ("id,text\n,\n", 0),  # an empty id is no id (as for a whole row)
    ],
)
def test_which_wrong_rows_carry_their_id(tmp_path: Path, text: str, expected: str | int) -> None:
    src = tmp_path / "in.csv"
    src.write_text(text)
    (plan,) = plan_chunks(src, "csv", 100)
    (record,) = list(read_chunk(src, "csv", plan))
    assert record_id(record) == expected
