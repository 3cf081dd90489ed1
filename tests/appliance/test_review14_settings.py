"""Review 14: the backend setting and the queue delay are checked where settings load, the fake
backend is said loudly, and `serve --autotune --retune` times again."""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from appliance.audit.report import art30_facts
from appliance.cli import main
from appliance.commands.doctor import server_report
from appliance.settings import load_settings, retention_problem, setting_warnings
from runtime.autotune import DecisionCache
from runtime.backends.registry import BACKENDS
from runtime.errors import ConfigError
from runtime.selection import Candidate, Decision, Verdict

pytestmark = pytest.mark.usefixtures("clean_env")


def _invoke(*args: str, **env: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- 1. a backend name that is not one ------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "env", "source"),
    [
        ("", {"INFERBOX_BACKEND": "ort_cpu"}, "env INFERBOX_BACKEND"),
        ('[models]\nbackend = "ort_cpu"\n', {}, "file "),
    ],
)
def test_a_backend_that_is_not_registered_is_refused_naming_the_valid_ones(
    tmp_path: Path, toml: str, env: dict[str, str], source: str
) -> None:
    config = tmp_path / "inferbox.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"HOME": str(tmp_path), **env}, config_file=config)
    message = str(caught.value)
    assert f"backend ({source}" in message
    assert "'ort_cpu' is not a backend; use auto or one of ort-cpu, " in message
    assert all(name in message for name in BACKENDS)


@pytest.mark.parametrize("name", ["auto", *BACKENDS])
def test_auto_and_every_registered_backend_are_accepted(tmp_path: Path, name: str) -> None:
    assert load_settings({"backend": name}, environ={"HOME": str(tmp_path)}).backend == name


@pytest.mark.parametrize(
    ("command", "refused"),
    [(["serve"], 78), (["doctor"], None), (["batch", "run", "--once"], None), (["config"], None)],
    ids=["serve", "doctor", "batch", "config"],
)
def test_every_command_refuses_a_backend_typo_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str], refused: int | None
) -> None:
    home = tmp_path / "home"
    monkeypatch.setitem(sys.modules, "export.default", None)  # had serve gone on: no default model build
    env = {"INFERBOX_HOME": str(home), "INFERBOX_BACKEND": "ort_cpu", "INFERBOX_PORT": str(_free_port())}
    result = _invoke(*command, **env)
    assert result.exit_code != 0
    if refused is not None:
        assert result.exit_code == refused  # serve: EX_CONFIG, the unit does not restart
    assert "backend (env INFERBOX_BACKEND): 'ort_cpu' is not a backend; use auto or one of" in result.output
    assert "Traceback" not in result.output
    assert not home.exists()  # refused before anything was made


# -- 2. a queue delay the request timeout cannot hold ---------------------------------------------


def test_a_queue_delay_over_half_the_request_timeout_is_refused_naming_both(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "INFERBOX_MAX_QUEUE_DELAY_MS": "5000", "INFERBOX_REQUEST_TIMEOUT_S": "2"}
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=env)
    message = str(caught.value)
    assert "max_queue_delay_ms (env INFERBOX_MAX_QUEUE_DELAY_MS): 5000.0 ms" in message
    assert "request_timeout_s (env INFERBOX_REQUEST_TIMEOUT_S) = 2.0 s" in message
    assert "lower max_queue_delay_ms to at most 1000.0 or raise request_timeout_s to at least 10.0" in message


def test_a_queue_delay_of_half_the_timeout_is_accepted(tmp_path: Path) -> None:
    s = load_settings({"max_queue_delay_ms": 1000, "request_timeout_s": 2}, environ={"HOME": str(tmp_path)})
    assert (s.max_queue_delay_ms, s.request_timeout_s) == (1000.0, 2.0)
    with pytest.raises(ConfigError, match="more than half of request_timeout_s"):
        load_settings({"max_queue_delay_ms": 1000.5, "request_timeout_s": 2}, environ={"HOME": str(tmp_path)})


def test_a_retention_below_the_prune_floor_is_warned_of_naming_both(tmp_path: Path) -> None:
    """The GDPR report stated a retention of 100 days beside a floor of 183, and `audit prune` to
    the stated retention was refused.  A warning (serve, doctor, the report), not a refusal: a
    configuration that ran before must not stop every service at an upgrade."""
    settings = load_settings(environ={"HOME": str(tmp_path), "INFERBOX_RETENTION_DAYS": "100"})
    problem = retention_problem(settings)
    assert problem is not None
    assert "retention_days (env INFERBOX_RETENTION_DAYS) = 100 is below min_retention_days (default) = 183" in problem
    assert "raise retention_days to at least 183 or lower min_retention_days to at most 100" in problem
    assert server_report(settings)["warning"] == problem
    assert art30_facts(settings)["retention"]["warning"] == problem
    fine = load_settings({"retention_days": 100, "min_retention_days": 100}, environ={"HOME": str(tmp_path)})
    assert retention_problem(fine) is None and "warning" not in art30_facts(fine)["retention"]


def test_max_inputs_above_queue_limit_is_warned_of(tmp_path: Path) -> None:
    """A configuration that kept the old queue_limit (1024) with the new 2,048 inputs: requests of
    more texts than the queue holds get a 400, which serve and doctor now say at start."""
    settings = load_settings({"queue_limit": 1024}, environ={"HOME": str(tmp_path)})
    assert settings.max_inputs == 2048
    [warning] = setting_warnings(settings)
    assert "max_inputs (default) = 2048 is above queue_limit (cli) = 1024" in warning
    assert "raise queue_limit to at least 2048" in warning and server_report(settings)["warning"] == warning
    assert setting_warnings(load_settings(environ={"HOME": str(tmp_path)})) == []


# -- 3. the fake backend, 4b. retune: serve up to the models' load --------------------------------


def _serve_until_the_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str, **env: str) -> Result:
    """``inferbox serve ARGS`` in process on an empty repository with no export toolchain: it stops
    (exit 78) where the models would load, after everything serve does at start before that."""
    monkeypatch.setitem(sys.modules, "export.default", None)  # a serving-only install
    return _invoke("serve", "--home", str(tmp_path / "home"), "--port", str(_free_port()), "--no-audit", *args, **env)


def test_serve_warns_at_start_that_the_fake_backend_makes_up_its_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        result = _serve_until_the_load(tmp_path, monkeypatch, INFERBOX_BACKEND="fake")
    assert result.exit_code == 78 and "the export toolchain is not installed" in result.output
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("backend = fake (env INFERBOX_BACKEND)" in w and "made-up outputs" in w for w in warned), warned
    assert any("for tests only" in w for w in warned)


def test_doctor_flags_the_fake_backend(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    result = _invoke("doctor", "--json", INFERBOX_HOME=str(home), INFERBOX_BACKEND="fake")
    warning = json.loads(result.output)["server"]["warning"]
    assert warning is not None and "backend = fake" in warning and "for tests only" in warning
    text = _invoke("doctor", INFERBOX_HOME=str(home), INFERBOX_BACKEND="fake").output
    assert "WARNING: backend = fake (env INFERBOX_BACKEND): the fake backend answers made-up outputs" in text
    assert "backend = fake" not in _invoke("doctor", INFERBOX_HOME=str(home)).output


def _cached(home: Path) -> DecisionCache:
    cache = DecisionCache(home / "cache" / "decisions.json")
    chosen = Candidate("ort-cpu", "onnx-fp32", "fp32")
    cache.put("box:pkg:pref", Decision(chosen, (Verdict(chosen, True, "autotuned: median 1 ms", 1e3),), "autotune"))
    return cache


def test_serve_retune_forgets_the_cached_autotune_decisions_before_the_models_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _cached(tmp_path / "home")
    result = _serve_until_the_load(tmp_path, monkeypatch, "--autotune")
    assert result.exit_code == 78
    assert cache.keys() == ["box:pkg:pref"]  # without --retune the decisions are kept
    result = _serve_until_the_load(tmp_path, monkeypatch, "--autotune", "--retune")
    assert result.exit_code == 78 and "the export toolchain is not installed" in result.output
    assert cache.keys() == []


def test_retune_without_autotune_is_refused_and_keeps_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _cached(tmp_path / "home")
    result = _serve_until_the_load(tmp_path, monkeypatch, "--retune")
    assert result.exit_code == 78
    assert "--retune re-times the autotune decisions, but autotune is off (default): add --autotune" in result.output
    assert cache.keys() == ["box:pkg:pref"]


def test_a_drain_that_does_nothing_or_a_stop_longer_than_the_unit_waits_is_warned(tmp_path: Path) -> None:
    """shutdown_drain_s did nothing with several workers, and drain + timeout past the unit's
    TimeoutStopSec had systemd kill the stop before the audit log's clean-shutdown checkpoint: silently."""
    from appliance.settings import UNIT_STOP_TIMEOUT_S

    unit = (Path(__file__).resolve().parents[2] / "appliance" / "systemd" / "inferbox-api.service").read_text()
    assert f"TimeoutStopSec={UNIT_STOP_TIMEOUT_S:g}s" in unit  # the number the warning is held to
    env = {"HOME": str(tmp_path)}
    (warning,) = setting_warnings(
        load_settings(environ={**env, "INFERBOX_SHUTDOWN_DRAIN_S": "5", "INFERBOX_WORKERS": "2"})
    )
    assert "does nothing with workers = 2" in warning
    (warning,) = setting_warnings(load_settings(environ={**env, "INFERBOX_SHUTDOWN_DRAIN_S": "15"}))
    assert "= 35 s is not below the unit's TimeoutStopSec (30 s)" in warning
    assert setting_warnings(load_settings(environ={**env, "INFERBOX_SHUTDOWN_DRAIN_S": "5"})) == []
