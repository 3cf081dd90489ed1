"""Versions and staging: a version chosen when the package is written, races with another export,
--version checked before any work, and staging folders of exports that died removed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from export.pipeline import export_model
from export.spec import ExportSpec
from runtime.errors import ExportError, PackageError
from runtime.package import STAGING, clean_stale_staging, discard_staging, read_package, staging_dir


def _spec(src: Path, repo: Path, **kw: object) -> ExportSpec:
    return ExportSpec(
        source=src, task="tensor", name="mlp", repository=repo, timing="quick", threads=1, variants=("onnx-fp32",), **kw
    )  # type: ignore[arg-type]


def test_another_export_landing_first_takes_the_version(tmp_path: Path, tiny_onnx: Path) -> None:
    """Both exports start at version 1; the one that finishes second is written as version 2."""
    repo = tmp_path / "repo"
    other = export_model(_spec(tiny_onnx, tmp_path / "other"))
    assert other.version == 1

    def land_first(_staging: Path) -> None:  # the other export finishes while this one runs
        shutil.copytree(tmp_path / "other" / "mlp" / "1", repo / "mlp" / "1")

    manifest = export_model(_spec(tiny_onnx, repo, before_finalize=land_first))
    assert manifest.version == 2
    assert read_package(repo / "mlp" / "2").manifest == manifest
    assert read_package(repo / "mlp" / "1").manifest == other
    assert [p.name for p in (repo / STAGING).iterdir()] == []


def test_rename_race_takes_the_next_version_or_names_version(
    tmp_path: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer renames into the target between the check and os.rename."""
    repo = tmp_path / "repo"
    first = export_model(_spec(tiny_onnx, repo))
    real_rename = os.rename
    raced: list[str] = []

    def racing_rename(src: str | Path, dst: str | Path) -> None:
        if Path(src).parent.name == STAGING and not raced:  # once per export
            raced.append(str(dst))
            shutil.copytree(repo / "mlp" / str(first.version), dst)  # the other writer lands first
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", racing_rename)
    manifest = export_model(_spec(tiny_onnx, repo))
    assert manifest.version == 3  # 2 was taken during the rename
    assert read_package(repo / "mlp" / "3").manifest.version == 3
    assert raced == [str(repo / "mlp" / "2")]
    raced.clear()
    with pytest.raises(PackageError, match=r"mlp/7 appeared while writing.*--version"):
        export_model(_spec(tiny_onnx, repo, version=7))
    assert [p.name for p in (repo / STAGING).iterdir()] == []


@pytest.mark.parametrize("version", [0, -3])
def test_unusable_version_is_refused_before_any_work(tmp_path: Path, version: int) -> None:
    with pytest.raises(ExportError, match="--version N with N >= 1"):
        export_model(_spec(tmp_path / "missing.onnx", tmp_path / "repo", version=version))
    assert not (tmp_path / "repo").exists()
    from appliance.cli import main

    env = {k: None for k in os.environ if k.startswith("INFERBOX_")}
    result = CliRunner().invoke(
        main,
        ["export", str(tmp_path / "missing.onnx"), "--task", "tensor", "--name", "m", "--version", str(version)],
        env=env,
        prog_name="inferbox",
    )
    assert result.exit_code == 2 and "--version" in result.output and "Traceback" not in result.output


_DIE = """
import os, sys
from pathlib import Path
from runtime.package import staging_dir
staging = staging_dir(Path(sys.argv[1]))
(staging / "model.onnx").write_bytes(b"x" * 1024)
os._exit(9)  # killed: nothing released, nothing cleaned
"""


def test_staging_of_dead_exports_is_removed(tmp_path: Path, tiny_onnx: Path) -> None:
    repo = tmp_path / "repo"
    for _ in range(2):
        subprocess.run([sys.executable, "-c", _DIE, str(repo)], check=False, cwd=Path(__file__).parents[2])
    dead = sorted(p.name for p in (repo / STAGING).iterdir() if p.is_dir())
    assert len(dead) == 2
    live = staging_dir(repo)  # this process's: held, so never removed
    said: list[tuple[str, str]] = []
    manifest = export_model(_spec(tiny_onnx, repo), progress=lambda step, msg: said.append((step, msg)))
    assert manifest.version == 1
    assert sorted(p.name for p in (repo / STAGING).iterdir()) == sorted([live.name, live.name + ".lock"])
    (removed,) = [msg for step, msg in said if step == "staging"]
    assert "removed 2 stale staging folder(s)" in removed and all(name in removed for name in dead)
    assert clean_stale_staging(repo) == []
    discard_staging(live)
    assert list((repo / STAGING).iterdir()) == []


def test_staging_without_lock_is_removed_only_when_old(tmp_path: Path) -> None:
    """A folder an older inferbox left (no lock file): removed once untouched for a day."""
    root = tmp_path / STAGING
    old = root / "pkg-old"
    old.mkdir(parents=True)
    (old / "model.onnx").write_bytes(b"x")
    mtime = old.stat().st_mtime
    assert clean_stale_staging(tmp_path, now=mtime + 60) == []
    assert clean_stale_staging(tmp_path, now=mtime + 2 * 24 * 3600) == ["pkg-old"]
    assert not old.exists()


_DIE_WORKING = """
import os, sys
from pathlib import Path
from runtime.package import staging_dir, work_dir
staging = staging_dir(Path(sys.argv[1]))
(work_dir(staging) / "intermediate.onnx").write_bytes(b"x" * 1024)
os._exit(9)  # killed mid-export: its scratch folder was left in /tmp for ever
"""


def test_the_scratch_folder_of_a_dead_export_goes_with_its_staging(tmp_path: Path) -> None:
    from runtime.package import work_dir

    repo = tmp_path / "repo"
    subprocess.run([sys.executable, "-c", _DIE_WORKING, str(repo)], check=False, cwd=Path(__file__).parents[2])
    (dead,) = [p.name for p in (repo / STAGING).iterdir() if p.name.endswith(".work")]
    live = staging_dir(repo)
    live_work = work_dir(live)  # this process's: held, so never removed
    removed = clean_stale_staging(repo)
    assert dead in removed and not (repo / STAGING / dead).exists()
    assert live_work.is_dir() and live.is_dir()
    discard_staging(live)  # and a discarded staging takes its scratch folder with it
    assert list((repo / STAGING).iterdir()) == []
    orphan = repo / STAGING / "pkg-gone.work"  # its owner's lock is gone: the export ended or died
    orphan.mkdir()
    assert clean_stale_staging(repo) == ["pkg-gone.work"]
