"""Settings: defaults < TOML < env < CLI, every problem at once, the default home."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from appliance.settings import FIELDS, Field, Settings, default_home, load_settings
from runtime.errors import ConfigError


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path / "user"), **extra}


def test_defaults(tmp_path: Path) -> None:
    s = load_settings(environ=env_for(tmp_path))
    home = tmp_path / "user" / ".inferbox"
    assert s.home == home
    assert s.repository == home / "models"
    assert s.signing_key == home / "keys" / "signing.key"
    assert s.public_key is None
    assert (s.host, s.port, s.auth, s.backend, s.threads) == ("127.0.0.1", 8080, True, "auto", 0)
    assert set(s.sources.values()) == {"default"}
    assert set(s.sources) == {f.name for f in FIELDS}
    assert (s.state_db, s.audit_db, s.keys_dir, s.spool, s.outbox, s.cache_dir) == (
        home / "state.db",
        home / "audit.db",
        home / "keys",
        home / "spool",
        home / "outbox",
        home / "cache",
    )
    public = s.public_dict()
    assert public["home"] == str(home)
    assert public["port"] == 8080
    assert set(public) == {f.name for f in FIELDS}


def test_every_field_is_a_settings_attribute_and_back() -> None:
    attrs = {f.name for f in Settings.__dataclass_fields__.values()} - {"sources", "config_file"}
    assert attrs == {f.name for f in FIELDS}
    for f in FIELDS:
        assert f.help, f"{f.name} has no help text"
        if f.default is not None:
            assert isinstance(f.default, f.type)


def test_precedence_defaults_file_env_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "inferbox.toml").write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[models]\nbackend = "ov-cpu"\n')
    env = env_for(tmp_path, INFERBOX_HOME=str(home))
    s = load_settings(environ=env)
    assert (s.port, s.host, s.backend, s.workers) == (9000, "0.0.0.0", "ov-cpu", 1)
    assert s.sources["port"] == f"file {home / 'inferbox.toml'}"
    assert s.sources["home"] == "env INFERBOX_HOME"
    assert s.sources["workers"] == "default"

    env["INFERBOX_PORT"] = "9001"
    s = load_settings(environ=env)
    assert (s.port, s.host) == (9001, "0.0.0.0")
    assert s.sources["port"] == "env INFERBOX_PORT"

    s = load_settings({"port": 9002, "host": None}, environ=env)
    assert (s.port, s.host) == (9002, "0.0.0.0")  # None = flag not given
    assert s.sources["port"] == "cli"


def test_cli_home_decides_where_the_file_is(tmp_path: Path) -> None:
    env_home, cli_home = tmp_path / "a", tmp_path / "b"
    for h, port in ((env_home, 1111), (cli_home, 2222)):
        h.mkdir()
        (h / "inferbox.toml").write_text(f"[server]\nport = {port}\n")
    s = load_settings({"home": cli_home}, environ=env_for(tmp_path, INFERBOX_HOME=str(env_home)))
    assert (s.home, s.port, s.repository) == (cli_home, 2222, cli_home / "models")


def test_explicit_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "elsewhere.toml"
    cfg.write_text("[batching]\nmax_batch_size = 8\n[paths]\nrepository = '/srv/models'\n")
    s = load_settings(environ=env_for(tmp_path, INFERBOX_CONFIG=str(cfg)))
    assert s.max_batch_size == 8
    assert s.repository == Path("/srv/models")
    s = load_settings(environ=env_for(tmp_path), config_file=cfg)
    assert s.max_batch_size == 8


def test_top_level_keys_are_accepted(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 7000\n")
    assert load_settings(environ=env_for(tmp_path), config_file=cfg).port == 7000


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "colour = 'blue'\n"
        "[server]\nport = 'eighty'\nauth = 'maybe'\nlog_level = 'loud'\nbogus = 1\n"
        "[models]\nhost = '::'\n"
        "[batching]\nmax_batch_size = 0\n"
    )
    env = env_for(tmp_path, INFERBOX_CONFIG=str(cfg), INFERBOX_WORKERS="many", INFERBOX_NOPE="1")
    with pytest.raises(ConfigError) as err:
        load_settings({"threads": -1, "colour": "red"}, environ=env)
    problems = err.value.problems
    expected = [
        "unknown setting 'colour'",
        "environment variable INFERBOX_NOPE is not an inferbox setting",
        f"config file {cfg}: unknown key colour",
        f"config file {cfg}: unknown key [server] bogus",
        f"config file {cfg}: host belongs in [server], not [models]",
        f"port (file {cfg}): 'eighty' is not valid",
        f"auth (file {cfg}): 'maybe' is not valid: expected true or false",
        f"log_level (file {cfg}): 'loud' is not one of debug, info, warning, error",
        f"max_batch_size (file {cfg}): 0 is below the minimum 1",
        "workers (env INFERBOX_WORKERS): 'many' is not valid",
        "threads (cli): -1 is below the minimum 0",
    ]
    for want in expected:
        assert any(want in p for p in problems), f"missing problem {want!r} in {problems}"
    assert len(problems) == len(expected)
    assert str(err.value).startswith("invalid settings:\n  - ")


def test_a_misspelt_setting_is_named_with_the_closest_one_and_a_word_for_an_integer(tmp_path: Path) -> None:
    """INFERBOX_PROT was refused without a hint, and INFERBOX_PORT=abc said "invalid literal for int()
    with base 10" (Python's words, not an operator's)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nprot = 9000\n[batching]\nmax_batch = 8\n")
    env = env_for(tmp_path, INFERBOX_CONFIG=str(cfg), INFERBOX_PROT="1", INFERBOX_PORT="abc", INFERBOX_ZZZ="1")
    with pytest.raises(ConfigError) as err:
        load_settings({"treads": 2}, environ=env)
    problems = err.value.problems
    for want in [
        "unknown setting 'treads'; did you mean threads?",
        "environment variable INFERBOX_PROT is not an inferbox setting; did you mean INFERBOX_PORT?",
        "environment variable INFERBOX_ZZZ is not an inferbox setting",  # exactly: no guess when none is close
        f"config file {cfg}: unknown key [server] prot; did you mean port?",
        f"config file {cfg}: unknown key [batching] max_batch; did you mean max_batch_size?",
        "port (env INFERBOX_PORT): 'abc' is not valid: expected a whole number",
    ]:
        assert want in problems, (want, problems)
    assert not any("int()" in p for p in problems)


@pytest.mark.parametrize(
    ("field", "raw", "message"),
    [
        ("port", True, "expected an integer"),
        ("max_queue_delay_ms", False, "expected a number"),
        ("host", 5, "expected a string"),
        ("home", "", "expected a path"),
        ("docs", 1, "expected true or false"),
        ("request_timeout_s", "0", "below the minimum 0.001"),
    ],
)
def test_bad_types(tmp_path: Path, field: str, raw: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_settings({field: raw}, environ=env_for(tmp_path))
    assert err.value.problems[0].startswith(f"{field} (cli): ")


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_settings(environ=env_for(tmp_path, INFERBOX_CONFIG=str(tmp_path / "missing.toml")))
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(environ=env_for(tmp_path), config_file=bad)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_booleans_from_the_environment(tmp_path: Path, raw: str, value: bool) -> None:
    assert load_settings(environ=env_for(tmp_path, INFERBOX_AUTH=raw)).auth is value


def test_state_directory_is_the_default_home(tmp_path: Path) -> None:
    assert default_home({"STATE_DIRECTORY": "/var/lib/inferbox:/var/lib/other", "HOME": "/root"}) == Path(
        "/var/lib/inferbox"
    )
    assert default_home({"HOME": "/home/ops"}) == Path("/home/ops/.inferbox")
    state = tmp_path / "state"
    s = load_settings(environ={"STATE_DIRECTORY": str(state), "HOME": str(tmp_path)})
    assert s.home == state
    assert s.repository == state / "models"
    # INFERBOX_HOME wins over STATE_DIRECTORY
    s = load_settings(environ={"STATE_DIRECTORY": str(state), "INFERBOX_HOME": str(tmp_path / "x")})
    assert s.home == tmp_path / "x"


def test_settings_are_immutable(tmp_path: Path) -> None:
    s = load_settings(environ=env_for(tmp_path))
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


INT_FIELDS = [f for f in FIELDS if f.type is int]


@given(field=st.sampled_from(INT_FIELDS), value=st.integers(min_value=1, max_value=2**31))
def test_env_and_cli_agree_on_integers(field: Field, value: int) -> None:
    assume(field.maximum is None or value <= field.maximum)
    name = field.name
    from_env = load_settings(environ={"HOME": "/nonexistent", f"INFERBOX_{name.upper()}": str(value)})
    from_cli = load_settings({name: value}, environ={"HOME": "/nonexistent"})
    assert getattr(from_env, name) == getattr(from_cli, name) == value


def test_relative_paths_are_made_absolute_from_the_home_in_the_file_and_from_here_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative home was kept relative: a batch job stored ``h/spool/cur/...``, and a run from another
    folder wrote its outputs there and failed the job for good; ``repository = "models"`` in the file
    named a folder of wherever a command ran (``/models`` under systemd)."""
    (tmp_path / "box" / "h").mkdir(parents=True)
    (tmp_path / "box" / "h" / "inferbox.toml").write_text('[paths]\nrepository = "models"\n')
    monkeypatch.chdir(tmp_path / "box")
    s = load_settings({"home": "h"}, environ={})
    assert s.home == tmp_path / "box" / "h"
    assert s.repository == tmp_path / "box" / "h" / "models"  # the file's: from the home
    monkeypatch.chdir(tmp_path)
    s = load_settings({"home": str(tmp_path / "box" / "h")}, environ={"INFERBOX_SHIP_DIR": "ship/../copies"})
    assert s.repository == tmp_path / "box" / "h" / "models"  # the same, run from elsewhere
    assert s.ship_dir == tmp_path / "copies"  # a variable's: from here


def test_a_home_set_in_the_config_file_is_the_base_of_the_files_other_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``home`` and ``repository = "models"`` in one file: the repository was taken from the default home."""
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "inferbox.toml"
    config.write_text(f'[paths]\nhome = "{tmp_path / "srv"}"\nrepository = "models"\n[tls]\ntls_cert = "tls/s.crt"\n')
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={"HOME": str(tmp_path / "user")}, config_file=config)
    assert (s.home, s.repository, s.tls_cert) == (
        tmp_path / "srv",
        tmp_path / "srv" / "models",
        tmp_path / "srv" / "tls" / "s.crt",
    )
    config.write_text('[paths]\nhome = "../srv"\n')  # relative in the file: from the file's folder
    assert load_settings(environ={"HOME": str(tmp_path / "user")}, config_file=config).home == tmp_path / "srv"
