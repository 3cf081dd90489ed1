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
