"""``serve --workers N``: the supervisor's exit status and SIGHUP, as a systemd unit needs them."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

#: run_workers on a free port with settings from the environment
RUN = """
import sys
from appliance.workers import run_workers
run_workers({"host": "127.0.0.1", "port": int(sys.argv[1]), "workers": 2, "log_level": "info", "access_log": False})
"""


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, seen: bytes, deadline: float) -> bytes:
    """``seen`` and what ``proc`` writes until ``marker`` is in it; a server silent past ``deadline``
    fails the test (a blocking readline waited for ever)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, seen.decode(errors="replace")[-3000:]
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, seen.decode(errors="replace")[-3000:]  # its output closed: it ended
            seen += chunk
    return seen


def _run(tmp_path: Path, env: dict[str, str], run: str = RUN) -> subprocess.Popen[bytes]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "INFERBOX_HOME": str(tmp_path / "home"), **env}
    return subprocess.Popen(
        [sys.executable, "-c", run, "0"],  # port 0: the kernel's free port, no race with another test
        env=full,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_workers_that_cannot_start_end_the_service_with_a_failure(tmp_path: Path) -> None:
    """A worker that cannot build the app exits with uvicorn's start-up failure code (uvicorn would
    restart any other death forever); uvicorn then stops every worker, which must not read as a clean
    stop (0): Restart=on-failure would leave the service stopped."""
    proc = _run(tmp_path, {"INFERBOX_PUBLIC_KEY": str(tmp_path / "no-such-key.pem")})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out.decode(errors="replace")[-3000:]
    assert b"stopped without being asked to" in out


def test_sigterm_is_a_clean_stop_and_sighup_is_logged_not_a_restart(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    proc = _run(
        tmp_path,
        {"INFERBOX_REPOSITORY": str(tmp_path / "repo"), "INFERBOX_AUDIT": "false", "INFERBOX_AUTH": "false"},
    )
    try:
        deadline = time.monotonic() + 120
        seen = _read_until(proc, b"Application startup complete", b"", deadline)  # a worker serves
        proc.send_signal(signal.SIGHUP)
        seen = _read_until(proc, b"SIGHUP with 2 workers: ignored", seen, deadline)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (seen + rest).decode(errors="replace")[-3000:]
    assert b"restarting processes" not in seen + rest


def test_a_worker_that_cannot_load_the_tls_files_stops_the_service(
    tmp_path: Path, tls_files: Any, tls_factory: Any
) -> None:
    """Not a restart loop (uvicorn answers a worker dying with 1 by another, at once, forever)."""
    other = tls_factory()
    (tmp_path / "repo").mkdir()
    run = RUN.replace(
        '"access_log": False', '"access_log": False, "ssl_certfile": sys.argv[2], "ssl_keyfile": sys.argv[3]'
    )
    full = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "INFERBOX_HOME": str(tmp_path / "home"),
        "INFERBOX_REPOSITORY": str(tmp_path / "repo"),
        "INFERBOX_AUDIT": "false",
        "INFERBOX_AUTH": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-c", run, "0", str(tls_files.cert), str(other.key)],  # a key of another cert
        env=full,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 1, out[-3000:]
    assert "could not load the TLS certificate and key" in out and out.count("Child process") < 6
    assert "failed to start, stopping the parent process" in out  # uvicorn's reading of exit 3


def test_a_worker_that_dies_is_a_warning_naming_how(tmp_path: Path) -> None:
    """uvicorn starts another worker in a dead one's place and said so at INFO ("Child process died"):
    a worker killed again and again (out of memory) went unseen at `journalctl -p warning`."""
    import psutil

    (tmp_path / "repo").mkdir()
    proc = _run(
        tmp_path,
        {"INFERBOX_REPOSITORY": str(tmp_path / "repo"), "INFERBOX_AUDIT": "false", "INFERBOX_AUTH": "false"},
        "from runtime.logs import configure\nconfigure('info')\n" + RUN,  # serve's log format
    )
    try:
        deadline = time.monotonic() + 120
        seen = _read_until(proc, b"Application startup complete", b"", deadline)
        started = [int(p) for p in re.findall(rb"Started server process \[(\d+)\]", seen)]
        victim = next(c.pid for c in psutil.Process(proc.pid).children() if c.pid in started)
        os.kill(victim, signal.SIGKILL)
        seen = _read_until(proc, f"worker process {victim} died (killed by SIGKILL)".encode(), seen, deadline)
        assert b"WARNING" in seen.split(f"worker process {victim} died".encode())[0].rsplit(b"\n", 1)[-1]
        assert b"(1 since the service started)" in seen
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
