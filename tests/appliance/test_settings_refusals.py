"""Settings that would silently change behaviour are refused with the setting and its source named."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.settings import load_settings
from runtime.errors import ConfigError

# -- 4. settings that silently changed behaviour --------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[limits]\nrate_limit_per_minute = 0.5\n", {}, "rate_limit_per_minute (file"),
        ("[server]\nport = 8080.9\n", {}, "port (file"),
        ("", {"INFERBOX_PORT": "70000"}, "port (env INFERBOX_PORT): 70000 is above the maximum 65535"),
        ("", {"INFERBOX_HOST": ""}, "host (env INFERBOX_HOST): '' is not valid: must not be empty"),
        ("", {"INFERBOX_REQUEST_TIMEOUT_S": "nan"}, "request_timeout_s (env INFERBOX_REQUEST_TIMEOUT_S)"),
        ("", {"INFERBOX_CHECKPOINT_MINUTES": "inf"}, "checkpoint_minutes (env INFERBOX_CHECKPOINT_MINUTES)"),
        ("[batching]\nmax_queue_delay_ms = nan\n", {}, "max_queue_delay_ms (file"),
        ("[server]\nport = inf\n", {}, "port (file"),
    ],
)
def test_settings_refuse_values_that_would_change_behaviour(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    config = tmp_path / "inferbox.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"HOME": str(tmp_path), **env}, config_file=config)
    assert message in str(caught.value)


def test_integral_floats_and_the_port_range_edges_are_accepted(tmp_path: Path) -> None:
    config = tmp_path / "inferbox.toml"
    config.write_text("[server]\nport = 65535.0\n[limits]\nrate_limit_per_minute = 60.0\n")
    s = load_settings(environ={"HOME": str(tmp_path)}, config_file=config)
    assert (s.port, s.rate_limit_per_minute) == (65535, 60)


# -- review 13: counts past what the libraries take ---------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        (
            "",
            {"INFERBOX_THREADS": "99999999999"},
            "threads (env INFERBOX_THREADS): 99999999999 is above the maximum 1024",
        ),
        ("", {"INFERBOX_STREAMS": "2000"}, "streams (env INFERBOX_STREAMS): 2000 is above the maximum 1024"),
        ("[server]\nworkers = 1e300\n", {}, "): 1e+300 is above the maximum 256"),
        ("[audit]\nretention_days = 10000000000\n", {}, "retention_days (file"),
        ("", {"INFERBOX_MIN_RETENTION_DAYS": "1000000000"}, "min_retention_days (env"),
        ("", {"INFERBOX_DIGEST_KEY_DAYS": "1000000000"}, "digest_key_days (env"),
        ("", {"INFERBOX_CHECKPOINT_MINUTES": "1e300"}, "checkpoint_minutes (env"),
        # past what a float holds: the message itself once raised OverflowError (a traceback)
        ("", {"INFERBOX_THREADS": "9" * 400}, "threads (env INFERBOX_THREADS): 999999... (400 digits) is above"),
        (f"[models]\nstreams = -{'9' * 400}\n", {}, "-999999... (400 digits) is below the minimum 0"),
    ],
)
def test_counts_past_what_the_libraries_take_are_refused_naming_the_setting(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    config = tmp_path / "inferbox.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"HOME": str(tmp_path), **env}, config_file=config)
    assert message in str(caught.value)


def test_the_largest_counts_are_accepted(tmp_path: Path) -> None:
    s = load_settings(
        {"threads": 1024, "streams": 1024, "workers": 256, "retention_days": 36500},
        environ={"HOME": str(tmp_path)},
    )
    assert (s.threads, s.streams, s.workers, s.retention_days) == (1024, 1024, 256, 36500)
