"""``threads = 0`` is bounded by the cgroup CPU quota (``docker --cpus``, a Kubernetes CPU limit) and
divided among ``serve --workers`` processes: the cgroup reader on fake cgroup folders."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from runtime import hardware
from runtime.hardware import cgroup_cpu_limit, cpu_budget, default_threads


@pytest.fixture
def host_32c(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 32-core / 64-thread host whose affinity mask allows every CPU."""
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 64 if logical else 32)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)


def _v2(tmp_path: Path, rel: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for where, text in files.items():
        d = root / where.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(text)
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text(f"0::{rel}\n")
    return root, self_cgroup


def test_cgroup_v2_quota_in_a_container(tmp_path: Path) -> None:
    root, me = _v2(tmp_path, "/", {"/": "200000 100000\n"})
    cpus, where = cgroup_cpu_limit(root, me) or (0.0, "")
    assert cpus == 2.0
    assert where.endswith("cpu.max: 200000 100000")


def test_cgroup_v2_unlimited_and_missing_are_none(tmp_path: Path) -> None:
    root, me = _v2(tmp_path, "/", {"/": "max 100000\n"})
    assert cgroup_cpu_limit(root, me) is None
    assert cgroup_cpu_limit(tmp_path / "nothing", tmp_path / "no-self") is None
    root, me = _v2(tmp_path / "bad", "/", {"/": "garbage\n"})
    assert cgroup_cpu_limit(root, me) is None


def test_cgroup_v2_the_smallest_quota_on_the_path_applies(tmp_path: Path) -> None:
    # systemd: the service's own cgroup is unlimited, its slice allows 1.5 CPUs
    root, me = _v2(
        tmp_path,
        "/system.slice/inferbox-api.service",
        {"/": "max 100000", "/system.slice": "150000 100000", "/system.slice/inferbox-api.service": "max 100000"},
    )
    limit = cgroup_cpu_limit(root, me)
    assert limit is not None and limit[0] == 1.5
    assert "system.slice/cpu.max" in limit[1]


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    cpu = root / "cpu,cpuacct" / "docker" / "abc"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("300000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    me = tmp_path / "self_cgroup"
    me.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    limit = cgroup_cpu_limit(root, me)
    assert limit is not None and limit[0] == 3.0
    assert "cpu.cfs_quota_us: 300000" in limit[1]
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(root, me) is None


def test_the_quota_bounds_threads_rounded_up(tmp_path: Path, host_32c: None) -> None:
    root, me = _v2(tmp_path, "/", {"/": "200000 100000"})
    budget = cpu_budget(cgroup_root=root, self_cgroup=me)
    assert (budget.threads, budget.bound, budget.cgroup_cpus, budget.physical_cores) == (2, "cgroup CPU quota", 2, 32)
    assert "cgroup CPU quota" in budget.describe() and "200000 100000" in budget.describe()
    root, me = _v2(tmp_path / "b", "/", {"/": "250000 100000"})
    assert cpu_budget(cgroup_root=root, self_cgroup=me).threads == 3  # ceil(2.5)
    root, me = _v2(tmp_path / "c", "/", {"/": "50000 100000"})
    assert cpu_budget(cgroup_root=root, self_cgroup=me).threads == 1  # half a CPU is still one thread


def test_without_a_quota_physical_cores_and_affinity_bound(
    tmp_path: Path, host_32c: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = cpu_budget(cgroup_root=tmp_path / "none", self_cgroup=tmp_path / "none")
    assert (budget.threads, budget.bound, budget.cgroup_cpus) == (32, "physical cores", None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    budget = cpu_budget(cgroup_root=tmp_path / "none", self_cgroup=tmp_path / "none")
    assert (budget.threads, budget.bound) == (4, "CPU affinity")


def test_workers_share_the_cores(tmp_path: Path, host_32c: None) -> None:
    none = tmp_path / "none"
    assert cpu_budget(4, cgroup_root=none, self_cgroup=none).threads == 8
    assert "shared by 4 workers" in cpu_budget(4, cgroup_root=none, self_cgroup=none).describe()
    root, me = _v2(tmp_path, "/", {"/": "400000 100000"})
    assert cpu_budget(2, cgroup_root=root, self_cgroup=me).threads == 2
    assert cpu_budget(8, cgroup_root=root, self_cgroup=me).threads == 1  # never 0


def test_default_threads_reads_the_real_cgroup_files(
    tmp_path: Path, host_32c: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """default_threads() (what every `threads = 0` means) goes through the cgroup reader."""
    root, me = _v2(tmp_path, "/", {"/": "200000 100000"})
    real = hardware.cpu_budget

    def on_fake_files(workers: int = 1, **_: object) -> hardware.CpuBudget:
        return real(workers, cgroup_root=root, self_cgroup=me)

    monkeypatch.setattr(hardware, "cpu_budget", on_fake_files)
    assert default_threads() == 2
    assert default_threads(2) == 1
