"""``inferbox doctor`` says how many threads ``threads = 0`` gives and which bound decided it (the
cgroup CPU quota of a container, the affinity mask, the physical cores), shared among the workers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from appliance.cli import main
from runtime import hardware


@pytest.fixture(autouse=True)
def container_on_a_32_core_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("INFERBOX_") or key == "STATE_DIRECTORY":
            monkeypatch.delenv(key)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 64 if logical else 32)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda *a, **k: (2.0, "/sys/fs/cgroup/cpu.max: 200000 100000"))
    yield


def test_doctor_shows_the_cgroup_bound(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["doctor", "--home", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("  threads:")]
    assert "2 per process" in line
    assert "bound: cgroup CPU quota /sys/fs/cgroup/cpu.max: 200000 100000" in line
    assert "32 physical cores" in line


def test_doctor_divides_among_workers_in_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda *a, **k: None)
    monkeypatch.setenv("INFERBOX_WORKERS", "4")
    result = CliRunner().invoke(main, ["doctor", "--home", str(tmp_path), "--json"], catch_exceptions=False)
    threads = json.loads(result.output)["hardware"]["threads"]
    assert (threads["threads"], threads["workers"], threads["bound"]) == (8, 4, "physical cores")
    assert "shared by 4 workers" in threads["bound_by"]
